"""The core's command line: generate, bench, data, train, eval, corpus. The installed `dflash`
command (service/entry.py) adds `serve` on top; the core never imports the server.

Bad input gives one clear line on stderr and exit code 2; load failures exit 1.
"""
from __future__ import annotations

import argparse  # noqa: F401  (annotations)
import json
import sys
import time

from .chat import encode_prompt
from .clitools import CORPUS_HELP, TARGET_HELP, CliError, _Parser, _positive_int, add_runtime_args, apply_runtime_args


def build_generate_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dflash generate", description="Generate with DFlash speculative decoding.")
    ap.add_argument("--prompt", required=True, help="prompt text")
    ap.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    ap.add_argument("--max-new-tokens", type=_positive_int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--block-size", type=_positive_int, default=16, help="verified block size (1 = no speculation)")
    ap.add_argument("--no-draft", action="store_true", help="plain autoregressive decoding (the baseline)")
    ap.add_argument("--draft-tree", choices=("on", "off"), default="on",
                    help="verify a tree of drafts (on, where the native fp32 layers run the target) or a chain "
                         "(off); greedy output is the same, sampled output follows the same distribution")
    ap.add_argument("--draft-lookup", choices=("on", "off"), default="on",
                    help="trees also verify what followed the last tokens where they occurred before in "
                         "the prompt or output (on; dflash_core/lookup.py); greedy output is the same, sampled output "
                         "follows the same distribution")
    ap.add_argument("--draft-corpus", default="auto", help=CORPUS_HELP)
    ap.add_argument("--max-seq-len", type=_positive_int, default=2048)
    add_runtime_args(ap, drafter="default")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def cmd_generate(argv) -> int:
    args = build_generate_parser().parse_args(argv)
    from .api import build_engine
    from .engine import EngineConfig
    from .sampling import SamplingParams

    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                speculative=not args.no_draft)
        cfg = EngineConfig(max_slots=1, max_seq_len=args.max_seq_len, block_size=1 if args.no_draft else args.block_size,
                           draft_tree=args.draft_tree == "on", draft_lookup=args.draft_lookup == "on",
                           kv_cache_dtype=args.kv_cache_dtype, draft_corpus=args.draft_corpus)
    except ValueError as e:
        raise CliError(f"dflash generate: {e}")
    if not args.prompt:
        raise CliError("dflash generate: --prompt must not be empty")
    dtype = apply_runtime_args("dflash generate", args)
    engine, tok = build_engine(args.target, None if args.no_draft else args.drafter, cfg, device=args.device,
                               dtype=dtype, drafter_weights=args.drafter_weights)
    ids = encode_prompt(tok, args.prompt, args.chat)
    try:
        t0 = time.perf_counter()
        [res] = engine.generate([ids], params)
        dt = time.perf_counter() - t0
    except ValueError as e:
        raise CliError(f"dflash generate: {e}")
    text = tok.decode(res.token_ids, skip_special_tokens=True)
    stats = {
        "mean_acceptance_length": round(res.stats.mean_acceptance_length, 4),   # the API's name
        "num_draft_tokens": res.stats.num_draft_tokens,
        "num_accepted_tokens": res.stats.num_accepted_tokens,
        "num_steps": res.stats.num_steps,
        "draft_tree": engine.draft_trees,
        "draft_lookup": engine.draft_lookups,
        "draft_corpus": engine.draft_corpus,
        "accepted_per_position": res.stats.accepted_per_position,
        "tokens_per_s": round(len(res.token_ids) / dt, 3) if dt > 0 else None,
        "elapsed_s": round(dt, 3),
    }
    if args.json:
        print(json.dumps({"text": text, "token_ids": res.token_ids, "finish_reason": res.finish_reason,
                          "num_prompt_tokens": len(ids), "stats": stats}))
    else:
        print(text)
        print(f"[{len(res.token_ids)} tokens, {stats['tokens_per_s']} tok/s, "
              f"mean acceptance length {stats['mean_acceptance_length']}, finish {res.finish_reason}]", file=sys.stderr)
    return 0


def build_corpus_parser() -> argparse.ArgumentParser:
    from .corpus import FILE_NAME
    ap = _Parser(prog="dflash corpus", description="Build a corpus index (dflash_core/corpus.py) from data "
                                                   "folders of the target's own responses (dflash data).")
    ap.add_argument("--data", required=True, help="comma-separated data folders (token shards) to index")
    ap.add_argument("--out", required=True, help=f"the index file to write (a drafter folder's {FILE_NAME} is what "
                                                 "--draft-corpus auto loads)")
    ap.add_argument("--calibrate-on", default=None,
                    help="comma-separated folders among --data whose left-out records measure the probabilities "
                         "(default: all of them)")
    ap.add_argument("--min-count", type=int, default=2, help="a context enters the index when seen this often")
    ap.add_argument("--min-prob", type=float, default=0.25,
                    help="drop contexts whose kind of guess was right less often than this (0 keeps all)")
    ap.add_argument("--calibration-share", type=float, default=0.02,
                    help="the share of conversations (by hashed id) left out of the index to measure it on")
    ap.add_argument("--target", default="default", help=TARGET_HELP + " (its vocabulary size is recorded)")
    ap.add_argument("--json", action="store_true", help="print the index's build record as one JSON object")
    return ap


def cmd_corpus(argv) -> int:
    from pathlib import Path

    from .corpus import build_from_folders
    a = build_corpus_parser().parse_args(argv)
    folders = [f for f in a.data.split(",") if f]
    calib = [f for f in a.calibrate_on.split(",") if f] if a.calibrate_on else None
    for f in folders:
        if not Path(f).is_dir():
            raise CliError(f"dflash corpus: --data: no folder {f}")
    from .models.registry import resolve_model
    vocab = resolve_model(a.target).config.vocab_size
    t0 = time.perf_counter()
    try:
        index = build_from_folders(folders, vocab, calib, min_count=a.min_count, min_prob=a.min_prob,
                                   calibration_share=a.calibration_share)
    except ValueError as e:
        raise CliError(f"dflash corpus: {e}") from None
    index.meta["build_s"] = round(time.perf_counter() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    index.save(a.out)
    rec = index.meta | {"file": a.out, "file_mb": round(Path(a.out).stat().st_size / 1e6, 2)}
    if a.json:
        print(json.dumps(rec))
    else:
        print(f"{a.out}: {rec['entries']} contexts from {rec['records']} records ({rec['response_tokens']} response "
              f"tokens), calibrated on {rec['calibration_records']} left-out records, {rec['file_mb']} MB, "
              f"{rec['build_s']} s", file=sys.stderr)
    return 0


USAGE = """usage: dflash <command> [options]

commands:
  generate   generate text (DFlash speculative decoding, or --no-draft)
  bench      autoregressive vs DFlash on the same prompts, one process
  serve      start the OpenAI-compatible server (Ray Serve)
  data       generate drafter training data with the target
  train      train a drafter
  eval       measure a drafter's acceptance length and speedup
  corpus     index the target's own responses for corpus branches

`dflash <command> --help` for options."""


def _no_server(argv) -> int:
    raise CliError("dflash serve: the server lives in the `service` package; run the installed "
                   "`dflash` command (service.entry) or `python -m service.cli`")


def _unknown(cmd: str):
    def body(argv) -> int:
        raise CliError(f"dflash: unknown command {cmd!r} (try: generate, bench, serve, data, train, eval, corpus)")
    return body


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    # one engine process owns the cores: spinning OpenMP waiters (must precede torch's
    # import); the server's processes share the cores and keep sleeping ones
    from .runtime import set_thread_policy
    set_thread_policy(shared=cmd == "serve")
    from .clitools import run_command
    try:
        if cmd == "generate":
            return run_command("dflash generate", cmd_generate, rest)
        if cmd == "bench":
            from .bench import main as bench_main
            return run_command("dflash bench", bench_main, rest)
        if cmd == "serve":
            return run_command("dflash serve", _no_server, rest)
        if cmd == "corpus":
            return run_command("dflash corpus", cmd_corpus, rest)
        if cmd in ("data", "train", "eval"):
            import importlib
            mod = {"data": "datagen", "train": "train", "eval": "evaluate"}[cmd]
            return run_command(f"dflash {cmd}", importlib.import_module(f"dflash_core.training.{mod}").main, rest)
        return run_command("dflash", _unknown(cmd), rest)
    except KeyboardInterrupt:
        print("dflash: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
