"""`dflash eval`: how good is a drafter, measured through the real engine.

Contract
- Prompts: the ShareGPT holdout (never trained on) and/or HumanEval (evaluation only),
  chat template applied, first --num-prompts of each in a fixed order.
- For each dataset and temperature: the same engine generates every prompt twice at
  batch 1 (max_slots 1, requests one after another): speculatively (DFlash, block size
  --block-size) and autoregressively (`speculative=False`: one target token per forward
  through the same engine). Reported: tau = tokens emitted per target forward (mean
  acceptance length, max B), per-position acceptance (share of steps in which draft
  position k was accepted), tokens/s of both and the speedup = their ratio (wall clock,
  prefill included). Greedy speculative output is checked to equal the autoregressive one.
- --snapshots DIR: also tau (greedy, first --snapshot-prompts holdout prompts, batched)
  for every `step_NNNNNN/` snapshot of a training run, against training tokens seen.
  --prior-curve JSON --tokens-offset N --sitting LABEL: sittings add up; the curve of an
  earlier eval comes first, this run's snapshots follow with N earlier tokens added.
- --walk (greedy cells): the same outputs replayed by training/walk.py from one prefill
  per prompt: `walk_tau` and `walk_steps_equal` (prompts whose every step but the last
  equals the engine's).
- --walk-data DIR (a holdout-split data folder): greedy tau of the drafter, and of every
  snapshot, on its records without decoding (training/walk.py; `--datasets` with no name
  skips the decoded cells).
- --plot PNG: tau vs training tokens (snapshots, and the teacher-forced tau of the run's
  log.jsonl) and per-position acceptance per dataset/temperature.
- Output: one JSON object (also written to --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..datasets import load_eval_prompts


def walk_check(engine, prompts: list[list[int]], results: list) -> dict:
    """The engine's greedy outputs replayed by walk.walk_tau (one prefill per prompt):
    its tau, and on how many prompts every step but the last equals the engine's."""
    from .walk import walk_tau
    drafter = getattr(engine.draft_backend, "drafter", None)
    if drafter is None:
        raise ValueError("--walk needs a drafter in this process (not a remote draft backend)")
    # a response that ended on EOS: the engine verified the EOS too (outputs leave it out)
    recs = [{"prompt_ids": p, "response_ids": list(r.token_ids) + ([r.stop_token_id] if r.stop_token_id is not None
                                                                   else [])} for p, r in zip(prompts, results)]
    w = walk_tau(engine.target, drafter, recs, block_size=engine.block_size(1))
    same = sum(len(x) == len(r.stats.acceptance_lengths) and x[:-1] == r.stats.acceptance_lengths[:-1]
               for x, r in zip(w["walks"], results))
    return {"walk_tau": round(w["tau"], 4), "walk_steps_equal": same, "walk_prompts": len(recs)}


def evaluate(engine, prompts: list[list[int]], temperature: float, max_new_tokens: int, seed: int = 0,
             speedup: bool = True, batch: int = 1, walk: bool = False) -> dict:
    """tau and per-position acceptance of DFlash on the prompts; with speedup, also plain
    decoding on the same engine (speedup.run_modes: the one engine benchmark)."""
    from ..sampling import SamplingParams
    from ..speedup import run_modes
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=seed if temperature > 0 else None)
    runs = run_modes(engine, prompts, params, ("dflash", "ar") if speedup else ("dflash",), batch)
    spec = runs["dflash"]
    res = {"temperature": temperature, "num_prompts": len(prompts), "batch": batch, "tau": round(spec.tau, 4),
           "per_position_acceptance": [round(x, 4) for x in spec.per_position_acceptance],
           "spec_tokens": spec.tokens, "spec_tokens_per_s": round(spec.tokens_per_s, 2)}
    if speedup:
        ar = runs["ar"]
        res.update({"ar_tokens": ar.tokens, "ar_tokens_per_s": round(ar.tokens_per_s, 2),
                    "speedup": round(spec.tokens_per_s / ar.tokens_per_s, 3)})
        if temperature == 0:
            res["greedy_outputs_equal"] = sum(a == b for a, b in zip(spec.outputs, ar.outputs))
    if walk and temperature == 0:
        res.update(walk_check(engine, prompts, spec.results[:len(prompts)]))
    return res


def walk_snapshot_curve(snap_dir: Path, target, records: list[dict], block_size: int, device: str,
                        dtype=torch.float32) -> list[dict]:
    """Greedy tau of every snapshot on held-out records, each replayed from one prefill
    (walk.walk_tau: the engine's tau) instead of decoded: a curve point over 100 prompts
    costs about what decoding 8 did."""
    from ..drafter import DFlashDrafter
    from .walk import walk_tau
    rows = []
    for s in sorted(p for p in snap_dir.glob("step_*") if (p / "model.safetensors").exists()):
        meta = json.loads((s / "meta.json").read_text()) if (s / "meta.json").exists() else {}
        d = DFlashDrafter.load(s, device=device, dtype=dtype)
        w = walk_tau(target, d, records, block_size=min(block_size, d.config.block_size))
        rows.append({"snapshot": s.name, "step": meta.get("step"), "tokens_seen": meta.get("tokens_seen"),
                     "tau": round(w["tau"], 4), "method": "walk", "prompts": len(records)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def snapshot_curve(snap_dir: Path, target_spec: str, prompts: list[list[int]], max_new_tokens: int,
                   block_size: int, device: str, dtype=torch.float32, drafter_weights: str = "auto") -> list[dict]:
    """Greedy tau of every snapshot on the same prompts (batched: tau does not depend on it)."""
    from ..api import build_engine
    from ..engine import EngineConfig
    from ..sampling import SamplingParams
    rows = []
    snaps = sorted(p for p in snap_dir.glob("step_*") if (p / "model.safetensors").exists())
    for s in snaps:
        meta = json.loads((s / "meta.json").read_text()) if (s / "meta.json").exists() else {}
        engine, _ = build_engine(target=target_spec, drafter=str(s), device=device, tokenizer=False, dtype=dtype,
                                 drafter_weights=drafter_weights, config=EngineConfig(max_slots=min(8, len(prompts)), block_size=block_size,
                                                     max_seq_len=max(len(p) for p in prompts) + max_new_tokens + 8,
                                                     draft_tree=False))   # the drafter's chain acceptance
        res = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
        lens = [x for r in res for x in r.stats.acceptance_lengths]
        rows.append({"snapshot": s.name, "step": meta.get("step"), "tokens_seen": meta.get("tokens_seen"),
                     "tau": round(sum(lens) / max(len(lens), 1), 4)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def extend_curve(prior: dict | None, curve: list[dict], tokens_offset: int = 0,
                 sitting: str | None = None) -> list[dict]:
    """Sittings add up: a previous eval's curve, then this run's snapshots with the earlier
    sittings' training tokens added (each point keeps its own run's step)."""
    out = [dict(c) for c in (prior or {}).get("snapshot_curve", [])]
    for c in curve:
        c = dict(c)
        if c.get("tokens_seen") is not None:
            c["tokens_seen"] = int(c["tokens_seen"]) + int(tokens_offset)
        if sitting is not None:
            c["sitting"] = sitting
        out.append(c)
    return out


def write_plot(path: Path, results: dict, curve: list[dict], log_path: Path | None, log_tokens_offset: int = 0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict = {}
    for c in curve:
        if c.get("tokens_seen") is not None:
            groups.setdefault(c.get("sitting"), []).append(c)
    for label, pts in groups.items():
        name = "engine tau (greedy, holdout)" + (f", sitting {label}" if label is not None else "")
        ax1.plot([c["tokens_seen"] for c in pts], [c["tau"] for c in pts], "o-", label=name)
    if log_path is not None and log_path.exists():
        rows = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
        tf = [r for r in rows if "tau_tf" in r]
        ax1.plot([r["tokens_seen"] + log_tokens_offset for r in tf], [r["tau_tf"] for r in tf], alpha=0.5,
                 label="teacher-forced tau (train batches)")
        ho = [r for r in rows if "heldout_tau" in r]
        if ho:
            ax1.plot([r["tokens_seen"] + log_tokens_offset for r in ho], [r["heldout_tau"] for r in ho], "s-",
                     label="held-out tau (walk, greedy)")
    ax1.set_xlabel("training tokens seen")
    ax1.set_ylabel("acceptance length tau")
    ax1.set_title("tau vs training tokens")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    for key, r in results.items():
        pp = r["per_position_acceptance"]
        ax2.plot(range(1, len(pp) + 1), pp, "o-", label=f"{key} (tau {r['tau']:.2f})")
    ax2.set_xlabel("draft position k")
    ax2.set_ylabel("share of steps with position k accepted")
    ax2.set_title("per-position acceptance")
    ax2.set_ylim(0, 1)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    from ..clitools import _Parser, add_runtime_args, default_device
    ap = _Parser(prog="dflash eval", description=__doc__.split("\n\n")[0])
    add_runtime_args(ap, drafter="default", device=default_device())
    ap.add_argument("--datasets", nargs="*", default=["sharegpt", "humaneval"], choices=["sharegpt", "humaneval"],
                    help="decoded through the engine (none: only --walk-data)")
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--no-speedup", action="store_true", help="tau only (skip the autoregressive runs)")
    ap.add_argument("--tree-blocks", default="",
                    help="with --walk-data: also the greedy tau of tree verification at these verified block sizes "
                         "(comma-separated), replayed like the walk (training/walk.py tree_walk_tau); "
                         "--save-acceptance then records them as tree_tau (what the server's measured schedule "
                         "predicts tree steps with), with lookup branches (dflash_core/lookup.py) as "
                         "tree_lookup_tau, and where a corpus index loads (--draft-corpus) with corpus branches "
                         "too (dflash_core/corpus.py) as tree_corpus_tau")
    ap.add_argument("--draft-tree", action="store_true",
                    help="cells verify draft trees of block-size - 1 nodes (EngineConfig.draft_tree; where "
                         "the native fp32 layers run the target) instead of chains (default: chains, the "
                         "drafter's own acceptance)")
    ap.add_argument("--draft-lookup", action="store_true",
                    help="with --draft-tree: trees also verify lookup branches (EngineConfig.draft_lookup, "
                         "dflash_core/lookup.py; default off here: the drafter's own acceptance)")
    ap.add_argument("--draft-corpus", default="auto",
                    help="with --draft-tree --draft-lookup: greedy trees are planned with this corpus index "
                         "(EngineConfig.draft_corpus: auto = the drafter folder's corpus.npz where it has one, none, "
                         "or an index file; dflash_core/corpus.py); also what --tree-blocks walks with")
    ap.add_argument("--batch", type=int, default=1,
                    help="requests decoded together (1: one after another, the speedup users see at batch 1)")
    ap.add_argument("--walk", action="store_true",
                    help="greedy cells: also replay the engine's outputs with one prefill per prompt "
                         "(training/walk.py, what `dflash train --eval-data` logs) and count the prompts "
                         "whose steps it reproduces")
    ap.add_argument("--walk-data", default=None,
                    help="a holdout-split data folder (`dflash data --split holdout --sample-frac 0`): greedy tau "
                         "of the drafter, and of every --snapshots snapshot, on its records, replayed from one "
                         "prefill per record (training/walk.py) instead of decoded")
    ap.add_argument("--snapshots", default=None, help="a run's snapshots/ folder: tau vs training tokens")
    ap.add_argument("--snapshot-prompts", type=int, default=8)
    ap.add_argument("--prior-curve", default=None,
                    help="a previous sitting's eval JSON: its snapshot curve comes first (sittings add up)")
    ap.add_argument("--tokens-offset", type=int, default=0,
                    help="training tokens of earlier sittings, added to this run's snapshots")
    ap.add_argument("--sitting", default=None, help="label of this run's snapshots in the curve")
    ap.add_argument("--log", default=None, help="a run's log.jsonl (teacher-forced tau in the plot)")
    ap.add_argument("--plot", default=None, help="PNG path")
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-acceptance", default=None, metavar="DIR",
                    help="write DIR/acceptance.json (normally the drafter's folder) from the first greedy decoded "
                         "cell: the per-position acceptance the server's measured block-size schedule reads")
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..clitools import CliError, apply_runtime_args
    a = build_parser().parse_args(argv)
    if a.num_prompts < 1 or a.max_new_tokens < 1 or a.block_size < 2 or a.batch < 1:
        raise CliError("dflash eval: --num-prompts, --max-new-tokens and --batch must be >= 1, --block-size >= 2")
    if any(not 0 <= t <= 2 for t in a.temperatures):
        raise CliError("dflash eval: --temperatures must be in [0, 2]")
    if not a.datasets and not a.walk_data:
        raise CliError("dflash eval: nothing to evaluate: name --datasets or give --walk-data")
    if a.save_acceptance is not None and not (a.datasets and 0 in a.temperatures):
        raise CliError("dflash eval: --save-acceptance needs a greedy decoded cell (--datasets and --temperatures 0)")
    if a.draft_tree and (a.save_acceptance is not None or a.walk or a.walk_data or a.snapshots):
        raise CliError("dflash eval: --save-acceptance, --walk, --walk-data and --snapshots measure chains: "
                       "drop --draft-tree")
    if a.save_acceptance is not None and not Path(a.save_acceptance).is_dir():
        raise CliError(f"dflash eval: --save-acceptance {a.save_acceptance}: not a folder")
    from ..clitools import int_list
    tree_blocks = int_list(a.tree_blocks, "--tree-blocks", "dflash eval")
    if tree_blocks and not a.walk_data:
        raise CliError("dflash eval: --tree-blocks replays the --walk-data records: give --walk-data")
    if any(not 2 <= b <= 64 for b in tree_blocks):
        raise CliError("dflash eval: --tree-blocks must be block sizes in 2..64")
    dtype = apply_runtime_args("dflash eval", a)
    from ..api import build_engine
    from ..engine import EngineConfig
    try:
        engine, tok = build_engine(target=a.target, drafter=a.drafter, device=a.device, dtype=dtype,
                                   drafter_weights=a.drafter_weights, config=EngineConfig(max_slots=a.batch, block_size=a.block_size,
                                                       max_seq_len=a.max_prompt_tokens + a.max_new_tokens + 8,
                                                       draft_tree=a.draft_tree, draft_lookup=a.draft_lookup,
                                                       kv_cache_dtype=a.kv_cache_dtype, draft_corpus=a.draft_corpus))
        results, prompt_sets = {}, {}
        for ds in a.datasets:
            prompt_sets[ds] = load_eval_prompts(ds, tok, a.num_prompts, a.max_prompt_tokens)
            for t in a.temperatures:
                key = f"{ds}@T{t:g}"
                results[key] = evaluate(engine, prompt_sets[ds], t, a.max_new_tokens, a.seed, not a.no_speedup,
                                        a.batch, walk=a.walk)
                print(json.dumps({key: results[key]}), file=sys.stderr)
        walk_recs = None
        if a.walk_data:
            from .train import ShardData, TrainConfig
            from .walk import walk_tau
            walk_recs = ShardData.holdout_records(a.walk_data, TrainConfig.max_seq_len)
            w = walk_tau(engine.target, engine.draft_backend.drafter, walk_recs, block_size=engine.block_size(1))
            key = f"walk:{Path(a.walk_data).name}@T0"
            results[key] = {"temperature": 0.0, "num_prompts": len(walk_recs), "method": "walk",
                            "tau": round(w["tau"], 4),
                            "per_position_acceptance": [round(x, 4) for x in w["per_position_acceptance"]]}
            print(json.dumps({key: results[key]}), file=sys.stderr)
            if tree_blocks:
                from .walk import tree_walk_tau
                tkey = f"tree_walk:{Path(a.walk_data).name}@T0"
                tw = tree_walk_tau(engine.target, engine.draft_backend.drafter, walk_recs, tree_blocks, lookup=True)
                results[tkey] = {"temperature": 0.0, "num_prompts": len(walk_recs), "method": "tree walk",
                                 "tau_by_block_size": {b: round(t, 4) for b, t in tw["tau"].items()},
                                 "chain_tau_by_block_size": {b: round(t, 4) for b, t in tw["chain_tau"].items()}}
                print(json.dumps({tkey: results[tkey]}), file=sys.stderr)
                lkey = f"tree_lookup_walk:{Path(a.walk_data).name}@T0"
                results[lkey] = {"temperature": 0.0, "num_prompts": len(walk_recs), "method": "tree walk, lookup branches",
                                 "tau_by_block_size": {b: round(t, 4) for b, t in tw["lookup_tau"].items()}}
                print(json.dumps({lkey: results[lkey]}), file=sys.stderr)
                if engine.corpus is not None:
                    tc = tree_walk_tau(engine.target, engine.draft_backend.drafter, walk_recs, tree_blocks,
                                       lookup=True, corpus=engine.corpus)
                    ckey = f"tree_corpus_walk:{Path(a.walk_data).name}@T0"
                    results[ckey] = {"temperature": 0.0, "num_prompts": len(walk_recs),
                                     "method": "tree walk, lookup and corpus branches",
                                     "tau_by_block_size": {b: round(t, 4) for b, t in tc["lookup_tau"].items()}}
                    print(json.dumps({ckey: results[ckey]}), file=sys.stderr)
        curve = []
        if a.snapshots and walk_recs is not None:
            curve = walk_snapshot_curve(Path(a.snapshots), engine.target, walk_recs, a.block_size, a.device, dtype)
        elif a.snapshots:
            sp = prompt_sets.get("sharegpt") or load_eval_prompts("sharegpt", tok, a.snapshot_prompts,
                                                                 a.max_prompt_tokens)
            curve = snapshot_curve(Path(a.snapshots), a.target, sp[:a.snapshot_prompts], a.max_new_tokens,
                                   a.block_size, a.device, dtype, a.drafter_weights)
        curve = extend_curve(json.loads(Path(a.prior_curve).read_text()) if a.prior_curve else None, curve,
                             a.tokens_offset, a.sitting)
        from ..runtime import dtype_name
        # the block actually verified: the engine caps --block-size at the drafter's own block
        from ..api import resolve_drafter_weights
        summary = {"target": a.target, "drafter": a.drafter, "draft_tree": a.draft_tree,
                   "draft_lookup": a.draft_lookup and a.draft_tree,
                   "drafter_weights": resolve_drafter_weights(a.drafter_weights, a.device, dtype),
                   "block_size": engine.block_size(a.batch),
                   "requested_block_size": a.block_size, "dtype": dtype_name(dtype),
                   "max_new_tokens": a.max_new_tokens, "results": results, "snapshot_curve": curve}
        if a.plot:
            write_plot(Path(a.plot), results, curve, Path(a.log) if a.log else None, a.tokens_offset)
        if a.save_acceptance is not None:
            from ..autoschedule import save_acceptance
            ds = a.datasets[0]
            cell = results[f"{ds}@T0"]
            summary["acceptance_file"] = str(save_acceptance(
                a.save_acceptance, cell["per_position_acceptance"], tau=cell["tau"], block_size=summary["block_size"],
                prompts=f"{ds} ({'holdout' if ds == 'sharegpt' else 'evaluation set'}), first {cell['num_prompts']}",
                temperature=0.0, max_new_tokens=a.max_new_tokens, dtype=summary["dtype"],
                drafter_weights=summary["drafter_weights"], measured_by="dflash eval",
                **({"tree_tau": results[f"tree_walk:{Path(a.walk_data).name}@T0"]["tau_by_block_size"],
                    "tree_lookup_tau": results[f"tree_lookup_walk:{Path(a.walk_data).name}@T0"]["tau_by_block_size"],
                    **({"tree_corpus_tau": results[f"tree_corpus_walk:{Path(a.walk_data).name}@T0"]["tau_by_block_size"]}
                       if f"tree_corpus_walk:{Path(a.walk_data).name}@T0" in results else {}),
                    "tree_tau_from": f"tree walk over {Path(a.walk_data).name}"} if tree_blocks else {})))
    except ValueError as e:   # a model or data that does not load (FileNotFoundError: run_command)
        print(f"dflash eval: {e}", file=sys.stderr)
        return 1
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from ..clitools import run_command
    sys.exit(run_command("dflash eval", main, None))
