"""Hot-path ops with backend dispatch: Triton kernels on CUDA tensors, the PyTorch
reference (`reference.py`) everywhere else. `set_backend("torch" | "triton" | "auto")`
or the env var DFLASH_KERNELS forces a choice ("triton" on CPU needs TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

from . import reference

_BACKEND = os.environ.get("DFLASH_KERNELS", "auto")


def set_backend(name: str) -> None:
    global _BACKEND
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown kernel backend {name!r}: use auto, torch or triton")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


def block_attention(q, k_cache, v_cache, slots, ctx_lens, k_block, v_block, causal, scale):
    return reference.block_attention(q, k_cache, v_cache, slots, ctx_lens, k_block, v_block, causal, scale)


def write_context_kv(k, v, k_norm_weight, eps, cos, sin, k_cache, v_cache, slots, positions):
    return reference.write_context_kv(k, v, k_norm_weight, eps, cos, sin, k_cache, v_cache, slots, positions)


def greedy_accept(draft_tokens, target_tokens):
    return reference.greedy_accept(draft_tokens, target_tokens)


def rejection_accept(draft_tokens, target_probs, draft_probs, u_accept, u_sample):
    return reference.rejection_accept(draft_tokens, target_probs, draft_probs, u_accept, u_sample)


sample_from_probs = reference.sample_from_probs
rms_norm = reference.rms_norm
apply_rope = reference.apply_rope
