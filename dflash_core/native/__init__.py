"""Native fp32 linears over the model's own quantised weights (CPU, AVX2 + FMA).

The default target ships as a GGUF (Q4_1 layers, a Q8_0 embedding / LM head) that
transformers dequantises to fp32. Every fp32 weight of such a model is exactly
d * q (+ m) for small integers q and a per-32-block scale d (and minimum m), so the same
product can read 4-bit or 8-bit codes instead of 32-bit floats: a one-token decode step
reads ~1/6 of the bytes, and since that step is bound by reading weights, it runs that
much faster. `pack(weight)` recovers the codes from the fp32 weight itself and keeps them
only if they give back every weight bit for bit (else plain fp32 rows: same kernel, no
saving in bytes), so nothing here changes the model: the product is an fp32 linear over
the same weights, in another summation order.

The kernel (dflash_linear.c) is row-invariant: each output is one accumulator over k in
order, whatever the number of rows (up to `row_limit()`), so a token's numbers are the same in
a one-token step, a verify block and a batch of rows (greedy speculative output equals
the engine's own decoding bit for bit), and a k-row product reads the weights once, so a
16-token verify costs far less than 16 steps.

Weights that are bf16 values (a drafter shipped in bf16 and run in fp32) are kept as
bf16 ("bf16" format: the upcast is exact, half the bytes).

`NativeLayers` runs a whole decoder layer in one call (dflash_layer.c): norms, these
linears, q/k norms, RoPE, the K/V write and attention over the cache, SiLU, residuals,
each in a fixed order per token, so the layer stays row-invariant. On a small model the
~40 torch ops around the linears cost about as much as the linears themselves; a
one-token forward of the default target went from ~19 to ~7-9 ms on 2 AVX2 cores.

On CPUs with AMX-BF16 (Intel Sapphire Rapids and later) the Q4_1 / Q8_0 weights are
re-tiled for AMX tiles instead (`to_amx`: formats q4_1x / q8_0x, dflash_amx.c): each fp32
input is split exactly into three bf16 parts, each code times a part is exact, and
TDPBF16PS sums 16 rows x 32 weights x 16 outputs at once in fp32, so the product is again
the same fp32 linear in another summation order, row-invariant, and a block of up to 16
rows costs little more than one (`amx()`; DFLASH_NATIVE_AMX=0 or `set_amx(False)` keeps
the FMA forms; `dflash bench --amx-ab` compares the two in one run). The same records can
take bf16 inputs instead (`set_amx_inputs("bf16")`: formats q4_1xb / q8_0xb): each input is
rounded to the nearest bf16 and only that one part goes through the tiles, so a row costs a
third of the tile products. That computes W @ bf16(x), not the fp32 linear: a different
model by that rounding, still row-invariant, the same in every mode and batch (so greedy
speculation equals the engine's own decoding with it), and torch's fallback past
`max_rows` rounds its inputs the same way. That is the default (the commands' and the
server's `--amx-inputs` too); "fp32" keeps the exact fp32 linear. With bf16 inputs, a
prompt's forward (the engine's prefills: `NativeLayers.forward(prefill=True)`, a linear's
`prefill=True`) runs the *prefill forms* of the same records (q4_1xw / q8_0xw,
PREFILL_FORMATS): each weight is rounded to bf16 too as the tiles are filled, so the tile
sums a row over the whole of K with no fp32 step per 32 weights and one pass of the weights
serves up to 32 rows (more: the weights expanded once per column pair): a prompt token
costs ~2/3 of what it does in the decode forms. Every prompt token gets those numbers,
whatever the forward's rows or chunks (row-invariant), and every decode step and verify
block the decode forms, so the output still does not depend on batching or speculation.

It is compiled at first use with the machine's C compiler (`cc`, ~1 s) into
$DFLASH_CACHE/native/ and loaded with ctypes. `available()` says whether it could be
(x86-64 with AVX2 and FMA, a compiler, not turned off by DFLASH_NATIVE=0 or
`set_enabled(False)`) and `reason()` why not. On CPUs with AVX-512 (F/BW/VL/DQ) the
linears are built with 16-lane accumulators (`vector_width()`; DFLASH_NATIVE_AVX512=0
keeps the 8-lane AVX2 build): the same products in about half the instructions.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import operator
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..runtime import cache_root

SOURCE = Path(__file__).with_name("dflash_linear.c")
LAYER_SOURCE = Path(__file__).with_name("dflash_layer.c")   # whole decoder layers (see NativeLayers)
AMX_SOURCE = Path(__file__).with_name("dflash_amx.c")       # Q4_1 / Q8_0 linears on AMX tiles
FORMATS = {"f32": 0, "q8_0": 1, "q4_1": 2, "bf16": 3, "q4_1x": 4, "q8_0x": 5, "q4_1xb": 6, "q8_0xb": 7,
           "q4_1xw": 8, "q8_0xw": 9}
# the AMX forms of the quantised formats (same weights, tiled for dflash_amx.c)
AMX_FORMATS = {"q4_1": "q4_1x", "q8_0": "q8_0x"}
# the same records read with each input rounded to bf16 first (set_amx_inputs("bf16"))
AMX_BF16_FORMATS = {"q4_1": "q4_1xb", "q8_0": "q8_0xb"}
# what the bf16-input forms take in a prefill forward (NativeLayers.forward's prefill, a
# linear's prefill=True): the same records with each weight rounded to bf16 too (dflash_amx.c)
PREFILL_FORMATS = {"q4_1xb": "q4_1xw", "q8_0xb": "q8_0xw"}
AMX_KINDS = frozenset(AMX_FORMATS.values()) | frozenset(AMX_BF16_FORMATS.values())
# the forms whose greedy choice the kernel takes without the outputs (dfl_argmax_amx), and
# the most rows it takes at once
ARGMAX_CODES = frozenset({4, 5, 6, 7})
ARGMAX_ROWS = 16
# what the AMX linears take as input: "fp32" (exact: the same fp32 linear) or "bf16"
AMX_INPUTS = ("fp32", "bf16")
MAX_K = 16384
# Inputs of more rows than this (a long prompt's prefill chunk, a prompt-logprobs pass)
# take torch's `F.linear` over the fp32 weights instead: there the product is bound by
# arithmetic, not by reading weights, and this kernel's 4 x 2 register tiles are no
# faster than MKL's sgemm. A whole prefill of the default target on a 2-core AVX2 EPYC
# (medians of 4 alternating, two runs): 128 tokens 444 / 556 ms in the kernel vs 586 / 517
# through `F.linear`, 192 tokens 784 vs 730, 256 tokens 1053 / 1087 vs 968 / 1063: even
# within this VM's noise. Up to this many rows (decode steps, verify blocks, batches of
# them, short prompts) every row's numbers are the same whatever the row count.
MAX_ROWS = 192
# The AVX-512 build (16-lane accumulators) runs near the cores' FMA rate at every row count
# and beats MKL's fp32 sgemm ~1.6x from 64 rows on (a 2-core Zen 5 EPYC, one thread: 165-183
# vs 100-104 GFLOP/s for the default target's gate/up and down shapes; a whole prefill of 256
# / 512 tokens 1.12x / 1.25x faster than with torch past 192 rows, `dflash bench --prefill-ab`,
# docs/BENCHMARKS.md), so there a whole prefill chunk (the engine's default
# max_prefill_tokens is 512) stays in it.
MAX_ROWS_AVX512 = 1024


_ARGMAX = None   # dfl_argmax_amx of the loaded build (None: not in it)


def row_limit() -> int:
    """The most rows a native linear or layer forward takes in this build (more: torch)."""
    return MAX_ROWS_AVX512 if vector_width() == 16 else MAX_ROWS

_LIB = None
_RMS_NORM = None   # dfl_rms_norm once the library is loaded
_LAYER = None   # (dfl_layer, dfl_layer_work, reads bf16 caches, dfl_layers or None) once the library is loaded
_WRITE_CONTEXT = None   # dfl_write_context once the library is loaded
_TOPK = None            # dfl_topk_softmax once the library is loaded
_DRAFT = None           # (dfl_draft, dfl_draft_work) once the library is loaded (None: a build without them)
_DRAFT_ON = True        # set_draft_call
_REASON: str | None = None
_WIDTH = 0   # fp32 lanes per accumulator of the loaded build (8: AVX2, 16: AVX-512)
_AMX = False   # whether the loaded build has the AMX linears and the process may use the tiles
_ENABLED = os.environ.get("DFLASH_NATIVE", "1") != "0"


def set_enabled(flag: bool) -> None:
    """Turn the native linears on or off for models packed from now on (DFLASH_NATIVE=0
    in the environment starts with them off)."""
    global _ENABLED
    _ENABLED = bool(flag)


def enabled() -> bool:
    return _ENABLED


AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")


def wants_avx512() -> bool:
    """Whether the kernel is built with 16-lane AVX-512 accumulators: on CPUs with AVX-512
    F/BW/VL/DQ, unless DFLASH_NATIVE_AVX512=0 (the 8-lane AVX2 build; the two differ only
    in rounding, each row-invariant)."""
    from ..runtime import cpu_flags
    return os.environ.get("DFLASH_NATIVE_AVX512", "1") != "0" and set(AVX512_FLAGS) <= cpu_flags()


AMX_FLAGS = ("amx_tile", "amx_bf16", "avx512_bf16")
AMX_CFLAGS = ("-mamx-tile", "-mamx-bf16", "-mavx512bf16")   # the compiler options for dflash_amx.c


def wants_amx() -> bool:
    """Whether the Q4_1 / Q8_0 linears are built for AMX tiles (dflash_amx.c): on CPUs with
    AMX-TILE, AMX-BF16 and AVX512-BF16 in the AVX-512 build, unless DFLASH_NATIVE_AMX=0.
    Same weights, exact products, fp32 sums in another order: like the AVX2 and AVX-512
    builds, it differs from the FMA kernel only in rounding, and is row-invariant."""
    from ..runtime import cpu_flags
    return os.environ.get("DFLASH_NATIVE_AMX", "1") != "0" and wants_avx512() and set(AMX_FLAGS) <= cpu_flags()


def _flags() -> list[str]:
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-fno-fast-math"]
    if wants_avx512():
        flags += [f"-m{f}" for f in AVX512_FLAGS]
    return flags


def _build(layer_source: Path = LAYER_SOURCE, amx_source: Path = AMX_SOURCE) -> Path:
    sources = (SOURCE, layer_source, amx_source)
    src = b"".join(p.read_bytes() for p in sources)
    from ..runtime import c_compiler
    cc = c_compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    flags = _flags()
    if not wants_amx():
        return _compile(cc, flags, src, sources)
    try:
        return _compile(cc, flags + list(AMX_CFLAGS), src, sources)
    except RuntimeError:
        # a compiler without the AMX options (GCC < 11, old clang): the build without them
        # (dflash_amx.c then compiles to stubs and the quantised weights keep the FMA formats)
        return _compile(cc, flags, src, sources)


def _compile(cc: str, flags: list[str], src: bytes, sources) -> Path:
    key = hashlib.sha256(src + " ".join([cc] + flags).encode()).hexdigest()[:16]
    out = cache_root() / "native" / f"libdflash_linear-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    res = subprocess.run([cc, *flags, *map(str, sources), "-o", tmp, "-lm"], capture_output=True, text=True)
    if res.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {SOURCE.name} failed: {res.stderr.strip()[:400]}")
    os.replace(tmp, out)   # atomic: concurrent builders each write their own temp file
    return out


def _layer_fns(lib):
    """(dfl_layer, dfl_layer_work, dfl_layers or None) of a loaded build, typed (dfl_layers,
    a whole stack in one call, is missing from earlier revisions of dflash_layer.c)."""
    layer = lib.dfl_layer
    layer.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 6 + [ctypes.c_long] * 2 \
        + [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    layer.restype = ctypes.c_int
    work = lib.dfl_layer_work
    work.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    work.restype = ctypes.c_long
    stack = getattr(lib, "dfl_layers", None)
    if stack is not None:
        stack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + [ctypes.c_long] * 2 \
            + [ctypes.c_void_p] * 6 + [ctypes.c_long] * 2 \
            + [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long] + [ctypes.c_void_p] * 3
        stack.restype = ctypes.c_int
    return layer, work, stack


def layer_build(source) -> tuple:
    """The decoder-layer functions of a build with another kernel source in place of its
    namesake: a dflash_layer.c (it defines dfl_layer) or a dflash_amx.c (dfl_linear_amx),
    e.g. an earlier revision's with the same signatures; the rest of the kernel and the
    flags as loaded. What `use_layer_build` swaps in for an A/B in one process (the layers'
    linears run in that build too; the LM head and other lone linears stay in the loaded one)."""
    if _load() is None:
        raise RuntimeError(f"the native kernel is not available: {_REASON}")
    source = Path(source)
    text = source.read_text(errors="replace")
    if "int dfl_layer(" in text:
        path = _build(layer_source=source)
    elif "int dfl_linear_amx(" in text:
        path = _build(amx_source=source)
    else:
        raise RuntimeError(f"{source} defines neither dfl_layer (dflash_layer.c) nor dfl_linear_amx (dflash_amx.c)")
    lib = ctypes.CDLL(str(path))
    if _AMX:
        lib.dfl_amx_init()
    layer, work, stack = _layer_fns(lib)
    # a third item: whether its layers read bf16 caches (revisions before kv_bf16 read fp32 only)
    return layer, work, "int dfl_layer(" not in text or "kv_bf16" in text, stack


@contextlib.contextmanager
def use_layer_build(fns):
    """Within: every NativeLayers forward calls `fns` (from `layer_build`); restored after."""
    global _LAYER
    saved, _LAYER = _LAYER, fns
    try:
        yield
    finally:
        _LAYER = saved


def _load():
    global _LIB, _REASON
    if _LIB is not None or _REASON is not None:
        return _LIB
    from ..runtime import native_cpu_ok
    if not native_cpu_ok():
        _REASON = "needs Linux on an x86-64 CPU with AVX2 and FMA"
        return None
    try:
        torch.zeros(1).add_(1)   # torch's OpenMP runtime is loaded before ours resolves to it
        lib = ctypes.CDLL(str(_build()))
        fn = lib.dfl_linear
        width = lib.dfl_vector_width
        width.argtypes = []
        width.restype = ctypes.c_int
        global _WIDTH, _AMX
        _WIDTH = int(width())
        lib.dfl_amx_init.restype = ctypes.c_int
        # the kernel must grant this process the tiles' state (Linux 5.16+); else FMA formats
        _AMX = wants_amx() and bool(lib.dfl_amx_init())
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        fn.restype = ctypes.c_int
        layer, work, stack = _layer_fns(lib)
        wctx = lib.dfl_write_context
        wctx.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                         ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
        wctx.restype = ctypes.c_int
        topk = lib.dfl_topk_softmax
        topk.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        topk.restype = ctypes.c_int
        chain = lib.dfl_corpus_chain
        chain.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64,
                          ctypes.c_void_p, ctypes.c_void_p]
        chain.restype = ctypes.c_long
        norm = lib.dfl_rms_norm
        norm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_float,
                         ctypes.c_void_p]
        norm.restype = ctypes.c_int
        global _LAYER, _WRITE_CONTEXT, _TOPK, _CORPUS_CHAIN, _RMS_NORM, _ARGMAX
        amax = getattr(lib, "dfl_argmax_amx", None)
        if amax is not None:
            amax.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            amax.restype = ctypes.c_int
        _ARGMAX = amax
        _RMS_NORM = norm
        _LAYER = (layer, work, True, stack)
        _WRITE_CONTEXT = wctx
        _TOPK = topk
        _CORPUS_CHAIN = chain
        global _DRAFT
        if hasattr(lib, "dfl_draft"):
            draft, dwork = lib.dfl_draft, lib.dfl_draft_work
            draft.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 4 \
                + [ctypes.c_long] + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2 + [ctypes.c_void_p] \
                + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_int] \
                + [ctypes.c_void_p] * 4 + [ctypes.c_int]
            draft.restype = ctypes.c_int
            dwork.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 5 + [ctypes.c_int]
            dwork.restype = ctypes.c_long
            _DRAFT = (draft, dwork)
        _LIB = fn
    except (OSError, RuntimeError) as e:
        _REASON = f"could not build the native kernel: {e}"
    return _LIB


def vector_width() -> int:
    """fp32 lanes per accumulator of the loaded kernel (8: AVX2, 16: AVX-512); 0 when it
    is not available."""
    return _WIDTH if available() else 0


_AMX_ON = True   # set_amx


def set_amx(flag: bool) -> None:
    """Let models packed from now on take the AMX formats where the build has them (the
    default), or not (the FMA formats: `dflash bench --amx-ab`, tests)."""
    global _AMX_ON
    _AMX_ON = bool(flag)


_AMX_INPUTS = "bf16"   # set_amx_inputs


def check_amx_inputs(kind) -> str:
    """kind if it is one of AMX_INPUTS, else ValueError naming them."""
    if kind not in AMX_INPUTS:
        raise ValueError(f"amx inputs must be one of {', '.join(AMX_INPUTS)}, got {kind!r}")
    return kind


def set_amx_inputs(kind: str) -> None:
    """What the AMX linears of models packed from now on take as input: "bf16" (the
    default: each input rounded to the nearest bf16 first, one part: a third of the tile
    products, so a verify block's or a prefill's extra rows cost less; the model then
    computes W @ bf16(x) at every quantised linear, a different model by that rounding, the
    same in every mode and batch) or "fp32" (each input split exactly into three bf16
    parts, so the product is the fp32 linear over the model's weights). ValueError else."""
    global _AMX_INPUTS
    _AMX_INPUTS = check_amx_inputs(kind)


@contextlib.contextmanager
def amx_inputs_set(kind: str):
    """Within: set_amx_inputs(kind) (models packed within take those forms); restored after."""
    saved = _AMX_INPUTS
    set_amx_inputs(kind)
    try:
        yield kind
    finally:
        set_amx_inputs(saved)


def amx_inputs() -> str:
    """What AMX linears packed now take as input (set_amx_inputs)."""
    return _AMX_INPUTS


_AMX_ATT_ON = True   # set_amx_attention


def set_amx_attention(flag: bool) -> None:
    """Whether the native layers of models in the bf16-input AMX forms run their attention
    on AMX tiles too (the default; NativeLayers.amx_att): each query, key, probability and
    value rounded to bf16, the products summed in fp32, row-invariant like the fp32
    attention it replaces. Off: the fp32 attention (the model as before it). Read at every
    forward (an A/B in one process)."""
    global _AMX_ATT_ON
    _AMX_ATT_ON = bool(flag)


def amx_attention_on() -> bool:
    """set_amx_attention's setting."""
    return _AMX_ATT_ON


def amx_built() -> bool:
    """Whether the loaded build has the AMX linears and this process may use the tiles."""
    return available() and _AMX


def amx() -> bool:
    """Whether quantised weights packed now take the AMX formats (q4_1x / q8_0x)."""
    return _AMX_ON and amx_built()


def form(fmt: str) -> str:
    """The format make_linear gives weights `pack` finds in `fmt` now: its AMX form
    (q4_1 -> q4_1x, q8_0 -> q8_0x; q4_1xb / q8_0xb with bf16 inputs) where `amx()`, else
    fmt itself."""
    if not amx():
        return fmt
    return (AMX_BF16_FORMATS if _AMX_INPUTS == "bf16" else AMX_FORMATS).get(fmt, fmt)


def available() -> bool:
    """Whether models packed now get native linears (on, and the kernel built)."""
    return _ENABLED and _load() is not None


def reason() -> str | None:
    """Why models packed now do not get native linears (None when they do)."""
    if not _ENABLED:
        return "turned off (DFLASH_NATIVE=0 or --no-native)"
    _load()
    return _REASON


# ---- recovering the codes from fp32 weights --------------------------------------------

def _blocks(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    return w.reshape(N, K // 32, 32)


def pack_q8_0(w: torch.Tensor):
    """(q int8 [N, K], d float [N, K/32]) with d * q == w exactly, or None."""
    b = _blocks(w)
    d = b.abs().amax(-1) / 127
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(b / safe[..., None])
    if q.abs().max() > 127 or not torch.equal(q * d[..., None], b):
        return None
    return q.to(torch.int8).reshape(w.shape).contiguous(), d.contiguous()


def round_to_q8_0(w: torch.Tensor) -> torch.Tensor:
    """A weight [N, K] (K a multiple of 32) rounded onto the Q8_0 grid the kernel reads:
    each 32-weight block of a row becomes d * q, q an integer in [-127, 127] and d its
    block's max|w| / 127 rounded up to 17 significant bits, so that the largest weight
    takes q = +-127 and d * q, 127 * d and (127 * d) / 127 = d are exact in fp32: `pack`
    then takes the result as q8_0 exactly (8 bits a weight plus a scale, against bf16's
    16). Returned as fp32 in w's shape. Lossy, unlike `pack`: for weights whose exact
    values do not decide the output, the drafter's (drafts are proposals; the target
    verifies every token). Each weight moves by at most d / 2, ~0.4% of its block's
    largest."""
    w = w.detach().float()
    N, K = w.shape
    if K % 32:
        raise ValueError(f"Q8_0 rounds blocks of 32 weights along a row; {K} is not a multiple of 32")
    if not torch.isfinite(w).all():
        raise ValueError("cannot round non-finite weights onto the Q8_0 grid")
    b = w.reshape(N, K // 32, 32)
    d = b.abs().amax(-1) / 127
    # round the scale up to 17 significant bits (clear the low 7 of fp32's 23-bit mantissa)
    bits = d.view(torch.int32)
    low = bits & 0x7F
    d = torch.where(low > 0, (bits - low) + 0x80, bits).view(torch.float32)
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(b / safe[..., None]).clamp(-127, 127)
    return (q * d[..., None]).reshape(N, K)


def pack_q4_1(w: torch.Tensor):
    """(nibbles uint8 [N, K/2], d, m float [N, K/32]) with d * q + m == w exactly, q in
    0..15 (the GGUF Q4_1 form), or None."""
    b = _blocks(w)
    m = b.amin(-1)
    d0 = ((b.amax(-1) - m) / 15).half()
    best_q = best_d = None
    ok = torch.zeros_like(m, dtype=torch.bool)
    # the scale was stored in fp16: the estimate rounds to it, or to a neighbour
    for step in (0, 1, -1):
        bits = d0.view(torch.int16) + step
        d = bits.view(torch.float16).float()
        safe = torch.where(d > 0, d, torch.ones_like(d))
        q = torch.round((b - m[..., None]) / safe[..., None]).clamp(0, 15)
        good = (q * d[..., None] + m[..., None] == b).all(-1) & torch.isfinite(d)
        if best_q is None:
            best_q, best_d = q, d
        take = good & ~ok
        best_q = torch.where(take[..., None], q, best_q)
        best_d = torch.where(take, d, best_d)
        ok |= good
        if bool(ok.all()):
            break
    if not bool(ok.all()):
        return None
    q = best_q.to(torch.uint8)
    nib = (q[..., :16] | (q[..., 16:] << 4)).reshape(w.shape[0], w.shape[1] // 2).contiguous()
    return nib, best_d.contiguous(), m.contiguous()


def _tiled(parts, N: int) -> torch.Tensor:
    """Per-row pieces [N, B, bytes] (fp32 scales as bytes, codes) -> the kernel's layout:
    rows padded to a multiple of 4, then one record per (4-row tile, block) holding every
    piece for the 4 rows: [N/4, B, sum(4 * bytes)] uint8 (see dflash_linear.c)."""
    pad = (-N) % 4
    out = []
    for p in parts:
        if pad:
            p = torch.cat([p, p.new_zeros(pad, *p.shape[1:])])
        nt, B = p.shape[0] // 4, p.shape[1]
        out.append(p.view(nt, 4, B, -1).permute(0, 2, 1, 3).reshape(nt, B, -1))
    return torch.cat(out, -1).contiguous()


def _untiled(rec: torch.Tensor, N: int, sizes) -> list[torch.Tensor]:
    """Inverse of _tiled: [N/4, B, ...] uint8 -> per-row pieces [N, B, bytes] for `sizes`."""
    nt, B, _ = rec.shape
    out, at = [], 0
    for size in sizes:
        part = rec[:, :, at:at + 4 * size].reshape(nt, B, 4, size).permute(0, 2, 1, 3).reshape(nt * 4, B, size)
        out.append(part[:N])
        at += 4 * size
    return out


def pack(weight: torch.Tensor, formats=("q4_1", "q8_0", "bf16", "f32")):
    """The most compact exact form of an fp32 CPU weight [N, K]: (format name, the one
    tensor the kernel reads), or None where the kernel cannot take it."""
    w = weight.detach()
    if w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
        return None
    N, K = w.shape
    if K % 8 or K > MAX_K:
        return None
    w = w.contiguous()
    for fmt in formats:
        if fmt == "f32":
            return "f32", w
        if fmt == "bf16":
            b = w.bfloat16()
            if torch.equal(b.float(), w):   # every weight a bf16 value: the upcast gives it back
                return "bf16", b
            continue
        if K % 32:
            continue
        B = K // 32
        if fmt == "q4_1":
            got = pack_q4_1(w)
            if got is not None:
                nib, d, m = got
                return fmt, _tiled([d.view(N, B, 1).view(torch.uint8), m.view(N, B, 1).view(torch.uint8),
                                    nib.view(N, B, 16)], N)
        else:
            got = pack_q8_0(w)
            if got is not None:
                q, d = got
                return fmt, _tiled([d.view(N, B, 1).view(torch.uint8), q.view(torch.uint8).view(N, B, 32)], N)


def _vnni(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] -> [J, B, 16, 32]: per column tile j (16 rows of the weight, N padded
    with zero rows) and 32-weight block b, the B-tile order of AMX: tile row r, byte p
    holds row 16 j + p // 2, k = 32 b + 2 r + p % 2."""
    N, K = q.shape
    pad = (-N) % 16
    if pad:
        q = torch.cat([q, q.new_zeros(pad, K)])
    J, B = q.shape[0] // 16, K // 32
    return q.view(J, 16, B, 16, 2).permute(0, 2, 3, 1, 4).reshape(J, B, 16, 32)


def _unvnni(t: torch.Tensor, N: int) -> torch.Tensor:
    J, B = t.shape[:2]
    return t.view(J, B, 16, 16, 2).permute(0, 3, 1, 2, 4).reshape(J * 16, B * 32)[:N]


def _per_tile(v: torch.Tensor) -> torch.Tensor:
    """Per-row block values [N, B] fp32 -> [J, B, 64] bytes (16 rows a column tile)."""
    N, B = v.shape
    pad = (-N) % 16
    if pad:
        v = torch.cat([v, v.new_zeros(pad, B)])
    return v.view(-1, 16, B).permute(0, 2, 1).contiguous().view(torch.uint8)


def to_amx(fmt: str, packed: torch.Tensor, N: int, inputs: str = "fp32"):
    """A q4_1 / q8_0 packing -> its AMX form (q4_1x / q8_0x, dflash_amx.c's records
    [N/16, K/32, 384 or 576] uint8): the same weights, tiled for AMX; inputs="bf16": the
    same records as q4_1xb / q8_0xb (each input rounded to bf16: set_amx_inputs)."""
    if check_amx_inputs(inputs) == "bf16" and fmt in AMX_FORMATS:
        return AMX_BF16_FORMATS[fmt], to_amx(fmt, packed, N)[1]
    if fmt == "q8_0":
        d, q = _untiled(packed, N, (4, 32))
        q = q.contiguous().view(N, -1)
        codes = _vnni(q).reshape(-1, q.shape[1] // 32, 512)
        return "q8_0x", torch.cat([_per_tile(d.contiguous().view(torch.float32).view(N, -1)), codes], -1).contiguous()
    if fmt == "q4_1":
        d, m, nib = _untiled(packed, N, (4, 4, 16))
        q = torch.cat([nib & 15, nib >> 4], -1).reshape(N, -1)
        t = _vnni(q)                                   # [J, B, 16, 32], values 0..15
        codes = (t[:, :, 0::2] | (t[:, :, 1::2] << 4)).reshape(t.shape[0], t.shape[1], 256)
        return "q4_1x", torch.cat([_per_tile(d.contiguous().view(torch.float32).view(N, -1)),
                                   _per_tile(m.contiguous().view(torch.float32).view(N, -1)), codes], -1).contiguous()
    raise ValueError(f"no AMX form of {fmt!r}")


def dequantize(fmt: str, packed: torch.Tensor, N: int) -> torch.Tensor:
    """The fp32 weight [N, K] a packed form stands for (tests compare it with the original)."""
    if fmt in AMX_KINDS:
        q4 = fmt.startswith("q4_1")
        J, B = packed.shape[:2]
        d = packed[:, :, :64].contiguous().view(torch.float32)        # [J, B, 16]
        if q4:
            m = packed[:, :, 64:128].contiguous().view(torch.float32)
            c = packed[:, :, 128:].reshape(J, B, 8, 32)
            t = torch.stack([c & 15, c >> 4], 3).reshape(J, B, 16, 32).float()
        else:
            t = packed[:, :, 64:].contiguous().view(torch.int8).reshape(J, B, 16, 32).float()
        q = _unvnni(t, J * 16)                                           # [J*16, K]
        scale = d.permute(0, 2, 1).reshape(J * 16, B).repeat_interleave(32, 1)
        w = q * scale
        if q4:
            w = w + m.permute(0, 2, 1).reshape(J * 16, B).repeat_interleave(32, 1)
        return w[:N].contiguous()
    if fmt == "f32":
        return packed
    if fmt == "bf16":
        return packed.float()
    if fmt == "q8_0":
        d, q = _untiled(packed, N, (4, 32))
        B = q.shape[1]
        return (q.contiguous().view(torch.int8).float() * d.contiguous().view(torch.float32)).view(N, B * 32)
    d, m, nib = _untiled(packed, N, (4, 4, 16))
    B = nib.shape[1]
    q = torch.cat([nib & 15, nib >> 4], -1).float()
    return (q * d.contiguous().view(torch.float32) + m.contiguous().view(torch.float32)).view(N, B * 32)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, formats=("q4_1", "q8_0", "bf16", "f32"),
                max_rows: int | None = None, use_amx: bool | None = None, amx_inputs: str | None = None):
    """An inference linear x[..., K] -> [..., N] through the native kernel over the most
    compact exact form of `weight` for inputs of up to `max_rows` rows (default: the
    build's `row_limit()`; `F.linear` over
    `weight` beyond), or None (kernel unavailable, shape unsupported). The callable
    carries `.native_format`, `.weight_bytes` and `.out_features`. use_amx: the quantised
    formats in their AMX form (q4_1x / q8_0x) where the build has it (None: `amx()`);
    amx_inputs: what that form takes, "fp32" or "bf16" (None: `amx_inputs()`)."""
    fn = _load() if _ENABLED else None
    if fn is None:
        return None
    packed = pack(weight, formats)
    if packed is None:
        return None
    fmt, data = packed
    if fmt in AMX_FORMATS and (amx() if use_amx is None else (use_amx and amx_built())):
        fmt, data = to_amx(fmt, data, weight.shape[0], amx_inputs or _AMX_INPUTS)
    code = FORMATS[fmt]
    N, K = weight.shape
    wp = data.data_ptr()
    b = None if bias is None else bias.detach().float().contiguous()
    threads = torch.get_num_threads
    # the bf16-input forms compute W @ bf16(x): torch's product stands in for them on rounded inputs
    fallback_input = ((lambda x: x.bfloat16().to(x.dtype) if x.dtype == torch.float32 else x)
                      if fmt in AMX_BF16_FORMATS.values() else (lambda x: x))

    prefill_code = FORMATS.get(PREFILL_FORMATS.get(fmt), code)
    prefill_weight = None   # torch's stand-in for the prefill form: the bf16-rounded weights, made when first asked

    def fallback(x: torch.Tensor, prefill: bool) -> torch.Tensor:
        nonlocal prefill_weight
        if prefill and prefill_code != code:
            if prefill_weight is None:
                prefill_weight = weight.detach().bfloat16().float()
            return torch.nn.functional.linear(fallback_input(x), prefill_weight, bias)
        return torch.nn.functional.linear(fallback_input(x), weight, bias)

    def linear(x: torch.Tensor, prefill: bool = False) -> torch.Tensor:
        """prefill: the bf16-input AMX forms run their prefill form (PREFILL_FORMATS: the
        weights rounded to bf16 too), as the native layers do in a prompt's forward."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        if M > linear.max_rows or x2.dtype != torch.float32 or x2.device.type != "cpu" or x2.requires_grad:
            return fallback(x, prefill)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = torch.empty(M, N)
        if M and fn(prefill_code if prefill else code, x2.data_ptr(), M, K, N, wp, y.data_ptr(), threads()) != 0:
            return fallback(x, prefill)   # (out of memory for a work buffer)
        if b is not None:
            y += b
        return y.view(*lead, N)

    argmax_fn = _ARGMAX if code in ARGMAX_CODES and b is None else None   # (a bias: the outputs)

    def argmax(x: torch.Tensor) -> torch.Tensor | None:
        """The index of each row's largest output [...] (int64), as `linear(x).max(-1).indices`
        gives it (the first of equal values; a NaN above any number), without writing the
        outputs (`dfl_argmax_amx`: the same products, so the same values); None where the
        kernel does not take it (more than ARGMAX_ROWS rows, another format, a bias): the
        caller then computes the outputs."""
        if argmax_fn is None:
            return None
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        M = x2.shape[0]
        if not 1 <= M <= ARGMAX_ROWS or M > linear.max_rows or x2.dtype != torch.float32 \
                or x2.device.type != "cpu" or x2.requires_grad:
            return None
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        idx = torch.empty(M, dtype=torch.int64)
        if argmax_fn(code, x2.data_ptr(), M, K, N, wp, idx.data_ptr(), threads()) != 0:
            return None
        return idx.view(lead)

    linear.argmax = argmax
    linear.max_rows = max_rows if max_rows is not None else row_limit()   # settable (benchmarks)
    linear.native_format = fmt
    linear.out_features = N
    linear.weight_bytes = data.numel() * data.element_size()
    linear._keep = data         # the codes live as long as the linear
    return linear


# ---- whole decoder layers -----------------------------------------------------------------

_LINEARS_VERSION = 0   # linears_changed()


def linears_changed() -> None:
    """A layer's prepacked linears were assigned (models.layers): NativeLayers.current()
    compares them again at its next call."""
    global _LINEARS_VERSION
    _LINEARS_VERSION += 1


_ATTN_FNS = operator.attrgetter("_qkv_fn", "_o_fn")
_MLP_FNS = operator.attrgetter("_gate_up_fn", "_down_fn")


class _LayerParams(ctypes.Structure):
    """dfl_layer_t of dflash_layer.c, field for field."""
    _fields_ = [("hidden", ctypes.c_long), ("inter", ctypes.c_long), ("heads", ctypes.c_int),
                ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p), ("qkv_fmt", ctypes.c_int),
                ("o_fmt", ctypes.c_int), ("gu_fmt", ctypes.c_int), ("down_fmt", ctypes.c_int),
                ("qkv_w", ctypes.c_void_p), ("o_w", ctypes.c_void_p), ("gu_w", ctypes.c_void_p),
                ("down_w", ctypes.c_void_p), ("qkv_b", ctypes.c_void_p), ("o_b", ctypes.c_void_p),
                ("kv_bf16", ctypes.c_int), ("bf16_weights", ctypes.c_int), ("amx_att", ctypes.c_int)]


def _native_parts(fn):
    """(format code, codes tensor) of a native linear, or None for anything else."""
    if fn is None or not hasattr(fn, "native_format") or not hasattr(fn, "_keep"):
        return None
    return FORMATS[fn.native_format], fn._keep


def _f32_ptr(t) -> int | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("not a contiguous fp32 CPU tensor")
    return t.data_ptr()


def write_context(kv: torch.Tensor, k_norm_weight: torch.Tensor | None, eps: float, cos_table: torch.Tensor,
                  sin_table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor) -> bool:
    """One drafter layer's context K/V into its cache in one native call (dfl_write_context):
    kv [N, 2, Hkv, D] (k and v projections, before k_norm and RoPE; any row stride),
    cos / sin tables [P, D], caches [S, Hkv, cap, D] -> True when written; False (nothing
    written) where the native kernel does not serve it: off, not built, or not all fp32
    on the CPU with contiguous caches. A slot or position out of range is a ValueError."""
    if not _ENABLED or _load() is None or _WRITE_CONTEXT is None:
        return False
    N, two, H, D = kv.shape
    ts = (kv, cos_table, sin_table, k_cache, v_cache) + (() if k_norm_weight is None else (k_norm_weight,))
    if two != 2 or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in ts) \
            or not (k_cache.is_contiguous() and v_cache.is_contiguous() and cos_table.is_contiguous()
                    and sin_table.is_contiguous()) or kv.stride()[1:] != (H * D, D, 1) or D % 8 or D > 256:
        return False
    S, Hc, cap, Dc = k_cache.shape
    if (Hc, Dc) != (H, D) or cos_table.shape[1] != D:
        raise ValueError(f"context K/V [.., 2, {H}, {D}] does not fit the cache {tuple(k_cache.shape)}")
    slots = slots.to("cpu", torch.int64).contiguous()
    positions = positions.to("cpu", torch.int64).contiguous()
    knw = None if k_norm_weight is None else k_norm_weight.contiguous()
    rc = _WRITE_CONTEXT(kv.data_ptr(), N, kv.stride(0), H, D, None if knw is None else knw.data_ptr(), eps,
                        cos_table.data_ptr(), sin_table.data_ptr(), cos_table.shape[0], slots.data_ptr(),
                        positions.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), S, cap)
    if rc != 0:
        raise ValueError("context slot or position out of the cache's range")
    return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [..., n] * rsqrt(mean(x^2) + eps) * weight in one native call (fp32 on the CPU, no
    grad, n a multiple of 8; the decoder layers' own norm, row by row: a row's bits do not
    depend on the others), or None where the kernel does not serve it (the caller then takes
    torch's ops, which sum the squares in another order). For the drafter's norms: a few
    rows, where torch's five ops cost ~10x the arithmetic."""
    n = x.shape[-1]
    if not _ENABLED or _load() is None or _RMS_NORM is None or torch.is_grad_enabled() or n % 8 \
            or x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype != torch.float32 \
            or weight.device.type != "cpu" or tuple(weight.shape) != (n,):
        return None
    xc = x.contiguous()
    w = weight.detach().contiguous()
    y = torch.empty_like(xc)
    if _RMS_NORM(xc.data_ptr(), w.data_ptr(), xc.numel() // n, n, eps, y.data_ptr()) != 0:
        return None
    return y


TOPK_MAX = 16   # the most k dfl_topk_softmax (and dfl_draft's top k) takes


def topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """logits [..., N] fp32 on the CPU -> (indices int64 [..., k], probabilities fp32 [..., k]):
    each row's k largest logits, descending (equal values: the lower index first, so index 0
    is the row's first maximum, argmax's choice), and their softmax probabilities (the row's
    sum of e^(x - max) in the kernel's own order: equal to torch.softmax's to rounding), in
    one native call (dfl_topk_softmax) instead of a softmax, a top-k and an argmax over every
    row. None where the native kernel does not serve it (off, not built, not fp32 on the
    CPU, k outside [1, min(N, TOPK_MAX)]): the caller then takes torch's ops."""
    if not _ENABLED or _load() is None or _TOPK is None:
        return None
    N = logits.shape[-1]
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or not 1 <= k <= min(N, TOPK_MAX):
        return None
    x = logits.reshape(-1, N).contiguous()
    R = x.shape[0]
    idx = torch.empty(R, k, dtype=torch.int64)
    p = torch.empty(R, k)
    if R and _TOPK(x.data_ptr(), R, N, k, idx.data_ptr(), p.data_ptr()) != 0:
        return None
    lead = logits.shape[:-1]
    return idx.view(*lead, k), p.view(*lead, k)


_CORPUS_CHAIN = None   # dfl_corpus_chain, once loaded


def corpus_chain(keys, tokens, buckets, ctx: list[int], k: int, max_n: int, seed: int, mul: int
                 ) -> tuple[list[int], list[int]] | None:
    """A corpus index's chain of up to k guesses after ctx (dflash_core/corpus.py: keys
    uint32 [E] ascending, tokens int64 [E], buckets uint8 [E], C-contiguous numpy arrays)
    in one native call (dfl_corpus_chain) -> (tokens, buckets), or None where the native
    kernel is not loaded (the caller then searches with numpy: the same guesses)."""
    if not _ENABLED or _load() is None or _CORPUS_CHAIN is None or k < 1:
        return None
    tail = ctx[-max_n:]
    c = (ctypes.c_int64 * max(len(tail), 1))(*tail)
    out_t = (ctypes.c_int64 * k)()
    out_b = (ctypes.c_uint8 * k)()
    n = _CORPUS_CHAIN(keys.ctypes.data, len(keys), tokens.ctypes.data, buckets.ctypes.data, c, len(tail), max_n, k,
                      seed, mul, out_t, out_b)
    if n < 0:
        return None
    return list(out_t[:n]), list(out_b[:n])


TREE_MAX = 64   # block tokens of a tree verify (dflash_layer.c)
# what a target's KV cache may hold for the native layers: fp32, or bf16 (each K / V value
# rounded to the nearest bf16 as it is written, read back widened: half the bytes a step
# reads from the cache; dflash_layer.c)
KV_DTYPES = (torch.float32, torch.bfloat16)


def _scratch(local: threading.local, size: int) -> torch.Tensor:
    """This thread's work buffer of at least `size` floats, kept between calls (a fresh one
    page-faults on every forward)."""
    work = getattr(local, "work", None)
    if work is None or work.numel() < size:
        work = local.work = torch.empty(size)
    return work


def set_draft_call(flag: bool) -> None:
    """Whether a draft step runs as one native call where it can (NativeDraft; on by
    default); off: the step's ~15 calls (the same kernels, the same bits). For benchmarks
    and tests."""
    global _DRAFT_ON
    _DRAFT_ON = bool(flag)


def draft_call_on() -> bool:
    return _DRAFT_ON


class _DrafterParams(ctypes.Structure):
    """dfl_drafter_t of dflash_layer.c, field for field."""
    _fields_ = [("n_layers", ctypes.c_int), ("layers", ctypes.c_void_p), ("feat", ctypes.c_long),
                ("fc_fmt", ctypes.c_int), ("fc_w", ctypes.c_void_p), ("hidden_norm", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("hn_eps", ctypes.c_float), ("fn_eps", ctypes.c_float),
                ("ctx_fmt", ctypes.c_void_p), ("ctx_w", ctypes.c_void_p), ("embed", ctypes.c_void_p),
                ("vocab", ctypes.c_long), ("mask_id", ctypes.c_long), ("head_fmt", ctypes.c_int),
                ("head_w", ctypes.c_void_p), ("head_n", ctypes.c_long)]


class NativeDraft:
    """A DFlash draft step in one native call (dfl_draft): the committed tokens' context
    (fc, hidden_norm, each layer's k / v rows, k_norm and RoPE into the cache), the block's
    layers, the final norm, the drafting vocabulary's head, and each drafted position's top
    k with their probabilities (greedy rows) or the head's logits (the rest). What the drafter's own path runs as ~15 calls
    and ~60 small torch ops (~0.4 ms a step on 2 cores) around the same kernels, in the same
    order: the same bits. Built where every piece is native (`of`), else None."""

    def __init__(self, drafter, layers: "NativeLayers", params, keep, embed: torch.Tensor, head_fn, fns):
        self.drafter, self.layers, self._params, self._keep = drafter, layers, params, keep
        self.embed, self.head_fn = embed, head_fn
        self._fns = fns   # the drafter's fc and each layer's context linear, as built
        self._local = threading.local()

    @classmethod
    def of(cls, drafter, embed: torch.Tensor, head_fn) -> "NativeDraft | None":
        """drafter: a packed fp32 DFlashDrafter (its `_native_layers`, `_fc_fn`, each layer's
        `_ctx_kv_fn`); embed: the target's input embedding [vocab, hidden]; head_fn: the native
        linear of the drafting vocabulary's head rows."""
        nl = getattr(drafter, "_native_layers", None)
        if _DRAFT is None or not _ENABLED or nl is None or embed is None:
            return None
        attns = [layer.self_attn for layer in drafter.layers]
        fns = [drafter._fc_fn, head_fn] + [getattr(a, "_ctx_kv_fn", None) for a in attns]
        parts = [_native_parts(f) for f in fns]
        if any(p is None for p in parts) or embed.dtype != torch.float32 or embed.device.type != "cpu" \
                or not embed.is_contiguous() or embed.dim() != 2:
            return None
        shapes = {(a.kv_heads, a.head_dim) for a in attns}
        hidden = drafter.config.hidden_size
        if len(shapes) != 1 or embed.shape[1] != hidden or drafter.fc.weight.shape[0] != hidden:
            return None
        # the shapes dfl_draft sizes its buffers by: fc [hidden, feat], each context linear
        # [2 Hkv D, hidden], the head [head_n, hidden]
        (kv_heads, head_dim), = shapes
        want = [(hidden, drafter.fc.weight.shape[1]), (head_fn.out_features, hidden)] \
            + [(2 * kv_heads * head_dim, hidden)] * len(attns)
        if any(not hasattr(f, "native") or tuple(f.native[0].shape) != w for f, w in zip(fns, want)):
            return None
        try:
            hn = _f32_ptr(drafter.hidden_norm.weight.data)
            fn = _f32_ptr(drafter.norm.weight.data)
        except ValueError:
            return None
        L = len(attns)
        ctx_fmt = (ctypes.c_int * L)(*[p[0] for p in parts[2:]])
        ctx_w = (ctypes.c_void_p * L)(*[p[1].data_ptr() for p in parts[2:]])
        layer_ptrs = nl._stack_ptrs(L)
        params = _DrafterParams(
            n_layers=L, layers=ctypes.cast(layer_ptrs, ctypes.c_void_p), feat=drafter.fc.weight.shape[1],
            fc_fmt=parts[0][0], fc_w=parts[0][1].data_ptr(), hidden_norm=hn, final_norm=fn,
            hn_eps=drafter.hidden_norm.eps, fn_eps=drafter.norm.eps, ctx_fmt=ctypes.cast(ctx_fmt, ctypes.c_void_p),
            ctx_w=ctypes.cast(ctx_w, ctypes.c_void_p), embed=embed.data_ptr(), vocab=embed.shape[0],
            mask_id=drafter.config.mask_token_id, head_fmt=parts[1][0], head_w=parts[1][1].data_ptr(),
            head_n=head_fn.out_features)
        keep = (ctx_fmt, ctx_w, layer_ptrs, [p[1] for p in parts], embed)   # what the struct points into
        return cls(drafter, nl, params, keep, embed, head_fn, [fns[0]] + fns[2:])

    def current(self, embed: torch.Tensor, head_fn) -> bool:
        """On, and still what it was built from: the same embedding and head, the drafter's
        linears unchanged (its layers' by NativeLayers.current, its fc and context rows)."""
        d = self.drafter
        return (_ENABLED and _DRAFT_ON and embed is self.embed and head_fn is self.head_fn
                and d._native_layers is self.layers and self.layers.current()
                and [d._fc_fn] + [getattr(layer.self_attn, "_ctx_kv_fn", None) for layer in d.layers] == self._fns)

    def run(self, cache, ctx_slots: torch.Tensor, ctx_pos: torch.Tensor, feats: torch.Tensor, slots: torch.Tensor,
            anchors: torch.Tensor, starts: torch.Tensor, B: int, positions: tuple[int, int], k: int):
        """One draft step (the class docstring) over R rows -> with k > 0 (indices into the
        drafting vocabulary int64 [R, n, k], probabilities fp32 [R, n, k]); with k = 0 the
        head's logits fp32 [R, n, head_n] (sampling rows, confidences: the caller takes it
        from there); or None (nothing written: a shape or an index the call does not take;
        the caller then runs the drafter's own path)."""
        draft, dwork = _DRAFT
        rot = self.drafter.rotary
        N, R = feats.shape[0], slots.shape[0]
        lo, n = int(positions[0]), int(positions[1])
        nl = self.layers
        # the rows each linear takes natively (its max_rows, settable by benchmarks): past them the
        # step's own calls run torch's product, other bits
        if cache.k[0].dtype != torch.float32 or R * B > nl.rows() or N > min(f.max_rows for f in self._fns) \
                or R * n > self.head_fn.max_rows or feats.dtype != torch.float32 or feats.device.type != "cpu":
            return None
        feats = feats.contiguous()
        ctx_slots = ctx_slots.to("cpu", torch.int64).contiguous()
        ctx_pos = ctx_pos.to("cpu", torch.int64).contiguous()
        slots = slots.to("cpu", torch.int64).contiguous()
        anchors = anchors.to("cpu", torch.int64).contiguous()
        starts = starts.to("cpu", torch.int64).contiguous()
        S, _, cap, _ = cache.k[0].shape
        # RoPE rows for every position of the cache (the call declines a context or block
        # past it), so no step's positions need a look first
        if rot.cos.shape[0] < cap:
            rot.reserve(torch.tensor([cap - 1]))
        nl._set_flags(0, False)
        threads = torch.get_num_threads()
        work = _scratch(self._local, dwork(ctypes.addressof(self._params), N, R, B, n, cap, threads))
        L = self._params.n_layers
        ptrs = ctypes.c_void_p * L
        idx = torch.empty(R, n, k, dtype=torch.int64)
        p = torch.empty(R, n, k)
        logits = None if k else torch.empty(R, n, self.head_fn.out_features)
        rc = draft(ctypes.addressof(self._params), feats.data_ptr(), N, ctx_slots.data_ptr(), ctx_pos.data_ptr(),
                   rot.cos.data_ptr(), rot.sin.data_ptr(), rot.cos.shape[0], ptrs(*[t.data_ptr() for t in cache.k[:L]]),
                   ptrs(*[t.data_ptr() for t in cache.v[:L]]), S, cap, cache.lens.data_ptr(), R, B, slots.data_ptr(),
                   anchors.data_ptr(), starts.data_ptr(), lo, n, k, idx.data_ptr(), p.data_ptr(),
                   None if logits is None else logits.data_ptr(), work.data_ptr(), threads)
        if rc == -5:
            return None
        if rc != 0:
            raise RuntimeError(f"native draft step failed (code {rc})")
        return (idx, p) if k else logits


class NativeLayers:
    """A decoder's layers, each run in one native call (dflash_layer.c): norms, the packed
    q/k/v, o, gate/up and down linears (the same native linears the torch path calls),
    q/k norms, RoPE, the K/V write and attention over each row's cache, SiLU and the
    residuals. On a small model in fp32 on a CPU the ~40 torch ops of a layer cost about
    as much as its matmuls; here a layer is one call. Every op runs in a fixed order per
    token, so a token's numbers do not depend on how many rows or tokens share the
    forward: greedy speculative decoding still equals the engine's own decoding bit for
    bit (tests/test_native.py).

    Built by `of(layers)` from packed layers (None where any linear is not native or a
    shape is unsupported). It reads the layers' current linears: `current()` is False
    once any was swapped (benchmarks' A/B), and the decoder then runs its torch path."""

    max_rows = None   # forwards of more rows (R x T) take the torch path; None: the build's row_limit()

    def __init__(self, params, owners):
        self._params, self._owners = params, owners   # (the structs must outlive their addresses)
        self._ptrs = [ctypes.addressof(p) for p in params]
        self._stack_arrays = {}   # _stack_ptrs
        self._checked_version, self._current = None, False   # current()'s last comparison
        # attention on AMX tiles (dflash_layer.c attn_amx: bf16 q, k, p, v, fp32 sums) for models
        # whose linears all take bf16 inputs on AMX already (the default forms on AMX CPUs);
        # models in exact forms (fp32 inputs, the FMA formats, f32 / bf16 weights) keep the
        # fp32 attention. set_amx_attention(False) turns it off for every model (benchmarks).
        bf16_forms = {FORMATS[f] for f in AMX_BF16_FORMATS.values()}
        self.amx_att = amx_built() and all(FORMATS[fn.native_format] in bf16_forms
                                           for _, _, fns in owners for fn in fns) \
            and all(p.head_dim % 32 == 0 and p.head_dim <= 128 for p in params)   # (attn_amx's tiles)
        self._built_fns = [f for _, _, f in owners]   # each layer's 4 linears (a tuple): what current() compares
        self.enabled = True   # settable: benchmarks compare with the torch path in one process
        # what every layer's struct says now of the flags forward sets: kv_bf16 (from the cache),
        # bf16_weights (prefill)
        self._flags = {"kv_bf16": 0, "bf16_weights": 0, "amx_att": 0}
        self._local = threading.local()   # each calling thread's scratch, kept between forwards (a fresh one page-faults)

    @classmethod
    def of(cls, layers) -> "NativeLayers | None":
        if not _ENABLED or _load() is None or _LAYER is None or not len(layers):
            return None
        params, owners = [], []
        try:
            for layer in layers:
                a, mlp = layer.self_attn, layer.mlp
                fns = (a._qkv_fn, a._o_fn, mlp._gate_up_fn, mlp._down_fn)
                parts = [_native_parts(f) for f in fns]
                if any(p is None for p in parts):
                    return None
                eps = {layer.input_layernorm.eps, layer.post_attention_layernorm.eps}
                if a.q_norm is not None:
                    eps |= {a.q_norm.eps, a.k_norm.eps}
                if len(eps) != 1 or a.head_dim % 8 or a.head_dim > 128 or a.heads % a.kv_heads:
                    return None
                hidden = layer.input_layernorm.weight.shape[0]
                if hidden % 8 or fns[2].out_features % 2:
                    return None
                p = _LayerParams(
                    hidden=hidden, inter=fns[2].out_features // 2, heads=a.heads, kv_heads=a.kv_heads,
                    head_dim=a.head_dim, eps=eps.pop(), scale=a.scale,
                    in_norm=_f32_ptr(layer.input_layernorm.weight.data),
                    post_norm=_f32_ptr(layer.post_attention_layernorm.weight.data),
                    q_norm=_f32_ptr(a.q_norm.weight.data) if a.q_norm is not None else None,
                    k_norm=_f32_ptr(a.k_norm.weight.data) if a.k_norm is not None else None,
                    qkv_fmt=parts[0][0], o_fmt=parts[1][0], gu_fmt=parts[2][0], down_fmt=parts[3][0],
                    qkv_w=parts[0][1].data_ptr(), o_w=parts[1][1].data_ptr(), gu_w=parts[2][1].data_ptr(),
                    down_w=parts[3][1].data_ptr(), qkv_b=_f32_ptr(a._qkv_b),
                    o_b=_f32_ptr(a.o_proj.bias.data) if a.o_proj.bias is not None else None)
                params.append(p)
                owners.append((a, mlp, fns))
        except ValueError:
            return None
        return cls(params, owners)

    def rows(self) -> int:
        """The most rows (R x T) a forward may have to run here."""
        return self.max_rows if self.max_rows is not None else row_limit()

    def serves(self, x: torch.Tensor) -> bool:
        """Whether a forward of x [R, T, hidden] runs here: fp32 on the CPU, at most
        rows() rows, and current()."""
        return (x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] * x.shape[1] <= self.rows()
                and self.current())

    def current(self) -> bool:
        """On, and every layer still has the linears this was built from."""
        if not (self.enabled and _ENABLED):
            return False
        # every forward and tree check asks: the layers' linears are compared (one attrgetter
        # per module, ~20 us for 30 layers) only after some layer's linears were reassigned
        version = _LINEARS_VERSION
        if self._checked_version != version:
            self._current = [_ATTN_FNS(a) + _MLP_FNS(m) for a, m, _ in self._owners] == self._built_fns
            self._checked_version = version
        return self._current

    def _set_flag(self, name: str, value: int) -> None:
        """Every layer's struct field `name` = value (written only when it changes)."""
        if self._flags[name] != value:
            for p in self._params:
                setattr(p, name, value)
            self._flags[name] = value

    def _set_flags(self, kv_bf16: int, prefill: bool) -> None:
        """The structs' per-forward flags: what the caches hold, the prefill forms, and the
        AMX attention where it is built for these layers and on."""
        self._set_flag("kv_bf16", kv_bf16)
        self._set_flag("bf16_weights", int(prefill))
        self._set_flag("amx_att", int(self.amx_att and _AMX_ATT_ON))

    def forward(self, x: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, cache, last: int, capture, causal: bool = True, out=None, tree=None,
                prefill: bool = False) -> dict:
        """x [R, T, hidden] fp32 (updated in place through layer `last`), slots / starts [R]
        int64, cos / sin [R, T, D]; layer i's K/V go to cache.k[i] / cache.v[i]
        [S, Hkv, cap, D] at positions starts .. starts + T - 1 -> {layer id in capture: a
        copy of x after that layer}. causal=False: every token reads all T (a drafter's
        block, which then leaves its K/V past the cached context, overwritten later).
        out=(lo, n): layer `last` computes tokens lo .. lo+n-1 of each row only (their bits
        as in a full forward); x's other tokens are then not that layer's output.
        tree: int32 [R, T, T + 1] (a tree verify: token t reads the context and then the block
        tokens tree[r, t, 1 .. tree[r, t, 0]], in that order; dflash_layer.c), or None.
        prefill: the linears in the bf16-input AMX forms take their bf16-weight forms
        (q4_1xw / q8_0xw: PREFILL_FORMATS), as the engine's prompt forwards do."""
        layer_fn, work_fn, reads_bf16, stack_fn = _LAYER
        R, T, _ = x.shape
        kv_bf16 = int(cache.k[0].dtype == torch.bfloat16)
        if kv_bf16 and not reads_bf16:
            raise ValueError("this build of the native layers (native.layer_build) reads fp32 KV caches only")
        self._set_flags(kv_bf16, prefill)
        slots = slots.to("cpu", torch.int64).contiguous()
        starts = starts.to("cpu", torch.int64).contiguous()
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        threads = torch.get_num_threads()
        S, _, cap, _ = cache.k[0].shape
        work = _scratch(self._local, work_fn(self._ptrs[0], R * T, cap, threads))
        lo, n = (0, T) if out is None else (int(out[0]), int(out[1]))
        if not (0 <= lo and n >= 1 and lo + n <= T):
            raise ValueError(f"out={out} is not a range of the {T} tokens")
        tree_ptr = None
        if tree is not None:
            if tuple(tree.shape) != (R, T, T + 1) or T > TREE_MAX:
                raise ValueError(f"tree of shape {tuple(tree.shape)} for {R} rows of {T} tokens (at most {TREE_MAX})")
            tree = tree.to("cpu", torch.int32).contiguous()
            tree_ptr = tree.data_ptr()
        ks, vs = cache.k[:last + 1], cache.v[:last + 1]
        kind = ks[0].dtype
        if kind not in KV_DTYPES or any(t.dtype != kind or not t.is_contiguous() for t in ks + vs):
            raise ValueError("the native layers need a contiguous fp32 or bf16 KV cache")
        got = {i: torch.empty_like(x) for i in capture if i <= last}
        if stack_fn is not None:   # the whole stack in one call: no return here between layers
            L = last + 1
            ptrs = ctypes.c_void_p * L
            failed = ctypes.c_int(-1)
            rc = stack_fn(self._stack_ptrs(L), L, x.data_ptr(), R, T, slots.data_ptr(), starts.data_ptr(),
                          cos.data_ptr(), sin.data_ptr(), ptrs(*[t.data_ptr() for t in ks]),
                          ptrs(*[t.data_ptr() for t in vs]), S, cap, work.data_ptr(), threads, int(causal), lo, n,
                          tree_ptr, ptrs(*[got[i].data_ptr() if i in got else None for i in range(L)]),
                          ctypes.byref(failed))
            if rc != 0:
                raise RuntimeError(f"native decoder layer {failed.value} failed (code {rc})")
            return got
        for i in range(last + 1):   # a build without dfl_layers (an earlier revision's, benchmarks)
            rc = layer_fn(self._ptrs[i], x.data_ptr(), R, T, slots.data_ptr(), starts.data_ptr(), cos.data_ptr(),
                          sin.data_ptr(), ks[i].data_ptr(), vs[i].data_ptr(), S, cap, work.data_ptr(), threads,
                          int(causal), *((lo, n) if i == last else (0, T)), tree_ptr)
            if rc != 0:
                raise RuntimeError(f"native decoder layer {i} failed (code {rc})")
            if i in got:
                got[i].copy_(x)
        return got

    def _stack_ptrs(self, n: int):
        """The first n layers' struct addresses as a C array (kept: built once per n)."""
        arr = self._stack_arrays.get(n)
        if arr is None:
            arr = self._stack_arrays[n] = (ctypes.c_void_p * n)(*self._ptrs[:n])
        return arr
