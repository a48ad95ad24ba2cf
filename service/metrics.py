"""Prometheus metrics of one server: one `CollectorRegistry` per `ServiceMetrics`.

Contract: the scheduler reports what happened (a request queued, admitted, got tokens,
finished; an engine step ran) and this module turns it into counters, histograms and
gauges; `/metrics` renders `render()`. Nothing here reads the engine directly.

Speculative-decoding counters follow vLLM's names with a `dflash_` prefix:
`dflash_spec_decode_num_drafts_total` (target forwards that verified drafts),
`..._num_draft_tokens_total`, `..._num_accepted_tokens_total` and
`..._num_accepted_tokens_per_pos_total{position}` (position k = 0-based draft index).
`..._num_lookup_accepted_tokens_total` counts the accepted drafts that were nodes of a
lookup branch (dflash_core/lookup.py; a node the drafter proposed too counts).
Their sums over requests equal the sums of the usage objects returned to clients.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets in seconds: CPU steps are ~50-500 ms, GPU steps ~5-50 ms.
_TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 60.0)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _WithLabels:
    """A registry view whose every sample carries extra labels (the replica's id)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]):
        self.registry, self.labels = registry, labels

    def collect(self):
        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(s.name, {**s.labels, **self.labels}, s.value, s.timestamp, s.exemplar)
            yield out


class ServiceMetrics:
    def __init__(self, model_name: str = "", max_slots: int = 0, registry: CollectorRegistry | None = None,
                 replica_id: str | None = None):
        """replica_id: added as the `replica` label to every sample (several Serve replicas
        behind one proxy answer /metrics in turn; the label keeps their series apart)."""
        r = self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        self.replica_id = replica_id
        # speculative decoding
        self.num_drafts = Counter("dflash_spec_decode_num_drafts", "Target forwards that verified a drafted block",
                                  registry=r)
        self.num_draft_tokens = Counter("dflash_spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.num_accepted_tokens = Counter("dflash_spec_decode_num_accepted_tokens", "Draft tokens accepted",
                                           registry=r)
        self.lookup_accepted = Counter("dflash_spec_decode_num_lookup_accepted_tokens",
                                       "Draft tokens accepted at nodes of a lookup branch (dflash_core/lookup.py; "
                                       "a node the drafter proposed too counts)", registry=r)
        self.accepted_per_pos = Counter("dflash_spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each draft position (0-based)",
                                        ["position"], registry=r)
        # tokens and requests
        self.prompt_tokens = Counter("dflash_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("dflash_generation_tokens", "Tokens returned to clients", registry=r)
        self.requests = Counter("dflash_requests", "HTTP requests to /v1/* by status code", ["status"], registry=r)
        self.finished = Counter("dflash_request_finished", "Generation requests finished, by finish reason",
                                ["finish_reason"], registry=r)
        # latencies
        self.ttft_s = Histogram("dflash_time_to_first_token_seconds", "Arrival to first token",
                                buckets=_TTFT_BUCKETS_S, registry=r)
        self.itl_s = Histogram("dflash_inter_token_latency_seconds",
                               "Gap between outputs divided by the tokens it delivered (observed once per token)",
                               buckets=_ITL_BUCKETS_S, registry=r)
        self.chunk_s = Histogram("dflash_inter_chunk_latency_seconds", "Gap between two outputs (streamed chunks)",
                                 buckets=_ITL_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("dflash_e2e_request_latency_seconds", "Arrival to finish",
                               buckets=_E2E_BUCKETS_S, registry=r)
        self.queue_s = Histogram("dflash_request_queue_time_seconds", "Arrival to admission into the engine",
                                 buckets=_TTFT_BUCKETS_S, registry=r)
        # state
        self.running = Gauge("dflash_num_requests_running", "Requests holding an engine slot", registry=r)
        self.waiting = Gauge("dflash_num_requests_waiting", "Requests queued for a slot", registry=r)
        self.slots_in_use = Gauge("dflash_slots_in_use", "Engine KV-cache slots in use", registry=r)
        self.slots_total = Gauge("dflash_slots_total", "Engine KV-cache slots", registry=r)
        self.block_size = Gauge("dflash_spec_decode_block_size", "Verified block size picked for the running batch",
                                registry=r)
        self.drafter_link_up = Gauge("dflash_drafter_link_up",
                                     "Disaggregated placement: 1 while the remote drafter answers, 0 while "
                                     "the target decodes without drafts (degraded); always 1 when colocated",
                                     registry=r)
        self.drafter_link_up.set(1)
        self.drafter_wire_bytes = Counter("dflash_drafter_wire_bytes",
                                          "Disaggregated placement: bytes between target and drafter",
                                          ["direction"], registry=r)
        self._totals_seen: dict[str, float] = {}   # running totals reported so far (on_drafter_link)
        self.drafter_failed_steps = Counter("dflash_drafter_failed_steps",
                                            "Draft steps the remote drafter did not answer", registry=r)
        self.engine_alive = Gauge("dflash_engine_alive", "1 while the engine loop runs", registry=r)
        self.slots_total.set(max_slots)

    # ---- events from the scheduler (called on the engine-loop thread) ----------------
    def on_admitted(self, queue_s: float, num_prompt_tokens: int) -> None:
        self.queue_s.observe(queue_s)
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft_s.observe(ttft_s)

    def on_tokens(self, gap_s: float, num_tokens: int) -> None:
        """A later output (not the first) delivering num_tokens after gap_s."""
        if num_tokens <= 0:
            return
        self.chunk_s.observe(gap_s)
        per_token = gap_s / num_tokens
        for _ in range(num_tokens):
            self.itl_s.observe(per_token)

    def on_spec(self, drafts: int, draft_tokens: int, accepted_tokens: int, accepted_per_pos: list[int],
                lookup_accepted: int = 0) -> None:
        if lookup_accepted:
            self.lookup_accepted.inc(lookup_accepted)
        if drafts:
            self.num_drafts.inc(drafts)
        if draft_tokens:
            self.num_draft_tokens.inc(draft_tokens)
        if accepted_tokens:
            self.num_accepted_tokens.inc(accepted_tokens)
        for k, n in enumerate(accepted_per_pos):
            if n:
                self.accepted_per_pos.labels(position=str(k)).inc(n)

    def on_finished(self, finish_reason: str, e2e_s: float, num_generated_tokens: int) -> None:
        self.finished.labels(finish_reason=finish_reason).inc()
        self.e2e_s.observe(e2e_s)
        self.generation_tokens.inc(num_generated_tokens)

    def on_state(self, running: int, waiting: int, slots_in_use: int, block_size: int, alive: bool) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.slots_in_use.set(slots_in_use)
        self.block_size.set(block_size)
        self.engine_alive.set(1 if alive else 0)

    def on_drafter_link(self, up: bool, num_failed_steps: int, bytes_sent: int = 0, bytes_received: int = 0) -> None:
        """The remote backend's running totals; counters advance by what is new."""
        self.drafter_link_up.set(1 if up else 0)
        for key, counter, total in (("failed", self.drafter_failed_steps, num_failed_steps),
                                    ("sent", self.drafter_wire_bytes.labels(direction="sent"), bytes_sent),
                                    ("received", self.drafter_wire_bytes.labels(direction="received"),
                                     bytes_received)):
            new = total - self._totals_seen.get(key, 0)
            if new > 0:
                counter.inc(new)
                self._totals_seen[key] = total

    # ---- HTTP side -------------------------------------------------------------------
    def on_http(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def render(self) -> bytes:
        if self.replica_id:
            return generate_latest(_WithLabels(self.registry, {"replica": self.replica_id}))
        return generate_latest(self.registry)
