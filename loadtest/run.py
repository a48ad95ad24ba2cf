"""Load-test driver: speculation on vs off against one running server, with a report.

    .venv/bin/python -m loadtest.run --host http://127.0.0.1:8000 --concurrency 1,4,16 \\
        --duration 60s --max-tokens 64 --out loadtest/results/latest

For each concurrency level it runs Locust headless twice (`locust -f
loadtest/locustfile.py --headless -u N -r N -t T --host H`): speculation on, then off,
with the same prompt file (same prompts, same order) and the same options; `--reps N`
runs each level's modes N times, the order reversed in every second rep, and reports the
ratio of the modes' median tokens/s beside each rep's own (a machine that drifts cannot
favour the mode that always runs first). Around each
run it waits until the server is idle and scrapes /metrics, so the speculative-decoding
counter deltas belong to that run alone. It writes `report.json` and `report.md` to
--out (plus each run's Locust CSVs, log and per-request records) and prints the markdown
and, last, one compact JSON line with the speedups.

A server started with an API key: export DFLASH_API_KEY for this driver too.

Errors a user can act on (no server, bad option) end the run with one line on stderr and
exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dflash_core.stats import rep_order  # noqa: E402
from loadtest.prompts import SOURCES, load_prompt_mix, write_prompts_file  # noqa: E402
from loadtest.report import (build_report, outputs_by_prompt, parse_metrics, render_markdown,  # noqa: E402
                             spec_decode_delta, summarize_run, write_plot)
from loadtest.stream import RequestRecord  # noqa: E402

LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
# Scheduler gauges of the service's /metrics; the run waits until both read 0.
IDLE_GAUGES = ("dflash_num_requests_running", "dflash_num_requests_waiting")
DURATION_RE = re.compile(r"^(\d+h)?(\d+m)?(\d+s)?$|^\d+$")


class UsageError(Exception):
    """Bad input or an unreachable server: one line for the user."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="http://127.0.0.1:8000", help="base URL of the running server")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated user counts, e.g. 1,4,16")
    p.add_argument("--duration", default="60s", help="run time per (mode, concurrency), Locust syntax: 60s, 1m30s")
    p.add_argument("--modes", default="on,off", help="speculation modes to run, in order")
    p.add_argument("--reps", type=int, default=1,
                   help="run each concurrency's modes this many times, the order reversed in every second rep; "
                        "the speedup is then the ratio of the modes' median tokens/s")
    p.add_argument("--api", choices=["chat", "completions"], default="chat")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--model", default="", help="default: the first id of GET /v1/models")
    p.add_argument("--prompt-source", choices=SOURCES, default="sharegpt")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-seed", type=int, default=0)
    p.add_argument("--token-ids", choices=["on", "off"], default="on")
    p.add_argument("--out", default=str(REPO / "loadtest" / "results" / "latest"), help="output folder")
    p.add_argument("--idle-timeout-s", type=float, default=300.0, help="max wait for the server to drain")
    p.add_argument("--server-timeout-s", type=float, default=60.0, help="max wait for GET /health")
    p.add_argument("--no-warmup", action="store_true", help="skip the one warm-up request per mode")
    args = p.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
    if not args.levels or min(args.levels) < 1:
        raise UsageError(f"--concurrency levels must be >= 1, got {args.concurrency!r}")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.mode_list or any(m not in ("on", "off") for m in args.mode_list):
        raise UsageError(f"--modes must be a comma-separated list of on/off, got {args.modes!r}")
    if not DURATION_RE.match(args.duration) or args.duration in ("", "0", "0s"):
        raise UsageError(f"--duration must look like 60s, 2m or 1m30s, got {args.duration!r}")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.reps < 1:
        raise UsageError(f"--reps must be >= 1, got {args.reps}")
    args.host = args.host.rstrip("/")
    return args


# --------------------------------------------------------------------------- server

def wait_healthy(host: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = requests.get(host + "/health", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as e:
            last = type(e).__name__
        time.sleep(1.0)
    raise UsageError(f"no healthy server at {host} after {timeout_s:.0f} s (GET /health: {last}); "
                     "start one with `make serve`")


def auth_headers() -> dict:
    key = os.environ.get("DFLASH_API_KEY")  # the Locust users read the same variable
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_model(host: str) -> str:
    r = requests.get(host + "/v1/models", timeout=30, headers=auth_headers())
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def scrape(host: str) -> dict:
    r = requests.get(host + "/metrics", timeout=30)
    r.raise_for_status()
    return parse_metrics(r.text)


def wait_idle(host: str, timeout_s: float) -> dict:
    """Poll /metrics until no request is running or waiting; return that scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(host)
        busy = sum(v for (name, _), v in samples.items() if name in IDLE_GAUGES)
        if busy == 0 or time.monotonic() > deadline:
            if busy:
                print(f"warning: server still has {busy:.0f} requests after {timeout_s:.0f} s", file=sys.stderr)
            return samples
        time.sleep(0.5)


def warmup(host: str, model: str, api: str, prompt: str, speculative: bool) -> None:
    """One short request so that first-call costs (compile, allocation) stay out of the runs."""
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    body = {"model": model, "max_tokens": 8, "temperature": 0.0, "speculative": speculative}
    body.update({"messages": [{"role": "user", "content": prompt}]} if api == "chat" else {"prompt": prompt})
    r = requests.post(host + path, json=body, timeout=600, headers=auth_headers())
    if r.status_code != 200:
        raise UsageError(f"warm-up request failed: HTTP {r.status_code}: {r.text[:200]}")


# --------------------------------------------------------------------------- runs

def locust_command(args: argparse.Namespace, users: int, mode: str, model: str, prompts_file: Path,
                   prefix: Path) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", str(users), "-t", args.duration, "--host", args.host,
        "--only-summary", "--exit-code-on-error", "0", "--csv", str(prefix),
        "--api", args.api, "--speculative", mode, "--max-tokens", str(args.max_tokens),
        "--temperature", str(args.temperature), "--model", model, "--prompts-file", str(prompts_file),
        "--token-ids", args.token_ids, "--records-out", str(prefix) + "_records.jsonl",
    ]


def run_one(args: argparse.Namespace, users: int, mode: str, model: str, prompts_file: Path,
            out_dir: Path, rep: int = 1) -> dict:
    prefix = out_dir / (f"c{users}_{mode}" if args.reps == 1 else f"c{users}_{mode}_r{rep}")
    records_path = Path(str(prefix) + "_records.jsonl")
    records_path.unlink(missing_ok=True)
    before = wait_idle(args.host, args.idle_timeout_s)
    cmd = locust_command(args, users, mode, model, prompts_file, prefix)
    with open(str(prefix) + "_locust.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise UsageError(f"locust exited with status {proc.returncode}; see {prefix}_locust.log")
    after = wait_idle(args.host, args.idle_timeout_s)
    records = []
    if records_path.exists():
        records = [RequestRecord.from_dict(json.loads(line))
                   for line in records_path.read_text().splitlines() if line.strip()]
    if not records:
        raise UsageError(f"the run (concurrency {users}, speculation {mode}) recorded no requests; "
                         f"see {prefix}_locust.log")
    return {"concurrency": users, "mode": mode, "rep": rep, "client": summarize_run(records),
            "server": spec_decode_delta(before, after), "outputs": outputs_by_prompt(records)}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        # 1) server and prompts
        wait_healthy(args.host, args.server_timeout_s)
        model = args.model or served_model(args.host)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        prompts, source = load_prompt_mix(args.prompt_source, args.num_prompts, args.prompt_seed)
        prompts_file = out_dir / "prompts.json"
        write_prompts_file(prompts_file, prompts, source)
        if not args.no_warmup:
            for mode in args.mode_list:
                warmup(args.host, model, args.api, prompts[0], mode == "on")
        # 2) runs: each concurrency, each mode, same prompts
        runs = []
        load_start = os.getloadavg()[0]
        for users in args.levels:
            for rep in range(1, args.reps + 1):
                for mode in rep_order(args.mode_list, rep - 1):
                    run = run_one(args, users, mode, model, prompts_file, out_dir, rep)
                    c = run["client"]
                    print(f"concurrency {users:>3} speculation {mode:>3} rep {rep}: "
                          f"{c['output_tokens_per_s'] or 0:.1f} tok/s, {c['requests_completed']} done, "
                          f"{c['requests_failed']} failed", file=sys.stderr)
                    runs.append(run)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except requests.RequestException as e:
        print(f"error: server request failed: {e}", file=sys.stderr)
        return 2
    # 3) report
    config = {
        "command": shlex.join(["python", "-m", "loadtest.run", *(sys.argv[1:] if argv is None else argv)]),
        "host": args.host, "model": model, "api": args.api, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "duration": args.duration, "concurrency": args.levels,
        "modes": args.mode_list, "reps": args.reps, "prompt_source": source, "num_prompts": len(prompts),
        "cpu_count": os.cpu_count(),
        # other work on the machine skews CPU-bound figures: record how busy it was
        "loadavg_1m_start": round(load_start, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }
    report = build_report(config, runs)
    try:
        write_plot(report, out_dir / "report.png")
        report["plot"] = "report.png"
    except ImportError as e:   # matplotlib is optional for the load test
        print(f"no plot: {e}", file=sys.stderr)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    md = render_markdown(report)
    (out_dir / "report.md").write_text(md)
    print(md)
    print(json.dumps({"speedup": {str(r["concurrency"]): r["speedup"] for r in report["speedup"]},
                      "out": str(out_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
