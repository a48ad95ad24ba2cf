"""Compact on-disk shards of generated training data (token ids, not features).

A shard `shard_NNNNN.npz` (numpy, compressed, no pickle) holds R records as flat arrays:
  prompt_ids   uint16 [sum of prompt lengths]      (uint16: vocabularies up to 65536)
  response_ids uint16 [sum of response lengths]
  prompt_lens, response_lens  int32 [R]
  sampled      bool [R]
  finish       uint8 [R]  (index into FINISH_REASONS)
  conv_ids     unicode [R]
A record with stored features (datagen --capture-layers) cannot be written compactly:
those shards stay `shard_NNNNN.pt` (torch.save of a list of dicts), as before.
`read_shard` returns a list of dicts {conv_id, prompt_ids, response_ids, sampled,
finish_reason[, features]} for either format.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

FINISH_REASONS = ("stop", "length", "abort", None)


def write_shard(path: Path, records: list[dict]) -> None:
    """Atomic write (tmp + rename). `.npz` for token-only records, `.pt` with features."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".pt":
        torch.save(records, tmp)
    else:
        big = max((max(r["prompt_ids"] + r["response_ids"], default=0) for r in records), default=0)
        dtype = np.uint16 if big < 1 << 16 else np.int32
        arrays = {
            "prompt_ids": np.array([t for r in records for t in r["prompt_ids"]], dtype=dtype),
            "response_ids": np.array([t for r in records for t in r["response_ids"]], dtype=dtype),
            "prompt_lens": np.array([len(r["prompt_ids"]) for r in records], dtype=np.int32),
            "response_lens": np.array([len(r["response_ids"]) for r in records], dtype=np.int32),
            "sampled": np.array([bool(r["sampled"]) for r in records], dtype=bool),
            "finish": np.array([FINISH_REASONS.index(r["finish_reason"]) for r in records], dtype=np.uint8),
            "conv_ids": np.array([str(r["conv_id"]) for r in records]),
        }
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def read_shard(path: Path) -> list[dict]:
    path = Path(path)
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)
    with np.load(path, allow_pickle=False) as z:
        p_ids, r_ids = z["prompt_ids"].astype(np.int64), z["response_ids"].astype(np.int64)
        p_lens, r_lens = z["prompt_lens"].tolist(), z["response_lens"].tolist()
        sampled, finish, conv = z["sampled"].tolist(), z["finish"].tolist(), z["conv_ids"].tolist()
    out, po, ro = [], 0, 0
    for i in range(len(p_lens)):
        out.append({"conv_id": conv[i], "prompt_ids": p_ids[po:po + p_lens[i]].tolist(),
                    "response_ids": r_ids[ro:ro + r_lens[i]].tolist(), "sampled": sampled[i],
                    "finish_reason": FINISH_REASONS[finish[i]]})
        po += p_lens[i]
        ro += r_lens[i]
    return out
