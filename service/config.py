"""Service configuration: one dataclass shared by the CLI, `deploy/serve.yaml` and tests.

Unknown keys are rejected by name (`ServiceConfig.from_dict`), bad values raise
`ValueError` with a message a user can act on.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from dflash_core.engine import (DEFAULT_BLOCK_SIZE_SCHEDULE, FP32_BLOCK_SIZE_SCHEDULE,  # noqa: F401
                                auto_block_size_schedule, check_draft_threshold, check_kv_cache_dtype,
                                parse_block_size_schedule)
from dflash_core.native import AMX_INPUTS

PLACEMENTS = ("colocated", "disaggregated")


# the named block-size schedules (ServiceConfig.block_size_schedule)
SCHEDULE_MODES = ("auto", "measure", "table")


@dataclass
class ServiceConfig:
    # what to serve
    target: str = "default"
    drafter: str | None = "default"
    # the drafter's weights: auto (rounded onto the native kernel's 8-bit grid where it runs
    # an fp32 drafter, else as stored) | stored | q8_0 (dflash_core.api.load_drafter)
    drafter_weights: str = "auto"
    served_model_name: str | None = None  # default: "dflash-<target name>"
    device: str = "cpu"
    dtype: str = "auto"  # auto (bf16 on CUDA; fp32 on CPUs where the native kernels build, else bf16 on AMX/AVX512-BF16, else fp32) | float32 | bfloat16 | float16
    placement: str = "colocated"
    # engine
    max_slots: int = 8
    max_seq_len: int = 2048
    block_size: int = 16
    # "auto": measured at start-up on this machine (dflash_core.autoschedule: the engine's
    # step times x the drafter's acceptance profile) where the colocated drafter's folder has
    # one (acceptance.json; the shipped drafter's does), else "table";
    # "measure": the same, and an error where it cannot be measured;
    # "table": DEFAULT_BLOCK_SIZE_SCHEDULE where the engine runs in bf16/fp16 (GPUs; AMX or
    # AVX512-BF16 CPUs without the native kernels), FP32_BLOCK_SIZE_SCHEDULE in fp32 (block 2
    # at 1 running request, plain decoding beyond, as measured on 2-core EPYCs);
    # pairs "1:4,inf:1"; None: always block_size
    block_size_schedule: list[tuple[int, int]] | str | None = "auto"
    max_prefill_tokens: int = 512  # prompt tokens prefilled per engine step (longer prompts: in chunks)
    # dynamic draft length (EngineConfig.draft_threshold): a request verifies only the drafts
    # whose running product of drafter confidences stays >= this; 0 = the whole block
    draft_threshold: float = 0.0
    # tree verification (EngineConfig.draft_tree): requests verify trees of b - 1 nodes in
    # the same b target rows instead of chains (greedy: the drafter's most likely paths;
    # sampling: the sampled drafts plus extra children for residual draws); where the native
    # fp32 layers run the target (CPU), else chains. Greedy output unchanged, sampled output
    # distributed as before
    draft_tree: bool = True
    # lookup branches (EngineConfig.draft_lookup): requests' trees also verify what
    # followed their last tokens where those occurred before in the prompt or the output
    # (dflash_core/lookup.py); where trees run. Greedy output unchanged, sampled output
    # distributed as before
    draft_lookup: bool = True
    # corpus branches (EngineConfig.draft_corpus): greedy trees with lookup branches are
    # planned best-first by path probability, with an index of the target's own responses
    # (dflash_core/corpus.py): "auto" (the drafter folder's corpus.npz where it has one),
    # "none", or an index file (dflash corpus). Greedy output unchanged
    draft_corpus: str = "auto"
    # where the CPU has AMX-BF16 (Intel Xeon Sapphire Rapids and later), the native fp32
    # kernel runs the 4-bit / 8-bit linears on AMX tiles (the same fp32 product, row-invariant;
    # measured 1.2-1.8x the served tokens/s of its AVX-512 FMA form on a 2-core Xeon); false
    # keeps the FMA form. No effect elsewhere.
    native_amx: bool = True
    # what those AMX linears take as input: "bf16" (each input rounded to bf16 first: a third
    # of the tile products, so verify blocks and prefills cost less; the target then computes
    # W @ bf16(x) at its quantised linears, in every mode alike, so speculation stays lossless
    # against it; default target: 99.7% of next tokens as the exact fp32 model's, KL 7e-5,
    # docs/BENCHMARKS.md); with it the attention runs on AMX tiles too (bf16 q, k, p, v, fp32
    # sums: 99.3% of next tokens as the fp32 attention's, KL 1.7e-4), and an "auto" KV cache
    # stores bf16 (the same numbers at half the bytes); or "fp32" (exact: the same fp32
    # linear and attention). No effect without AMX.
    amx_inputs: str = "bf16"
    # with bf16 inputs on AMX: the attention on AMX tiles too (true, the default) or in fp32
    # (false: the model as before it; docs/BENCHMARKS.md "AMX attention")
    amx_attention: bool = True
    # what the target's KV cache stores (dflash_core.engine.resolve_kv_cache_dtype): "auto"
    # (the model's dtype, bf16 where the attention reads K / V rounded to bf16 anyway),
    # "float32", or "bfloat16" (each K / V value rounded to the nearest bf16 as it is written,
    # in every mode alike: half the bytes a step reads from the cache and half its memory)
    kv_cache_dtype: str = "auto"
    # admission and limits
    max_queue: int = 64  # waiting requests beyond the running slots; more get 429
    retry_after_s: int = 1
    request_timeout_s: float | None = 600.0
    max_prompt_tokens: int | None = None  # default: max_seq_len - 1
    max_tokens_limit: int | None = None  # cap on max_tokens; default: max_seq_len
    default_max_tokens: int = 256  # chat requests that give no max_tokens
    # sampling defaults for requests that leave temperature / top_p / top_k out (vLLM's
    # convention): None = the model folder's generation_config.json, then OpenAI's 1.0 / 1.0 / off
    sampling_defaults: dict | None = None
    shutdown_grace_s: float = 30.0
    body_read_timeout_s: float = 30.0  # a client that has not sent its whole body by then gets 408
    # operations
    api_key: str | None = None  # default: env DFLASH_API_KEY
    log_level: str = "INFO"
    # disaggregated transport
    transport_backend: str = "auto"  # auto | gloo | nccl
    # what carries the context of committed tokens to the drafter: "kv", the drafter's own
    # context K/V computed on the target side (4.5x fewer bytes per token for the shipped
    # drafter, 2x for Qwen3-8B's), or "features", the fused target layer outputs
    transport_context: str = "kv"
    transport_timeout_s: float = 60.0  # how long one (re)connect waits for the drafter to join
    drafter_step_timeout_s: float = 5.0  # a step the drafter does not answer by then: decode plainly
    # Ray Serve resources per deployment (the drafter deployment too, when disaggregated);
    # num_gpus None: 0 on CPU, 1 colocated / 0.5 each disaggregated on CUDA
    num_cpus: float = 0.5
    num_gpus: float | None = None
    # Ray custom resources per deployment, to pin each to nodes that offer them (e.g. the
    # target on GPU nodes labelled {"target_node": 1}, the drafter on {"drafter_node": 1})
    target_resources: dict | None = None
    drafter_resources: dict | None = None
    # Serve autoscaling of the (colocated) DFlashServer deployment, e.g. {"min_replicas": 1,
    # "max_replicas": 4}; target_ongoing_requests defaults to max_slots (a replica is
    # "full" when its engine slots are); None: one replica
    autoscaling: dict | None = None
    # OpenMP waiters of each replica: auto (the OpenMP runtime's default: libgomp spins
    # briefly, then sleeps; idle replicas use no CPU), passive (sleep at once: every
    # parallel region pays a wake-up; measured ~2x slower decoding on 2 cores) or active
    # (spin forever: a replica that owns its cores; an idle one keeps a core busy)
    omp_wait_policy: str = "auto"
    # torch CPU threads of each replica process; 0: every CPU the process may run on
    # (torch's own default; Ray would otherwise give a replica floor(num_cpus) threads,
    # i.e. 1 for the default 0.5). Set it when several replicas share a node's cores.
    threads: int = 0

    def __post_init__(self) -> None:
        if not self.drafter_step_timeout_s > 0:
            raise ValueError("drafter_step_timeout_s must be > 0")
        if not self.body_read_timeout_s > 0:
            raise ValueError(f"body_read_timeout_s must be > 0, got {self.body_read_timeout_s}")
        if self.sampling_defaults is not None:
            bad = sorted(set(self.sampling_defaults) - {"temperature", "top_p", "top_k"})
            if bad:
                raise ValueError(f"sampling_defaults takes temperature, top_p, top_k; got {', '.join(bad)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        for name in ("max_slots", "max_seq_len", "block_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.transport_context not in ("kv", "features"):
            raise ValueError(f"transport_context must be kv or features, got {self.transport_context!r}")
        if self.transport_backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"transport_backend must be auto, gloo or nccl, got {self.transport_backend!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.drafter_weights not in ("auto", "stored", "q8_0"):
            raise ValueError(f"drafter_weights must be auto, stored or q8_0, got {self.drafter_weights!r}")
        if self.drafter_weights == "q8_0" and self.dtype in ("bfloat16", "float16"):
            raise ValueError(f"drafter_weights q8_0 rounds float32 weights; dtype is {self.dtype}")
        if self.omp_wait_policy not in ("auto", "passive", "active"):
            raise ValueError(f"omp_wait_policy must be auto, passive or active, got {self.omp_wait_policy!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an integer >= 0 (0: every CPU of the process), got {self.threads!r}")
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ValueError("num_cpus and num_gpus must be >= 0")
        if self.autoscaling is not None:
            self.autoscaling = autoscaling_config(self.autoscaling, self.max_slots)
            if self.placement != "colocated":
                raise ValueError("autoscaling is for the colocated placement (one target/drafter pair per "
                                 "disaggregated application)")
        for name in ("target_resources", "drafter_resources"):
            res = getattr(self, name)
            if res is not None and not (isinstance(res, dict) and all(
                    isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in res.items())):
                raise ValueError(f"{name} must map resource names to amounts >= 0, got {res!r}")
        if self.num_gpus is None:
            on_gpu = str(self.device).startswith("cuda")
            self.num_gpus = (0.5 if self.placement == "disaggregated" else 1.0) if on_gpu else 0.0
        if self.drafter in ("none", "None", ""):
            self.drafter = None
        named = self.block_size_schedule.strip().lower() if isinstance(self.block_size_schedule, str) else None
        if named in SCHEDULE_MODES:
            self.block_size_schedule = named   # resolved where the engine runs (its CPU decides the dtype)
            if named == "measure" and self.placement != "colocated":
                raise ValueError("block_size_schedule 'measure' times the engine's steps with its drafter in "
                                 "the process: colocated placement only (give pairs or 'table' here)")
        elif self.block_size_schedule is not None:
            try:
                self.block_size_schedule = parse_block_size_schedule(self.block_size_schedule)
            except ValueError:
                if named is None or ":" in named:   # pairs: the parser's message names the entry
                    raise
                raise ValueError(f"block_size_schedule must be {', '.join(SCHEDULE_MODES)}, none or "
                                 f"MAX_RUNNING:BLOCK_SIZE pairs, got {self.block_size_schedule!r}") from None
        self.draft_threshold = check_draft_threshold(self.draft_threshold)
        if not isinstance(self.draft_tree, bool):
            raise ValueError(f"draft_tree must be true or false, got {self.draft_tree!r}")
        if not isinstance(self.draft_lookup, bool):
            raise ValueError(f"draft_lookup must be true or false, got {self.draft_lookup!r}")
        if not isinstance(self.draft_corpus, str) or not self.draft_corpus:
            raise ValueError(f"draft_corpus must be auto, none or a corpus index file, got {self.draft_corpus!r}")
        if not isinstance(self.native_amx, bool):
            raise ValueError(f"native_amx must be true or false, got {self.native_amx!r}")
        if not isinstance(self.amx_attention, bool):
            raise ValueError(f"amx_attention must be true or false, got {self.amx_attention!r}")
        if self.amx_inputs not in AMX_INPUTS:
            raise ValueError(f"amx_inputs must be fp32 or bf16, got {self.amx_inputs!r}")
        self.kv_cache_dtype = check_kv_cache_dtype(self.kv_cache_dtype)
        if self.max_prompt_tokens is None:
            self.max_prompt_tokens = self.max_seq_len - 1
        if not 1 <= self.max_prompt_tokens < self.max_seq_len:
            raise ValueError(f"max_prompt_tokens must be in [1, max_seq_len), got {self.max_prompt_tokens}")
        if self.max_tokens_limit is None:
            self.max_tokens_limit = self.max_seq_len
        if self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.api_key is None:
            self.api_key = os.environ.get("DFLASH_API_KEY") or None
        if self.served_model_name is None:
            base = os.path.basename(str(self.target).rstrip("/")) or str(self.target)
            self.served_model_name = f"dflash-{base}"

    @classmethod
    def from_dict(cls, args: dict | None) -> "ServiceConfig":
        """Build from a plain dict (serve.yaml `args`); unknown keys raise ValueError by name."""
        args = dict(args or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ValueError(f"unknown service option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**args)

    def resolved_block_size_schedule(self) -> list[tuple[int, int]] | None:
        """The schedule the engine is built with: pairs, None, or for a named mode the
        table for the dtype it runs in on this machine ("auto" and "measure" then replace
        it with a measured one once the engine is built: service.engines.measure_schedule)."""
        if self.block_size_schedule in SCHEDULE_MODES:
            from dflash_core.runtime import resolve_dtype
            return auto_block_size_schedule("bfloat16" if self.dtype == "float16"
                                            else resolve_dtype(self.dtype, self.device))
        return self.block_size_schedule

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


AUTOSCALING_KEYS = {"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
                    "upscale_delay_s", "downscale_delay_s", "metrics_interval_s", "look_back_period_s"}


def autoscaling_config(value: dict, max_slots: int) -> dict:
    """Validate a Serve autoscaling_config; target_ongoing_requests defaults to max_slots."""
    if not isinstance(value, dict):
        raise ValueError(f"autoscaling must be a mapping like {{min_replicas: 1, max_replicas: 4}}, got {value!r}")
    unknown = set(value) - AUTOSCALING_KEYS
    if unknown:
        raise ValueError(f"unknown autoscaling option(s): {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(AUTOSCALING_KEYS))})")
    out = {"target_ongoing_requests": max_slots, **value}
    lo, hi = out.get("min_replicas", 1), out.get("max_replicas", 1)
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1):
        raise ValueError(f"autoscaling needs 0 <= min_replicas <= max_replicas, max_replicas >= 1; got {lo}, {hi}")
    if not out["target_ongoing_requests"] > 0:
        raise ValueError("autoscaling target_ongoing_requests must be > 0")
    return out
