"""A preallocated KV cache indexed by slot, with a length per slot.

One slot per running sequence. `append` happens inside the model forward (the kernels
write K/V at absolute positions); here we only keep the bookkeeping: which slots are
free and how many positions of each are valid. Crop = set the length (stale entries
beyond it are overwritten later), free = return the slot.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, max_slots: int, capacity: int, num_kv_heads: int,
                 head_dim: int, dtype=torch.float32, device="cpu"):
        shape = (max_slots, num_kv_heads, capacity, head_dim)  # [S, Hkv, L, D]
        # one tensor per kind, [layers, S, Hkv, L, D]; k[i] / v[i] are layer i's (contiguous
        # views), and an op over every layer (tree.commit_path) is one indexing of k_all / v_all
        self.k_all = torch.zeros((num_layers,) + shape, dtype=dtype, device=device)
        self.v_all = torch.zeros((num_layers,) + shape, dtype=dtype, device=device)
        self.k = list(self.k_all.unbind(0))
        self.v = list(self.v_all.unbind(0))
        self.lens = torch.zeros(max_slots, dtype=torch.int64)  # valid positions per slot (host)
        self.capacity = capacity
        self.max_slots = max_slots
        self._free = list(range(max_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache slot")
        slot = self._free.pop()
        self.lens[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise RuntimeError(f"slot {slot} freed twice")
        self.lens[slot] = 0
        self._free.append(slot)

    def crop(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.capacity:
            raise ValueError(f"crop length {length} outside [0, {self.capacity}]")
        self.lens[slot] = length

    def set_len(self, slot: int, length: int) -> None:
        self.crop(slot, length)
