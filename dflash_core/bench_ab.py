"""`python -m dflash_core.bench_ab --baseline REV`: this checkout's engine against the engine
of an earlier git revision, side by side in one process.

The package as it was at REV (`git archive`) is imported beside this one as
`dflash_core_base` (its native kernel builds from its own sources into its own library),
both engines are built on the same target and drafter, and the same prompts run through
both, prompt by prompt, plain decoding and DFlash each, the order of the two engines
alternating from prompt to prompt, so machine noise hits both alike. Prints a table and,
last, one JSON line (`--json`: only the JSON): per engine ("baseline", "working") the
tokens/s of each mode, the speedup, tau, whether its DFlash output equals its plain output;
and whether the two engines' plain outputs are the same (on how many prompts).

What it is for: an engine change that is not a switch (a restructured step, a kernel
rewrite) measured against the code before it, as the benchmarks require, in one run.
"""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .clitools import CliError, _Parser, _positive_int, add_runtime_args, apply_runtime_args, run_command

PACKAGE_DIR = Path(__file__).resolve().parent
BASE_NAME = "dflash_core_base"


def _parser() -> _Parser:
    ap = _Parser(prog="python -m dflash_core.bench_ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="the git revision whose engine is the baseline (e.g. HEAD~3)")
    ap.add_argument("--num-prompts", type=_positive_int, default=20)
    ap.add_argument("--dataset", choices=("sharegpt", "humaneval"), default="sharegpt")
    ap.add_argument("--max-prompt-tokens", type=_positive_int, default=512)
    ap.add_argument("--max-new-tokens", type=_positive_int, default=128)
    ap.add_argument("--block-size", type=_positive_int, default=6, help="verified block size of DFlash")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature of every run (> 0: prompt i is sampled with seed i in both engines)")
    ap.add_argument("--context-tokens", type=int, default=0,
                    help="long prompts: each of this many tokens, holdout prompts joined (the last one's final "
                         f"{LONG_TAIL} tokens end it), and tokens/s of decoding only (each prompt's prefill, timed "
                         "by a one-token request, taken off); 0: the dataset's prompts, whole requests timed")
    ap.add_argument("--top-p", type=float, default=1.0, help="top_p of every sampled run (with --temperature > 0)")
    ap.add_argument("--top-k", type=int, default=0, help="top_k of every sampled run (with --temperature > 0)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line (the table to stderr)")
    add_runtime_args(ap, drafter="default")
    return ap


def export_package(rev: str, dest: Path) -> Path:
    """dflash_core as it was at git revision `rev`, written under dest as BASE_NAME -> its
    folder. CliError when this is not a git checkout, the revision is unknown, or that
    package imports itself by absolute name (it would load this checkout's modules)."""
    repo = PACKAGE_DIR.parent
    try:
        top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CliError(f"--baseline needs git: {e}") from None
    if top.returncode != 0:
        raise CliError(f"--baseline needs a git checkout of the repository ({repo} is not one)")
    arch = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", rev, PACKAGE_DIR.name],
                          capture_output=True, timeout=120)
    if arch.returncode != 0:
        msg = arch.stderr.decode(errors="replace").strip().splitlines()
        raise CliError(f"--baseline {rev}: {msg[-1] if msg else 'git archive failed'}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True, timeout=120)
    out = dest / BASE_NAME
    (dest / PACKAGE_DIR.name).rename(out)
    for f in out.rglob("*.py"):
        text = f.read_text(errors="replace")
        if f"from {PACKAGE_DIR.name}" in text or f"import {PACKAGE_DIR.name}" in text:
            raise CliError(f"--baseline {rev}: its {f.relative_to(dest)} imports {PACKAGE_DIR.name} by name")
    return out


# a long prompt's last tokens: the end of one holdout prompt (its chat template's turn end
# and the assistant's header), so the model answers that prompt after the others
LONG_TAIL = 300


def long_prompts(pool: list[list[int]], n: int, tokens: int) -> list[list[int]]:
    """n prompts of `tokens` tokens from pool (token ids): pool prompts joined in turn, cut
    to make room for the last LONG_TAIL tokens (or all) of the next pool prompt, which end it."""
    out, i = [], 0
    while len(out) < n:
        ids: list[int] = []
        while len(ids) < tokens:
            ids += pool[i % len(pool)]
            i += 1
        tail = pool[i % len(pool)][-LONG_TAIL:]
        i += 1
        out.append(ids[:tokens - len(tail)] + tail)
    return out


def _engine(pkg: str, args, dtype):
    native = importlib.import_module(f"{pkg}.native")   # the process-wide kernel settings, as for this checkout
    if args.no_native:
        native.set_enabled(False)
    if hasattr(native, "set_amx_inputs"):
        native.set_amx_inputs(args.amx_inputs)
    api = importlib.import_module(f"{pkg}.api")
    eng = importlib.import_module(f"{pkg}.engine")
    sampling = importlib.import_module(f"{pkg}.sampling")
    engine, tok = api.build_engine(args.target, args.drafter, eng.EngineConfig(
        max_slots=1, max_seq_len=max(args.max_prompt_tokens, args.context_tokens) + args.max_new_tokens + 8,
        block_size=args.block_size),
        device=args.device, dtype=dtype)
    return engine, tok, sampling


def run(args) -> dict:
    dtype = apply_runtime_args("python -m dflash_core.bench_ab", args)
    if not args.temperature >= 0:
        raise CliError(f"python -m dflash_core.bench_ab: --temperature must be >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0 or args.top_k < 0:
        raise CliError("python -m dflash_core.bench_ab: --top-p must be in (0, 1] and --top-k >= 0, got "
                       f"{args.top_p} and {args.top_k}")
    if (args.top_p < 1.0 or args.top_k) and args.temperature == 0:
        raise CliError("python -m dflash_core.bench_ab: --top-p / --top-k need --temperature > 0 (greedy ignores them)")
    if args.context_tokens and args.context_tokens < 2 * LONG_TAIL:
        raise CliError(f"python -m dflash_core.bench_ab: --context-tokens must be 0 or at least {2 * LONG_TAIL}, "
                       f"got {args.context_tokens}")
    if args.kv_cache_dtype != "auto":
        raise CliError("python -m dflash_core.bench_ab: --kv-cache-dtype: it compares the engines' own defaults (auto)")
    from .datasets import load_eval_prompts
    out = sys.stderr if args.json else sys.stdout
    tmp = Path(tempfile.mkdtemp(prefix="dflash-ab-"))
    try:
        export_package(args.baseline, tmp)
        sys.path.insert(0, str(tmp))
        try:
            systems = {"baseline": _engine(BASE_NAME, args, dtype), "working": _engine(PACKAGE_DIR.name, args, dtype)}
        finally:
            sys.path.remove(str(tmp))
        tok = systems["working"][1]
        prompts = load_eval_prompts(args.dataset, tok, args.num_prompts + 1, args.max_prompt_tokens)
        if len(prompts) < 2:
            raise CliError(f"no {args.dataset} prompt fits --max-prompt-tokens {args.max_prompt_tokens}")
        if args.context_tokens:
            prompts = long_prompts(prompts, args.num_prompts + 1, args.context_tokens)
        for engine, _, sampling in systems.values():   # warm-up (first calls allocate)
            engine.generate([prompts[0]], sampling.SamplingParams(max_new_tokens=4))
        names = list(systems)
        n = {k: {"plain": 0, "dflash": 0} for k in names}
        secs = {k: {"plain": 0.0, "dflash": 0.0} for k in names}
        steps = {k: 0 for k in names}
        outs = {k: {"plain": [], "dflash": []} for k in names}
        print(f"{'prompt':>6} " + " ".join(f"{k + ' speedup':>17}" for k in names), file=out)
        for i, ids in enumerate(prompts[1:]):
            for k in (names if i % 2 == 0 else names[::-1]):
                engine, _, sampling = systems[k]
                for mode in ("plain", "dflash"):
                    p = sampling.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                                speculative=mode == "dflash",
                                                **({"seed": i, "top_p": args.top_p, "top_k": args.top_k}
                                                   if args.temperature > 0 else {}))
                    prefill = 0.0
                    if args.context_tokens:   # decoding only: the prompt's prefill (and first token) timed apart
                        t0 = time.perf_counter()
                        engine.generate([ids], sampling.SamplingParams(max_new_tokens=1))
                        prefill = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    [r] = engine.generate([ids], p)
                    secs[k][mode] += time.perf_counter() - t0 - prefill
                    n[k][mode] += len(r.token_ids) - (1 if args.context_tokens else 0)
                    outs[k][mode].append(list(r.token_ids))
                    if mode == "dflash":
                        steps[k] += len(r.stats.acceptance_lengths)
            print(f"{i:>6} " + " ".join(
                f"{n[k]['dflash'] / secs[k]['dflash'] / (n[k]['plain'] / secs[k]['plain']):>16.3f}x" for k in names),
                file=out)
        res = {"baseline_rev": args.baseline, "target": args.target, "drafter": args.drafter, "dataset": args.dataset,
               "num_prompts": len(prompts) - 1, "max_new_tokens": args.max_new_tokens, "block_size": args.block_size,
               "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
               "context_tokens": args.context_tokens or None}
        greedy = args.temperature == 0   # (sampled DFlash draws other uniforms than plain decoding: not comparable)
        for k in names:
            plain, dflash = n[k]["plain"] / secs[k]["plain"], n[k]["dflash"] / secs[k]["dflash"]
            res[k] = {"ar_tokens_per_s": round(plain, 2), "dflash_tokens_per_s": round(dflash, 2),
                      "speedup": round(dflash / plain, 3), "tau": round(n[k]["dflash"] / max(steps[k], 1), 3),
                      "greedy_outputs_identical": outs[k]["plain"] == outs[k]["dflash"] if greedy else None}
            print(f"{k}: plain {plain:.2f} tok/s, DFlash {dflash:.2f} tok/s, {dflash / plain:.3f}x, "
                  f"tau {res[k]['tau']}" + (f", DFlash output = plain output: {res[k]['greedy_outputs_identical']}"
                                            if greedy else ""), file=out)
        res["plain_outputs_equal"] = outs["baseline"]["plain"] == outs["working"]["plain"]
        # prompts whose plain outputs are the same in both engines (a change of the model's numerics moves some)
        res["plain_outputs_same"] = sum(a == b for a, b in zip(outs["baseline"]["plain"], outs["working"]["plain"]))
        # and the same for DFlash (sampling: whether the change keeps every draw)
        res["dflash_outputs_same"] = sum(a == b for a, b in zip(outs["baseline"]["dflash"], outs["working"]["dflash"]))
        res["dflash_over_baseline"] = round(res["working"]["dflash_tokens_per_s"] / res["baseline"]["dflash_tokens_per_s"], 3)
        res["speedup_over_baseline"] = round(res["working"]["speedup"] / res["baseline"]["speedup"], 3)
        print(f"the two engines' plain outputs equal: {res['plain_outputs_equal']} ({res['plain_outputs_same']} of "
              f"{res['num_prompts']} prompts; DFlash outputs: {res['dflash_outputs_same']}); DFlash tokens/s "
              f"{res['dflash_over_baseline']}x the baseline's, speedup {res['speedup_over_baseline']}x its", file=out)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    def body(a):
        res = run(_parser().parse_args(a))
        print(json.dumps(res))
        return 0
    return run_command("python -m dflash_core.bench_ab", body, argv)


if __name__ == "__main__":
    sys.exit(main())
