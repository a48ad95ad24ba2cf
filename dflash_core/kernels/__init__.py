"""Hot-path ops with backend dispatch: Triton kernels on CUDA tensors, the PyTorch
reference (`reference.py`) everywhere else.

`set_backend("auto" | "torch" | "triton")` or the env var DFLASH_KERNELS picks:
- auto (default): Triton when the tensors are on CUDA and Triton imports, else reference;
- torch: always the reference;
- triton: always Triton (on CPU that needs TRITON_INTERPRET=1: the interpreter).
The Triton modules are imported lazily, so CPU-only installs without a working Triton
still run. Every op keeps the reference's signature and contract.
"""
from __future__ import annotations

import os

import torch

from . import reference

_BACKEND = os.environ.get("DFLASH_KERNELS", "auto")
_MODULES: dict[str, object] = {}


def set_backend(name: str) -> None:
    global _BACKEND
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown kernel backend {name!r}: use auto, torch or triton")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


def _triton(module: str):
    if module not in _MODULES:
        import importlib
        _MODULES[module] = importlib.import_module(f".{module}", __name__)
    return _MODULES[module]


def _use_triton(t: torch.Tensor) -> bool:
    if _BACKEND == "torch":
        return False
    if _BACKEND == "triton":
        return True
    if t.device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def uses_triton(t: torch.Tensor) -> bool:
    """Whether ops on tensors like `t` dispatch to the Triton kernels."""
    return _use_triton(t)


def block_attention(q, k_cache, v_cache, slots, ctx_lens, k_block, v_block, causal, scale):
    if _use_triton(q):
        return _triton("triton_attention").block_attention(q, k_cache, v_cache, slots, ctx_lens, k_block,
                                                           v_block, causal, scale)
    return reference.block_attention(q, k_cache, v_cache, slots, ctx_lens, k_block, v_block, causal, scale)


def write_context_kv(k, v, k_norm_weight, eps, cos, sin, k_cache, v_cache, slots, positions):
    if _use_triton(k):
        return _triton("triton_context_kv").write_context_kv(k, v, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                                                             slots, positions)
    return reference.write_context_kv(k, v, k_norm_weight, eps, cos, sin, k_cache, v_cache, slots, positions)


def greedy_accept(draft_tokens, target_tokens):
    if _use_triton(draft_tokens):
        return _triton("triton_accept").greedy_accept(draft_tokens, target_tokens)
    return reference.greedy_accept(draft_tokens, target_tokens)


def rejection_accept(draft_tokens, target_probs, draft_probs, u_accept, u_sample):
    if _use_triton(draft_tokens):
        return _triton("triton_accept").rejection_accept(draft_tokens, target_probs, draft_probs, u_accept, u_sample)
    return reference.rejection_accept(draft_tokens, target_probs, draft_probs, u_accept, u_sample)


sample_from_probs = reference.sample_from_probs
rms_norm = reference.rms_norm
apply_rope = reference.apply_rope
