"""Load test: SSE parsing, per-request timing, report arithmetic, /metrics deltas, and one
short real run of the Locust driver against the real service app (tiny random target)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loadtest.prompts import BUILTIN_PROMPTS, load_prompt_mix, read_prompts_file, write_prompts_file  # noqa: E402
from loadtest.report import (build_report, compare_outputs, outputs_by_prompt, parse_metrics,  # noqa: E402
                             never_speculated, render_markdown, spec_decode_delta, summarize_run)
from loadtest.stream import RequestRecord, SSEDecoder, StreamRecorder  # noqa: E402


# --------------------------------------------------------------------------- SSE + records

def test_sse_decoder_handles_split_bytes_comments_crlf_and_multiline():
    stream = (b": keep-alive\r\n\r\n"
              b"data: {\"a\": 1}\r\n\r\n"
              b"data: line1\ndata: line2\n\n"
              b"data:[DONE]\n\n")
    # every split point must give the same payloads
    for cut in range(1, len(stream)):
        dec = SSEDecoder()
        got = list(dec.feed(stream[:cut])) + list(dec.feed(stream[cut:])) + list(dec.close())
        assert got == ['{"a": 1}', "line1\nline2", "[DONE]"], cut


def _chunk(tokens: list[int], text: str = "x", chat: bool = True) -> str:
    choice = {"index": 0, "finish_reason": None, "token_ids": tokens}
    if chat:
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    return json.dumps({"choices": [choice]})


def test_recorder_times_tokens_and_amortises_itl_over_multi_token_chunks():
    rec = RequestRecord(mode="on", api="chat", prompt_index=3, start_s=100.0)
    r = StreamRecorder(rec)
    r.on_payload(json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "token_ids": [], "finish_reason": None}]}), 100.05)
    r.on_payload(_chunk([5]), 100.2)          # first token: TTFT 0.2 s
    r.on_payload(_chunk([6, 7, 8]), 100.5)    # 3 tokens after 0.3 s: 3 ITL samples of 0.1 s
    r.on_payload(_chunk([9]), 100.6)          # 1 token after 0.1 s
    r.on_payload(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "length",
                                          "token_ids": []}]}), 100.61)
    r.on_payload(json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}), 100.62)
    r.on_payload("[DONE]", 100.8)
    assert rec.complete and rec.error is None and rec.finish_reason == "length"
    assert rec.ttft_s == pytest.approx(0.2)
    assert rec.chunk_tokens == [1, 3, 1]
    assert rec.token_ids == [5, 6, 7, 8, 9]
    assert rec.output_tokens == 5
    assert rec.itl_samples_s() == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert rec.e2e_s == pytest.approx(0.8)
    assert rec.tokens_per_s == pytest.approx(5 / 0.8)
    # a record survives the JSON round trip the Locust process -> driver uses
    back = RequestRecord.from_dict(json.loads(rec.to_json()))
    assert back == rec


def test_recorder_without_token_ids_counts_text_chunks_and_reports_errors():
    rec = RequestRecord(mode="off", api="completions", prompt_index=0, start_s=0.0)
    r = StreamRecorder(rec)
    r.on_payload(json.dumps({"choices": [{"index": 0, "text": "Hel", "finish_reason": None}]}), 0.1)
    r.on_payload(json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": None}]}), 0.15)
    r.on_payload(json.dumps({"choices": [{"index": 0, "text": "lo", "finish_reason": None}]}), 0.3)
    assert rec.chunk_tokens == [1, 1] and rec.itl_samples_s() == pytest.approx([0.2])
    r.on_payload(json.dumps({"error": {"message": "engine loop is dead", "type": "server_error"}}), 0.4)
    r.on_payload("[DONE]", 0.5)
    assert rec.error == "engine loop is dead" and not rec.complete
    assert rec.tokens_per_s is None


# --------------------------------------------------------------------------- report arithmetic

def _record(mode, idx, start, times, tokens, complete=True, error=None, ids=None):
    rec = RequestRecord(mode=mode, api="chat", prompt_index=idx, start_s=start, chunk_times_s=list(times),
                        chunk_tokens=list(tokens), end_s=times[-1] if times else 0.5, complete=complete,
                        error=error, token_ids=list(ids or []))
    if complete:
        rec.usage = {"completion_tokens": sum(tokens)}
    return rec


def test_summary_window_throughput_percentiles_and_cut_off_requests():
    records = [
        _record("on", 0, 10.0, [0.5, 1.0, 2.0], [1, 4, 2]),         # 7 tokens, ends at 12.0
        _record("on", 1, 10.5, [0.3, 0.9], [1, 2]),                 # 3 tokens, ends at 11.4
        _record("on", 2, 11.0, [0.4], [1], complete=False),         # cut off at the end: 1 token counts
        _record("on", 3, 11.2, [], [], complete=False, error="HTTP 429: busy"),
    ]
    s = summarize_run(records)
    assert (s["requests_completed"], s["requests_cut_off"], s["requests_failed"]) == (2, 1, 1)
    assert s["errors"] == ["HTTP 429: busy"]
    # window: first send 10.0 .. last byte 12.0 (the failed request ended at 11.2 + 0.5)
    assert s["window_s"] == pytest.approx(2.0)
    assert s["output_tokens"] == 11
    assert s["output_tokens_per_s"] == pytest.approx(5.5)
    assert s["requests_per_s"] == pytest.approx(1.0)
    # TTFT samples 500, 300, 400 ms -> p50 400; linear interpolation for p95
    assert s["ttft_ms_p50"] == pytest.approx(400.0)
    assert s["ttft_ms_p95"] == pytest.approx(490.0)
    # ITL samples: request 0: 4 x 125 ms, 2 x 500 ms; request 1: 2 x 300 ms
    itl = sorted([125.0] * 4 + [500.0] * 2 + [300.0] * 2)
    assert s["itl_ms_p50"] == pytest.approx((itl[3] + itl[4]) / 2)
    assert s["itl_ms_mean"] == pytest.approx(sum(itl) / len(itl))
    # per-request tokens/s: 7/2.0 and 3/0.9
    assert s["request_tokens_per_s_p50"] == pytest.approx((3.5 + 3 / 0.9) / 2)


def test_report_speedup_and_lossless_comparison():
    on = [_record("on", 0, 0.0, [0.1, 0.2], [1, 3], ids=[1, 2, 3, 4]),
          _record("on", 1, 0.0, [0.1, 0.2], [1, 3], ids=[5, 6, 7, 8])]
    off = [_record("off", 0, 0.0, [0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], ids=[1, 2, 3, 4]),
           _record("off", 1, 0.0, [0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], ids=[5, 6, 7, 9])]
    assert compare_outputs(outputs_by_prompt(on), outputs_by_prompt(off)) == {"compared": 2, "identical": 1}
    runs = [{"concurrency": 2, "mode": m, "client": summarize_run(recs), "server": {"acceptance_length": 2.5},
             "outputs": outputs_by_prompt(recs)} for m, recs in (("on", on), ("off", off))]
    report = build_report({"command": "x"}, runs)
    row = report["speedup"][0]
    assert row["output_tokens_per_s_on"] == pytest.approx(8 / 0.2)
    assert row["output_tokens_per_s_off"] == pytest.approx(8 / 0.4)
    assert row["speedup"] == pytest.approx(2.0)
    assert row["same_output"] == {"compared": 2, "identical": 1}
    assert all("outputs" not in r for r in report["runs"])
    md = render_markdown(report)
    assert "| 2 | 40.0 | 20.0 | 2.00x | 1/2 |" in md
    json.dumps(report)  # the report is plain JSON


def test_report_over_reps_takes_medians_and_keeps_each_reps_ratio():
    """--reps: several runs of each mode per concurrency -> the speedup is the ratio of the
    medians, `rep_speedups` each rep's own on/off ratio, and `same_output` adds up every rep
    that ran both modes."""
    def recs(mode, dt, last_id):   # 2 prompts x 4 tokens over dt seconds
        return [_record(mode, 0, 0.0, [dt / 2, dt], [2, 2], ids=[1, 2, 3, 4]),
                _record(mode, 1, 0.0, [dt / 2, dt], [2, 2], ids=[5, 6, 7, last_id])]
    runs = []
    for rep, (dt_on, dt_off, last_off) in enumerate([(0.2, 0.4, 8), (0.4, 0.4, 9), (0.25, 0.5, 8)], 1):
        for mode, dt, last in (("on", dt_on, 8), ("off", dt_off, last_off)):
            r = recs(mode, dt, last)
            runs.append({"concurrency": 4, "mode": mode, "rep": rep, "client": summarize_run(r),
                         "server": {"acceptance_length": 2.0 + rep}, "outputs": outputs_by_prompt(r)})
    report = build_report({"command": "x", "reps": 3}, runs)
    row = report["speedup"][0]
    # on: 40, 20, 32 tok/s -> median 32; off: 20, 20, 16 -> median 20
    assert row["output_tokens_per_s_on"] == pytest.approx(32.0)
    assert row["output_tokens_per_s_off"] == pytest.approx(20.0)
    assert row["speedup"] == pytest.approx(1.6)
    assert row["rep_speedups"] == pytest.approx([2.0, 1.0, 2.0])
    assert row["acceptance_length_on"] == pytest.approx(4.0)
    assert row["same_output"] == {"compared": 6, "identical": 5}   # rep 2's second prompt differs
    md = render_markdown(report)
    assert "| 4 | 32.0 | 20.0 | 1.60x | 2.00, 1.00, 2.00 | 5/6 |" in md
    assert "| 4 | on (rep 2) |" in md and "medians over the reps" in md
    json.dumps(report)
    # one rep: the figures as measured, the table without a per-rep column
    one = build_report({"command": "x"}, [dict(r) for r in runs if r["rep"] == 1])
    assert one["speedup"][0]["speedup"] == pytest.approx(2.0) and one["speedup"][0]["rep_speedups"] == [2.0]
    assert "| 4 | 40.0 | 20.0 | 2.00x | 2/2 |" in render_markdown(one)


def test_report_says_when_speculation_never_ran():
    recs = [_record("on", 0, 0.0, [0.1, 0.2], [1, 1], ids=[1, 2])]
    runs = [{"concurrency": c, "mode": m, "client": summarize_run(recs), "server": {"num_drafts": n}}
            for c, m, n in ((1, "on", 5), (4, "on", 0), (4, "off", 0))]
    report = build_report({"command": "x"}, runs)
    assert never_speculated(report) == [4]
    assert "**Speculation never ran** in the 'on' runs at concurrency 4" in render_markdown(report)
    report["runs"][1]["server"]["num_drafts"] = 3
    assert never_speculated(report) == [] and "never ran" not in render_markdown(report)


def test_metrics_delta_from_the_service_registry():
    """Scrapes of the service's own metrics registry before and after some verify steps."""
    from service.metrics import ServiceMetrics

    m = ServiceMetrics("m", max_slots=4)
    m.on_spec(drafts=3, draft_tokens=45, accepted_tokens=9, accepted_per_pos=[3, 2, 2, 1, 1])
    before = parse_metrics(m.render().decode())
    m.on_spec(drafts=2, draft_tokens=30, accepted_tokens=6, accepted_per_pos=[2, 2, 1, 1])
    m.on_spec(drafts=2, draft_tokens=14, accepted_tokens=2, accepted_per_pos=[2])
    after = parse_metrics(m.render().decode())
    d = spec_decode_delta(before, after)
    assert (d["num_drafts"], d["num_draft_tokens"], d["num_accepted_tokens"]) == (4, 44, 8)
    assert d["acceptance_length"] == pytest.approx(1 + 8 / 4)
    assert d["draft_acceptance_rate"] == pytest.approx(8 / 44)
    assert d["acceptance_rate_per_position"] == pytest.approx([4 / 4, 2 / 4, 1 / 4, 1 / 4, 0.0])
    # no verify steps between two scrapes: no acceptance length
    assert spec_decode_delta(after, after)["acceptance_length"] is None


def test_prompt_mix_is_deterministic_and_round_trips(tmp_path):
    a, src = load_prompt_mix("builtin", num_prompts=20, seed=1)
    b, _ = load_prompt_mix("builtin", num_prompts=20, seed=1)
    assert a == b and src == "builtin" and set(a) == set(BUILTIN_PROMPTS)
    path = tmp_path / "p.json"
    write_prompts_file(path, a, src)
    assert read_prompts_file(path) == (a, src)
    with pytest.raises(ValueError, match="prompt source"):
        load_prompt_mix("nope")


# --------------------------------------------------------------------------- real run

@pytest.fixture(scope="module")
def tiny_server():
    """The real service app (service/app.py) on a tiny random target, in this process."""
    from service.config import ServiceConfig
    from service.local import LocalServer

    cfg = ServiceConfig(target="tiny-random", drafter="random", max_slots=4, max_seq_len=512, block_size=8,
                        block_size_schedule=None)
    with LocalServer(cfg) as srv:
        yield srv.url, cfg.served_model_name


def test_driver_runs_locust_on_and_off_against_the_real_service(tiny_server, tmp_path):
    host, model = tiny_server
    out = tmp_path / "lt"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--host", host, "--concurrency", "2", "--duration", "4s",
         "--max-tokens", "12", "--prompt-source", "builtin", "--num-prompts", "8", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["model"] == model
    runs = {r["mode"]: r for r in report["runs"]}
    assert set(runs) == {"on", "off"}
    for mode, run in runs.items():
        c = run["client"]
        assert c["requests_completed"] > 0 and c["requests_failed"] == 0, (mode, c)
        assert c["output_tokens_per_s"] > 0 and c["ttft_ms_p50"] > 0 and c["itl_ms_p50"] >= 0
    # the "speculative" switch reached the engine: drafts only with speculation on
    assert runs["on"]["server"]["num_drafts"] > 0
    assert runs["on"]["server"]["acceptance_length"] >= 1.0
    assert runs["off"]["server"]["num_drafts"] == 0
    # greedy decoding is lossless: the same prompt gives the same tokens on and off
    same = report["speedup"][0]["same_output"]
    assert same["compared"] > 0 and same["identical"] == same["compared"]
    # per-request records: streamed token ids add up to the usage the server reported
    for mode in ("on", "off"):
        lines = (out / f"c2_{mode}_records.jsonl").read_text().splitlines()
        recs = [RequestRecord.from_dict(json.loads(x)) for x in lines]
        done = [r for r in recs if r.complete]
        assert done and all(sum(r.chunk_tokens) == r.usage["completion_tokens"] == len(r.token_ids) for r in done)
        assert all(r.mode == mode for r in recs)
    md = (out / "report.md").read_text()
    assert "| 2 | on |" in md and "Speculation never ran" not in md
    assert report["plot"] == "report.png" and (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.strip().splitlines()[-1].startswith('{"speedup"')


def test_driver_reps_alternate_the_order_and_report_medians(tiny_server, tmp_path):
    """--reps 2: each mode runs twice per level, rep 2 in the reverse order, each run in
    its own record files; the report keeps all four runs and the ratio of the medians."""
    host, _ = tiny_server
    out = tmp_path / "lt"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--host", host, "--concurrency", "2", "--duration", "2s",
         "--max-tokens", "8", "--prompt-source", "builtin", "--num-prompts", "4", "--reps", "2",
         "--no-warmup", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    order = [line.split(":")[0].split()[-3:] for line in proc.stderr.splitlines() if line.startswith("concurrency")]
    assert order == [["on", "rep", "1"], ["off", "rep", "1"], ["off", "rep", "2"], ["on", "rep", "2"]]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["reps"] == 2
    assert sorted((r["mode"], r["rep"]) for r in report["runs"]) == [("off", 1), ("off", 2), ("on", 1), ("on", 2)]
    for mode in ("on", "off"):
        for rep in (1, 2):
            assert (out / f"c2_{mode}_r{rep}_records.jsonl").read_text().strip()
    row = report["speedup"][0]
    tps = {m: sorted(r["client"]["output_tokens_per_s"] for r in report["runs"] if r["mode"] == m)
           for m in ("on", "off")}
    assert row["output_tokens_per_s_on"] == pytest.approx(sum(tps["on"]) / 2)
    assert row["speedup"] == pytest.approx(sum(tps["on"]) / sum(tps["off"]))
    assert len(row["rep_speedups"]) == 2
    assert row["same_output"]["compared"] > 0 and row["same_output"]["identical"] == row["same_output"]["compared"]


def test_driver_reports_an_unreachable_server_in_one_line(tmp_path):
    from service.local import free_port

    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--host", f"http://127.0.0.1:{free_port()}",
         "--server-timeout-s", "1", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no healthy server at") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "loadtest.run", "--concurrency", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --concurrency levels must be >= 1, got '0'"]
    proc = subprocess.run([sys.executable, "-m", "loadtest.run", "--reps", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: --reps must be >= 1, got 0"]
