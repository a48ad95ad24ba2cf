"""Small helpers shared by the Triton kernel modules (no Triton import here).

`triton_available()` tells whether Triton can be imported at all; the kernel modules
themselves (`triton_*.py`) import Triton at module level and are only imported lazily
by the dispatch in `__init__.py`.
"""
from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def check_launchable(*tensors: torch.Tensor) -> None:
    """Compiled Triton needs CUDA tensors; CPU tensors need the interpreter."""
    for t in tensors:
        if t.device.type != "cuda" and not interpret_mode():
            raise RuntimeError(
                f"Triton kernels need CUDA tensors (got {t.device}); on CPU set "
                "TRITON_INTERPRET=1 before the kernels are first used, or use the "
                "'torch' backend")


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    n = max(int(n), 1)
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_in_fp32(t: torch.Tensor) -> bool:
    """Whether tl.dot operands are upcast to fp32: always for fp32 inputs (then the
    dot runs in IEEE fp32, not TF32), and always in the interpreter, whose bf16 dot is
    wrong. On GPU, fp16/bf16 dots run natively with fp32 accumulation."""
    return t.dtype == torch.float32 or interpret_mode() or t.device.type != "cuda"
