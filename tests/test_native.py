"""The native fp32 linear (dflash_core.native): exact recovery of the GGUF's 4-bit / 8-bit
codes from fp32 weights, the kernel against a float64 reference, row invariance (a row
alone gives the bits it gives inside any block or batch, at any thread count), and greedy
DFlash equal to the engine's own decoding bit for bit on a model whose linears run
through it. Real computations on random and quantised-then-dequantised weights."""
from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
import torch.nn.functional as F

from dflash_core import native
from dflash_core.models.layers import prepack_linear
from dflash_core.runtime import cpu_flags

HAS_KERNEL = {"avx2", "fma"} <= cpu_flags() and shutil.which("cc") is not None


@pytest.fixture(autouse=True)
def _need_kernel():
    if not HAS_KERNEL:
        pytest.skip("the native kernel needs an AVX2 + FMA CPU and a C compiler")
    assert native.available(), native.reason()   # where it can be built, it is


@pytest.fixture(params=["default", "fma"])
def linear_forms(request):
    """The test with the kernel's default forms (the AMX ones where the build has them)
    and, on CPUs with AMX, again with the AVX-512 FMA forms of the same weights."""
    if request.param == "fma":
        if not native.amx():
            pytest.skip("the default forms are the FMA forms on this CPU")
        native.set_amx(False)
        try:
            yield "fma"
        finally:
            native.set_amx(True)
    else:
        yield "default"


@pytest.fixture(params=["bf16", "fp32"])
def amx_input_kind(request):
    """The test with the AMX linears taking bf16 inputs (the default) and again taking fp32
    ones (exact: native.set_amx_inputs); the bf16 run only where the AMX forms are in use."""
    if request.param == "bf16" and not native.amx():
        pytest.skip("bf16 inputs are a choice of the AMX forms, not in use here")
    with native.amx_inputs_set(request.param):
        yield request.param


@contextlib.contextmanager
def one_thread():
    """Within: torch (and the native kernel, which reads torch's count) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def q8_0_weight(N, K, seed=0):
    """Weights as the GGUF converter hands them over: fp16 scale per 32, int8 codes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K // 32, 32, generator=g) * 0.05
    d = (w.abs().amax(-1) / 127).half().float()
    q = torch.round(w / d[..., None]).clamp(-127, 127)
    return (q * d[..., None]).reshape(N, K)


def q4_1_weight(N, K, seed=0):
    """fp16 scale and minimum per 32, codes 0..15 (the llama.cpp Q4_1 quantiser)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K // 32, 32, generator=g) * 0.05
    mn, mx = w.amin(-1), w.amax(-1)
    d = ((mx - mn) / 15).half().float()
    m = mn.half().float()
    q = torch.round((w - m[..., None]) / d[..., None]).clamp(0, 15)
    return (q * d[..., None] + m[..., None]).reshape(N, K)


def bf16_weight(N, K, seed=0):
    """fp32 weights that are bf16 values (a drafter shipped in bf16, loaded in fp32)."""
    return (torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05).bfloat16().float()


@pytest.mark.parametrize("make,fmt", [(q4_1_weight, "q4_1"), (q8_0_weight, "q8_0"), (bf16_weight, "bf16"),
                                      (lambda N, K, seed=0: torch.randn(N, K) * 0.05, "f32")])
def test_pack_recovers_the_exact_codes(make, fmt):
    w = make(70, 96)
    got_fmt, packed = native.pack(w)
    assert got_fmt == fmt
    assert torch.equal(native.dequantize(got_fmt, packed, 70), w)       # every weight, bit for bit
    bytes_ = packed.numel() * packed.element_size()                     # (rows padded to 72)
    assert bytes_ <= {"q4_1": 0.19, "q8_0": 0.29, "bf16": 0.5, "f32": 1.0}[fmt] * 72 * 96 * 4


def test_pack_rejects_what_it_cannot_reproduce():
    w = q4_1_weight(8, 64)
    w[3, 5] = w[3, 5] + 1e-3          # one weight off the grid: not Q4_1, not Q8_0
    fmt, packed = native.pack(w)
    assert fmt == "f32" and torch.equal(packed, w)
    assert native.pack(w.double()) is None and native.pack(w[:, :60]) is None   # dtype; K % 8


@pytest.mark.parametrize("make", [q4_1_weight, q8_0_weight, bf16_weight, lambda N, K, seed=0: torch.randn(N, K)])
def test_kernel_matches_float64_and_is_row_invariant(make, linear_forms):
    N, K = 37, 160                    # N not a multiple of the 4-row tile
    w = make(N, K, seed=1)
    b = torch.randn(N)
    lin = native.make_linear(w, b, amx_inputs="fp32")   # the exact kind (bf16 inputs: the test below)
    g = torch.Generator().manual_seed(2)
    for M in (1, 2, 3, 5, 16, 17, 33):
        x = torch.randn(M, K, generator=g)
        y = lin(x)
        ref = (x.double() @ w.double().t() + b.double()).float()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        for i in range(M):            # a row alone == the same row inside the block
            assert torch.equal(lin(x[i:i + 1]), y[i:i + 1]), (M, i)
    x = torch.randn(2, 7, K, generator=g)
    full = lin(x)
    assert full.shape == (2, 7, N)
    assert torch.equal(lin(x.transpose(0, 1)).transpose(0, 1), full)   # non-contiguous input
    with one_thread():
        one = lin(x)
    assert torch.equal(one, full)     # thread count does not change a bit


def test_amx_forms_hold_the_same_weights():
    """to_amx re-tiles Q4_1 / Q8_0 codes for AMX tiles (16 weight rows a column tile, the
    B-tile pair order): the same fp32 weights bit for bit, at 0.75 / 1.125 bytes a weight
    (the FMA forms' bytes). A pure layout: checked on every CPU."""
    for make, fmt, amx_fmt, rec in ((q4_1_weight, "q4_1", "q4_1x", 384), (q8_0_weight, "q8_0", "q8_0x", 576)):
        w = make(37, 96, seed=5)
        got, packed = native.pack(w)
        assert got == fmt
        xf, xp = native.to_amx(fmt, packed, 37)
        assert xf == amx_fmt and xp.shape == (3, 3, rec)   # 37 rows -> 3 tiles of 16, 96 -> 3 blocks of 32
        assert torch.equal(native.dequantize(xf, xp, 37), w)
    with pytest.raises(ValueError, match="no AMX form"):
        native.to_amx("bf16", bf16_weight(16, 32), 16)


def _need_amx():
    if not native.amx():
        pytest.skip("the AMX linears need a CPU with AMX-TILE / AMX-BF16 / AVX512-BF16 and the AVX-512 build")


def test_amx_linear_takes_fp32_inputs_whole():
    """The AMX kernel splits each fp32 input into three bf16 parts that sum to it exactly,
    and every code x part product is exact: an input needing all 24 bits of its
    significand comes through whole (one bf16 part, or two, would lose 2^-23 or more)."""
    _need_amx()
    w = torch.zeros(16, 32)
    w[:, 0] = 127.0                   # the block's scale comes out as exactly 1
    w[:, 1] = 1.0
    w[5, 1] = -3.0
    lin = native.make_linear(w, amx_inputs="fp32")
    assert lin.native_format == "q8_0x"
    x = torch.zeros(2, 32)
    x[:, 1] = 1 + 2 ** -8 + 2 ** -23                # needs the third part
    x[1, 1] = -(2 ** -30 + 2 ** -45)                # a small value keeps its low bits too
    y = lin(x)
    assert torch.equal(y[:, 0], x[:, 1]) and torch.equal(y[:, 5], -3 * x[:, 1])
    q4 = q4_1_weight(16, 64, seed=9)
    lin4 = native.make_linear(q4, amx_inputs="fp32")
    assert lin4.native_format == "q4_1x"
    xr = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * (1 + 2 ** -20)
    torch.testing.assert_close(lin4(xr).double(), xr.double() @ q4.double().t(), rtol=2e-6, atol=1e-6)


def test_amx_linear_is_row_invariant_across_tiles_threads_and_forms():
    """Up to 16 rows share one tile (accumulators in registers: column tiles in pairs up to 8
    rows, one at a time for 9-16); past 16 rows go in groups of 16 (the last one padded with
    zero rows), up to 8 groups per expansion of the weights, so 150 rows take two
    expansions: every row's bits stay those of the row alone, at 1 or 2 threads; the AMX and
    FMA forms of a weight agree to fp32 rounding (different summation orders of the same
    products)."""
    _need_amx()
    g = torch.Generator().manual_seed(3)
    for make in (q4_1_weight, q8_0_weight):
        w = make(70, 160, seed=4)
        amx_lin, fma_lin = native.make_linear(w, amx_inputs="fp32"), native.make_linear(w, use_amx=False)
        assert amx_lin.native_format.endswith("x") and not fma_lin.native_format.endswith("x")
        x = torch.randn(150, 160, generator=g)
        y = amx_lin(x)
        with one_thread():
            assert torch.equal(amx_lin(x), y)
        for rows in ((0, 1), (1, 3), (5, 12), (20, 28), (3, 19), (16, 33), (31, 40), (0, 128), (7, 136),
                     (140, 150)):   # 1-8 rows: column tiles in pairs; 9-16: one at a time
            assert torch.equal(amx_lin(x[rows[0]:rows[1]]), y[rows[0]:rows[1]]), rows
        torch.testing.assert_close(y, fma_lin(x), rtol=1e-5, atol=1e-5)
        assert not torch.equal(y, fma_lin(x))   # two kernels, really: the orders differ somewhere


def test_amx_bf16_inputs_are_the_exact_linear_of_the_rounded_inputs():
    """With bf16 inputs (q4_1xb / q8_0xb: the same records, one bf16 part) each input is
    rounded to the nearest bf16 first and the rest is the exact path: the same bits as the
    fp32-input form given bf16(x), row-invariant across tiles and threads, and an input
    needing more than bf16's 8 significant bits comes out rounded, not whole."""
    _need_amx()
    g = torch.Generator().manual_seed(5)
    for make, fmt in ((q4_1_weight, "q4_1"), (q8_0_weight, "q8_0")):
        w = make(70, 160, seed=6)
        exact, rounded = native.make_linear(w, amx_inputs="fp32"), native.make_linear(w)
        assert (exact.native_format, rounded.native_format) == (fmt + "x", fmt + "xb")
        assert torch.equal(native.dequantize(rounded.native_format, rounded._keep, 70), w)
        x = torch.randn(150, 160, generator=g) * 3
        xr = x.bfloat16().float()
        y = rounded(x)
        assert torch.equal(y, exact(xr))                      # W @ bf16(x), bit for bit
        assert not torch.equal(y, exact(x))
        torch.testing.assert_close(y.double(), xr.double() @ w.double().t(), rtol=2e-6, atol=1e-5)
        for rows in ((0, 1), (1, 3), (5, 12), (3, 19), (16, 33), (31, 40), (7, 136), (140, 150)):
            assert torch.equal(rounded(x[rows[0]:rows[1]]), y[rows[0]:rows[1]]), rows
        with one_thread():
            assert torch.equal(rounded(x), y)
    w = torch.zeros(16, 32)
    w[:, 0] = 127.0                   # the block's scale comes out as exactly 1
    w[:, 1] = 1.0                     # y[:, 0] = x[:, 1] (x[:, 0] = 0)
    x = torch.zeros(1, 32)
    x[0, 1] = 1 + 2 ** -8 + 2 ** -10  # nearest bf16: 1 + 2^-7 (rounded up, not cut to 1)
    assert native.make_linear(w)(x)[0, 0] == 1 + 2 ** -7
    assert native.make_linear(w, amx_inputs="fp32")(x)[0, 0] == x[0, 1]


def test_amx_argmax_is_the_outputs_argmax_by_torchs_rule(amx_input_kind):
    """`linear.argmax` (dfl_argmax_amx: an LM head's greedy choice without writing the logits)
    gives `linear(x).max(-1).indices` for 1-16 rows, at 1 and 2 threads, partial column tiles
    included: the first of equal outputs (columns with the same weights), and a NaN above any
    number (the first NaN); more rows, or a bias, are left to the caller (None)."""
    _need_amx()
    g = torch.Generator().manual_seed(11)
    for make in (q4_1_weight, q8_0_weight):
        for N in (1, 49, 70, 1000):
            w = make(N, 160, seed=N)
            lin = native.make_linear(w)
            x = torch.randn(17, 160, generator=g)
            for M in list(range(1, 9)) + [9, 12, 16]:   # column tiles in pairs up to 8 rows, then one at a time
                want = lin(x[:M]).max(-1).indices
                got = lin.argmax(x[:M])
                assert got.dtype == torch.int64 and got.shape == (M,)
                assert torch.equal(got, want), (make.__name__, N, M)
                with one_thread():
                    assert torch.equal(lin.argmax(x[:M]), want)
            assert lin.argmax(x) is None   # 17 rows: the outputs' own max
            assert torch.equal(lin.argmax(x[:3].view(1, 3, 160)), lin(x[:3]).max(-1).indices.view(1, 3))
            if N < 70:
                continue
            # ties: each row's winning column copied to earlier and later columns of its lane
            # (16 apart), of other lanes and of the other thread's half
            y = lin(x[:12])
            w2 = w.clone()
            for c in y.max(-1).indices.tolist():
                for d in (-32, 16, -37, 23, N // 2):
                    w2[(c + d) % N] = w[c]
            tied = native.make_linear(w2)
            for M in (4, 12):
                assert torch.equal(tied.argmax(x[:M]), tied(x[:M]).max(-1).indices)
            # NaN: an infinite input times a zero code (0 x inf): in columns 10 and 63 at least
            w3 = w.clone()
            for c in (10, 63):   # the code 0: Q4_1's block minimum, Q8_0's zero (still on the grid)
                w3[c, 5] = w[c, :32].min() if make is q4_1_weight else 0.0
            nan_lin = native.make_linear(w3)
            assert nan_lin.native_format == lin.native_format
            xi = x[:10].clone()
            xi[:, 5] = float("inf")
            out = nan_lin(xi)
            assert out[:, 10].isnan().all() and out[:, 63].isnan().all()
            first_nan = [int(row.isnan().nonzero()[0]) for row in out]
            assert nan_lin.argmax(xi).tolist() == first_nan == out.max(-1).indices.tolist()
    biased = native.make_linear(q8_0_weight(64, 160), bias=torch.randn(64))
    assert biased.argmax(torch.randn(2, 160)) is None


def test_prefill_form_rounds_the_weights_to_bf16_too_and_stays_row_invariant():
    """A bf16-input AMX linear's prefill form (prefill=True: q4_1xw / q8_0xw, the same
    records) rounds each weight to the nearest bf16 as well and sums each row over the whole
    of K in the tile: bf16(W) @ bf16(x) to fp32 rounding, a little off the decode form, the
    same bits for a row at any row count (1-16 rows in one tile, up to 32 in one pass of the
    weights, more reading them expanded once) and thread count; torch stands in for it past
    the kernel's rows with the same rounded weights."""
    _need_amx()
    g = torch.Generator().manual_seed(8)
    for make, fmt in ((q4_1_weight, "q4_1xb"), (q8_0_weight, "q8_0xb")):
        w = make(70, 160, seed=2)
        lin = native.make_linear(w, amx_inputs="bf16")
        assert lin.native_format == fmt and native.PREFILL_FORMATS[fmt] in native.FORMATS
        x = torch.randn(150, 160, generator=g) * 3
        y = lin(x, prefill=True)
        want = x.bfloat16().double() @ w.bfloat16().double().t()
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
        decode = lin(x)
        assert not torch.equal(y, decode)   # the weights' rounding is real
        torch.testing.assert_close(y, decode, rtol=0.05, atol=0.05)
        for rows in ((0, 1), (1, 3), (5, 12), (3, 19), (16, 33), (0, 32), (31, 40), (7, 136), (140, 150)):
            assert torch.equal(lin(x[rows[0]:rows[1]], prefill=True), y[rows[0]:rows[1]]), rows
        with one_thread():
            assert torch.equal(lin(x, prefill=True), y)
        lin.max_rows = 8   # past the kernel's rows: torch over the same rounded weights
        try:
            torch.testing.assert_close(lin(x[:20], prefill=True), y[:20], rtol=1e-5, atol=1e-5)
        finally:
            lin.max_rows = native.row_limit()
    exact = native.make_linear(q8_0_weight(32, 64, seed=3), amx_inputs="fp32")   # the exact forms have none
    xe = torch.randn(4, 64, generator=g)
    assert exact.native_format not in native.PREFILL_FORMATS and torch.equal(exact(xe, prefill=True), exact(xe))


def test_prefill_forwards_take_the_prefill_forms_whatever_their_rows():
    """Decoder.forward(prefill=True) (the engine's prompt forwards): every linear of the
    native layers in its prefill form. A prompt's hidden states and cached K/V are the same
    bits alone in one forward, in chunks, and padded beside a longer prompt; they differ
    from a decode forward's (prefill=False) by the weights' rounding only; and the engine's
    first token (its logprobs) is read from a prefill forward."""
    _need_amx()
    from dflash_core.engine import EngineConfig, SpecEngine
    from dflash_core.sampling import SamplingParams
    t = _variant_target("bf16")
    assert t.layers[0].mlp._gate_up_fn.native_format in native.PREFILL_FORMATS
    V = t.config.vocab_size
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, V, (1, 37), generator=g), torch.randint(0, V, (1, 52), generator=g)

    def forward(chunks, prefill=True, beside=None):
        cache = t.new_cache(2, 64)
        outs = []
        for lo, hi in chunks:
            ids = a[:, lo:hi] if beside is None else torch.cat([
                torch.cat([a[:, lo:hi], a.new_zeros(1, max(0, hi - max(lo, 37)))], 1)[:, :hi - lo], beside[:, lo:hi]])
            h, _ = t(ids, cache, torch.tensor([0] if beside is None else [0, 1]),
                     torch.tensor([lo] if beside is None else [lo, lo]), prefill=prefill)
            outs.append(h[:1, :max(0, min(hi, 37) - lo)])
        return torch.cat(outs, 1), cache.k[1][0, :, :37].clone(), cache.v[2][0, :, :37].clone()
    whole = forward([(0, 37)])
    for way in (forward([(0, 7), (7, 20), (20, 37)]), forward([(0, 52)], beside=b), forward([(0, 30), (30, 52)], beside=b)):
        assert all(torch.equal(x, y) for x, y in zip(way, whole))
    decode = forward([(0, 37)], prefill=False)
    assert not torch.equal(decode[0], whole[0])
    assert float((decode[0] - whole[0]).norm() / whole[0].norm()) < 0.05   # the same model, rounded a little (~1.7%)
    eng = SpecEngine(t, None, EngineConfig(max_slots=2, max_seq_len=64, block_size=1))
    [out] = eng.generate([a[0].tolist()], SamplingParams(max_new_tokens=1, logprobs=0))
    with torch.no_grad():   # (the packed LM head, as the engine's)
        lp = torch.log_softmax(t.logits(whole[0][0, -1]), -1)
    assert out.token_ids == [int(lp.argmax())] and out.logprobs[0].logprob == float(lp.max())


def test_target_features_compute_prompts_as_prefills_and_the_rest_as_decode_steps():
    """training.features.target_features(prefill_lens=...) (what the held-out walk reads):
    each row's prompt as the engine prefills it, the rest as its decode steps compute it,
    batched rows of different prompt lengths and in chunks: the bits of those forwards run
    row by row; without prefill_lens, every position in the decode forms."""
    _need_amx()
    from dflash_core.training.features import target_features
    t = _variant_target("bf16")
    V = t.config.vocab_size
    g = torch.Generator().manual_seed(5)
    rows = [(torch.randint(0, V, (9,), generator=g), torch.randint(0, V, (14,), generator=g)),
            (torch.randint(0, V, (21,), generator=g), torch.randint(0, V, (6,), generator=g))]
    C = max(len(p) + len(r) for p, r in rows)
    tokens = torch.zeros(2, C, dtype=torch.int64)
    for i, (p, r) in enumerate(rows):
        tokens[i, :len(p) + len(r)] = torch.cat([p, r])
    lens = [len(p) for p, _ in rows]
    for chunk in (None, 5):
        feats, outs = target_features(t, tokens, [0, 2], chunk=chunk, outputs=True, prefill_lens=lens)
        for i, (p, r) in enumerate(rows):
            cache = t.new_cache(1, C)
            o1, f1 = t(p[None], cache, torch.tensor([0]), torch.tensor([0]), capture_layers=[0, 2], prefill=True)
            o2, f2 = t(r[None], cache, torch.tensor([0]), torch.tensor([len(p)]), capture_layers=[0, 2])
            n = len(p) + len(r)
            assert torch.equal(feats[i, :n], torch.cat([f1, f2], 1)[0]) and torch.equal(outs[i, :n], torch.cat([o1, o2], 1)[0])
    plain = target_features(t, tokens, [0, 2])
    assert not torch.equal(plain[0, :9], feats[0, :9]) and torch.equal(
        plain[0, :9], t(rows[0][0][None], t.new_cache(1, C), torch.tensor([0]), torch.tensor([0]), capture_layers=[0, 2])[1][0])


def test_set_amx_inputs_picks_the_forms_packed_from_then_on():
    """bf16 inputs by default: models packed take the bf16-input forms where the AMX forms
    are in use (the FMA forms do not change); set_amx_inputs("fp32") (amx_inputs_set within
    a block) the exact ones; anything but fp32 / bf16 is refused with the choices named."""
    assert native.amx_inputs() == "bf16"
    want = "q4_1xb" if native.amx() else "q4_1"
    assert native.form("q4_1") == want and native.make_linear(q4_1_weight(32, 64)).native_format == want
    assert native.form("bf16") == "bf16"
    for bad in ("fp16", "BF16", None, 1):
        with pytest.raises(ValueError, match="fp32, bf16"):
            native.set_amx_inputs(bad)
    with pytest.raises(ValueError, match="fp32, bf16"):
        native.to_amx("q4_1", native.pack(q4_1_weight(16, 32))[1], 16, inputs="int8")
    with native.amx_inputs_set("fp32"):
        assert native.amx_inputs() == "fp32"
        want = "q4_1x" if native.amx() else "q4_1"
        assert native.form("q4_1") == want and native.make_linear(q4_1_weight(32, 64)).native_format == want
    assert native.amx_inputs() == "bf16"
    native.set_amx(False)
    try:
        assert native.form("q4_1") == "q4_1"
    finally:
        native.set_amx(True)


def test_amx_can_be_turned_off(monkeypatch):
    """set_amx(False) (and DFLASH_NATIVE_AMX=0 for the build) keeps the FMA forms."""
    w = q4_1_weight(32, 64)
    native.set_amx(False)
    try:
        assert native.make_linear(w).native_format == "q4_1" and native.form("q4_1") == "q4_1"
    finally:
        native.set_amx(True)
    monkeypatch.setenv("DFLASH_NATIVE_AMX", "0")
    assert not native.wants_amx()
    monkeypatch.setenv("DFLASH_NATIVE_AMX", "1")
    assert native.wants_amx() == (native.wants_avx512() and set(native.AMX_FLAGS) <= cpu_flags())
    assert native.make_linear(w).native_format == native.form("q4_1") == ("q4_1xb" if native.amx() else "q4_1")


def test_bench_amx_off_swaps_in_the_fma_forms_and_restores():
    """bench --amx-ab's swap: within amx_off every AMX linear is its FMA form, the native
    layers are rebuilt over them, and the engine decodes exactly as one built with the FMA
    forms; after it, the AMX forms and the engine's own output are back."""
    _need_amx()
    from dflash_core.bench import amx_off, amx_swaps
    from dflash_core.engine import EngineConfig, SpecEngine
    from dflash_core.sampling import SamplingParams
    p = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(300, 331))]
    eng = SpecEngine(_quantised_tiny_target(), None, EngineConfig(max_slots=2, max_seq_len=128, block_size=1))
    own = [o.token_ids for o in eng.generate(prompts, p)]
    native.set_amx(False)
    try:
        fma = SpecEngine(_quantised_tiny_target(), None, EngineConfig(max_slots=2, max_seq_len=128, block_size=1))
    finally:
        native.set_amx(True)
    want = [o.token_ids for o in fma.generate(prompts, p)]
    swaps = amx_swaps(eng)
    assert len(swaps) == 3 * 4 + 1 and {new.native_format for *_, new in swaps} == {"q4_1"}   # + the LM head
    nl = eng.target._native_layers
    with amx_off(eng, swaps) as n:
        assert n == len(swaps)
        assert eng.target._native_layers is not nl and eng.target._native_layers.current()
        assert [o.token_ids for o in eng.generate(prompts, p)] == want
    assert eng.target._native_layers is nl and nl.current()
    assert eng.target.layers[0].mlp._gate_up_fn.native_format == native.form("q4_1")
    assert [o.token_ids for o in eng.generate(prompts, p)] == own


def test_bench_amx_inputs_swap_runs_the_other_input_forms_and_restores():
    """bench --amx-inputs-ab's swap: within it every AMX linear takes fp32 inputs (the
    engine was built with bf16 ones), and the engine decodes exactly as one built with fp32
    inputs (a different model by the rounding: its output differs somewhere); after it, the
    bf16-input forms and output; next_token_agreement measures how far apart the two are."""
    _need_amx()
    from dflash_core.bench import amx_inputs_swaps, amx_off, next_token_agreement
    from dflash_core.engine import EngineConfig, SpecEngine
    from dflash_core.sampling import SamplingParams
    p = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(300, 331)), [40, 41] * 9]
    eng = SpecEngine(_quantised_tiny_target(), None, EngineConfig(max_slots=3, max_seq_len=128, block_size=1))
    own = [o.token_ids for o in eng.generate(prompts, p)]
    with native.amx_inputs_set("fp32"):
        exact = SpecEngine(_quantised_tiny_target(), None, EngineConfig(max_slots=3, max_seq_len=128, block_size=1))
    want = [o.token_ids for o in exact.generate(prompts, p)]
    assert want != own
    assert amx_inputs_swaps(eng, "bf16") == []                # nothing takes another input yet
    swaps = amx_inputs_swaps(eng, "fp32")
    assert len(swaps) == 3 * 4 + 1 and {new.native_format for *_, new in swaps} == {"q4_1x"}
    with amx_off(eng, swaps) as n:
        assert n == len(swaps)
        assert eng.target.layers[0].mlp._gate_up_fn.native_format == "q4_1x"
        assert [o.token_ids for o in eng.generate(prompts, p)] == want
    assert eng.target.layers[0].mlp._gate_up_fn.native_format == "q4_1xb"
    assert [o.token_ids for o in eng.generate(prompts, p)] == own
    ag = next_token_agreement(eng, prompts, own, lambda: amx_off(eng, swaps), reference_is_variant=True)
    assert ag["positions"] == 3 * 24 and 0.5 < ag["argmax_agreement"] < 1 and 0 < ag["mean_kl"] < 0.1
    same = next_token_agreement(eng, prompts, own, contextlib.nullcontext)
    assert same == {"positions": 72, "argmax_agreement": 1.0, "mean_kl": 0.0}


def test_linear_kind_says_how_the_linears_run():
    """api.linear_kind (/health's "linears"): the AMX forms where this CPU has them (with
    bf16 inputs: amx-bf16), the FMA forms otherwise or when turned off, torch for a bf16
    model."""
    from dflash_core.api import linear_kind
    assert linear_kind(_quantised_tiny_target()) == ("amx-bf16" if native.amx() else "native")
    with native.amx_inputs_set("fp32"):
        assert linear_kind(_quantised_tiny_target()) == ("amx" if native.amx() else "native")
    native.set_amx(False)
    try:
        assert linear_kind(_quantised_tiny_target()) == "native"
    finally:
        native.set_amx(True)
    assert linear_kind(_quantised_tiny_target().bfloat16().pack_weights()) == "torch"


@pytest.mark.parametrize("make", [bf16_weight, lambda N, K, seed=0: torch.randn(N, K)])
def test_row_stored_weights_with_a_half_vector_tail(make):
    """K % 16 == 8: the AVX-512 build's last step is a masked half vector; still exact to
    the float64 reference's rounding and row-invariant."""
    N, K = 9, 168
    w = make(N, K, seed=3)
    lin = native.make_linear(w)
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(4))
    y = lin(x)
    torch.testing.assert_close(y, (x.double() @ w.double().t()).float(), rtol=1e-5, atol=1e-5)
    for i in range(6):
        assert torch.equal(lin(x[i:i + 1]), y[i:i + 1]), i


def test_vector_width_follows_the_cpu_and_both_builds_pass(monkeypatch):
    """16-lane accumulators exactly where the CPU has AVX-512 F/BW/VL/DQ (and
    DFLASH_NATIVE_AVX512 is not 0), else 8; on such a CPU the 8-lane build is also built
    and passes the kernel tests above, in a fresh process."""
    import os
    import subprocess
    import sys
    has512 = set(native.AVX512_FLAGS) <= cpu_flags()
    want = 16 if has512 and os.environ.get("DFLASH_NATIVE_AVX512", "1") != "0" else 8
    assert native.vector_width() == want
    monkeypatch.setenv("DFLASH_NATIVE_AVX512", "0")
    assert not native.wants_avx512()
    monkeypatch.setenv("DFLASH_NATIVE_AVX512", "1")
    assert native.wants_avx512() == has512
    if not has512 or want == 8:
        return
    env = dict(os.environ, DFLASH_NATIVE_AVX512="0")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "(row_invariant or half_vector_tail or layers_are_row_invariant or whole_prefill_chunk) and not amx and not fma and not bf16"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    progress = res.stdout.split()[0]   # the suite's quiet output: one "." per passed test
    assert set(progress) == {"."} and len(progress) >= 8, res.stdout[-500:]


def test_bench_reports_the_native_linears_and_their_width():
    import json
    import subprocess
    import sys
    from pathlib import Path
    dflash = str(Path(sys.executable).with_name("dflash"))
    out = subprocess.run([dflash, "bench", "--target", "tiny-random", "--drafter", "random", "--num-prompts", "1",
                          "--max-new-tokens", "4", "--dtype", "float32", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    nl = json.loads(out.stdout.strip().splitlines()[-1])["native_linears"]
    assert nl["count"] > 0 and nl["why_not"] is None
    assert nl["vector_width"] == native.vector_width() in (8, 16)


def test_layer_build_swaps_in_another_layer_source_and_restores(tmp_path):
    """native.layer_build compiles another dflash_layer.c (or dflash_amx.c) beside the
    loaded kernel and use_layer_build makes every native forward call it within, and only
    within."""
    t = _variant_target()
    x = torch.randint(0, t.config.vocab_size, (1, 5))
    want = t(x, t.new_cache(1, 8), torch.tensor([0]), torch.tensor([0]))[0]
    src = native.LAYER_SOURCE.read_text()
    head = "int dfl_layer(const dfl_layer_t *P, float *x, long R, long T,"
    assert head in src
    broken = tmp_path / "dflash_layer.c"
    broken.write_text(src.replace("    const long M = R * T, Hd = P->hidden, I = P->inter;",
                                  "    if (R > 0) return -1;\n    const long M = R * T, Hd = P->hidden, I = P->inter;", 1))
    fns = native.layer_build(broken)
    with native.use_layer_build(fns):
        with pytest.raises(RuntimeError, match="native decoder layer 0 failed"):
            t(x, t.new_cache(1, 8), torch.tensor([0]), torch.tensor([0]))
    assert torch.equal(t(x, t.new_cache(1, 8), torch.tensor([0]), torch.tensor([0]))[0], want)
    same = native.layer_build(native.LAYER_SOURCE)   # the same source: the same build, the same bits
    with native.use_layer_build(same):
        assert torch.equal(t(x, t.new_cache(1, 8), torch.tensor([0]), torch.tensor([0]))[0], want)
    if native.amx():   # a dflash_amx.c replaces its namesake: the layers' linears run in it
        asrc = native.AMX_SOURCE.read_text()
        anchor = "    if (fmt < 4 || fmt > 9 || K % 32) return -1;"
        assert anchor in asrc
        broken_amx = tmp_path / "dflash_amx.c"
        broken_amx.write_text(asrc.replace(anchor, "    if (M > 0) return -1;\n" + anchor, 1))
        with native.use_layer_build(native.layer_build(broken_amx)):
            with pytest.raises(RuntimeError, match="native decoder layer 0 failed"):
                t(x, t.new_cache(1, 8), torch.tensor([0]), torch.tensor([0]))
        assert torch.equal(t(x, t.new_cache(1, 8), torch.tensor([0]), torch.tensor([0]))[0], want)
    with pytest.raises(RuntimeError, match="defines neither"):
        (tmp_path / "x.c").write_text("int main(void) { return 0; }\n")
        native.layer_build(tmp_path / "x.c")


def test_bench_kernel_source_ab_runs_both_builds_and_refuses_a_missing_file(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    dflash = str(Path(sys.executable).with_name("dflash"))
    base = [dflash, "bench", "--target", "tiny-random", "--drafter", "random", "--num-prompts", "1",
            "--max-new-tokens", "6", "--dtype", "float32", "--block-sizes", "2", "--threads", "1"]
    out = subprocess.run(base + ["--kernel-source-ab", str(native.AMX_SOURCE), "--verify-cost", "--verify-reps", "2",
                                 "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    other = s["kernel_source"]["by_block_size"]["2"]
    assert s["greedy_outputs_identical"] and other["greedy_outputs_identical"]
    assert other["dflash_tokens_per_s"] > 0 and other["ar_tokens_per_s"] > 0
    ab = s["kernel_source_ab"]["128"]
    assert set(ab) == {"layers as built", "layers with the file"}
    assert all(v > 0 for r in ab.values() for v in r["verify_ms"].values())
    for path, text in ((tmp_path / "none.c", None), (tmp_path / "other.c", "int main(void) { return 0; }\n")):
        if text is not None:
            path.write_text(text)
        bad = subprocess.run(base + ["--kernel-source-ab", str(path)], capture_output=True, text=True, timeout=300)
        lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
        assert bad.returncode == 2 and len(lines) == 1 and "--kernel-source-ab" in lines[0], bad.stderr


def test_bench_amx_inputs_ab_reports_both_kinds_and_refuses_without_amx_linears():
    """`dflash bench --amx-inputs-ab` on the default target (its GGUF codes on AMX tiles):
    every measurement with both kinds, greedy DFlash equal to plain decoding in each, and
    the two models' next-token agreement; an engine without AMX linears (the native kernel
    off) is refused in one line."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    dflash = str(Path(sys.executable).with_name("dflash"))
    base = [dflash, "bench", "--num-prompts", "1", "--max-new-tokens", "8", "--block-sizes", "4", "--threads", "1",
            "--amx-inputs-ab"]
    bad = subprocess.run(base + ["--target", "tiny-random", "--drafter", "random", "--dtype", "float32", "--no-native"],
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "--amx-inputs-ab" in lines[0], bad.stderr
    if not native.amx():
        return
    out = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["native_linears"]["amx_inputs"] == "bf16" and set(s["native_linears"]["formats"]) == {"q4_1xb", "q8_0xb"}
    other = s["amx_inputs_fp32"]
    assert s["greedy_outputs_identical"] and other["by_block_size"]["4"]["greedy_outputs_identical"]
    ag = other["next_token_agreement"]
    assert ag["positions"] == 8 and 0.5 <= ag["argmax_agreement"] <= 1 and 0 <= ag["mean_kl"] < 0.01


def test_bench_amx_attention_ab_runs_the_engine_both_ways_and_refuses_without_it():
    """`dflash bench --amx-attention-ab` on the default target: every measurement with the
    attention on AMX tiles over the "auto" (bf16) KV cache and with `--amx-attention off`'s
    engine (fp32 attention, fp32 cache), greedy DFlash equal to plain decoding in each, the
    two models' next-token agreement, and the verify cost of both at each context; an
    engine whose attention is not on AMX tiles (--amx-attention off) is refused in one line."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    _need_amx()
    dflash = str(Path(sys.executable).with_name("dflash"))
    base = [dflash, "bench", "--num-prompts", "1", "--max-new-tokens", "8", "--block-sizes", "4", "--threads", "1",
            "--amx-attention-ab"]
    bad = subprocess.run(base + ["--amx-attention", "off"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "--amx-attention-ab" in lines[0], bad.stderr
    out = subprocess.run(base + ["--verify-cost", "--verify-reps", "2", "--verify-tokens", "1,2", "--verify-ctx",
                                 "16,40", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["kv_cache_dtype"] == "bfloat16"
    other = s["amx_attention_off"]
    assert s["greedy_outputs_identical"] and other["by_block_size"]["4"]["greedy_outputs_identical"]
    ag = other["next_token_agreement"]
    assert ag["positions"] == 8 and 0.5 <= ag["argmax_agreement"] <= 1 and 0 <= ag["mean_kl"] < 0.01
    assert set(s["amx_attention_ab"]) == {"16", "40"}
    assert set(s["amx_attention_ab"]["40"]) == {"AMX attention, bfloat16 KV cache", "fp32 attention, float32 KV cache"}
    assert all(v["verify_ms"]["2"] > 0 for v in s["amx_attention_ab"]["40"].values())


def test_bench_kv_cache_ab_runs_both_caches_and_reports_their_agreement():
    """`dflash bench --kv-cache-ab`: every measurement again with the target's KV cache in the
    other dtype (back to back), greedy DFlash equal to plain decoding with each, and the two
    models' next-token agreement, read with the swapped cache (KL above 0: the bf16 cache's
    rounding reaches the logits); the batched throughput too. A bf16 model has no fp32 cache
    to compare: refused in one line."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    dflash = str(Path(sys.executable).with_name("dflash"))
    base = [dflash, "bench", "--target", "tiny-random", "--drafter", "random", "--num-prompts", "2",
            "--max-new-tokens", "12", "--block-sizes", "4", "--threads", "1", "--kv-cache-ab"]
    bad = subprocess.run(base + ["--dtype", "bfloat16"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "--kv-cache-ab" in lines[0] and "float32" in lines[0], bad.stderr
    out = subprocess.run(base + ["--dtype", "float32", "--batch-sizes", "2", "--json"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["kv_cache_dtype"] == "float32"
    other = s["kv_cache_bfloat16"]
    assert s["greedy_outputs_identical"] and other["by_block_size"]["4"]["greedy_outputs_identical"]
    assert other["batched_ar_tokens_per_s"]["2"] > 0 and s["batched_ar_tokens_per_s"]["2"] > 0
    ag = other["next_token_agreement"]
    assert ag["positions"] == 24 and 0.5 <= ag["argmax_agreement"] <= 1 and 0 < ag["mean_kl"] < 0.01


def test_topk_softmax_is_torchs_topk_of_the_softmax_in_one_pass():
    """native.topk_softmax (the draft tree's candidates): each row's k largest logits,
    descending, index 0 the first maximum (argmax's), equal values lower index first, a NaN
    never picked, and their softmax probabilities as torch computes them (to rounding);
    None where it does not serve (k outside [1, min(N, 16)], not fp32)."""
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 5, 8192), (3, 7, 8192), (2, 3, 49152), (4, 16), (1, 1, 20), (2, 9)]:
        x = torch.randn(*shape, generator=g) * 4
        k = min(4, shape[-1])
        ti, tp = native.topk_softmax(x, k)
        assert ti.shape == tp.shape == shape[:-1] + (k,) and ti.dtype == torch.int64
        want_p, want_i = torch.softmax(x, -1).topk(k, -1)
        assert torch.equal(ti[..., 0], x.argmax(-1)), shape
        assert torch.equal(x.gather(-1, ti), x.gather(-1, want_i)), shape    # the same values, in order
        torch.testing.assert_close(tp, want_p, rtol=1e-5, atol=1e-7)
    x = torch.zeros(2, 50)
    x[:, [10, 3, 40, 7]] = 5.0          # a four-way tie: lower indices first
    x[1, 3] = float("nan")              # a NaN is never picked
    assert native.topk_softmax(x, 4)[0].tolist() == [[3, 7, 10, 40], [7, 10, 40, 0]]
    assert native.topk_softmax(x[:1], 3)[0].tolist() == [[3, 7, 10]]
    assert native.topk_softmax(torch.randn(2, 10), 17) is None and native.topk_softmax(torch.randn(2, 3), 4) is None
    assert native.topk_softmax(torch.randn(2, 10, dtype=torch.bfloat16), 4) is None
    assert native.topk_softmax(torch.randn(2, 10), 0) is None


def test_more_rows_than_max_rows_take_torch_linear():
    """Past max_rows (long prefill chunks) the product is F.linear over the fp32 weights;
    up to it, the kernel (row-invariant, close to F.linear)."""
    w, b = q4_1_weight(40, 64), torch.randn(40)
    lin = native.make_linear(w, b, max_rows=4, amx_inputs="fp32")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 64, generator=g)
    assert torch.equal(lin(x), F.linear(x, w, b))
    y = lin(x[:4])
    torch.testing.assert_close(y, F.linear(x[:4], w, b), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(lin(x[i:i + 1]), y[i:i + 1]) for i in range(4))
    assert native.MAX_ROWS >= 48     # a verify block of 3 over 16 running rows stays in the kernel
    if native.amx():   # a bf16-input form: F.linear over its rounded inputs, the model it computes
        lb = native.make_linear(w, b, max_rows=4)
        xr = x.bfloat16().float()
        assert torch.equal(lb(x), F.linear(xr, w, b)) and not torch.equal(lb(x), F.linear(x, w, b))
        torch.testing.assert_close(lb(x[:4]), F.linear(xr[:4], w, b), rtol=1e-5, atol=1e-5)


def test_prepack_linear_takes_the_native_kernel_for_fp32_only():
    w = q4_1_weight(64, 96)
    fn = prepack_linear(w)
    assert fn.native_format == native.form("q4_1") and fn.weight_bytes < w.numel()
    x = torch.randn(3, 96)
    takes = x.bfloat16().float() if fn.native_format in native.AMX_BF16_FORMATS.values() else x
    torch.testing.assert_close(fn(x), F.linear(takes, w), rtol=1e-5, atol=1e-5)
    exact = prepack_linear(w, amx_inputs="fp32")
    torch.testing.assert_close(exact(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert getattr(prepack_linear(w, native=False), "native_format", None) is None
    assert getattr(prepack_linear(w.bfloat16()), "native_format", None) is None
    was = native.enabled()
    native.set_enabled(False)
    try:
        assert getattr(prepack_linear(w), "native_format", None) is None
        assert "turned off" in native.reason()
    finally:
        native.set_enabled(was)


def _quantised_tiny_target():
    """The tiny random target with every linear weight put on a Q4_1 grid (as a GGUF model
    is), so the engine runs the 4-bit kernel."""
    from dflash_core.api import tiny_random_target
    t = tiny_random_target(vocab_size=2048, num_layers=3, seed=1)
    with torch.no_grad():
        for i, (name, p) in enumerate(t.named_parameters()):
            if p.dim() == 2 and "embed" not in name:
                p.copy_(q4_1_weight(*p.shape, seed=i) * 2)
    return t.pack_weights()


def test_fp32_greedy_dflash_equals_fp32_autoregressive_bit_for_bit(linear_forms, amx_input_kind):
    """With the native kernel, fp32 is row-invariant like bf16: verify blocks of any size
    and batches of any size compute each token as a one-token step does (and so with the
    AMX linears taking bf16 inputs)."""
    from dflash_core.drafter import DFlashDrafter, LocalDraftBackend
    from dflash_core.engine import EngineConfig, SpecEngine
    from dflash_core.sampling import SamplingParams
    target = _quantised_tiny_target()
    assert target.layers[0].mlp._gate_up_fn.native_format == native.form("q4_1")
    assert target.layers[0].self_attn._qkv_fn.native_format == native.form("q4_1")
    assert target._native_layers is not None and target._native_layers.current()   # whole layers native too
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700], [9], list(range(1000, 1023)), [40, 41] * 9]

    def engine(block_size, drafter=True, packed=False):
        cfg = EngineConfig(max_slots=6, max_seq_len=200, block_size=block_size)
        backend = None
        if drafter:
            d = DFlashDrafter.from_target(target.config, num_layers=1, block_size=block_size, mask_token_id=3,
                                          num_features=2, seed=0)
            if packed:   # as loaded for serving: its block forward in native layers too
                d = d.pack_weights()
                assert d._native_layers is not None and d._native_layers.current()
            backend = LocalDraftBackend(d, 6, 200 + block_size + 1)
        return SpecEngine(target, backend, cfg)

    p = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ar = engine(1, drafter=False)
    ref = [o.token_ids for o in ar.generate(prompts, p)]
    assert len({tuple(r) for r in ref}) == len(ref)
    assert [ar.generate([q], p)[0].token_ids for q in prompts] == ref      # batch-invariant
    for b in (4, 16):
        for packed in (False, True):
            out = engine(b, packed=packed).generate(prompts, p)
            assert [o.token_ids for o in out] == ref, (b, packed)
            assert sum(o.stats.num_draft_tokens for o in out) > 0


def _variant_target(amx_inputs: str | None = None, **cfg):
    """A small random target of the given config (Qwen2 biases, Qwen3 q/k norms, GQA),
    linears on a Q4_1 grid, norms not 1, packed for inference (its AMX linears taking
    `amx_inputs`, None: the kind set now)."""
    from dflash_core.models.config import ModelConfig
    from dflash_core.models.decoder import Decoder
    c = ModelConfig(**{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_layers": 3,
                       "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, **cfg})
    t = Decoder(c)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for i, (name, p) in enumerate(t.named_parameters()):
            if p.dim() == 2 and "embed" not in name:
                p.copy_(q4_1_weight(*p.shape, seed=i) * 4)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.1))
    if amx_inputs is None:
        return t.eval().pack_weights()
    with native.amx_inputs_set(amx_inputs):
        return t.eval().pack_weights()


@pytest.mark.parametrize("cfg", [{}, {"attention_bias": True}, {"qk_norm": True, "family": "qwen3"}])
def test_native_layers_match_the_torch_layers(cfg):
    """Whole layers in one native call compute what the torch layers compute (fp32, to
    summation order): hidden states, captured features and the K/V left in the cache,
    for a prefill and then a 3-token block on two rows at different positions."""
    t = _variant_target("fp32", **cfg)   # exact linears: the layers' own code compared
    nl = t._native_layers
    assert nl is not None and nl.current()
    V = t.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, V, (2, 11), generator=g)
    block = torch.randint(0, V, (2, 3), generator=g)
    runs = {}
    for on in (True, False):
        nl.enabled = on
        cache = t.new_cache(3, 40)
        slots = torch.tensor([2, 0])
        h0, f0 = t(prompt, cache, slots, torch.tensor([0, 0]), [0, 2])
        h1, f1 = t(block, cache, slots, torch.tensor([11, 7]), [0, 2])   # row 1 rewinds to 7
        runs[on] = (h0, f0, h1, f1, cache.k[1][[2, 0], :, :14].clone(), cache.v[2][[2, 0], :, :10].clone())
    nl.enabled = True
    for a, b in zip(runs[True], runs[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.equal(runs[True][2], runs[False][2])   # (really another summation order)


def test_native_stack_call_equals_layer_by_layer():
    """The whole stack in one native call (dfl_layers) leaves the same bits as one call per
    layer (what a build without it, e.g. an earlier revision's for --kernel-source-ab, runs):
    hidden states, captured features (a copy after each captured layer, the last one too)
    and the cache's K/V, for a prefill and then a tree-less 4-token block on two rows, and
    for a drafter-style forward computing only some tokens of its last layer."""
    t = _variant_target(qk_norm=True, family="qwen3")
    nl = t._native_layers
    layer, work, reads_bf16, stack = native._LAYER
    assert stack is not None
    V = t.config.vocab_size
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, V, (2, 10), generator=g)
    block = torch.randint(0, V, (2, 4), generator=g)
    last = len(t.layers) - 1
    runs = {}
    for fns in ((layer, work, reads_bf16, stack), (layer, work, reads_bf16, None)):
        with native.use_layer_build(fns):
            cache = t.new_cache(3, 40)
            slots = torch.tensor([2, 0])
            h0, f0 = t(prompt, cache, slots, torch.tensor([0, 0]), [0, last])
            h1, f1 = t(block, cache, slots, torch.tensor([10, 6]), [1, 0])
            x = t.embed_tokens(block).contiguous()
            cos, sin = t.rotary(torch.tensor([[10, 11, 12, 13], [6, 7, 8, 9]]), x.dtype)
            got = nl.forward(x, slots, torch.tensor([10, 6]), cos, sin, cache, last, {0, last}, causal=False,
                             out=(1, 2))
            runs[stack is not None and fns[3] is not None] = (h0, f0, h1, f1, x[:, 1:3], got[0], got[last],
                                                              cache.k[last][[2, 0], :, :14], cache.v[0][[2, 0], :, :14])
    for a, b in zip(runs[True], runs[False]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[True][5], runs[True][6])   # (a copy per captured layer, not one tensor)


def test_native_layers_are_row_invariant_and_step_like_the_engine(linear_forms, amx_input_kind):
    """A token's numbers are the same bits whether it comes alone, in a verify block of
    any size or beside other rows; swapping a linear (benchmarks) sends forwards back to
    the torch path, as do forwards of more than max_rows rows."""
    t = _variant_target(qk_norm=True, family="qwen3")
    nl = t._native_layers
    V = t.config.vocab_size
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, V, (3, 9), generator=g)
    new = torch.randint(0, V, (3, 5), generator=g)

    def prefilled():
        cache = t.new_cache(3, 32)
        t(prompts, cache, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]))
        return cache
    cache = prefilled()
    steps = torch.cat([t(new[:, i:i + 1], cache, torch.tensor([0, 1, 2]), torch.full((3,), 9 + i))[0]
                       for i in range(5)], 1)                                          # one token at a time
    for T in (2, 5):
        cache = prefilled()
        blocks = [t(new[:, a:a + T], cache, torch.tensor([0, 1, 2]), torch.full((3,), 9 + a))[0]
                  for a in range(0, 5, T)]
        assert torch.equal(torch.cat(blocks, 1), steps), T
    cache = prefilled()
    alone = t(new[1:2], cache, torch.tensor([1]), torch.tensor([9]))[0]                # one row of three
    assert torch.equal(alone, steps[1:2])
    # the thread count changes no bit of a layer either
    with one_thread():
        cache = prefilled()
        assert torch.equal(t(new[1:2], cache, torch.tensor([1]), torch.tensor([9]))[0], alone)

    a = t.layers[1].self_attn
    fn = a._o_fn
    # the torch linear for the native one: on the inputs the native one takes (bf16-rounded
    # where the AMX linears take bf16)
    takes = (lambda x: x.bfloat16().float()) if fn.native_format in native.AMX_BF16_FORMATS.values() else (lambda x: x)
    a._o_fn = lambda x: F.linear(takes(x), a.o_proj.weight)
    try:
        assert not nl.current()
        cache = prefilled()
        swapped = t(new, cache, torch.tensor([0, 1, 2]), torch.full((3,), 9))[0]
        torch.testing.assert_close(swapped, steps, rtol=1e-4, atol=1e-4)
    finally:
        a._o_fn = fn
    assert nl.current()
    nl.max_rows = 8            # 3 rows x 5 tokens: past it, the torch path
    try:
        cache = prefilled()
        torch.testing.assert_close(t(new, cache, torch.tensor([0, 1, 2]), torch.full((3,), 9))[0], steps,
                                   rtol=1e-4, atol=1e-4)
    finally:
        del nl.max_rows


def _same_bits_every_way(t, new, slots, start, prefilled, steps):
    """Asserts that the new tokens new [R, N] after `start` cached ones (prefilled() -> a
    cache holding them) give `steps` (their outputs one token at a time) bit for bit: in
    blocks of 7 and of N, as a tree whose every token lists all earlier ones (the gathered
    path), and with 1 or 7 threads (other thread counts cut the tokens into other runs; 7:
    runs that do not divide evenly)."""
    R, N = new.shape

    def blocks(T):
        cache = prefilled()
        return torch.cat([t(new[:, a:a + T], cache, slots, torch.full((R,), start + a))[0] for a in range(0, N, T)], 1)
    for T in (7, N):
        assert torch.equal(blocks(T), steps), T
    chain = torch.zeros(R, N, N + 1, dtype=torch.int32)
    for i in range(N):
        chain[:, i, 0] = i + 1
        chain[:, i, 1:i + 2] = torch.arange(i + 1, dtype=torch.int32)
    cache = prefilled()
    assert torch.equal(t(new, cache, slots, torch.full((R,), start), tree=chain)[0], steps)
    threads = torch.get_num_threads()
    try:
        for n in (1, 7):
            torch.set_num_threads(n)
            for T in (7, N):
                assert torch.equal(blocks(T), steps), (n, T)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 64), (4, 4, 64), (8, 2, 32), (4, 1, 40)])
def test_native_attention_is_row_invariant_across_runs_pairs_and_trees(heads, kv_heads, head_dim):
    """The attention reads a kv head's keys once per run of up to 16 tokens of a row, two
    queries per 16-lane FMA, and a token's heads' values in one pass (head sizes of 32 /
    64 lanes; others head by head). None of it may change a bit: 20 new tokens (past one
    run) one at a time, in blocks of 7, in one block, in a tree whose every token lists all
    earlier ones (the gathered path) and with 1 or 7 threads all give the same numbers,
    which match the torch layers to summation order."""
    t = _variant_target("fp32", num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, qk_norm=True,
                        family="qwen3")
    nl = t._native_layers
    assert nl is not None
    V = t.config.vocab_size
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, V, (2, 13), generator=g)
    new = torch.randint(0, V, (2, 20), generator=g)
    slots = torch.tensor([1, 0])

    def prefilled():
        cache = t.new_cache(2, 40)
        t(prompt, cache, slots, torch.tensor([0, 0]))
        return cache

    cache = prefilled()
    steps = torch.cat([t(new[:, i:i + 1], cache, slots, torch.full((2,), 13 + i))[0] for i in range(20)], 1)
    _same_bits_every_way(t, new, slots, 13, prefilled, steps)
    nl.enabled = False
    try:
        cache = prefilled()
        torch.testing.assert_close(t(new, cache, slots, torch.full((2,), 13))[0], steps, rtol=1e-4, atol=1e-4)
    finally:
        nl.enabled = True


def test_bf16_kv_cache_stores_rounded_values_and_stays_row_invariant():
    """A bf16 KV cache (EngineConfig.kv_cache_dtype) under the fp32 native layers: each K / V
    value is stored as torch rounds it to bf16 (layer 0's inputs do not depend on attention,
    so its entries are exactly the fp32 cache's, rounded), and every token reads the rounded
    values: one at a time, in blocks, as a tree and with 1 or 7 threads give the same bits,
    the torch layers over the same cache give them to summation order, and the model differs
    from the fp32 cache's by that rounding only (close, not equal)."""
    t = _variant_target("fp32", num_heads=6, num_kv_heads=2, head_dim=64, qk_norm=True, family="qwen3")
    nl = t._native_layers
    assert nl is not None
    V = t.config.vocab_size
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, V, (2, 13), generator=g)
    new = torch.randint(0, V, (2, 20), generator=g)
    slots = torch.tensor([1, 0])

    def prefilled(dtype=torch.bfloat16):
        cache = t.new_cache(2, 40, dtype)
        t(prompt, cache, slots, torch.tensor([0, 0]))
        return cache

    def one_at_a_time(cache):
        return torch.cat([t(new[:, i:i + 1], cache, slots, torch.full((2,), 13 + i))[0] for i in range(20)], 1)

    cache, ref = prefilled(), prefilled(torch.float32)
    assert cache.k_all.dtype == torch.bfloat16 and cache.k_all.element_size() == 2
    steps, ref_steps = one_at_a_time(cache), one_at_a_time(ref)
    for kind in ("k", "v"):   # layer 0: the fp32 cache's values, rounded to the nearest bf16
        want = getattr(ref, kind)[0][:, :, :33].bfloat16()
        assert torch.equal(getattr(cache, kind)[0][:, :, :33], want), kind
    assert not torch.equal(cache.k[2][:, :, :33].float(), ref.k[2][:, :, :33])   # (they really are rounded)
    _same_bits_every_way(t, new, slots, 13, prefilled, steps)
    # the torch layers over a bf16 cache read rounded values too: to summation order, which
    # rounding can turn into one bf16 step (2^-8 relative) of a K / V value near a boundary
    c = prefilled()
    nl.enabled = False
    try:
        torch.testing.assert_close(t(new, c, slots, torch.full((2,), 13))[0], steps, rtol=1e-2, atol=2e-3)
    finally:
        nl.enabled = True
    assert not torch.equal(steps, ref_steps)
    torch.testing.assert_close(steps, ref_steps, rtol=0.05, atol=0.05)


def test_a_kernel_build_without_bf16_caches_refuses_one(tmp_path):
    """native.layer_build of a dflash_layer.c from before bf16 caches (no kv_bf16 field) would
    read their 2-byte values as fp32: a forward over a bf16 cache refuses it with a
    ValueError and writes nothing, and the same build still serves an fp32 cache."""
    t = _variant_target()
    x = torch.randint(0, t.config.vocab_size, (1, 5))
    src = native.LAYER_SOURCE.read_text()
    old = tmp_path / "dflash_layer.c"
    old.write_text(src.replace("kv_bf16", "kv_half"))
    fns = native.layer_build(old)
    with native.use_layer_build(fns):
        cache = t.new_cache(1, 8, torch.bfloat16)
        with pytest.raises(ValueError, match="fp32 KV caches only"):
            t(x, cache, torch.tensor([0]), torch.tensor([0]))
        assert not cache.k_all.any() and not cache.v_all.any()
        want = t(x, t.new_cache(1, 8), torch.tensor([0]), torch.tensor([0]))[0]
    assert torch.equal(t(x, t.new_cache(1, 8), torch.tensor([0]), torch.tensor([0]))[0], want)


def test_bf16_kv_cache_greedy_dflash_equals_autoregressive_bit_for_bit():
    """The engine with a bf16 target cache (kv_cache_dtype="bfloat16"): greedy DFlash, chains
    and trees at blocks 4 and 16, batched, equals the same engine's plain decoding token for
    token; the fp32 cache's engine decodes other tokens somewhere (another model)."""
    from dflash_core.drafter import DFlashDrafter, LocalDraftBackend
    from dflash_core.engine import EngineConfig, SpecEngine
    from dflash_core.sampling import SamplingParams
    target = _quantised_tiny_target()
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700], [9], list(range(1000, 1023)), [40, 41] * 9]

    def engine(block_size, kv="bfloat16", trees=True):
        cfg = EngineConfig(max_slots=6, max_seq_len=200, block_size=block_size, kv_cache_dtype=kv, draft_tree=trees)
        backend = None
        if block_size > 1:
            d = DFlashDrafter.from_target(target.config, num_layers=1, block_size=block_size, mask_token_id=3,
                                          num_features=2, seed=0).pack_weights()
            backend = LocalDraftBackend(d, 6, 200 + block_size + 1)
        return SpecEngine(target, backend, cfg)

    p = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = engine(1)
    assert plain.cache.k_all.dtype == torch.bfloat16
    ref = [o.token_ids for o in plain.generate(prompts, p)]
    assert [plain.generate([q], p)[0].token_ids for q in prompts] == ref      # batch-invariant
    for b in (4, 16):
        for trees in (False, True):
            out = engine(b, trees=trees).generate(prompts, p)
            assert [o.token_ids for o in out] == ref, (b, trees)
            assert sum(o.stats.num_draft_tokens for o in out) > 0
    fp32 = [o.token_ids for o in engine(1, "float32").generate(prompts, p)]
    assert fp32 != ref


def test_native_drafter_style_block_is_the_same_for_any_share_of_its_tokens():
    """A non-causal block (a drafter's: every token reads the whole block) computes the same
    bits for its tokens whichever of them a call asks for (out=(lo, n) changes how the
    tokens are cut into attention runs) and with one thread."""
    t = _variant_target("fp32", num_heads=6, num_kv_heads=2, head_dim=64)
    nl = t._native_layers
    V, L = t.config.vocab_size, t.config.num_layers
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 19, t.config.hidden_size, generator=g)
    pos = torch.tensor([[5 + i for i in range(19)], [11 + i for i in range(19)]])
    cos, sin = t.rotary(pos, torch.float32)
    slots, starts = torch.tensor([0, 1]), torch.tensor([5, 11])

    def run(out=None):
        cache = t.new_cache(2, 40)
        t(torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(3)), cache, slots,
          torch.tensor([0, 0]))
        x = x0.clone()
        nl.forward(x, slots, starts, cos, sin, cache, L - 1, set(), causal=False, out=out)
        return x
    full = run()
    for lo, n in ((1, 18), (3, 5), (18, 1)):
        assert torch.equal(run((lo, n))[:, lo:lo + n], full[:, lo:lo + n]), (lo, n)
    with one_thread():
        assert torch.equal(run(), full)


def test_a_whole_prefill_chunk_stays_native_in_the_avx512_build():
    """The AVX-512 build takes forwards of up to row_limit() = 1024 rows (the engine's
    default 512-token prefill chunk among them), the AVX2 build up to 192; a forward of
    that many rows gives the same bits as the same tokens in short chunks, and one row
    more takes the torch path (other bits, close)."""
    limit = native.row_limit()
    assert limit == (native.MAX_ROWS_AVX512 if native.vector_width() == 16 else native.MAX_ROWS)
    if native.vector_width() == 16:
        from dflash_core.engine import EngineConfig
        assert limit >= EngineConfig().max_prefill_tokens
    g = torch.Generator().manual_seed(5)
    for kind in (["bf16"] if native.amx() else []) + ["fp32"]:
        t = _variant_target(kind)
        assert t._native_layers.max_rows is None   # the build's limit
        tokens = torch.randint(0, t.config.vocab_size, (1, limit + 1), generator=g)

        def forward(n, chunk):
            cache = t.new_cache(1, limit + 8)
            return torch.cat([t(tokens[:, a:min(a + chunk, n)], cache, torch.tensor([0]), torch.tensor([a]))[0]
                              for a in range(0, n, chunk)], 1)
        chunks = forward(limit + 1, 64)
        assert torch.equal(forward(limit, limit), chunks[:, :limit]), kind   # one forward of `limit` rows
        whole = forward(limit + 1, limit + 1)                                  # one row more: torch
        assert not torch.equal(whole, chunks)
        if kind == "fp32":   # (with bf16 inputs the torch layers' own rounding of a norm's output can
            # land on the other bf16 neighbour: the layers are compared exactly in fp32)
            torch.testing.assert_close(whole, chunks, rtol=1e-4, atol=1e-4)


def test_bench_prefill_ab_times_both_limits_and_restores_the_build_limit():
    """--prefill-ab: whole prefills at the build's row limit and at the AVX2 build's 192,
    and in the decode forms, alternating; past 192 rows the two limits differ in bits only
    where the limits differ."""
    from dflash_core.bench import prefill_ab
    t = _variant_target()
    res = prefill_ab(t, sizes=(16, 200), reps=2)
    assert res["max_rows"] == {"build": native.row_limit(), "avx2": 192}
    assert set(res["by_tokens"]) == {16, 200}
    assert all(r["build_ms"] > 0 and r["avx2_ms"] > 0 and r["decode_forms_ms"] > 0 for r in res["by_tokens"].values())
    assert all(isinstance(r["forms_same_argmax"], bool) and r["forms_speedup"] > 0 for r in res["by_tokens"].values())
    assert res["by_tokens"][16]["same_bits"]
    assert res["by_tokens"][200]["same_bits"] == (native.row_limit() == 192)
    assert t._native_layers.max_rows is None


def test_native_drafter_block_matches_the_torch_drafter():
    """The drafter's block forward in native layers (every block token reads the whole
    block and the row's context) equals its torch forward (fp32, to summation order),
    leaves the cached context and its lengths as they were, and falls back to torch when
    the block would not fit past the context."""
    from dflash_core.drafter import DFlashDrafter
    from dflash_core.models.config import ModelConfig
    tcfg = ModelConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_layers=8, num_heads=6,
                       num_kv_heads=2, head_dim=8, qk_norm=True, family="qwen3")
    d = DFlashDrafter.from_target(tcfg, num_layers=2, block_size=8, mask_token_id=3, num_features=3, seed=2)
    d = d.pack_weights()
    nl = d._native_layers
    assert nl is not None and nl.current()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 20, 3 * 48, generator=g)
    emb = torch.randn(2, 8, 48, generator=g)
    lens = [13, 6]
    cache = d.new_cache(3, 40)
    for slot, n in zip((2, 0), lens):
        d.append_context(cache, torch.full((n,), slot), torch.arange(n), feats[slot // 2, :n])
    slots = torch.tensor([2, 0])
    pos = torch.tensor(lens)[:, None] + torch.arange(8)[None]
    before = [t[:, :, :13].clone() for t in cache.k + cache.v]
    out = {}
    for on in (True, False):
        nl.enabled = on
        out[on] = d.forward_cached(cache, slots, emb, pos)
        for lo, n in ((1, 1), (1, 2), (1, 7), (0, 8)):   # only the drafted positions: the same bits
            assert torch.equal(d.forward_cached(cache, slots, emb, pos, (lo, n)), out[on][:, lo:lo + n]), (on, lo, n)
    nl.enabled = True
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)
    assert not torch.equal(out[True], out[False])
    assert cache.lens.tolist() == [6, 0, 13]
    for was, t in zip(before, cache.k + cache.v):
        assert torch.equal(was[2, :, :13], t[2, :, :13]) and torch.equal(was[0, :, :6], t[0, :, :6])
    small = d.new_cache(1, 16)                     # 13 + 8 > 16: the torch forward
    d.append_context(small, torch.zeros(13, dtype=torch.int64), torch.arange(13), feats[1, :13])
    torch.testing.assert_close(d.forward_cached(small, torch.tensor([0]), emb[:1], pos[:1]), out[False][:1],
                               rtol=1e-4, atol=1e-4)


def test_native_context_write_matches_the_reference_kernel():
    """A drafter layer's context K/V written in one native call (k_norm, RoPE, the store)
    equal the reference kernel's (given the same projected K/V) to rounding, the values bit
    for bit; the lengths are the same; the projected K/V themselves agree to rounding (the
    native path's hidden_norm sums in another order than torch's); a slot or position
    outside the cache is refused before anything is written; a bf16 drafter keeps the
    torch path."""
    from dflash_core import native
    from dflash_core.drafter import DFlashDrafter
    from dflash_core.models.config import ModelConfig
    tcfg = ModelConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_layers=8, num_heads=6,
                       num_kv_heads=2, head_dim=8, qk_norm=True, family="qwen3")
    d = DFlashDrafter.from_target(tcfg, num_layers=2, block_size=8, mask_token_id=3, num_features=3, seed=2)
    d = d.pack_weights()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(9, 3 * 48, generator=g)
    slots = torch.tensor([0, 0, 0, 2, 2, 1, 1, 1, 1])
    pos = torch.tensor([0, 1, 2, 0, 1, 5, 6, 7, 40])      # 40: past the RoPE tables built so far? grown
    d.rotary._build(16)
    caches, kvs = {}, {}
    for on in (True, False):
        native.set_enabled(on)
        try:
            caches[on] = d.new_cache(3, 48)
            kvs[on] = d.context_kv(feats)
            if on:
                d.append_context(caches[on], slots, pos, feats)
            else:   # the reference kernel on the native path's K/V
                d.write_context(caches[on], slots, pos, kvs[True])
        finally:
            native.set_enabled(True)
    torch.testing.assert_close(kvs[True], kvs[False], rtol=1e-5, atol=1e-5)
    a, b = caches[True], caches[False]
    assert a.lens.tolist() == b.lens.tolist() == [3, 41, 2]
    for i in range(2):
        torch.testing.assert_close(a.k[i], b.k[i], rtol=1e-6, atol=1e-6)
        assert torch.equal(a.v[i], b.v[i]) and a.k[i].abs().sum() > 0
    kv = d.context_kv(feats[:2])
    assert native.write_context(kv[:, 0], d.layers[0].self_attn.k_norm.weight, 1e-6, d.rotary.cos, d.rotary.sin,
                                a.k[0], a.v[0], torch.tensor([0, 0]), torch.tensor([3, 4]))
    before = a.k[0].clone()
    for bad_slots, bad_pos in (([0, 3], [5, 6]), ([0, 0], [5, 48]), ([0, -1], [5, 6])):
        with pytest.raises(ValueError, match="range"):
            native.write_context(kv[:, 0], None, 1e-6, d.rotary.cos, d.rotary.sin, a.k[0], a.v[0],
                                 torch.tensor(bad_slots), torch.tensor(bad_pos))
    assert torch.equal(before, a.k[0])
    assert not native.write_context(kv[:, 0].bfloat16(), None, 1e-6, d.rotary.cos, d.rotary.sin,
                                    a.k[0], a.v[0], torch.tensor([0, 0]), torch.tensor([3, 4]))


@pytest.mark.parametrize("scale", [0.05, 1e-3, 1e-6, 1e-20, 30.0])
def test_round_to_q8_0_lands_on_the_grid_the_kernel_reads(scale):
    """Lossy rounding for the drafter's weights: every block becomes d * q (|q| <= 127, the
    largest weight at +-127), which `pack` takes as q8_0 bit for bit at any magnitude (fp16
    scales would fail for tiny blocks), each weight within half a step of where it was,
    zero blocks zero, rounding twice the same as once."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 96, generator=g) * scale
    w[3, 32:64] = 0
    r = native.round_to_q8_0(w)
    fmt, packed = native.pack(r)
    assert fmt == "q8_0" and torch.equal(native.dequantize(fmt, packed, 40), r)
    assert torch.equal(native.round_to_q8_0(r), r)
    step = w.view(40, 3, 32).abs().amax(-1) / 127
    err = (r - w).view(40, 3, 32).abs()
    assert (err <= 0.5 * step[..., None] * (1 + 2 ** -15)).all()
    assert bool((err > 0).any())                     # it did round
    assert torch.equal(r[3, 32:64], torch.zeros(32))
    with pytest.raises(ValueError, match="multiple of 32"):
        native.round_to_q8_0(torch.randn(4, 40))
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        native.round_to_q8_0(w)


def test_drafter_weights_on_the_8bit_grid_run_in_the_kernel_and_stay_close():
    """round_weights("q8_0") before pack_weights(): every linear of the drafter runs as q8_0
    in the native kernel, the block forward stays close to the stored weights' one (not
    equal: the weights moved), and the API refuses what it cannot do by name."""
    from dflash_core.api import load_drafter, resolve_drafter_weights
    from dflash_core.drafter import DFlashDrafter
    from dflash_core.models.config import ModelConfig
    tcfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4,
                       num_kv_heads=2, head_dim=16, qk_norm=True, family="qwen3")
    stored = DFlashDrafter.from_target(tcfg, num_layers=2, block_size=4, mask_token_id=3, num_features=3, seed=5)
    rounded = DFlashDrafter.from_target(tcfg, num_layers=2, block_size=4, mask_token_id=3, num_features=3, seed=5)
    assert stored.round_weights("stored") == 0
    assert rounded.round_weights("q8_0") == 1 + 7 * 2             # fc, then q/k/v/o/gate/up/down per layer
    stored.pack_weights(), rounded.pack_weights()
    fns = [rounded._fc_fn] + [f for l in rounded.layers for f in (l.self_attn._qkv_fn, l.self_attn._o_fn,
                                                                  l.mlp._gate_up_fn, l.mlp._down_fn)]
    assert {f.native_format for f in fns} == {native.form("q8_0")}
    assert {f.native_format for f in (stored._fc_fn, stored.layers[0].mlp._down_fn)} == {"f32"}
    g = torch.Generator().manual_seed(0)
    feats, emb = torch.randn(2, 12, 3 * 64, generator=g), torch.randn(2, 4, 64, generator=g)
    outs = []
    for d in (stored, rounded):
        cache = d.new_cache(2, 32)
        slots = torch.tensor([0, 1])
        d.append_context(cache, slots.repeat_interleave(12), torch.arange(12).repeat(2), feats.reshape(24, -1))
        outs.append(d.forward_cached(cache, slots, emb, torch.arange(12, 16).repeat(2, 1)))
    rel = ((outs[0] - outs[1]).norm() / outs[0].norm()).item()
    assert 0 < rel < 0.02, rel
    with pytest.raises(ValueError, match="before pack_weights"):
        rounded.round_weights("q8_0")
    with pytest.raises(ValueError, match="float32"):
        DFlashDrafter.from_target(tcfg, num_layers=1, block_size=4, mask_token_id=3).bfloat16().round_weights("q8_0")
    with pytest.raises(ValueError, match="stored, q8_0"):
        stored.round_weights("q4_1")
    # auto: q8_0 where the kernel runs an fp32 drafter, else as stored; q8_0 only in fp32
    assert resolve_drafter_weights("auto", "cpu", torch.float32) == "q8_0"
    assert resolve_drafter_weights("auto", "cpu", torch.bfloat16) == "stored"
    assert resolve_drafter_weights("stored", "cpu", torch.float32) == "stored"
    for bad, dt in (("q8_0", torch.bfloat16), ("int4", torch.float32)):
        with pytest.raises(ValueError, match="drafter weights"):
            resolve_drafter_weights(bad, "cpu", dt)
    native.set_enabled(False)
    try:
        assert resolve_drafter_weights("auto", "cpu", torch.float32) == "stored"
    finally:
        native.set_enabled(True)
    d = load_drafter("random", tcfg, "tiny-random", 4, weights="q8_0")
    assert d._fc_fn.native_format == native.form("q8_0")


def test_bench_drafter_weights_ab_runs_both_forms_and_restores_the_backend():
    """--drafter-weights-ab: the same prompts decoded with the drafter's weights in both
    forms, back to back, each with its own autoregressive run; greedy output equals the
    autoregressive one in both (the drafts differ, the output cannot)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    dflash = str(Path(sys.executable).with_name("dflash"))
    out = subprocess.run([dflash, "bench", "--num-prompts", "1", "--max-new-tokens", "12", "--block-sizes", "2",
                          "--dtype", "float32", "--drafter-weights-ab", "--threads", "1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["drafter_weights"] == "q8_0"
    other = s["drafter_weights_stored"]
    assert other["num_linears"] == 8                                  # the shipped 1-layer drafter
    assert s["greedy_outputs_identical"] and other["by_block_size"]["2"]["greedy_outputs_identical"]
    assert s["dflash_tokens_per_s"] > 0 and other["by_block_size"]["2"]["dflash_tokens_per_s"] > 0
    bad = subprocess.run([dflash, "bench", "--num-prompts", "1", "--dtype", "bfloat16", "--drafter-weights", "q8_0"],
                         capture_output=True, text=True, timeout=300)
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "--drafter-weights" in lines[0], bad.stderr


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
def test_bench_draft_call_ab_runs_both_ways_and_refuses_without_the_call():
    """--draft-call-ab: the same prompts decoded with the draft step as one native call and
    as its own calls, back to back: the same drafts, so the same tau, and greedy output
    equal to the autoregressive one both ways; the switch is back on after. Without the
    call (the native kernel off) the option is refused in one line."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    dflash = str(Path(sys.executable).with_name("dflash"))
    out = subprocess.run([dflash, "bench", "--num-prompts", "2", "--max-new-tokens", "16", "--block-sizes", "4",
                          "--draft-call-ab", "--threads", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    off = s["draft_call_off"]["by_block_size"]["4"]
    assert s["greedy_outputs_identical"] and off["greedy_outputs_identical"]
    assert s["acceptance_length"] == off["acceptance_length"] > 1
    assert s["dflash_tokens_per_s"] > 0 and off["dflash_tokens_per_s"] > 0
    bad = subprocess.run([dflash, "bench", "--num-prompts", "1", "--max-new-tokens", "4", "--draft-call-ab"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "DFLASH_NATIVE": "0"})
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "--draft-call-ab" in lines[0], bad.stderr


@pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
def test_prefills_past_the_native_row_limit_keep_one_tokens_bits():
    """A batched prefill pads its rows to the longest chunk; where rows x that length would
    pass the native layers' row limit (their bits stop there, the torch path computes
    others), the engine prefills in smaller forwards and long chunks in pieces: every
    prompt's logprobs and greedy output are bit for bit the ones it gets alone, whatever
    was prefilled beside it. Checked with the limit set low (16 rows)."""
    from dflash_core.engine import EngineConfig, SpecEngine
    from dflash_core.sampling import SamplingParams
    target = _quantised_tiny_target()
    nl = target._native_layers
    assert nl is not None and target.native_rows() == native.row_limit()
    prompts = [list(range(100, 113)), [7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41, 42], list(range(500, 540))]
    p = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=2)

    def run(batched: bool):
        eng = SpecEngine(target, None, EngineConfig(max_slots=4, max_seq_len=128, block_size=1))
        if batched:
            return [(o.token_ids, o.logprobs) for o in eng.generate(prompts, p)]
        return [(o.token_ids, o.logprobs) for q in prompts for o in eng.generate([q], p)]
    nl.max_rows = 16
    try:
        assert target.native_rows() == 16
        eng = SpecEngine(target, None, EngineConfig(max_slots=4, max_seq_len=128, block_size=1))
        work = [(object(), 0, 13), (object(), 0, 9), (object(), 0, 3), (object(), 0, 40)]
        batches = eng._prefill_batches(work, 16)
        assert all(len(b) * max(n for _, _, n in b) <= 16 for b in batches)
        long_row = work[3][0]
        assert [(st, n) for b in batches for s, st, n in b if s is long_row] == [(0, 16), (16, 16), (32, 8)]   # in order
        assert sum(n for b in batches for _, _, n in b) == 65
        alone = run(False)
        together = run(True)
        assert together == alone
    finally:
        nl.max_rows = None
    # without the split, the same batched prefill leaves the native layers: other bits
    # (the check that the case above is one the limit changes)
    x = torch.zeros(4, 13, target.config.hidden_size)
    nl.max_rows = 16
    try:
        assert not nl.serves(x) and nl.serves(x[:1])
    finally:
        nl.max_rows = None


def test_native_rms_norm_matches_torch_and_is_row_invariant():
    """native.rms_norm (the drafter's norms) equals the RMSNorm module to rounding, gives a
    row the same bits alone or among others, and declines what it does not serve."""
    from dflash_core.models.layers import RMSNorm
    g = torch.Generator().manual_seed(3)
    m = RMSNorm(64, 1e-6)
    with torch.no_grad():
        m.weight.copy_(1 + 0.2 * torch.randn(64, generator=g))
    x = torch.randn(2, 5, 64, generator=g) * 3
    with torch.no_grad():
        y = native.rms_norm(x, m.weight, m.eps)
        assert y is not None and y.shape == x.shape
        torch.testing.assert_close(y, m(x), rtol=1e-6, atol=1e-6)
        assert torch.equal(native.rms_norm(x[1, 2:3], m.weight, m.eps), y[1, 2:3])   # one row alone
        assert torch.equal(native.rms_norm(x[:, 1:4], m.weight, m.eps), y[:, 1:4])    # a non-contiguous view
        assert native.rms_norm(x.double(), m.weight, m.eps) is None                   # fp32 only
        assert native.rms_norm(x[..., :60], m.weight[:60], m.eps) is None             # n % 8
    assert native.rms_norm(x, m.weight, m.eps) is None                                # not under grad


def test_amx_attention_is_row_invariant_and_reads_bf16_caches_alike():
    """The native layers' attention on AMX tiles (models in the bf16-input AMX forms with
    head_dim % 32 == 0; native.set_amx_attention): a token's numbers are the same bits in
    one-token steps, a causal block, beside another row and in a tree verify (reading its
    ancestors only); over a bf16 cache the same bits as over an fp32 one (each K / V rounded
    to bf16 either way); close to the fp32 attention, not equal to it; an engine's "auto"
    KV cache is then bf16, and fp32 with the AMX attention off."""
    _need_amx()
    from dflash_core import tree as tree_mod
    from dflash_core.engine import EngineConfig, SpecEngine
    from dflash_core.models.kv_cache import KVCache
    t = _variant_target("bf16", head_dim=32, num_heads=6, num_kv_heads=2, qk_norm=True, family="qwen3")
    nl = t._native_layers
    assert nl.amx_att and native.amx_attention_on() and t.attention_rounds_kv()
    c = t.config
    V = c.vocab_size
    g = torch.Generator().manual_seed(9)
    prompts = torch.randint(0, V, (2, 45), generator=g)    # 45: key blocks of 16 and chunks of 32 straddled
    new = torch.randint(0, V, (2, 5), generator=g)

    def prefilled(dtype=torch.float32):
        cache = KVCache(c.num_layers, 2, 64, c.num_kv_heads, c.head_dim, dtype, t.device)
        t(prompts, cache, torch.tensor([0, 1]), torch.tensor([0, 0]))
        return cache
    with torch.no_grad():
        cache = prefilled()
        steps = torch.cat([t(new[:1, i:i + 1], cache, torch.tensor([0]), torch.tensor([45 + i]))[0]
                           for i in range(5)], 1)
        block = t(new[:1], prefilled(), torch.tensor([0]), torch.tensor([45]))[0]
        beside = t(new, prefilled(), torch.tensor([0, 1]), torch.tensor([45, 45]))[0]
        assert torch.equal(block, steps) and torch.equal(beside[:1], steps)
        # a tree: nodes 1, 2 children of the anchor, 3 of 1, 4 of 2; node 4 reads [0, 2, 4]
        lay = tree_mod.layout([[0, 0, 1, 2]], 5)
        tr = t(new[:1], prefilled(), torch.tensor([0]), torch.tensor([45]), tree=lay)[0]
        path = t(new[:1, [0, 2, 4]], prefilled(), torch.tensor([0]), torch.tensor([45]))[0]
        assert torch.equal(tr[:, [0, 2, 4]], path) and torch.equal(tr[:, :2], steps[:, :2])
        # a bf16 cache: the same bits
        assert torch.equal(t(new[:1], prefilled(torch.bfloat16), torch.tensor([0]), torch.tensor([45]))[0], block)
        native.set_amx_attention(False)
        try:
            assert not t.attention_rounds_kv()
            fp32 = t(new[:1], prefilled(), torch.tensor([0]), torch.tensor([45]))[0]
            assert SpecEngine(t, None, EngineConfig(max_slots=1, max_seq_len=32)).cache.k_all.dtype == torch.float32
        finally:
            native.set_amx_attention(True)
    assert not torch.equal(fp32, block)
    assert float((fp32 - block).norm() / fp32.norm()) < 0.05
    assert SpecEngine(t, None, EngineConfig(max_slots=1, max_seq_len=32)).cache.k_all.dtype == torch.bfloat16
