"""`dflash data`: the target writes its own responses to ShareGPT prompts.

Contract
- Input: the train split of `datasets.load_sharegpt_prompts()` (--turns first: opening
  user messages; --turns later: every other user message as a standalone prompt) (optionally also a small
  holdout set for validation, written to separate shards and never trained on).
- Each prompt gets the target's chat template (generation prompt appended); prompts
  longer than --max-prompt-tokens are skipped (never truncated: a cut prompt is not a
  real request).
- Responses come from the project's SpecEngine in plain autoregressive mode (no
  drafter), continuously batched over --max-slots rows; the engine's EOS set ends them.
  With --capture-layers the engine also returns those target layers' outputs for every
  position it reads (`EngineConfig.capture_layers`), stored fp16 with each record. A deterministic share
  (--sample-frac) is sampled at --temperature with a per-prompt seed; the rest greedy.
- Output: `<out>/shard_00000.pt`, ... each a list of dicts
  {conv_id, prompt_ids, response_ids, sampled, finish_reason}; response_ids include the
  EOS token when the response ended on it. `<out>/manifest.json` records the settings
  and the finished shards; rerunning the same command skips finished shards (resume
  after an interruption), a changed setting is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..chat import encode_prompt
from ..datasets import TURNS, Prompt, load_sharegpt_prompts
from .shards import read_shard, write_shard


@dataclass
class DataConfig:
    target: str = "default"
    out: str = "data/shards"
    split: str = "train"            # "train" | "holdout"
    num_prompts: int = 1000
    shard_size: int = 64
    max_prompt_tokens: int = 256
    max_new_tokens: int = 256
    sample_frac: float = 0.25
    temperature: float = 0.8
    max_slots: int = 16
    seed: int = 0
    capture_layers: tuple[int, ...] = ()   # non-empty: also store these target layers' features
    dtype: str = "float32"                 # the target's dtype (greedy tokens depend on it)
    turns: str = "first"                   # "first": opening user messages; "later": the other ones

    def __post_init__(self):
        if self.split not in ("train", "holdout"):
            raise ValueError("--split must be 'train' or 'holdout'")
        if self.num_prompts < 1 or self.shard_size < 1 or self.max_slots < 1:
            raise ValueError("--num-prompts, --shard-size and --max-slots must be >= 1")
        if not 0.0 <= self.sample_frac <= 1.0:
            raise ValueError("--sample-frac must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0")
        if self.turns not in TURNS:
            raise ValueError(f"--turns must be one of {', '.join(TURNS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("--dtype must resolve to float32 or bfloat16")
        if self.max_new_tokens < 1 or self.max_prompt_tokens < 1:
            raise ValueError("--max-new-tokens and --max-prompt-tokens must be >= 1")

    def identity(self) -> dict:
        """Settings that determine the shards' content (resume must match them)."""
        d = asdict(self)
        for k in ("out", "max_slots", "num_prompts"):
            d.pop(k)  # batching does not change greedy tokens; more prompts = more shards
        d["capture_layers"] = list(self.capture_layers)  # as it reads back from JSON
        if self.turns == "first":
            d.pop("turns")  # folders written before --turns existed hold opening messages
        return d


def _hash_unit(*parts) -> float:
    """Deterministic uniform [0, 1) from the parts (sha256, not Python's salted hash)."""
    h = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()
    return int(h[:12], 16) / float(1 << 48)


def prompt_seed(conv_id: str, seed: int) -> int:
    return int(_hash_unit("seed", conv_id, seed) * (1 << 31))


def is_sampled(conv_id: str, seed: int, frac: float) -> bool:
    return _hash_unit("sampled", conv_id, seed) < frac


def select_prompts(prompts: list[Prompt], cfg: DataConfig, tokenizer) -> list[tuple[Prompt, list[int]]]:
    """The split's prompts in a seeded order, tokenized, over-long ones skipped, first
    num_prompts kept. Deterministic, so shard k always holds the same prompts."""
    pool = sorted((p for p in prompts if p.split == cfg.split), key=lambda p: p.conv_id)
    random.Random(cfg.seed).shuffle(pool)
    out = []
    for p in pool:
        ids = encode_prompt(tokenizer, p.text, chat=True)
        if len(ids) <= cfg.max_prompt_tokens:
            out.append((p, ids))
            if len(out) == cfg.num_prompts:
                break
    return out


class Manifest:
    def __init__(self, out: Path, cfg: DataConfig):
        self.path = out / "manifest.json"
        ident = cfg.identity()
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data["config"] != ident:
                diff = {k for k in ident if self.data["config"].get(k) != ident[k]}
                raise ValueError(f"{out} was generated with different settings ({', '.join(sorted(diff))}); "
                                 "use another --out or the original settings")
        else:
            self.data = {"config": ident, "shards": {}}

    def done(self, name: str) -> bool:
        return name in self.data["shards"] and (self.path.parent / name).exists()

    def add(self, name: str, info: dict) -> None:
        self.data["shards"][name] = info
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def shard_name(i: int, with_features: bool = False) -> str:
    """Token-only shards are compact `.npz` (shards.py); shards with features are `.pt`."""
    return f"shard_{i:05d}.pt" if with_features else f"shard_{i:05d}.npz"


def load_shards(path: str | Path) -> list[dict]:
    """All finished records under a shard folder, in shard order."""
    path = Path(path)
    man = json.loads((path / "manifest.json").read_text())
    recs = []
    for name in sorted(man["shards"]):
        recs.extend(read_shard(path / name))
    return recs


def generate_shards(cfg: DataConfig, engine, tokenizer, prompts: list[Prompt], progress=True) -> dict:
    """Continuous batching over all pending prompts; a shard is written as soon as all of
    its prompts are finished. Returns a summary dict."""
    from ..sampling import SamplingParams
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out, cfg)
    chosen = select_prompts(prompts, cfg, tokenizer)
    n_shards = (len(chosen) + cfg.shard_size - 1) // cfg.shard_size
    feats = bool(cfg.capture_layers)
    if feats and tuple(engine.config.capture_layers) != tuple(cfg.capture_layers):
        raise ValueError(f"the engine captures layers {list(engine.config.capture_layers)}, the data settings ask "
                         f"for {list(cfg.capture_layers)}")
    captured: dict[str, list[torch.Tensor]] = {}
    pending_shards = [i for i in range(n_shards) if not manifest.done(shard_name(i, feats))]
    todo = [(i, j) for i in pending_shards
            for j in range(i * cfg.shard_size, min(len(chosen), (i + 1) * cfg.shard_size))]
    results: dict[int, dict] = {}
    left_in_shard = {i: min(len(chosen), (i + 1) * cfg.shard_size) - i * cfg.shard_size
                     for i in pending_shards}
    bar = tqdm(total=len(todo), unit="resp", disable=not progress, dynamic_ncols=True,
               desc=f"data[{cfg.split}]")
    t0 = time.perf_counter()
    gen_tokens = 0
    nxt = 0
    owner: dict[str, tuple[int, int]] = {}
    while nxt < len(todo) or engine.has_unfinished_requests():
        # 1) keep the engine's queue topped up (running + waiting <= 2 * max_slots)
        while nxt < len(todo) and engine.num_running + engine.num_waiting < 2 * cfg.max_slots:
            shard_i, j = todo[nxt]
            p, ids = chosen[j]
            sampled = is_sampled(p.conv_id, cfg.seed, cfg.sample_frac)
            params = SamplingParams(
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature if sampled else 0.0,
                seed=prompt_seed(p.conv_id, cfg.seed) if sampled else None,
                speculative=False,
            )
            rid = f"{j}"
            owner[rid] = (shard_i, j)
            results[j] = {"conv_id": p.conv_id, "prompt_ids": ids, "response_ids": [],
                          "sampled": sampled, "finish_reason": None}
            engine.add_request(rid, ids, params)
            nxt += 1
        # 2) one engine step
        for o in engine.step():
            shard_i, j = owner[o.request_id]
            rec = results[j]
            rec["response_ids"].extend(o.new_token_ids)
            gen_tokens += len(o.new_token_ids)
            if feats and o.features is not None:
                captured.setdefault(o.request_id, []).append(o.features.to("cpu", torch.float16))
            if not o.finished:
                continue
            rec["finish_reason"] = o.finish_reason
            if feats:   # every position read: prompt + response without its last token
                rec["features"] = torch.cat(captured.pop(o.request_id))
            if o.finish_reason == "stop" and o.stop_token_id is not None:
                rec["response_ids"].append(int(o.stop_token_id))  # the engine never emits the stop token
            del owner[o.request_id]
            bar.update(1)
            dt = time.perf_counter() - t0
            bar.set_postfix(tok_s=f"{gen_tokens / max(dt, 1e-9):.1f}")
            left_in_shard[shard_i] -= 1
            # 3) shard complete -> write it atomically, then record it in the manifest
            if left_in_shard[shard_i] == 0:
                lo = shard_i * cfg.shard_size
                recs = [results.pop(k) for k in range(lo, min(len(chosen), lo + cfg.shard_size))]
                name = shard_name(shard_i, feats)
                write_shard(out / name, recs)
                manifest.add(name, {
                    "num_records": len(recs),
                    "prompt_tokens": sum(len(r["prompt_ids"]) for r in recs),
                    "response_tokens": sum(len(r["response_ids"]) for r in recs),
                })
    bar.close()
    dt = time.perf_counter() - t0
    shards = manifest.data["shards"]
    return {
        "split": cfg.split,
        "shards": len(shards),
        "records": sum(s["num_records"] for s in shards.values()),
        "response_tokens": sum(s["response_tokens"] for s in shards.values()),
        "generated_tokens_this_run": gen_tokens,
        "seconds_this_run": round(dt, 1),
        "tokens_per_s": round(gen_tokens / dt, 1) if dt > 0 else None,
    }


def build_parser() -> argparse.ArgumentParser:
    d = DataConfig()
    from ..clitools import _Parser, add_runtime_args, default_device
    ap = _Parser(prog="dflash data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=d.out, help="shard folder (resumable)")
    ap.add_argument("--split", default=d.split, choices=["train", "holdout"])
    ap.add_argument("--num-prompts", type=int, default=d.num_prompts)
    ap.add_argument("--shard-size", type=int, default=d.shard_size)
    ap.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    ap.add_argument("--sample-frac", type=float, default=d.sample_frac)
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--max-slots", type=int, default=d.max_slots)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--turns", default=d.turns, choices=list(TURNS),
                    help="first: each conversation's opening user message; later: every other user message, "
                         "standalone (never one that opens a conversation of either split)")
    ap.add_argument("--capture-layers", default="",
                    help="comma-separated target layer ids: store these layers' outputs (the drafter's context "
                         "features, fp16) with every record")
    add_runtime_args(ap, target=d.target, device=default_device())
    ap.add_argument("--prompt-cache", default=None, help="folder for the parsed-prompt cache")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--capture-layers must be comma-separated integers, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise ValueError("--capture-layers must be >= 0")
    return ids


def main(argv: list[str] | None = None) -> int:
    from ..clitools import CliError, apply_runtime_args
    from ..runtime import dtype_name
    a = build_parser().parse_args(argv)
    dtype = apply_runtime_args("dflash data", a)
    try:
        cfg = DataConfig(dtype=dtype_name(dtype), target=a.target, out=a.out, split=a.split, num_prompts=a.num_prompts,
                         shard_size=a.shard_size, max_prompt_tokens=a.max_prompt_tokens,
                         max_new_tokens=a.max_new_tokens, sample_frac=a.sample_frac,
                         temperature=a.temperature, max_slots=a.max_slots, seed=a.seed, turns=a.turns,
                         capture_layers=_parse_layers(a.capture_layers))
    except ValueError as e:
        raise CliError(f"dflash data: {e}") from None
    max_seq_len = cfg.max_prompt_tokens + cfg.max_new_tokens + 8
    try:
        prompts = load_sharegpt_prompts(cache_dir=a.prompt_cache, turns=cfg.turns)
        from ..api import build_engine
        from ..engine import EngineConfig
        engine, tokenizer = build_engine(
            target=cfg.target, drafter=None,
            config=EngineConfig(max_slots=cfg.max_slots, block_size=1, max_seq_len=max_seq_len,
                                capture_layers=cfg.capture_layers, kv_cache_dtype=a.kv_cache_dtype),
            device=a.device, dtype=getattr(torch, cfg.dtype))
        summary = generate_shards(cfg, engine, tokenizer, prompts, progress=not a.no_progress)
    except ValueError as e:   # a model or data that does not load (FileNotFoundError: run_command)
        print(f"dflash data: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    from ..clitools import run_command
    sys.exit(run_command("dflash data", main, None))
