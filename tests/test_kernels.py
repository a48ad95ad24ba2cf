"""Triton kernels against their PyTorch references, on CPU through the Triton
interpreter (TRITON_INTERPRET=1, set before any Triton kernel module is imported), and
compiled for real when CUDA is present.

Tolerances (max abs error vs the fp32 reference on the same inputs):
  attention: fp32 1e-4 (accumulation order differs); fp16 2e-3; bf16 2e-2 (8-bit mantissa);
  context K/V write: fp32 1e-5; bf16 two rounding steps (2^-6 relative).
"""
from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

triton = pytest.importorskip("triton")

from dflash_core import kernels  # noqa: E402
from dflash_core.kernels import reference as ref  # noqa: E402
from dflash_core.kernels import triton_accept, triton_attention, triton_context_kv  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def attention_inputs(R, Hkv, rep, T, D, L, ctx_lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = R + 2
    H = Hkv * rep
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    q, kb, vb = mk(R, H, T, D), mk(R, Hkv, T, D), mk(R, Hkv, T, D)
    kc, vc = mk(S, Hkv, L, D), mk(S, Hkv, L, D)
    slots = torch.randperm(S, generator=g)[:R].to(DEV)   # not consecutive: exercises gathers
    return q, kc, vc, slots, torch.tensor(ctx_lens, device=DEV), kb, vb


@pytest.mark.parametrize("rep", [1, 3, 8])
@pytest.mark.parametrize("T", [8, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_block_attention_fp32(rep, T, causal):
    args = attention_inputs(R=4, Hkv=2 if rep < 8 else 1, rep=rep, T=T, D=16, L=48,
                            ctx_lens=[0, 1, 17, 48], dtype=torch.float32)
    want = ref.block_attention(*args, causal, 0.25)
    got = triton_attention.block_attention(*args, causal, 0.25)
    assert (got - want).abs().max().item() < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rep,causal", [(3, True), (8, False)])
def test_block_attention_low_precision(dtype, rep, causal):
    args = attention_inputs(R=3, Hkv=1, rep=rep, T=16, D=32, L=40, ctx_lens=[1, 0, 33], dtype=dtype, seed=1)
    want = ref.block_attention(*[a.float() if a.is_floating_point() else a for a in args], causal, 0.2)
    got = triton_attention.block_attention(*args, causal, 0.2)
    assert got.dtype == dtype
    assert (got.float() - want).abs().max().item() < TOL[dtype]


def test_block_attention_single_row_and_split_context():
    """Batch 1 with a long context (the split-KV path on GPU) and a 1-token block."""
    for T in (1, 16):
        args = attention_inputs(R=1, Hkv=2, rep=3, T=T, D=16, L=300, ctx_lens=[257], dtype=torch.float32, seed=2)
        want = ref.block_attention(*args, True, 0.25)
        got = triton_attention.block_attention(*args, True, 0.25)
        assert (got - want).abs().max().item() < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_norm", [True, False])
def test_write_context_kv(dtype, with_norm):
    g = torch.Generator().manual_seed(3)
    N, Hkv, D, S, L = 7, 3, 16, 3, 20
    k = torch.randn(N, Hkv, D, generator=g).to(DEV, dtype)
    v = torch.randn(N, Hkv, D, generator=g).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(DEV, dtype) if with_norm else None
    pos = torch.tensor([0, 1, 2, 5, 6, 19, 3], device=DEV)
    slots = torch.tensor([0, 0, 0, 2, 2, 1, 1], device=DEV)
    ang = pos[:, None].float() * torch.linspace(0.1, 1.0, D // 2, device=DEV)[None]
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    caches = [torch.zeros(S, Hkv, L, D, device=DEV, dtype=dtype) for _ in range(4)]
    ref.write_context_kv(k, v, w, 1e-6, cos, sin, caches[0], caches[1], slots, pos)
    triton_context_kv.write_context_kv(k, v, w, 1e-6, cos, sin, caches[2], caches[3], slots, pos)
    # fp32: 1e-5; bf16: two rounding steps (norm output and stored value; 2^-6 relative)
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (2 ** -6, 1e-2)
    torch.testing.assert_close(caches[2].float(), caches[0].float(), rtol=rtol, atol=atol)
    assert torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("B", [1, 8, 16])
def test_greedy_accept(B):
    g = torch.Generator().manual_seed(B)
    R, V = 6, 40
    draft = torch.randint(0, V, (R, B - 1), generator=g)
    target = torch.randint(0, V, (R, B), generator=g)
    for r in range(R):  # row r agrees on its first min(r*3, B-1) drafts
        n = min(r * 3, B - 1)
        target[r, :n] = draft[r, :n]
        if n < B - 1:
            target[r, n] = (draft[r, n] + 1) % V   # a certain mismatch at n
    want = ref.greedy_accept(draft, target)
    got = triton_accept.greedy_accept(draft.to(DEV), target.to(DEV))
    assert [x.cpu().tolist() for x in got] == [x.tolist() for x in want]
    assert want[0].tolist() == [min(r * 3, B - 1) for r in range(R)]


@pytest.mark.parametrize("B,V", [(16, 60), (8, 3000), (1, 50)])
def test_rejection_accept(B, V):
    g = torch.Generator().manual_seed(V)
    R = 8
    tp = torch.softmax(torch.randn(R, B, V, generator=g) * 2, -1)
    # drafter close to the target for some rows (long acceptances), far for others,
    # and identical for row 0 (residual is all zero: fall back to p)
    mix = torch.linspace(0.0, 1.0, R)[:, None, None]
    dp = (1 - mix) * tp[:, :B - 1] + mix * torch.softmax(torch.randn(R, B - 1, V, generator=g) * 2, -1)
    dp = dp / dp.sum(-1, keepdim=True)
    draft = (torch.multinomial(dp.reshape(-1, V), 1, generator=g).view(R, B - 1) if B > 1
             else torch.zeros(R, 0, dtype=torch.int64))
    ua, us = torch.rand(R, B - 1, generator=g), torch.rand(R, generator=g)
    want = ref.rejection_accept(draft, tp, dp, ua, us)
    got = triton_accept.rejection_accept(draft.to(DEV), tp.to(DEV), dp.to(DEV), ua.to(DEV), us.to(DEV), block_v=256)
    assert [x.cpu().tolist() for x in got] == [x.tolist() for x in want]
    if B > 1:
        assert want[0][0].item() == B - 1 and want[0].max().item() > 0 and want[0].min().item() < B - 1


def test_dispatch_setting():
    with pytest.raises(ValueError):
        kernels.set_backend("cuda")
    old = kernels.get_backend()
    try:
        kernels.set_backend("torch")
        assert not kernels._use_triton(torch.zeros(1))
        kernels.set_backend("triton")
        assert kernels._use_triton(torch.zeros(1))
        kernels.set_backend("auto")
        assert not kernels._use_triton(torch.zeros(1, device="cpu"))
    finally:
        kernels.set_backend(old)


def test_engine_identical_with_triton_kernels():
    """The whole engine (verify, drafting, context writes, acceptance) on Triton kernels
    gives the same greedy tokens as on the reference path, and the same seeded samples:
    the engine hands the acceptance kernels the device tensors they launch on (greedy and
    rejection acceptance, one call each per step)."""
    from dflash_core.api import tiny_random_target
    from dflash_core.drafter import DFlashDrafter, LocalDraftBackend
    from dflash_core.engine import EngineConfig, SpecEngine
    from dflash_core.sampling import SamplingParams

    target = tiny_random_target(vocab_size=512, num_layers=2, seed=4).to(DEV).pack_weights()
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500], [9]]
    outs = {}
    old = kernels.get_backend()
    try:
        for backend in ("torch", "triton"):
            kernels.set_backend(backend)
            d = DFlashDrafter.from_target(target.config, num_layers=1, block_size=8, mask_token_id=3,
                                          num_features=2, seed=1).to(DEV)
            eng = SpecEngine(target, LocalDraftBackend(d, 3, 64), EngineConfig(max_slots=3, max_seq_len=48,
                                                                               block_size=8))
            res = eng.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
            outs[backend] = [r.token_ids for r in res]
            mixed = [SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=0.8, seed=3),
                     SamplingParams(max_new_tokens=10, ignore_eos=True),
                     SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=1.0, top_p=0.9, seed=4)]
            outs[backend + "-sampled"] = [r.token_ids for r in eng.generate(prompts, mixed)]
    finally:
        kernels.set_backend(old)
    assert outs["torch"] == outs["triton"]
    assert all(len(o) == 10 for o in outs["torch"])
    assert outs["torch-sampled"] == outs["triton-sampled"]
    assert outs["torch-sampled"][1] == outs["torch"][1]                  # the greedy row beside sampling ones
