"""`dflash data`: the target writes its own responses to ShareGPT prompts.

Contract
- Input: the train split of `prompts.load_sharegpt_prompts()` (optionally also a small
  holdout set for validation, written to separate shards and never trained on).
- Each prompt gets the target's chat template (generation prompt appended); prompts
  longer than --max-prompt-tokens are skipped (never truncated: a cut prompt is not a
  real request).
- Responses come from the project's SpecEngine in plain autoregressive mode (no
  drafter), continuously batched over --max-slots rows. A deterministic share
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
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from pathlib import Path

import torch

from .prompts import Prompt, load_sharegpt_prompts
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

    def __post_init__(self):
        if self.split not in ("train", "holdout"):
            raise ValueError("--split must be 'train' or 'holdout'")
        if self.num_prompts < 1 or self.shard_size < 1 or self.max_slots < 1:
            raise ValueError("--num-prompts, --shard-size and --max-slots must be >= 1")
        if not 0.0 <= self.sample_frac <= 1.0:
            raise ValueError("--sample-frac must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0")
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
        return d


def _hash_unit(*parts) -> float:
    """Deterministic uniform [0, 1) from the parts (sha256, not Python's salted hash)."""
    h = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()
    return int(h[:12], 16) / float(1 << 48)


def prompt_seed(conv_id: str, seed: int) -> int:
    return int(_hash_unit("seed", conv_id, seed) * (1 << 31))


def is_sampled(conv_id: str, seed: int, frac: float) -> bool:
    return _hash_unit("sampled", conv_id, seed) < frac


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """The target's chat template with one user turn and the generation prompt."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def select_prompts(prompts: list[Prompt], cfg: DataConfig, tokenizer) -> list[tuple[Prompt, list[int]]]:
    """The split's prompts in a seeded order, tokenized, over-long ones skipped, first
    num_prompts kept. Deterministic, so shard k always holds the same prompts."""
    pool = sorted((p for p in prompts if p.split == cfg.split), key=lambda p: p.conv_id)
    random.Random(cfg.seed).shuffle(pool)
    out = []
    for p in pool:
        ids = chat_prompt_ids(tokenizer, p.text)
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
            if not o.finished:
                continue
            rec["finish_reason"] = o.finish_reason
            if cfg.capture_layers:
                rec["features"] = engine.features(o.request_id)
            stop_id = getattr(o, "stop_token_id", None)
            if o.finish_reason == "stop" and stop_id is not None:
                rec["response_ids"].append(int(stop_id))  # the engine never emits the stop token
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


class FeatureCaptureGenerator:
    """Plain autoregressive decoding on the target `Decoder` that also records the
    target's context features (outputs of `layer_ids`) of every token it reads, so a
    drafter can be trained without a second target pass over the data.

    It speaks the subset of the SpecEngine interface that `generate_shards` uses
    (add_request / step / has_unfinished_requests / num_running / num_waiting /
    eos_token_ids) and produces the same greedy tokens as the engine's block-size-1 mode.
    Continuous batching: each step prefills newly admitted prompts (right-padded, one
    forward), then decodes one token for every running row (one forward).
    `features(request_id)` -> [L-1, K*hidden] (fp16) for the finished sequence
    prompt + response of length L: the last token is never read, so it has none."""

    def __init__(self, target, layer_ids: list[int], max_slots: int, max_seq_len: int,
                 eos_token_ids=(), feature_dtype=torch.float16):
        self.target = target
        self.layer_ids = list(layer_ids)
        self.cache = target.new_cache(max_slots, max_seq_len)
        self.max_seq_len = max_seq_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.feature_dtype = feature_dtype
        self.waiting: list = []
        self.rows: dict[int, dict] = {}          # slot -> request state
        self.finished_features: dict[str, torch.Tensor] = {}

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.rows)

    def add_request(self, request_id: str, prompt_ids: list[int], params) -> None:
        if len(prompt_ids) + params.max_new_tokens > self.max_seq_len:
            raise ValueError("prompt + max_new_tokens exceeds max_seq_len")
        self.waiting.append((request_id, list(prompt_ids), params))

    def features(self, request_id: str) -> torch.Tensor:
        return self.finished_features.pop(request_id)

    def _pick(self, row: dict, logits: torch.Tensor) -> int:
        p = row["params"]
        if p.temperature == 0.0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / p.temperature, -1)
        return int(torch.multinomial(probs, 1, generator=row["gen"]))

    def _emit(self, slot: int, tok: int, outs: list) -> None:
        row = self.rows[slot]
        row["out"].append(tok)
        n = len(row["out"])
        stop = tok in self.eos_token_ids and not row["params"].ignore_eos
        reason = "stop" if stop else ("length" if n >= row["params"].max_new_tokens else None)
        outs.append(SimpleNamespace(request_id=row["rid"], new_token_ids=[tok], finished=reason is not None,
                                    finish_reason=reason))
        if reason is not None:
            self.finished_features[row["rid"]] = torch.cat(row["feats"], 0)
            self.cache.free(slot)
            del self.rows[slot]

    @torch.no_grad()
    def step(self) -> list:
        outs: list = []
        dev = self.target.device
        # 1) admit + prefill new prompts (right-padded to a common length)
        new = []
        while self.waiting and self.cache.num_free:
            rid, ids, params = self.waiting.pop(0)
            slot = self.cache.alloc()
            gen = None
            if params.temperature > 0:
                gen = torch.Generator().manual_seed(int(params.seed or 0))
            self.rows[slot] = {"rid": rid, "params": params, "gen": gen, "out": [], "feats": [],
                               "len": len(ids), "last": None}
            new.append((slot, ids))
        if new:
            T = max(len(ids) for _, ids in new)
            inp = torch.zeros(len(new), T, dtype=torch.int64)
            for r, (_, ids) in enumerate(new):
                inp[r, :len(ids)] = torch.tensor(ids)
            slots = torch.tensor([s for s, _ in new])
            hidden, feats = self.target(inp, self.cache, slots, torch.zeros(len(new), dtype=torch.int64),
                                        capture_layers=self.layer_ids)
            last = torch.tensor([len(ids) - 1 for _, ids in new])
            logits = self.target.logits(hidden[torch.arange(len(new)), last])      # [R, V]
            for r, (slot, ids) in enumerate(new):
                self.cache.set_len(slot, len(ids))
                self.rows[slot]["feats"].append(feats[r, :len(ids)].to("cpu", self.feature_dtype))
                self._emit(slot, self._pick(self.rows[slot], logits[r]), outs)
            return outs
        # 2) one decode step for every running row
        slots = sorted(self.rows)
        if not slots:
            return outs
        inp = torch.tensor([[self.rows[s]["out"][-1]] for s in slots])
        st = torch.tensor(slots)
        lens = self.cache.lens[st].clone()
        hidden, feats = self.target(inp, self.cache, st, lens, capture_layers=self.layer_ids)
        logits = self.target.logits(hidden[:, 0])                                  # [R, V]
        for r, slot in enumerate(slots):
            self.cache.set_len(slot, int(lens[r]) + 1)
            self.rows[slot]["feats"].append(feats[r].to("cpu", self.feature_dtype))
            self._emit(slot, self._pick(self.rows[slot], logits[r]), outs)
        return outs


def build_parser() -> argparse.ArgumentParser:
    d = DataConfig()
    from ..clitools import _Parser
    ap = _Parser(prog="dflash data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=d.target, help="target model (default: embedded SmolLM2-135M-Instruct)")
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
    ap.add_argument("--capture-layers", default="",
                    help="comma-separated target layer ids: generate on the target decoder directly and store "
                         "these layers' outputs (the drafter's context features, fp16) with every record")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (auto: bf16 on AMX/AVX512-BF16 CPUs and GPUs)")
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


class _ArgError(Exception):
    pass


def _parse(ap: argparse.ArgumentParser, argv):
    def error(msg):
        raise _ArgError(msg)
    ap.error = error  # one clear line instead of usage + exit 2 from inside argparse
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    try:
        a = _parse(ap, argv)
        from ..runtime import dtype_name, resolve_dtype
        cfg = DataConfig(dtype=dtype_name(resolve_dtype(a.dtype, a.device)),target=a.target, out=a.out, split=a.split, num_prompts=a.num_prompts,
                         shard_size=a.shard_size, max_prompt_tokens=a.max_prompt_tokens,
                         max_new_tokens=a.max_new_tokens, sample_frac=a.sample_frac,
                         temperature=a.temperature, max_slots=a.max_slots, seed=a.seed,
                         capture_layers=_parse_layers(a.capture_layers))
    except (_ArgError, ValueError) as e:
        print(f"dflash data: error: {e}", file=sys.stderr)
        return 2
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    max_seq_len = cfg.max_prompt_tokens + cfg.max_new_tokens + 8
    try:
        prompts = load_sharegpt_prompts(cache_dir=a.prompt_cache)
        if cfg.capture_layers:
            from ..models.loader import load_target, load_tokenizer
            target = load_target(cfg.target, device=a.device, dtype=getattr(torch, cfg.dtype))
            if max(cfg.capture_layers) >= target.config.num_layers:
                raise ValueError(f"--capture-layers must be < {target.config.num_layers}")
            tokenizer = load_tokenizer(cfg.target)
            engine = FeatureCaptureGenerator(target, list(cfg.capture_layers), cfg.max_slots, max_seq_len,
                                             target.config.eos_token_ids)
        else:
            from ..api import build_engine
            from ..engine import EngineConfig
            engine, tokenizer = build_engine(
                target=cfg.target, drafter=None,
                config=EngineConfig(max_slots=cfg.max_slots, block_size=1, max_seq_len=max_seq_len),
                device=a.device, dtype=getattr(torch, cfg.dtype))
        summary = generate_shards(cfg, engine, tokenizer, prompts, progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"dflash data: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
