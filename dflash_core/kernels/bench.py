"""Kernel timings: Triton against the PyTorch path (SDPA / eager reference) at
realistic shapes. Needs a CUDA GPU:

    python -m dflash_core.kernels.bench [--dtype bf16] [--heads 32 --kv-heads 8 --head-dim 128]

Prints one line per shape and, last, one JSON line. On a machine without CUDA it says
so and exits 0 (the CPU path is the reference itself).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def _time_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dflash_core.kernels.bench")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="512,2048,8192")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel benchmark: no CUDA GPU here; the CPU path is the PyTorch reference itself "
              "(run this on a GPU machine)")
        return 0
    from . import reference, triton_accept, triton_attention  # noqa: F401
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    H, Hkv, D, T = args.heads, args.kv_heads, args.head_dim, args.block
    rows = []
    for R in map(int, args.batches.split(",")):
        for C in map(int, args.contexts.split(",")):
            dev = "cuda"
            q = torch.randn(R, H, T, D, device=dev, dtype=dtype)
            kc = torch.randn(R, Hkv, C + T, D, device=dev, dtype=dtype)
            vc = torch.randn_like(kc)
            kb, vb = torch.randn(R, Hkv, T, D, device=dev, dtype=dtype), torch.randn(R, Hkv, T, D, device=dev, dtype=dtype)
            slots = torch.arange(R, device=dev)
            lens = torch.full((R,), C, device=dev)
            for causal in (True, False):
                t_tri = _time_ms(lambda: triton_attention.block_attention(q, kc, vc, slots, lens, kb, vb, causal, D ** -0.5))
                t_ref = _time_ms(lambda: reference.block_attention(q, kc, vc, slots, lens, kb, vb, causal, D ** -0.5))
                rows.append({"batch": R, "context": C, "causal": causal, "triton_ms": round(t_tri, 4),
                             "torch_ms": round(t_ref, 4), "speedup": round(t_ref / t_tri, 3)})
                print(f"block_attention R={R:>3} ctx={C:>5} T={T} causal={causal!s:>5}: "
                      f"triton {t_tri:.3f} ms, torch {t_ref:.3f} ms ({t_ref / t_tri:.2f}x)")
    print(json.dumps({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
