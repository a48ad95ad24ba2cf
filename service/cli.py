"""`dflash serve`: start the OpenAI-compatible server.

    dflash serve [--host 127.0.0.1] [--port 8000] [--target default] [--drafter default]
                 [--placement colocated|disaggregated] [--max-slots 8] [--device cpu] ...

Runtime `ray` (default): a local Ray instance on 127.0.0.1 (or RAY_ADDRESS) running the
Serve application of service/deployments.py, exactly what `serve run deploy/serve.yaml`
starts. Runtime `uvicorn`: the same FastAPI app in this process, no Ray (colocated only).
Bad options print one line and exit 2; a model that does not load exits 1. SIGINT/SIGTERM
shut down gracefully (running streams get `--shutdown-grace-s` to finish).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .config import AMX_INPUTS, PLACEMENTS, ServiceConfig


from dflash_core.clitools import CORPUS_HELP, DRAFTER_WEIGHTS_HELP, KV_CACHE_HELP, CliError, _Parser  # noqa: E402  (one error type, one parser for every command)
from dflash_core.runtime import KV_CACHE_DTYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    d = ServiceConfig.__dataclass_fields__
    ap = _Parser(prog="dflash serve", description="OpenAI-compatible DFlash server (Ray Serve).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--target", default="default", help="default | HF folder | .gguf | hub id | tiny-random")
    ap.add_argument("--drafter", default="default", help="default | drafter folder | random | none")
    ap.add_argument("--drafter-weights", choices=("auto", "stored", "q8_0"), default=d["drafter_weights"].default,
                    help=DRAFTER_WEIGHTS_HELP)
    ap.add_argument("--placement", choices=PLACEMENTS, default="colocated")
    ap.add_argument("--runtime", choices=("ray", "uvicorn"), default="ray",
                    help="ray: Ray Serve app (default); uvicorn: in-process, colocated only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--max-slots", type=int, default=d["max_slots"].default)
    ap.add_argument("--max-seq-len", type=int, default=d["max_seq_len"].default)
    ap.add_argument("--block-size", type=int, default=d["block_size"].default)
    ap.add_argument("--block-size-schedule", default=None,
                    help="MAX_RUNNING:BLOCK_SIZE pairs, e.g. '1:16,4:8,inf:1', 'none' (always --block-size), "
                         "'measure' (time this engine's steps at start-up and pick with the drafter's "
                         "acceptance.json), 'table' (block 4 at 1-2 running requests in bf16, block 2 at 1 in "
                         "fp32, as measured on 2-core EPYCs in docs/BENCHMARKS.md) or 'auto' (default: "
                         "'measure' where the drafter has an acceptance profile, else 'table')")
    ap.add_argument("--draft-threshold", type=float, default=d["draft_threshold"].default,
                    help="dynamic draft length: verify only the drafts whose running product of drafter "
                         "confidences stays >= this (0: the whole block)")
    ap.add_argument("--draft-tree", choices=("on", "off"), default="on" if d["draft_tree"].default else "off",
                    help="requests verify a tree of the drafter's most likely paths instead of a chain "
                         "(where the native fp32 layers run the target; output unchanged)")
    ap.add_argument("--draft-lookup", choices=("on", "off"), default="on" if d["draft_lookup"].default else "off",
                    help="requests' trees also verify what followed their last tokens where those occurred "
                         "before in the prompt or output (dflash_core/lookup.py; greedy output unchanged, sampled "
                         "output in the same distribution)")
    ap.add_argument("--draft-corpus", default=d["draft_corpus"].default, help=CORPUS_HELP)
    ap.add_argument("--native-amx", choices=("on", "off"), default="on" if d["native_amx"].default else "off",
                    help="on CPUs with AMX-BF16: the native fp32 kernel's 4-bit / 8-bit linears on AMX tiles "
                         "(same output; off: its AVX-512 FMA form)")
    ap.add_argument("--amx-inputs", choices=AMX_INPUTS, default=d["amx_inputs"].default,
                    help="what those AMX linears take: bf16 (the default: each input rounded to bf16 first, "
                         "faster verify blocks and prefills, and the attention on AMX tiles too, with bf16 q, k, "
                         "p, v; the target computes with those roundings in every mode, so speculation stays "
                         "lossless) or fp32 (exact: the fp32 model)")
    ap.add_argument("--amx-attention", choices=("on", "off"), default="on" if d["amx_attention"].default else "off",
                    help="with --amx-inputs bf16 on AMX: the attention on AMX tiles too (bf16 q, k, p, v, fp32 sums; "
                         "the default) or in fp32 (off)")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=d["kv_cache_dtype"].default,
                    help=KV_CACHE_HELP)
    ap.add_argument("--max-queue", type=int, default=d["max_queue"].default)
    ap.add_argument("--request-timeout-s", type=float, default=d["request_timeout_s"].default)
    ap.add_argument("--max-tokens-limit", type=int, default=None)
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--num-cpus", type=float, default=d["num_cpus"].default, help="per Serve deployment")
    ap.add_argument("--num-gpus", type=float, default=None, help="per Serve deployment")
    ap.add_argument("--threads", type=int, default=d["threads"].default,
                    help="torch CPU threads per replica (0: every CPU the replica may run on)")
    ap.add_argument("--omp-wait-policy", choices=("auto", "passive", "active"), default=d["omp_wait_policy"].default,
                    help="OpenMP waiters per Ray replica (auto: the OpenMP runtime's spin-then-sleep; "
                         "--runtime uvicorn reads OMP_WAIT_POLICY from the environment)")
    ap.add_argument("--shutdown-grace-s", type=float, default=d["shutdown_grace_s"].default)
    ap.add_argument("--log-level", default="INFO")
    return ap


def config_from_args(a: argparse.Namespace) -> ServiceConfig:
    kw = dict(target=a.target, drafter=None if a.drafter.lower() == "none" else a.drafter,
              drafter_weights=a.drafter_weights, placement=a.placement,
              device=a.device, dtype=a.dtype, max_slots=a.max_slots, max_seq_len=a.max_seq_len,
              block_size=a.block_size, max_queue=a.max_queue, request_timeout_s=a.request_timeout_s,
              max_tokens_limit=a.max_tokens_limit, served_model_name=a.served_model_name, num_cpus=a.num_cpus,
              num_gpus=a.num_gpus, shutdown_grace_s=a.shutdown_grace_s, log_level=a.log_level,
              threads=a.threads, omp_wait_policy=a.omp_wait_policy, draft_threshold=a.draft_threshold,
              draft_tree=a.draft_tree == "on", draft_lookup=a.draft_lookup == "on", draft_corpus=a.draft_corpus,
              native_amx=a.native_amx == "on", amx_inputs=a.amx_inputs, amx_attention=a.amx_attention == "on",
              kv_cache_dtype=a.kv_cache_dtype)
    if a.block_size_schedule is not None:   # ServiceConfig parses it ("auto", "none", pairs)
        kw["block_size_schedule"] = a.block_size_schedule
    return ServiceConfig(**kw)


def check_models(cfg: ServiceConfig) -> None:
    """Fail fast, in this process, on model specs that cannot resolve."""
    from dflash_core.models.registry import resolve_model
    resolve_model(cfg.target)
    if cfg.drafter not in (None, "default", "random") and not Path(cfg.drafter).is_dir():
        raise CliError(f"dflash serve: drafter {cfg.drafter!r} is not a folder, 'default', 'random' or 'none'")


def _stop_event() -> threading.Event:
    """SIGINT/SIGTERM set the returned event (installed after ray.init, which installs its own)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _wait_for(stop: threading.Event) -> None:
    while not stop.is_set():
        stop.wait(1.0)


_SUPERVISED = "DFLASH_SERVE_SUPERVISED"


def ray_auth_env(environ=None) -> dict:
    """Ray's control plane (GCS, raylet, workers, agents) listens on every interface, and
    Ray 2.60 offers no setting to keep all of it on the loopback: a local `dflash serve`
    therefore turns on Ray's token authentication with a fresh random token per run,
    unless RAY_AUTH_MODE is set (RAY_AUTH_MODE=disabled opts out) or RAY_ADDRESS points at
    an existing cluster (whose settings apply). An existing RAY_AUTH_TOKEN is kept, so
    `ray status` and friends work with the same token. -> the variables to set."""
    env = os.environ if environ is None else environ
    if env.get("RAY_ADDRESS") or env.get("RAY_AUTH_MODE"):
        return {}
    import secrets
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": env.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}


def supervise(argv: list[str]) -> int:
    """Run the Ray driver (and so the local Ray cluster it starts) in a session of its own.

    Ctrl-C in a terminal sends SIGINT to the whole foreground process group, and Ray's
    worker processes (the HTTP proxy, the replicas) would die of it mid-stream. Here only
    this parent hears it and forwards one SIGTERM to the driver, which drains the
    application in order (no new requests, running ones get shutdown_grace_s, the rest end
    with finish_reason "abort" and [DONE]) and stops Ray. A second Ctrl-C kills it."""
    import subprocess
    child = subprocess.Popen([sys.executable, "-m", "service.cli", *argv], start_new_session=True,
                             env={**os.environ, **ray_auth_env(), _SUPERVISED: "1"})
    hits = []

    def forward(signum, _frame):
        hits.append(signum)
        try:
            if len(hits) == 1:
                child.send_signal(signal.SIGTERM)
            else:
                os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    while True:
        try:
            rc = child.wait()
            break
        except KeyboardInterrupt:   # pragma: no cover (handlers are installed)
            continue
    return rc if not hits or rc != -signal.SIGTERM else 0


def drain(cfg: ServiceConfig) -> None:
    """Before Serve tears down its proxy: the ingress stops accepting (503), gives running
    requests shutdown_grace_s, then ends the rest with finish_reason "abort" and [DONE]
    while the proxy is still there to deliver them."""
    from ray import serve
    try:
        handle = serve.get_deployment_handle("DFlashServer", app_name="dflash")
        handle.drain.remote(cfg.shutdown_grace_s).result(timeout_s=cfg.shutdown_grace_s + 60)
        time.sleep(1.0)   # the proxy flushes the streams' last chunks
    except Exception as e:  # noqa: BLE001  (shutting down regardless)
        print(f"dflash serve: drain failed ({type(e).__name__}: {str(e)[:200]}); stopping anyway",
              file=sys.stderr, flush=True)


# Ray Serve's proxy must answer its ready check within 5 s by default: on a small machine
# busy loading a model that can fail the whole start. Patient defaults (the env wins).
RAY_PATIENCE = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def run_ray(cfg: ServiceConfig, host: str, port: int) -> None:
    os.environ.update(ray_auth_env())   # read by ray.init and inherited by Ray's processes
    for k, v in RAY_PATIENCE.items():
        os.environ.setdefault(k, v)   # read by Ray's processes, which inherit this environment
    import ray
    from ray import serve

    from .deployments import build_app
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True)
    stop = _stop_event()
    try:
        serve.start(http_options={"host": host, "port": port})
        print(f"dflash serve: loading {cfg.target!r} (http://{host}:{port} answers once it is loaded)",
              flush=True)
        serve.run(build_app(cfg.to_dict()), name="dflash", route_prefix="/", blocking=False)
        print(f"dflash serve: model {cfg.served_model_name!r} ({cfg.placement}) on http://{host}:{port}/v1 "
              f"(Ctrl-C to stop)", flush=True)
        if os.environ.get("RAY_AUTH_MODE") == "token" and not os.environ.get("RAY_ADDRESS"):
            print("dflash serve: Ray's control plane requires this run's token (RAY_AUTH_TOKEN); "
                  "RAY_AUTH_MODE=disabled turns that off", flush=True)
        _wait_for(stop)
        print("dflash serve: shutting down", flush=True)
        drain(cfg)
    finally:
        serve.shutdown()
        ray.shutdown()


def run_uvicorn(cfg: ServiceConfig, host: str, port: int) -> None:
    import uvicorn

    from .app import Server, build_app
    from .engines import apply_threads, build_colocated
    if cfg.placement != "colocated":
        raise CliError("dflash serve: --runtime uvicorn supports --placement colocated only")
    if cfg.threads:
        apply_threads(cfg)
    engine, tok = build_colocated(cfg)
    app = build_app(Server(cfg, engine, tok))
    print(f"dflash serve: model {cfg.served_model_name!r} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=int(cfg.shutdown_grace_s))


def main(argv: list[str] | None = None) -> int:
    from .logs import setup_logging
    try:
        a = build_parser().parse_args(argv)
        if not 0 < a.port < 65536:
            raise CliError(f"dflash serve: --port must be in 1..65535, got {a.port}")
        try:
            cfg = config_from_args(a)
        except ValueError as e:
            raise CliError(f"dflash serve: {e}") from None
        setup_logging(cfg.log_level)
        try:
            check_models(cfg)
        except ValueError as e:   # ModelLoadError is a ValueError with a user-facing message
            print(f"dflash serve: {e}", file=sys.stderr)
            return 1
        if a.runtime == "uvicorn":
            run_uvicorn(cfg, a.host, a.port)
        elif not os.environ.get("RAY_ADDRESS") and os.environ.get(_SUPERVISED) != "1":
            return supervise(argv if argv is not None else sys.argv[1:])
        else:
            run_ray(cfg, a.host, a.port)
        return 0
    except CliError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
