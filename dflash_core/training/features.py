"""Context features of the training records, computed once by the frozen target and kept on disk.

On a CPU the target's forward over a batch's sequences is most of a training step
(SmolLM2-135M, 4 sequences of ~400 tokens, 1 thread: ~3.6 s of a ~4.2 s step); the
drafter's own forward and backward are the rest. A feature cache stores those features
(fp16, one file per data shard) so that only the first pass over the data pays for them:
later epochs, resumed runs and the runs of a sweep read them back.

Layout: `<root>/meta.json` (target, layer ids, hidden size: a cache built for other
settings is refused) and, per data folder, `<folder name>-<hash of its path>/<shard>.feat.npy`
(fp16 [sum of (sequence length - 1)], K*hidden]) + `<shard>.lens.npy` (int32 per record).
A shard whose records no longer match the stored lengths (data regenerated) is recomputed.
Files are written to a temporary name and renamed, so parallel writers (a `--fill-cache`
process beside a training run) never leave a torn file. The cache is derived data: it is
not committed (6.5 GB for the shipped data set) and can be deleted at any time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .blocks import collate


class FeatureCache:
    def __init__(self, root: str | Path, target, target_name: str, layer_ids: list[int], rows: int = 8):
        self.root = Path(root)
        self.target, self.layer_ids, self.rows = target, list(layer_ids), rows
        self.meta = {"target": str(target_name), "layer_ids": self.layer_ids,
                     "hidden": int(target.config.hidden_size), "num_layers": int(target.config.num_layers)}
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / "meta.json"
        if meta_path.exists():
            have = json.loads(meta_path.read_text())
            if have != self.meta:
                diff = sorted(k for k in self.meta if have.get(k) != self.meta[k])
                raise ValueError(f"feature cache {self.root} was built for other settings ({', '.join(diff)}); "
                                 "use another --feature-cache folder")
        else:
            tmp = meta_path.with_name(f"meta.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.meta))
            os.replace(tmp, meta_path)
        self._open: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def _path(self, folder: Path, shard: str, kind: str, tmp: bool = False) -> Path:
        """<root>/<folder name>-<hash of its path>/<shard stem>.<kind>.npy ("feat" | "lens")."""
        folder = Path(folder)
        h = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]
        stem = Path(shard).name.split(".")[0]
        return self.root / f"{folder.name}-{h}" / (f"{stem}.{kind}.{os.getpid()}.tmp.npy" if tmp
                                                   else f"{stem}.{kind}.npy")

    @staticmethod
    def _lens(records: list[dict]) -> np.ndarray:
        return np.array([len(r["prompt_ids"]) + len(r["response_ids"]) - 1 for r in records], dtype=np.int32)

    @staticmethod
    def _offsets(lens: np.ndarray) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])

    def ensure(self, folder: Path, shard: str, records: list[dict]) -> bool:
        """Compute and store the shard's features unless they are stored for exactly these
        records (same lengths). -> whether they were computed."""
        lens_path = self._path(folder, shard, "lens")
        if lens_path.exists() and np.array_equal(np.load(lens_path), self._lens(records)):
            return False
        self.compute(folder, shard, records)
        return True

    def shard(self, folder: Path, shard: str, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """-> (features fp16 [N, K*hidden] memory-mapped, offsets int64 [R+1]) for all records
        of a shard, computing and storing them first when missing or stale."""
        key = (str(folder), shard)
        if key not in self._open:
            self.ensure(folder, shard, records)
            feats = np.load(self._path(folder, shard, "feat"), mmap_mode="r")
            self._open[key] = (feats, self._offsets(self._lens(records)))
        return self._open[key]

    def compute(self, folder: Path, shard: str, records: list[dict]) -> None:
        """One target forward per group of similar-length records (little padding)."""
        lens = self._lens(records)
        KH = len(self.layer_ids) * self.target.config.hidden_size
        out = np.zeros((int(lens.sum()), KH), dtype=np.float16)
        offs = self._offsets(lens)
        order = sorted(range(len(records)), key=lambda i: -int(lens[i]))
        for g in range(0, len(order), self.rows):
            idx = order[g:g + self.rows]
            tokens, _, _ = collate([records[i] for i in idx])
            feats = target_features(self.target, tokens, self.layer_ids).to("cpu", torch.float16).numpy()
            if not np.isfinite(feats).all():
                raise ValueError(f"{folder}/{shard}: the target's features overflow float16; "
                                 "train without --feature-cache")
            for j, i in enumerate(idx):
                out[offs[i]:offs[i + 1]] = feats[j, :lens[i]]
        self._path(folder, shard, "feat").parent.mkdir(parents=True, exist_ok=True)
        for kind, arr in (("feat", out), ("lens", lens)):
            np.save(self._path(folder, shard, kind, tmp=True), arr)
        # features first: a reader checks the lengths file, which then names complete features
        for kind in ("feat", "lens"):
            os.replace(self._path(folder, shard, kind, tmp=True), self._path(folder, shard, kind))

    def record(self, folder: Path, shard: str, records: list[dict], index: int) -> torch.Tensor:
        """Features of one record: fp16 [sequence length - 1, K*hidden]."""
        feats, offs = self.shard(folder, shard, records)
        return torch.from_numpy(np.array(feats[offs[index]:offs[index + 1]]))


@torch.no_grad()
def target_features(target, tokens: torch.Tensor, layer_ids: list[int], chunk: int | None = None,
                    outputs: bool = False, prefill_lens: list[int] | None = None):
    """Captured features [R, C, K*hidden] of right-padded token rows [R, C] (each row from
    position 0, in a fresh cache); only the layers up to the last captured one run.
    outputs: run every layer and return (features, the final-norm outputs [R, C, hidden]:
    position p's is what the target's LM head turns into its distribution of token p+1).
    chunk: forward at most this many positions at a time (through the cache). With
    R * chunk <= the native kernel's row_limit() every linear takes the row-invariant native
    path, as the engine's verify forwards do, so the features equal theirs bit for bit
    (a whole prefill of more rows takes MKL's sgemm, which rounds differently).
    prefill_lens: row r's first prefill_lens[r] positions (its prompt) are computed as the
    engine prefills a prompt (Decoder.forward's prefill) and the rest as its decode steps
    compute them (so the features are the engine's where it runs the native layers)."""
    R, C = tokens.shape
    split = prefill_lens is not None and max(prefill_lens) > 0
    cache = target.new_cache(R, C + max(prefill_lens) - min(prefill_lens) if split else C)
    tokens = tokens.to(target.device)
    step = C if not chunk else max(1, int(chunk))

    def forwards(ids: torch.Tensor, starts: torch.Tensor, n: int, prefill: bool):
        """Positions 0 .. n-1 of ids [R, >= n] at starts[r] + position, `step` at a time ->
        (features, final-norm outputs or None), each [R, n, .]."""
        fs, os_ = [], []
        for lo in range(0, n, step):
            o, f = target(ids[:, lo:min(n, lo + step)], cache, torch.arange(R), starts + lo, capture_layers=layer_ids,
                          features_only=not outputs, prefill=prefill)
            fs.append(f)
            os_.append(o)
        cat = (lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs, dim=1))
        return cat(fs), (cat(os_) if outputs else None)

    zero = torch.zeros(R, dtype=torch.int64)
    if not split:
        feats, outs = forwards(tokens, zero, C, False)
        return feats if not outputs else (feats, outs)
    # the prompts (positions past a row's own are overwritten by the second pass), then the rest
    P, lens = max(prefill_lens), torch.tensor(prefill_lens, dtype=torch.int64)
    first = forwards(tokens, zero, P, True)
    rest = C - min(prefill_lens)
    idx = (lens[:, None] + torch.arange(rest)[None, :]).clamp(max=C - 1)   # [R, rest] (past C: padding)
    then = forwards(tokens.gather(1, idx.to(tokens.device)), lens, rest, False)

    def merged(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:   # [R, P, .], [R, rest, .] -> [R, C, .]
        out = torch.cat([a, a.new_zeros(R, C - P, a.shape[-1])], dim=1)
        for r, n in enumerate(prefill_lens):
            out[r, n:] = b[r, :C - n]
        return out
    feats = merged(first[0], then[0])
    return feats if not outputs else (feats, merged(first[1], then[1]))
