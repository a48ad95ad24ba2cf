"""`dflash train`: train a DFlash drafter on the target's own responses.

Contract
- Data: shard folders written by `dflash data` (records {prompt_ids, response_ids,
  [features]}). Records that carry the target's context features (datagen
  --capture-layers) are used as stored; the others get them on the fly from one target
  forward per batch (memoised in RAM up to --memo-gb, by default half of it), or, with --feature-cache DIR, from a cache on disk
  that the first pass fills a shard at a time (features.py; --fill-cache fills it alone). Shards that appear while training runs (datagen
  still going) join at the next epoch; the shard list of the current epoch is part of
  the checkpoint, so a resume sees exactly the same data.
- Step: R sequences, N random anchors in each response, blocks [anchor, MASK...] at
  absolute positions (blocks.py), one drafter forward over all N*B block tokens of a
  row (each block sees context < anchor and itself, never another block), logits through
  the frozen target LM head, loss = sum_k w_k CE_k / sum_k w_k with
  w_k = exp(-(k-1)/gamma) on block positions k = 1..B-1. With --distill a (0 < a <= 1)
  each position's loss is (1 - a) CE + a KL(target || drafter): the target's own
  next-token distribution at that position (from the same target forward that gives the
  features, two more layers and the head), over the drafting vocabulary when there is one.
- Optimiser: AdamW, linear warmup then cosine decay to `min_lr_ratio * lr`, gradient
  clipping; bf16 autocast on CUDA, fp32 on CPU.
- Output folder: `latest/` (the drafter in the public format + `trainer_state.pt`:
  optimizer, scheduler, RNG, data position) rewritten every `--ckpt-every-s` seconds and
  at the end; `snapshots/step_NNNNNN/` (drafter only, fp16, + `meta.json` with tokens
  seen) every `--snapshot-every` steps; `log.jsonl` (loss, per-position accuracy,
  teacher-forced acceptance length). Rerunning the same command resumes exactly: the
  parameters after resuming equal those of an uninterrupted run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .shards import read_shard
from .blocks import (IGNORE, accepted_lengths, build_block_batch, collate, loss_weights,
                     sample_anchors, walk_landings, weighted_block_loss)
from .features import FeatureCache, target_features


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=lambda: ["data/sharegpt-smollm2-135m"])
    out: str = "runs/drafter"
    target: str = "default"
    num_layers: int = 1
    num_features: int = 3             # target layers fused (public rule), unless the data fixes them
    target_layer_ids: list[int] | None = None  # explicit target layers (overrides the rule and num_features)
    block_size: int = 16
    mask_token_id: int = 16           # <empty_output> in SmolLM2's vocabulary
    gamma: float | None = None        # None: 7 for B 16, 4 for B 8
    blocks_per_seq: int = 12          # N anchors per sequence
    seqs_per_step: int = 4            # R rows per optimizer step
    steps: int = 1000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every_s: float = 180.0
    snapshot_every: int = 100
    log_every: int = 10
    max_seq_len: int = 1024           # longer records are skipped
    dtype: str = "auto"               # drafter compute: auto = bf16 autocast on CUDA and AMX/AVX512-BF16 CPUs
    draft_vocab: int = 0              # > 0: loss and drafts over the N most frequent response tokens
    init: str | None = None           # warm start: a drafter folder (same architecture) to begin from
    rebuild_draft_vocab: bool = False # warm start: rebuild the drafting vocabulary from this run's data
    distill: float = 0.0              # weight of KL(target's next-token distribution || drafter's); 0: labels only
    walk_weight: float = 0.0          # blocks where a walk lands (blocks.walk_landings) weigh 1 + this in the loss

    def __post_init__(self):
        if not self.data:
            raise ValueError("--data needs at least one shard folder")
        for name in ("num_layers", "num_features", "blocks_per_seq", "seqs_per_step", "steps", "log_every",
                     "snapshot_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.block_size < 2:
            raise ValueError("--block-size must be >= 2")
        if self.target_layer_ids is not None:
            ids = [int(i) for i in self.target_layer_ids]
            if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
                raise ValueError("--target-layer-ids needs distinct layer indices >= 0")
            self.target_layer_ids = ids
            self.num_features = len(ids)
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError("--dtype must be auto, float32 or bfloat16")
        if self.draft_vocab < 0:
            raise ValueError("--draft-vocab must be >= 0")
        if self.rebuild_draft_vocab and not (self.init and self.draft_vocab):
            raise ValueError("--rebuild-draft-vocab goes with --init and --draft-vocab N")
        if not 0 <= self.distill <= 1:
            raise ValueError("--distill must be between 0 and 1")
        if not 0 <= self.walk_weight <= 100:
            raise ValueError("--walk-weight must be between 0 and 100")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 <= min-lr-ratio <= 1, warmup-steps >= 0")

    def identity(self) -> dict:
        """Settings a resume must share with the run it continues."""
        d = asdict(self)
        for k in ("ckpt_every_s", "log_every", "snapshot_every", "steps"):
            d.pop(k)
        for k, default in (("dtype", "auto"), ("draft_vocab", 0), ("init", None),
                           ("rebuild_draft_vocab", False), ("distill", 0.0), ("walk_weight", 0.0),
                           ("target_layer_ids", None)):
            if d[k] == default:
                d.pop(k)  # runs from before these options resume unchanged
        return d


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def step_seed(seed: int, *parts) -> int:
    h = hashlib.sha256("|".join(map(str, (seed,) + parts)).encode()).hexdigest()
    return int(h[:15], 16)


# ---- data ------------------------------------------------------------------------------
class ShardData:
    """Records of finished shards, loaded lazily and kept in RAM.
    Record key = (folder index, shard name, index in shard)."""

    def __init__(self, folders: list[str], max_seq_len: int, holdout: bool = False):
        """holdout: the folders must hold the holdout split (evaluation data); otherwise a
        holdout folder is refused: it is never trained on."""
        self.folders = [Path(f) for f in folders]
        self.max_seq_len = max_seq_len
        self._shards: dict[tuple[int, str], list[dict]] = {}
        for f in self.folders:
            if not (f / "manifest.json").exists():
                raise FileNotFoundError(f"{f} is not a `dflash data` folder (no manifest.json)")
            split = json.loads((f / "manifest.json").read_text()).get("config", {}).get("split", "train")
            if (split == "holdout") != holdout:
                raise ValueError(f"{f} holds the {split} split: " + (
                    "evaluation data (--eval-data) must be the holdout split" if holdout
                    else "the holdout split is never trained on (pass it as --eval-data)"))

    @classmethod
    def holdout_records(cls, folder: str, max_seq_len: int) -> list[dict]:
        """Every usable record of a holdout-split folder (evaluation data)."""
        ev = cls([folder], max_seq_len, holdout=True)
        recs = ev.records(ev.finished_shards())
        if not recs:
            raise ValueError(f"{folder} holds no usable records")
        return recs

    def capture_layers(self) -> list[int] | None:
        """The target layers stored with the records (None: no stored features)."""
        layers = set()
        for f in self.folders:
            cfg = json.loads((f / "manifest.json").read_text())["config"]
            layers.add(tuple(cfg.get("capture_layers") or ()))
        if len(layers) != 1 or not next(iter(layers)):
            return None
        return list(next(iter(layers)))

    def finished_shards(self) -> list[list]:
        out = []
        for i, f in enumerate(self.folders):
            man = json.loads((f / "manifest.json").read_text())
            out += [[i, name] for name in sorted(man["shards"]) if (f / name).exists()]
        return out

    def shard_records(self, i: int, name: str) -> list[dict]:
        """Every record of one shard (unfiltered), each with its key, shard and index."""
        key = (i, name)
        if key not in self._shards:
            rows = read_shard(self.folders[i] / name)
            for j, r in enumerate(rows):
                r["key"], r["shard"], r["index"] = f"{i}/{name}/{j}", (i, name), j
            self._shards[key] = rows
        return self._shards[key]

    def records(self, shards: list[list]) -> list[dict]:
        recs = []
        for i, name in shards:
            recs += [r for r in self.shard_records(i, name)
                     if 2 <= len(r["response_ids"]) and len(r["prompt_ids"]) + len(r["response_ids"]) <= self.max_seq_len]
        return recs


def memo_limit_bytes(device: torch.device) -> int | None:
    """How much a FeatureSource memoises: half the host's RAM on a CPU (Linux; None where
    unknown), everything on a GPU (the sitting sizes itself: deploy/gpu)."""
    import os
    if device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


class FeatureSource:
    """Context features [R, C, K*hidden] for a batch: stored ones when the records carry
    them; else from a feature cache on disk when one is given (features.py: computed a
    whole shard at a time, kept across runs); else one target forward (memoised per
    record, fp16, kept on `memo_device`: host RAM on a CPU; on a GPU the device's own
    memory, so that later epochs never copy features from the host: the whole shipped data
    set is ~40 GB of fp16 features (11.6M tokens x 1728, 2026-12-03), and an H200 holds 139 GB)."""

    def __init__(self, target, layer_ids: list[int], stored_ok: bool, cache=None, data: "ShardData | None" = None,
                 memo_device="cpu", outputs: bool = False, memo_limit: int | None = None):
        """outputs: also give the target's final-norm outputs of every record of a batch
        (`last_outputs` after each call, for --distill); they come from the same forward, so
        only with features computed here. memo_limit: at most this many bytes memoised (None:
        everything); records past it are computed again when seen again."""
        self.target, self.layer_ids, self.stored_ok = target, list(layer_ids), stored_ok
        self.cache, self.data = cache, data
        self.memo_device = torch.device(memo_device)
        # key -> (features, outputs or None), fp16 on memo_device
        self.memo: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.keep_outputs = bool(outputs)
        self.last_outputs: torch.Tensor | None = None   # [R, C, hidden] fp32 of the last batch
        self.memo_limit = memo_limit
        self.memo_bytes = 0
        if cache is not None and data is None:
            raise ValueError("a feature cache needs the ShardData its records come from")
        if self.keep_outputs and (cache is not None or stored_ok):
            raise ValueError("--distill needs the target's outputs, computed with the features during training: "
                             "it does not go with --feature-cache or with features stored in the data")

    def _cached(self, r: dict) -> torch.Tensor:
        i, name = r["shard"]
        return self.cache.record(self.data.folders[i], name, self.data.shard_records(i, name), r["index"])

    def _pad(self, rows: list[torch.Tensor], C: int) -> torch.Tensor:
        """Per-record rows [n_i, width] -> [R, C, width] fp32 on memo_device, zeros past each record."""
        out = torch.zeros(len(rows), C, rows[0].shape[-1], dtype=torch.float32, device=self.memo_device)
        for i, f in enumerate(rows):
            n = min(f.shape[0], C)
            out[i, :n] = f[:n].to(out.device, torch.float32)
        return out

    @torch.no_grad()
    def __call__(self, recs: list[dict], tokens: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        R, C = tokens.shape

        def own(r):  # features this source supplies (not stored with the record)
            return not (self.stored_ok and "features" in r)
        missing = [i for i, r in enumerate(recs) if own(r) and self.cache is None and r["key"] not in self.memo]
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if missing:
            got = target_features(self.target, tokens[missing], self.layer_ids, outputs=self.keep_outputs)
            feats, outs = got if self.keep_outputs else (got, None)
            for j, i in enumerate(missing):
                n, key = int(seq_lens[i]) - 1, recs[i]["key"]
                pair = (feats[j, :n].to(self.memo_device, torch.float16),
                        None if outs is None else outs[j, :n].to(self.memo_device, torch.float16))
                fresh[key] = pair
                size = sum(t.nbytes for t in pair if t is not None)
                if self.memo_limit is None or self.memo_bytes + size <= self.memo_limit:
                    self.memo[key] = pair
                    self.memo_bytes += size

        def computed(r):
            return fresh[r["key"]] if r["key"] in fresh else self.memo[r["key"]]
        # stored with the record; else read from the memory-mapped cache file (the page cache keeps it)
        rows = [r["features"] if not own(r) else self._cached(r) if self.cache is not None else computed(r)[0]
                for r in recs]
        if self.keep_outputs:
            self.last_outputs = self._pad([computed(r)[1] for r in recs], C)
        return self._pad(rows, C)


# ---- the training step -----------------------------------------------------------------
def block_step(drafter, target, tokens, seq_lens, resp_starts, feats, cfg: TrainConfig,
               gen: torch.Generator, weights_k: torch.Tensor, head=None, amp: bool = False, outputs=None):
    """One forward over all blocks of a batch.
    head: None (logits over the full vocabulary through the target's LM head) or
    (vocab_ids [N], head_weight [N, hidden], index_of [V] -> position in vocab_ids or -1):
    logits over the drafting vocabulary only; targets outside it carry no loss and count
    as wrong (the drafter can never propose them).
    amp: bf16 autocast for the drafter and the head (CUDA, or CPUs with AMX/AVX512-BF16).
    outputs: the target's final-norm outputs [R, C, hidden] (FeatureSource.outputs), with
    cfg.distill > 0: the loss also pulls each position towards the target's distribution
    (its LM head, the same vocabulary as the drafter's, on the output one position earlier).
    -> (loss, stats {correct [R, N, B] bool, has_target [R, N, B] bool, landed [R, N] bool: the
    blocks anchored where a walk lands (blocks.walk_landings), which weigh 1 + cfg.walk_weight})."""
    dev = drafter.fc.weight.device
    B = cfg.block_size
    anchors, valid = sample_anchors(seq_lens.tolist(), resp_starts, cfg.blocks_per_seq, gen)
    bb = build_block_batch(tokens.to(dev), seq_lens, anchors, valid, B, cfg.mask_token_id)
    with torch.no_grad():
        block_emb = target.embed(bb.block_ids.to(dev))                         # [R, T, hidden]
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
        hidden = drafter.forward_blocks(block_emb, bb.block_pos.to(dev), feats.to(dev),
                                        bb.ctx_pos.to(dev), bb.attn_mask.to(dev))  # [R, T, hidden]
        targets = bb.targets.to(dev)
        sel = targets != IGNORE                                                 # [R, T]
        if head is None:
            logits = target.logits(hidden[sel])                                 # [M, V] fp32
            tgt = targets[sel]
        else:
            _, head_w, index_of = head
            logits = torch.nn.functional.linear(hidden[sel], head_w.to(dev)).float()   # [M, N]
            tgt = index_of.to(dev)[targets[sel]]                                # -1 outside the vocabulary
    R, T = targets.shape
    N = T // B
    in_vocab = tgt >= 0
    with torch.no_grad():
        correct = torch.zeros(R, T, dtype=torch.bool, device=dev)
        correct[sel] = (logits.argmax(-1) == tgt) & in_vocab
        landed = walk_landings(anchors.to(dev), valid.to(dev), accepted_lengths(correct.view(R, N, B),
                                                                                sel.view(R, N, B)))  # [R, N]
    wk = weights_k.to(dev)[bb.block_k.to(dev)].expand_as(targets)             # [R, T]
    if cfg.walk_weight > 0:   # the blocks a walk drafts from weigh more (by this step's own drafts)
        wk = wk * (1.0 + cfg.walk_weight * landed.float()).repeat_interleave(B, dim=1)
    w = wk[sel]                                                                 # [M]
    teacher = None
    if outputs is not None and cfg.distill > 0:
        with torch.no_grad():   # token p's distribution is the target's output at p - 1
            rows = torch.arange(R, device=dev)[:, None].expand(R, T)[sel]
            prev = bb.block_pos.to(dev)[sel] - 1
            th = outputs.to(dev)[rows, prev]                                    # [M, hidden]
            if head is None:
                teacher = target.logits(th.to(next(target.parameters()).dtype))
            else:
                teacher = torch.nn.functional.linear(th.to(head[1].dtype), head[1].to(dev))
            teacher = teacher.float()[in_vocab]
    loss = weighted_block_loss(logits[in_vocab], tgt[in_vocab], w[in_vocab], teacher, cfg.distill)
    return loss, {"correct": correct.view(R, N, B).cpu(), "has_target": sel.view(R, N, B).cpu(),
                  "landed": landed.cpu()}


class Trainer:
    def __init__(self, cfg: TrainConfig, target, device="cpu", feature_cache: str | None = None,
                 eval_data: str | None = None, eval_every: int = 0, memo_gb: float | None = None):
        from ..drafter import DFlashDrafter
        self.cfg, self.target, self.device = cfg, target, torch.device(device)
        for p in target.parameters():
            p.requires_grad_(False)
        self.data = ShardData(cfg.data, cfg.max_seq_len)
        # held-out tau as the run goes (walk.py): greedy responses of the holdout split
        self.eval_every = int(eval_every)
        if self.eval_every < 0:
            raise ValueError("--eval-every must be >= 0")
        self.eval_records = None
        if eval_data:
            self.eval_records = ShardData.holdout_records(eval_data, cfg.max_seq_len)
        stored = self.data.capture_layers()
        layer_ids = cfg.target_layer_ids or (stored if stored and len(stored) == cfg.num_features else None)
        self.drafter = DFlashDrafter.from_target(
            target.config, num_layers=cfg.num_layers, block_size=cfg.block_size, mask_token_id=cfg.mask_token_id,
            num_features=cfg.num_features, target_layer_ids=layer_ids, seed=cfg.seed).to(self.device).train()
        self.drafter.check_target(target.config)
        from ..runtime import cpu_has_fast_bf16
        self.amp = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and (
            self.device.type == "cuda" or (self.device.type == "cpu" and cpu_has_fast_bf16())))
        if cfg.init:
            self._warm_start(cfg.init)
        else:
            with torch.no_grad():
                # the drafter's hidden goes through the target's LM head. With unit final-norm
                # weights a random hidden gives logits of std ~6 on SmolLM2 (CE ~30-60 at
                # step 0) and Adam needs thousands of steps to shrink the norm weights. Start
                # at a quarter of the target's final norm: CE ~11 (uniform) at step 0.
                self.drafter.norm.weight.copy_(0.25 * target.norm.weight.to(self.drafter.norm.weight))
        self.head = None
        if cfg.draft_vocab:
            self._build_head(cfg.draft_vocab)
        ids = self.drafter.config.target_layer_ids
        cache = None
        if feature_cache and stored != ids:
            cache = FeatureCache(feature_cache, target, cfg.target, ids)
        if memo_gb is not None and not memo_gb >= 0:
            raise ValueError("--memo-gb must be >= 0")
        # a one-pass run over the whole data set would memoise ~1.1 GB per million tokens on a
        # CPU, more than its RAM: by default past half of it features are computed again
        memo_limit = memo_limit_bytes(self.device) if memo_gb is None else int(memo_gb * 2**30)
        self.features = FeatureSource(target, ids, stored_ok=(stored == ids), cache=cache, data=self.data,
                                      memo_device=self.device, outputs=cfg.distill > 0, memo_limit=memo_limit)
        decay = [p for n, p in self.drafter.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.drafter.named_parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.weights_k = loss_weights(cfg.block_size, cfg.gamma)
        self.out = Path(cfg.out)
        # data position
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.epoch_shards: list[list] | None = None
        self.tokens_seen = 0
        self.pred_tokens = 0

    def _warm_start(self, folder: str) -> None:
        """Begin from a saved drafter (same context features; as many or fewer layers; any
        block size: no weight depends on it, so a drafter trained on blocks of 16 can go on
        learning on blocks of 8 and is then saved with block_size 8).
        A drafter grown by extra layers computes exactly what the saved one did at step 0:
        each new layer sits on top with its output projections (attention o_proj, MLP
        down_proj) zeroed, so its residual branches start at 0 and are learnt from there."""
        from ..api import DEFAULT_DRAFTER_DIR
        from ..drafter import DFlashDrafter
        src = DFlashDrafter.load(DEFAULT_DRAFTER_DIR if folder == "default" else folder)
        a, b = src.config, self.drafter.config
        # a drafter may grow by context features too: its layers extend the saved ones, and
        # fc's columns for the new layers start at zero, so the fused context is unchanged
        grown_features = (len(a.target_layer_ids) < len(b.target_layer_ids)
                          and b.target_layer_ids[:len(a.target_layer_ids)] == a.target_layer_ids)
        same = ("hidden_size", "mask_token_id") + (() if grown_features else ("target_layer_ids",))
        for name in same:
            if getattr(a, name) != getattr(b, name):
                raise ValueError(f"--init {folder}: its {name} is {getattr(a, name)}, this run's is "
                                 f"{getattr(b, name)}; pass matching --num-features/--target-layer-ids/"
                                 "--mask-token-id (new feature layers may only follow the saved ones)")
        if a.num_layers > b.num_layers:
            raise ValueError(f"--init {folder}: it has {a.num_layers} layers, this run {b.num_layers}; "
                             "a warm start can add layers, not drop them")
        state = src.state_dict()
        if grown_features:
            w = state["fc.weight"]
            fc = torch.zeros_like(self.drafter.fc.weight, dtype=w.dtype)
            fc[:, :w.shape[1]] = w
            state["fc.weight"] = fc
        with torch.no_grad():
            missing, unexpected = self.drafter.load_state_dict(state, strict=False)
            grown = {f"layers.{i}." for i in range(a.num_layers, b.num_layers)}
            if unexpected or not all(any(k.startswith(g) for g in grown) for k in missing):
                raise ValueError(f"--init {folder} does not fit this drafter (missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]})")
            for layer in self.drafter.layers[a.num_layers:]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
        self.init_vocab = src.config.draft_vocab

    def _build_head(self, size: int) -> None:
        """Drafting vocabulary from the finished shards' responses (+ EOS ids). A warm start
        keeps its drafter's vocabulary unless --rebuild-draft-vocab: no weight depends on
        it (the head is the target's LM-head rows of the vocabulary), so data that has grown
        since it was built can choose the N most frequent tokens again."""
        from ..drafter import build_draft_vocab
        vocab = None if self.cfg.rebuild_draft_vocab else getattr(self, "init_vocab", None)
        if not vocab or len(vocab) < size:
            recs = self.data.records(self.data.finished_shards())
            always = tuple(getattr(self.target.config, "eos_token_ids", ()) or ())
            vocab = build_draft_vocab((r["response_ids"] for r in recs), size, always=always)
        self.drafter.config.draft_vocab = vocab
        ids = torch.tensor(vocab, dtype=torch.int64)
        w = self.target.embed_tokens.weight if self.target.lm_head is None else self.target.lm_head.weight
        index_of = torch.full((self.target.config.vocab_size,), -1, dtype=torch.int64)
        index_of[ids] = torch.arange(len(vocab))
        self.head = (ids, w.detach()[ids.to(w.device)].float().contiguous(), index_of)

    # -- data order --------------------------------------------------------------------
    def _epoch_records(self) -> list[dict]:
        if self.epoch_shards is None:
            self.epoch_shards = self.data.finished_shards()
        recs = self.data.records(self.epoch_shards)
        if len(recs) < self.cfg.seqs_per_step:
            raise ValueError(f"only {len(recs)} usable records in {', '.join(self.cfg.data)}; "
                             f"need at least --seqs-per-step {self.cfg.seqs_per_step}")
        return recs

    def _epoch_order(self) -> tuple[list[dict], list[int]]:
        """The epoch's records and their seeded order, built once per epoch (rebuilding them
        every step cost ~8 ms of host time at 18k records: a GPU step's budget)."""
        key = (self.epoch, None if self.epoch_shards is None else tuple(map(tuple, self.epoch_shards)))
        cached = getattr(self, "_order", None)
        if cached is None or cached[0] != key or key[1] is None:
            recs = self._epoch_records()
            g = torch.Generator().manual_seed(step_seed(self.cfg.seed, "epoch", self.epoch))
            perm = torch.randperm(len(recs), generator=g).tolist()
            cached = self._order = ((self.epoch, tuple(map(tuple, self.epoch_shards))), recs, perm)
        return cached[1], cached[2]

    def next_batch(self) -> list[dict]:
        R = self.cfg.seqs_per_step
        while True:
            recs, perm = self._epoch_order()
            lo = self.batch_in_epoch * R
            if lo + R <= len(perm):
                self.batch_in_epoch += 1
                return [recs[i] for i in perm[lo:lo + R]]
            self.epoch += 1
            self.batch_in_epoch = 0
            self.epoch_shards = None  # pick up shards finished meanwhile

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "config": self.cfg.identity(), "step": self.step, "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch, "epoch_shards": self.epoch_shards,
            "tokens_seen": self.tokens_seen, "pred_tokens": self.pred_tokens,
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def _save_drafter(self, folder: Path, dtype=None, **extra) -> None:
        """The drafter in the public format + a snapshot's meta.json (step, tokens seen,
        and `extra`), so any saved folder is also a point of the curve."""
        self.drafter.save(folder, dtype=dtype)
        (folder / "meta.json").write_text(json.dumps({"step": self.step, "tokens_seen": self.tokens_seen,
                                                     "pred_tokens": self.pred_tokens, **extra}))

    def save(self) -> None:
        tmp, latest, old = self.out / "latest.tmp", self.out / "latest", self.out / "latest.old"
        shutil.rmtree(tmp, ignore_errors=True)
        self._save_drafter(tmp)
        torch.save(self.state(), tmp / "trainer_state.pt")
        shutil.rmtree(old, ignore_errors=True)
        if latest.exists():
            latest.rename(old)
        tmp.rename(latest)
        shutil.rmtree(old, ignore_errors=True)

    def snapshot(self) -> None:
        self._save_drafter(self.out / "snapshots" / f"step_{self.step:06d}", dtype=torch.float16)

    def try_resume(self) -> bool:
        from safetensors.torch import load_file
        latest = self.out / "latest"
        if not (latest / "trainer_state.pt").exists():
            latest = self.out / "latest.old"  # crashed between the two renames
            if not (latest / "trainer_state.pt").exists():
                return False
        st = torch.load(latest / "trainer_state.pt", weights_only=False)
        if st["config"] != self.cfg.identity():
            diff = sorted(k for k in st["config"] if st["config"].get(k) != self.cfg.identity().get(k))
            raise ValueError(f"{self.out} holds a run with different settings ({', '.join(diff)}); "
                             "use another --out or the same settings")
        sd = load_file(str(latest / "model.safetensors"))
        self.drafter.load_state_dict(sd, strict=False)
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["torch_rng"])
        for k in ("step", "epoch", "batch_in_epoch", "epoch_shards", "tokens_seen", "pred_tokens"):
            setattr(self, k, st[k])
        return True

    def heldout(self) -> dict:
        """Greedy tau of the drafter as it is now on the --eval-data records, at the
        drafter's block size (walk.walk_tau: equal to the engine's, one prefill each)."""
        from .walk import walk_tau
        self.drafter.eval()
        try:
            r = walk_tau(self.target, self.drafter, self.eval_records)
        except Exception as e:   # evaluation must not cost the run (a lent GPU's minutes)
            msg = f"{type(e).__name__}: {e}"[:300]
            print(f"dflash train: held-out evaluation failed, training goes on without it: {msg}",
                  file=sys.stderr, flush=True)
            self.eval_records = None
            return {"heldout_error": msg}
        finally:
            self.drafter.train()
        return {"heldout_tau": round(r["tau"], 4), "heldout_acc_k": [round(x, 4) for x in r["per_position_acceptance"]],
                "heldout_records": len(self.eval_records)}

    def _keep_best(self, row: dict) -> None:
        """`best/`: the drafter at its highest held-out tau so far in this run (with a
        snapshot's meta.json + heldout_tau), so that a run that trains past its best (many
        epochs over the same records) still hands back the best one it had."""
        if "heldout_tau" not in row:
            return
        best = self.out / "best"
        meta = best / "meta.json"
        if meta.exists() and json.loads(meta.read_text())["heldout_tau"] >= row["heldout_tau"]:
            return
        tmp = self.out / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self._save_drafter(tmp, heldout_tau=row["heldout_tau"])
        shutil.rmtree(best, ignore_errors=True)
        tmp.rename(best)

    def fill_cache(self, progress: bool = False) -> dict:
        """Compute the feature cache of every finished shard (those missing or stale)."""
        from tqdm import tqdm
        cache = self.features.cache
        if cache is None:
            raise ValueError("--fill-cache needs --feature-cache (and data without stored features)")
        shards = self.data.finished_shards()
        computed = sum(cache.ensure(self.data.folders[i], name, self.data.shard_records(i, name))
                       for i, name in tqdm(shards, unit="shard", disable=not progress, dynamic_ncols=True,
                                           desc="features"))
        return {"feature_cache": str(cache.root), "shards": len(shards), "computed": computed}

    # -- the loop ----------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        recs = self.next_batch()
        tokens, seq_lens, resp_starts = collate(recs)
        feats = self.features(recs, tokens, seq_lens)
        outs = self.features.last_outputs   # None unless --distill
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, "anchors", self.step))
        loss, st = block_step(self.drafter, self.target, tokens, seq_lens, resp_starts, feats, cfg, gen,
                              self.weights_k, head=self.head, amp=self.amp, outputs=outs)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.tokens_seen += int(seq_lens.sum())
        self.pred_tokens += int(st["has_target"].sum())
        return {"loss": float(loss.detach()), "grad_norm": float(gnorm), **st}

    def run(self, progress: bool = False, stop_at: int | None = None, time_budget_s: float | None = None) -> dict:
        """Train until `stop_at` (default cfg.steps). Checkpoints by time and at the end.
        time_budget_s: also stop once this process has trained that long, and fit the
        schedule to it: every 10 steps the run's horizon (cfg.steps, where the cosine
        ends) becomes the step that the median time of the last 50 steps reaches when the
        budget runs out (never more than the --steps given), so a machine lent for a fixed
        time (a GPU) ends its cosine, and its checkpoint, inside that time whatever its
        speed. The schedule then depends on measured times: a resumed run continues the
        same optimizer and data order, but not bit for bit the same learning rates.
        SIGINT / SIGTERM (on the main thread) stop it after the step in flight, with a
        checkpoint at that step, so rerunning the command resumes exactly there; a second
        signal stops at once (back to the last checkpoint)."""
        import signal
        import threading
        stop = []
        restore = {}
        if threading.current_thread() is threading.main_thread():
            def on_signal(signum, frame):
                if stop:   # a second signal: give up on the clean stop
                    raise KeyboardInterrupt
                stop.append(signum)
                print(f"dflash train: stopping after step {self.step + 1} (signal {signum}; again to stop now)",
                      file=sys.stderr, flush=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                restore[sig] = signal.signal(sig, on_signal)
        try:
            return self._run(progress, stop_at, stop, time_budget_s)
        finally:
            for sig, handler in restore.items():
                signal.signal(sig, handler)

    def _run(self, progress: bool, stop_at: int | None, stop: list, time_budget_s: float | None = None) -> dict:
        from collections import deque
        from tqdm import tqdm
        cfg = self.cfg
        stop_at = cfg.steps if stop_at is None else stop_at
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError("--time-budget-s must be > 0")
        max_steps, user_stop = cfg.steps, stop_at
        step_times: deque = deque(maxlen=50)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
        log = open(self.out / "log.jsonl", "a")
        B = cfg.block_size
        fresh = lambda: {"loss": 0.0, "n": 0, "correct": torch.zeros(B), "has": torch.zeros(B), "tau": 0.0,  # noqa: E731
                         "blocks": 0, "tau_landed": 0.0, "landed": 0}
        acc = fresh()
        bar = tqdm(total=stop_at, initial=self.step, unit="step", disable=not progress, dynamic_ncols=True,
                   desc="train")
        last_ckpt = time.monotonic()
        last = {}
        if self.eval_records is not None:   # where the run starts, on the same measure
            first = {"step": self.step, "tokens_seen": self.tokens_seen, **self.heldout()}
            self._keep_best(first)
            log.write(json.dumps(first) + "\n")
            log.flush()
        t0 = time.perf_counter()
        while self.step < stop_at and not stop:
            ts = time.perf_counter()
            r = self.train_step()
            out_of_time = False
            if time_budget_s is not None:
                now = time.perf_counter()
                step_times.append(now - ts)
                left = time_budget_s - (now - t0)
                out_of_time = left <= 0
                if out_of_time:
                    stop_at = self.step
                elif self.step % 10 == 0:
                    per = sorted(step_times)[len(step_times) // 2]
                    cfg.steps = max(self.step, min(max_steps, self.step + int(left / per)))
                    stop_at = min(user_stop, cfg.steps)
                    bar.total = stop_at
            acc["loss"] += r["loss"]
            acc["n"] += 1
            acc["correct"] += (r["correct"] & r["has_target"]).sum((0, 1)).float()
            acc["has"] += r["has_target"].sum((0, 1)).float()
            tau = accepted_lengths(r["correct"], r["has_target"])
            acc["tau"] += float(tau.sum())
            acc["blocks"] += int((tau > 0).sum())
            landed = r["landed"] & (tau > 0)
            acc["tau_landed"] += float(tau[landed].sum())
            acc["landed"] += int(landed.sum())
            bar.update(1)
            ends = self.step == stop_at or bool(stop) or out_of_time
            evaluate = self.eval_records is not None and (
                ends or (self.eval_every and self.step % self.eval_every == 0))
            if self.step % cfg.log_every == 0 or ends or evaluate:
                per_pos = (acc["correct"][1:] / acc["has"][1:].clamp(min=1)).tolist()
                last = {"step": self.step, "epoch": self.epoch, "tokens_seen": self.tokens_seen,
                        "pred_tokens": self.pred_tokens, "loss": round(acc["loss"] / acc["n"], 5),
                        "tau_tf": round(acc["tau"] / max(acc["blocks"], 1), 4),
                        # the same over the blocks anchored where a walk lands, and their share
                        "tau_tf_landed": round(acc["tau_landed"] / max(acc["landed"], 1), 4),
                        "landed_share": round(acc["landed"] / max(acc["blocks"], 1), 4),
                        "acc_k": [round(x, 4) for x in per_pos], "lr": self.sched.get_last_lr()[0],
                        "grad_norm": round(r["grad_norm"], 4), "elapsed_s": round(time.perf_counter() - t0, 1)}
                if time_budget_s is not None:
                    last["steps_planned"] = cfg.steps
                if evaluate:
                    last.update(self.heldout())
                    self._keep_best(last)
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{last['loss']:.3f}", tau_tf=f"{last['tau_tf']:.2f}", ep=self.epoch)
                acc = fresh()
            if self.step % cfg.snapshot_every == 0:
                self.snapshot()
            if time.monotonic() - last_ckpt >= cfg.ckpt_every_s:
                self.save()
                last_ckpt = time.monotonic()
        self.save()
        bar.close()
        log.close()
        return last


# ---- CLI -------------------------------------------------------------------------------
def _layer_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    from ..clitools import _Parser, add_runtime_args, default_device
    ap = _Parser(prog="dflash train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=d.data, help="shard folders from `dflash data`")
    ap.add_argument("--out", default=d.out, help="run folder (rerun the same command to resume)")
    for name in ("num_layers", "num_features", "block_size", "mask_token_id", "blocks_per_seq", "seqs_per_step",
                 "steps", "warmup_steps", "seed", "snapshot_every", "log_every", "max_seq_len"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "ckpt_every_s"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    ap.add_argument("--target-layer-ids", type=_layer_ids, default=None, metavar="I,J,...",
                    help="the target layers whose outputs are the context features (default: --num-features "
                         "spaced by the public rule); with --init, layers appended to the saved drafter's "
                         "grow it: their fc columns start at zero, so it starts as exactly the saved one")
    ap.add_argument("--gamma", type=float, default=None, help="loss decay (default 7 for B 16, 4 for B 8)")
    ap.add_argument("--dtype", default=d.dtype, help="drafter compute: auto (bf16 autocast where fast) | float32 | bfloat16")
    ap.add_argument("--draft-vocab", type=int, default=d.draft_vocab,
                    help="N > 0: drafting vocabulary of the N most frequent response tokens (draft_vocab.json)")
    ap.add_argument("--init", default=None, help="warm start from this drafter folder (e.g. the shipped one)")
    ap.add_argument("--distill", type=float, default=d.distill,
                    help="0 < a <= 1: each position's loss is (1-a) CE on the data's token + a KL from the target's "
                         "own next-token distribution (computed beside the features; not with --feature-cache)")
    ap.add_argument("--walk-weight", type=float, default=d.walk_weight,
                    help="w > 0: blocks anchored where a speculative walk lands (right after another block's "
                         "last accepted draft, by this step's own drafts) weigh 1 + w in the loss, so training "
                         "leans towards the anchors the engine drafts from (default 0: all blocks alike)")
    ap.add_argument("--rebuild-draft-vocab", action="store_true",
                    help="with --init: choose the --draft-vocab N tokens again from this run's data "
                         "(by default a warm start keeps its drafter's vocabulary)")
    # the target's flags; --dtype above is the drafter's compute
    add_runtime_args(ap, target=d.target, device=default_device(), dtype=None)
    ap.add_argument("--feature-cache", default=None,
                    help="folder keeping the target's context features on disk (first epoch computes, "
                         "later epochs, resumes and parallel runs read them)")
    ap.add_argument("--fill-cache", action="store_true",
                    help="only compute the --feature-cache for every finished shard, then exit")
    ap.add_argument("--memo-gb", type=float, default=None,
                    help="keep at most this many GiB of computed features in memory for later epochs (default: "
                         "half the RAM on a CPU, all on a GPU; 0 for a run that reads each record once)")
    ap.add_argument("--eval-data", default=None,
                    help="a holdout-split folder from `dflash data --split holdout --sample-frac 0`: the "
                         "drafter's greedy held-out tau (the engine's, replayed from one prefill per prompt) "
                         "is logged at the start, every --eval-every steps and at the end")
    ap.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: start and end)")
    ap.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) at this step")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="train for at most this many seconds in this process; the cosine schedule is fitted "
                         "to end then (from measured step times; --steps stays the upper bound)")
    ap.add_argument("--no-retain-memory", action="store_true",
                    help="leave glibc's malloc at its defaults (with --feature-cache freed memory is kept for "
                         "reuse by default: ~6%% faster steps on CPU, measured; "
                         "dflash_core.runtime.retain_freed_memory; never without a feature cache, where the "
                         "target's forward over batches of every length grew the heap without bound)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    from ..clitools import CliError, apply_runtime_args
    a = build_parser().parse_args(argv)
    apply_runtime_args("dflash train", a)
    if a.feature_cache and not a.no_retain_memory:
        from ..runtime import retain_freed_memory
        retain_freed_memory()
    if a.time_budget_s is not None and not a.time_budget_s > 0:
        raise CliError("dflash train: --time-budget-s must be > 0")
    if a.fill_cache and not a.feature_cache:
        raise CliError("dflash train: --fill-cache needs --feature-cache DIR")
    try:
        fields = set(TrainConfig.__dataclass_fields__)
        cfg = TrainConfig(**{k: v for k, v in vars(a).items() if k in fields})
    except ValueError as e:
        raise CliError(f"dflash train: {e}") from None
    from ..models.registry import resolve_model
    try:
        from ..runtime import resolve_dtype
        # the frozen target only supplies features and the LM head over long sequences (rows
        # the native kernels hand to torch): bf16 where that is fast
        tdtype = torch.float32 if cfg.dtype == "float32" else resolve_dtype(cfg.dtype, a.device,
                                                                             prefer_native=False)
        target = resolve_model(cfg.target).load(device=a.device, dtype=tdtype)
        trainer = Trainer(cfg, target, device=a.device, feature_cache=a.feature_cache, eval_data=a.eval_data,
                          eval_every=a.eval_every, memo_gb=a.memo_gb)
        if a.fill_cache:
            print(json.dumps(trainer.fill_cache(progress=not a.no_progress)))
            return 0
        resumed = trainer.try_resume()
        if resumed:
            print(f"resuming {cfg.out} at step {trainer.step}", file=sys.stderr)
        last = trainer.run(progress=not a.no_progress, stop_at=a.stop_at, time_budget_s=a.time_budget_s)
    except ValueError as e:   # a model or data that does not load (FileNotFoundError: run_command)
        print(f"dflash train: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"out": cfg.out, "step": trainer.step, **{k: v for k, v in last.items() if k != "step"}}))
    return 0


if __name__ == "__main__":
    from ..clitools import run_command
    sys.exit(run_command("dflash train", main, None))
