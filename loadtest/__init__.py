"""Load testing for the OpenAI-compatible dflash service.

- `loadtest/locustfile.py`: Locust users that stream chat or text completions and
  record, per request, the arrival time and token count of every streamed chunk.
- `loadtest/run.py`: the driver; runs Locust headless with speculation on and then off
  at several concurrency levels against one running server and writes a report.
- `loadtest/stream.py`: SSE parsing and the per-request record (pure, no I/O).
- `loadtest/report.py`: summaries, /metrics deltas, the markdown/JSON report (pure).
- `loadtest/prompts.py`: the prompt mix (ShareGPT holdout, or built-in prompts).
"""
