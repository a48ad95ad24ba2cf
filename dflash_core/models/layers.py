"""Building blocks shared by the target decoder and the DFlash drafter: RMSNorm, the
gated MLP, the rotary-embedding table, and the q/k/v/o projections of one attention
layer (Llama / Qwen2 / Qwen3 naming so HF state dicts load unchanged)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels, native


# fp32 on CPU: below this many rows `F.linear` (MKL) is already at its one-row cost and
# packing would only change the numbers; from here on MKL's sgemm repacks the weight on
# every call and costs 2-4x a row, where the prepacked oneDNN product stays within ~1.5x
# (1 thread, AVX512F Xeon without AVX512-BF16: 576x1536 at 4 / 8 rows 301 / 507 us ->
# 228 / 310 us; the 576x49152 LM head 29.0 / 49.3 ms -> 11.9 / 14.9 ms).
FP32_PACKED_MIN_ROWS = 4
# ...and for weights up to this many elements (q/k/v, o and down of a small model; not a
# wide gate/up or an LM head) a plain `torch.mm` against a once-transposed copy beats the
# packed product from 4 rows on (2 threads, same Xeon, 576x960 q/k/v at 4 / 8 / 16 rows:
# F.linear 0.46 / 0.49 / 0.53 ms, packed 0.14 / 0.16 / 0.20, mm 0.065 / 0.080 / 0.120;
# 1536->576 down at 16 rows 0.86 / 0.35 / 0.27). Wider weights stay packed.
FP32_MM_MAX_ELEMENTS = 1 << 20


def is_prepacked(obj) -> bool:
    """Whether obj is a linear returned by prepack_linear (bench.prepacked_off finds them
    by this mark, wherever a model keeps them)."""
    return callable(obj) and getattr(obj, "prepacked", False) is True


def prepack_linear(weight: torch.Tensor, bias: torch.Tensor | None = None,
                   mm_max_elements: int = FP32_MM_MAX_ELEMENTS, native: bool = True, amx: bool | None = None,
                   amx_inputs: str | None = None):
    """Inference-only linear with its weight reordered once for oneDNN, or None where
    that is not available or not exact enough.

    fp32 on a CPU with AVX2 + FMA (and `native`): the native kernel (dflash_core.native)
    over the most compact exact form of the weight (the GGUF's 4-bit / 8-bit codes where
    they give back every fp32 weight bit for bit), for every row count: row-invariant, and
    a one-token step reads a fraction of the bytes (`amx`: its AMX forms or not, None: where
    the build has them, native.make_linear's use_amx; `amx_inputs`: what those take, "fp32"
    or "bf16", None: native.amx_inputs()). Everything below is the fallback.

    bf16 on CPU: `F.linear` reorders the weight into oneDNN's blocked layout on every
    call; for a decode step that reorder costs more than the matmul (576x3072: ~150 us ->
    ~60 us per call at 1 row, 576x49152 LM head ~4.2 -> ~1.6 ms, 2 threads). The packed
    product is bit-identical to `F.linear` (checked here on a probe input) and
    row-invariant (see the padding below): a speculative verify and the autoregressive
    step compute each token's numbers identically, which is what keeps greedy DFlash
    equal to the engine's own bf16 decoding.

    fp32 on CPU: inputs of fewer than FP32_PACKED_MIN_ROWS rows keep `F.linear` bit for
    bit (the one-row decode step, so fp32 greedy output still equals transformers'
    own); larger inputs (a verify block, a batch of rows, the drafter's block) take the
    packed product, which differs from `F.linear` by summation order only (a probe
    checks ~1e-6 relative), or, for weights of at most `mm_max_elements` elements, a
    plain `torch.mm` against a transposed copy kept instead of the packed one (no oneDNN
    reorder at all; the same probe check). `F.linear` itself is not row-invariant in fp32 (a row alone
    and inside a block round differently), so fp32 greedy DFlash equals fp32 decoding
    wherever the target's top two logits are not within rounding of each other, as before."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
        return None
    if native and weight.dtype == torch.float32:
        from .. import native as native_kernels
        fn = native_kernels.make_linear(weight, bias, use_amx=amx, amx_inputs=amx_inputs)
        if fn is not None:
            fn.prepacked = True
            fn.native = (weight, bias)   # bench.native_swaps rebuilds the fallback from these
            return fn
    try:
        w = weight.detach().contiguous()
        b = None if bias is None else bias.detach().contiguous()
        use_mm = w.dtype == torch.float32 and w.numel() <= mm_max_elements
        if use_mm:
            wt = w.t().contiguous()
            product = (lambda x2: torch.mm(x2, wt)) if b is None else (lambda x2: torch.addmm(b, x2, wt))
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            product = lambda x2: torch.ops.mkldnn._linear_pointwise(x2, packed, b, "none", [], "")  # noqa: E731
        rows = 2 if w.dtype == torch.bfloat16 else FP32_PACKED_MIN_ROWS
        probe = torch.linspace(-1, 1, rows * w.shape[1], dtype=w.dtype).view(rows, w.shape[1])
        got, want = product(probe), F.linear(probe, w, b)
        if w.dtype == torch.bfloat16:
            if not torch.equal(got, want):
                return None
        elif not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-30):
            return None
    except (AttributeError, RuntimeError):
        return None

    n_out = w.shape[0]

    if w.dtype == torch.float32:
        def linear_fp32(x: torch.Tensor) -> torch.Tensor:
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] < FP32_PACKED_MIN_ROWS:
                return F.linear(x, w, b)
            return product(x2).view(*lead, n_out)
        linear_fp32.prepacked = True
        if use_mm:
            linear_fp32.small_mm = (w, b)   # bench.small_mm_off rebuilds it packed from these
        return linear_fp32

    def linear(x: torch.Tensor) -> torch.Tensor:
        # oneDNN picks a different kernel (other summation order) for a single row: pad
        # one row to two, so a 1-token step computes each row bit-for-bit like a verify
        # block or a batch does (measured: every M >= 2 agrees with M = 16, M = 1 does not)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = product(torch.cat([x2, x2]))[:1] if x2.shape[0] == 1 else product(x2)
        return y.view(*lead, n_out)
    linear.prepacked = True
    return linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 like HF
        if x.dtype == torch.float32:  # (F.rms_norm measured slower on CPU for decode shapes)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return kernels.rms_norm(x, self.weight, self.eps)


class _WatchLinears:
    """Tells native.linears_changed() of every assignment to the prepacked-linear
    attributes (pack(), a benchmark's swap, a test's stand-in), so that
    native.NativeLayers.current() compares its layers' linears only when they may differ."""
    _WATCHED = frozenset({"_qkv_fn", "_o_fn", "_gate_up_fn", "_down_fn"})

    def __setattr__(self, name, value):
        if name in self._WATCHED:
            native.linears_changed()
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name in self._WATCHED:
            native.linears_changed()
        super().__delattr__(name)


class GatedMLP(_WatchLinears, nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    _gate_up = None  # packed [2*inter, hidden] weight once `pack()` ran (inference only)
    _gate_up_fn = _down_fn = None  # prepacked oneDNN linears (CPU), see prepack_linear

    def pack(self) -> None:
        """Pack gate/up into one weight (one matmul per step instead of two); the two
        parameters become views into it, so state_dict and in-place loads still work.
        Inference only: the forward then bypasses the parameters (no gradients)."""
        if self._gate_up is None:
            w = torch.cat([self.gate_proj.weight.data, self.up_proj.weight.data])
            n = self.gate_proj.weight.shape[0]
            self.gate_proj.weight.data, self.up_proj.weight.data = w[:n], w[n:]
            self._gate_up = w
            self._gate_up_fn = prepack_linear(w)
            self._down_fn = prepack_linear(self.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # down(silu(gate(x)) * up(x))
        if self._gate_up is not None and not torch.is_grad_enabled():
            # each prepacked linear exists only where its probe was exact (per weight shape:
            # a CPU may pack gate/up and not down), so each falls back on its own
            gu = self._gate_up_fn(x) if self._gate_up_fn is not None else F.linear(x, self._gate_up)
            gate, up = gu.chunk(2, dim=-1)
            h = F.silu(gate) * up
            return self._down_fn(h) if self._down_fn is not None else self.down_proj(h)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), with linear or llama3 scaling when configured."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv / factor).float()
    if kind == "llama3":
        # Llama 3.1: keep high frequencies (wavelength < orig/high_ff), divide low ones
        # (wavelength > orig/low_ff) by factor, interpolate smoothly in between.
        low_ff = float(scaling.get("low_freq_factor", 1.0))
        high_ff = float(scaling.get("high_freq_factor", 4.0))
        orig = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = ((orig / wavelen) - low_ff) / (high_ff - low_ff)
        scaled = torch.where(wavelen > orig / low_ff, inv / factor, inv)
        mid = (wavelen <= orig / low_ff) & (wavelen >= orig / high_ff)
        blended = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(mid, blended, scaled).float()
    raise ValueError(f"unsupported rope scaling {kind!r}")


class RotaryTable(nn.Module):
    """cos/sin tables [max_pos, D] in the rotate_half layout (freqs repeated twice)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_pos: int):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self._build(max_pos)

    def _build(self, max_pos: int, device=None):
        inv = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        t = torch.arange(max_pos, dtype=torch.float32)
        freqs = torch.outer(t, inv)                 # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)     # [P, D]
        dev = device if device is not None else (self.cos.device if hasattr(self, "cos") else None)
        self.register_buffer("cos", emb.cos().to(dev), persistent=False)
        self.register_buffer("sin", emb.sin().to(dev), persistent=False)

    def reserve(self, positions: torch.Tensor) -> None:
        """Grow the tables (doubling) so that they cover every position given."""
        need = int(positions.max().item()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:
            self._build(max(need, 2 * self.cos.shape[0]), device=self.cos.device)

    def forward(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: any int shape -> cos, sin of shape positions.shape + [D]."""
        self.reserve(positions)
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


class AttentionProj(_WatchLinears, nn.Module):
    """q/k/v/o projections (+ optional Qwen3 q_norm/k_norm) of one attention layer."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool,
                 qk_norm: bool, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = head_dim ** -0.5

    _qkv_w = None  # packed q/k/v weight [(H+2Hkv)*D, hidden] (and bias) after `pack()`
    _qkv_b = None
    _qkv_fn = _o_fn = None  # prepacked oneDNN linears (CPU), see prepack_linear

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o_proj, prepacked when possible (inference)."""
        if self._o_fn is not None and not torch.is_grad_enabled():
            return self._o_fn(o)
        return self.o_proj(o)

    def pack(self) -> None:
        """Pack q/k/v into one weight (see GatedMLP.pack); inference only."""
        if self._qkv_w is not None:
            return
        lin = (self.q_proj, self.k_proj, self.v_proj)
        w = torch.cat([l.weight.data for l in lin])
        sizes = [l.weight.shape[0] for l in lin]
        for l, part in zip(lin, w.split(sizes)):
            l.weight.data = part
        if self.q_proj.bias is not None:
            b = torch.cat([l.bias.data for l in lin])
            for l, part in zip(lin, b.split(sizes)):
                l.bias.data = part
            self._qkv_b = b
        self._qkv_w = w
        self._qkv_fn = prepack_linear(w, self._qkv_b)
        self._o_fn = prepack_linear(self.o_proj.weight, self.o_proj.bias)

    def project_qkv(self, x, cos, sin):
        """x [R, T, hidden] -> q [R, H, T, D], k, v [R, Hkv, T, D] (RoPE on q, k)."""
        if self._qkv_w is None or torch.is_grad_enabled():
            return (self.project_q(x, cos, sin),) + self.project_kv(x, cos, sin)
        R, T, _ = x.shape
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        qkv = self._qkv_fn(x) if self._qkv_fn is not None else F.linear(x, self._qkv_w, self._qkv_b)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(R, T, H, D), k.view(R, T, Hkv, D), v.view(R, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        qk = kernels.apply_rope(torch.cat([q, k], dim=2), cos[:, :, None], sin[:, :, None])  # one RoPE pass
        return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), v.transpose(1, 2)

    def project_q(self, x, cos, sin):
        """x [R, T, hidden], cos/sin [R, T, D] -> q [R, H, T, D] with RoPE."""
        R, T, _ = x.shape
        q = self.q_proj(x).view(R, T, self.heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return kernels.apply_rope(q, cos[:, :, None], sin[:, :, None]).transpose(1, 2)

    def project_kv(self, x, cos, sin):
        """x [R, T, hidden] -> k, v [R, Hkv, T, D] (k normed + RoPE)."""
        R, T, _ = x.shape
        k = self.k_proj(x).view(R, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(R, T, self.kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = kernels.apply_rope(k, cos[:, :, None], sin[:, :, None])
        return k.transpose(1, 2), v.transpose(1, 2)
