"""The target decoder: Llama / Qwen2 / Qwen3 in one compact module.

Forward contract (`Decoder.forward`): a batch of R rows, each with T new tokens at
absolute positions `cache_lens[r] + arange(T)`, attending causally to its slot's cached
K/V and to itself. The new K/V are written into the cache (the caller then sets the
valid length: that is commit / crop). Returns the final-normed hidden states (apply
`logits()` only where needed) and, if asked, the concatenated outputs of chosen layers
(the drafter's context features). Rows are right-padded to a common T; padded positions
write stale K/V beyond the row's valid length, which is never read.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels, native
from .config import ModelConfig
from .kv_cache import KVCache
from .layers import AttentionProj, GatedMLP, RMSNorm, RotaryTable


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = AttentionProj(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                       cfg.attention_bias, cfg.qk_norm, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, k_cache, v_cache, slots, cache_lens, positions, plan=None):
        # x: [R, T, hidden]; cos/sin: [R, T, D]; positions: [R, T]
        attn = self.self_attn
        h = self.input_layernorm(x)
        q, k, v = attn.project_qkv(h, cos, sin)  # [R, H, T, D], [R, Hkv, T, D] x 2
        if plan is not None:   # write the block's K/V first, then attend over the cache
            plan.write(k_cache, k)
            plan.write(v_cache, v)
            o = plan.attend(q, k_cache, v_cache, attn.scale)
        else:
            o = kernels.block_attention(q, k_cache, v_cache, slots, cache_lens, k, v, True, attn.scale)
            # append: cache[slot, :, pos] = k  (index [R,1] x [R,T] -> [R, T, Hkv, D])
            k_cache[slots[:, None], :, positions] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[slots[:, None], :, positions] = v.transpose(1, 2).to(v_cache.dtype)
        R, _, T, _ = o.shape
        x = x + attn.output(o.transpose(1, 2).reshape(R, T, -1))
        return x + self.mlp(self.post_attention_layernorm(x))


KEY_PAD = 64   # keys per attention read in 16-bit dtypes (CacheAttentionPlan._keys_and_mask)


class CacheAttentionPlan:
    """Everything about one forward's attention that does not depend on the layer,
    computed once per forward instead of once per layer (per-op overhead, not the
    matmuls, dominates a small model's step on a CPU).

    Row r's T new tokens sit at positions cache_lens[r] + t. Their K/V are written into
    the cache first; then query t of row r reads cache keys j <= cache_lens[r] + t: the
    cached context plus the block, causally. One boolean mask serves every layer.
    K/V are read in place: as a view of the slot range [min slot, max slot] (rows not
    running in that range are computed on a dummy query and dropped: cheaper than
    gathering K/V every layer as long as the range is at most twice the rows), else
    gathered. Off CUDA only; on CUDA the Triton block-attention kernel runs instead.

    Kernel: two batched bf16/fp32 matmuls with GQA by grouping query heads (query head
    h = g*rep + i reads kv head g) and an fp32 softmax. Chosen over CPU SDPA for two
    measured reasons: (1) it is *length-invariant*: query t of a 16-token verify gets
    bit-for-bit the numbers a 1-token step at that position gets (SDPA's blocked
    kernel differed in 10 of 16 rows in bf16), and in bf16 such ulp differences flip
    greedy argmaxes within ~100 tokens, so a speculative run would drift from the same
    engine's autoregressive output; (2) SDPA with a per-row mask took ~4 ms per layer
    for 32 one-token rows, the grouped form a fraction of that."""

    def __init__(self, slots: torch.Tensor, cache_lens: torch.Tensor, T: int, rep: int):
        # slots, cache_lens: [R] int64
        R = slots.shape[0]
        dev = slots.device
        lens = cache_lens.tolist()
        self.R, self.T, self.rep = R, T, rep
        self.slot_list = slots.tolist()
        self.starts = lens
        self.L = max(lens) + T                                     # keys read per row
        self.slots = slots
        lo, hi = min(self.slot_list), max(self.slot_list)
        self.lo, self.span = lo, hi - lo + 1
        self.in_range = self.span <= 2 * R                        # else gather K/V per layer
        self.full = self.in_range and self.slot_list == list(range(lo, lo + R))
        self.index = (slots.to(dev) - lo) if self.in_range and not self.full else None   # [R] rows in the range
        # the write: slices for one row, else one index_put over [R, T] positions
        self.pos = (cache_lens.to(dev)[:, None] + torch.arange(T, device=dev)[None, :]) if R > 1 else None
        self.cache_lens = cache_lens
        self._keys = None      # (keys read, mask [N, 1, rep*T, keys] or None), set by the first layer

    def _keys_and_mask(self, dtype: torch.dtype, capacity: int):
        """How many keys this forward's attention reads, and the mask over them (None: one
        token reading every key up to its own). fp32 reads exactly the L keys. In bf16/fp16
        the softmax's sum and the probabilities x values product are not invariant to the
        number of keys on every CPU (seen on a Xeon with AMX: a row of 161 keys and the same
        row padded to 168 with zero probabilities summed differently, so a verify's query t
        and the one-token step at that position came out an ulp apart and greedy DFlash
        drifted from bf16 decoding). So the 16-bit path reads keys in whole multiples of
        KEY_PAD, the keys past each query's own masked out: both forwards then run the same
        kernel shapes over the same nonzero terms. At the cache's end it reads what is there."""
        if self._keys is None:
            keys = self.L
            if dtype != torch.float32:
                keys = max(self.L, min(-(-self.L // KEY_PAD) * KEY_PAD, capacity))
            mask = None
            if keys > self.L or self.R > 1 or self.T > 1:
                mask = self._mask(keys)
            self._keys = (keys, mask)
        return self._keys

    def _mask(self, keys: int) -> torch.Tensor:
        """[N, 1, rep*T, keys]: query t of a computed row (the slot range, or the gathered
        rows) reads the keys up to its own position; dummy rows read key 0 only."""
        dev = self.slots.device
        n = self.span if self.index is not None else self.R
        row_lim = self.cache_lens.to(dev)[:, None] + torch.arange(self.T, device=dev)[None, :]
        if self.index is not None:
            lim = torch.zeros(n, self.T, dtype=torch.int64, device=dev)
            lim[self.index] = row_lim
        else:
            lim = row_lim
        ok = torch.arange(keys, device=dev)[None, None, :] <= lim[:, :, None]        # [N, T, keys]
        return ok.repeat(1, self.rep, 1)[:, None]

    def write(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """cache [S, Hkv, L, D] <- new [R, Hkv, T, D] at each row's positions."""
        if self.pos is None:
            s, p = self.slot_list[0], self.starts[0]
            cache[s, :, p:p + self.T] = new[0]
        else:
            cache[self.slots[:, None], :, self.pos] = new.transpose(1, 2).to(cache.dtype)

    def attend(self, q, k_cache, v_cache, scale) -> torch.Tensor:
        """q [R, H, T, D] -> [R, H, T, D] over the rows' cached keys (block included)."""
        R, H, T, D = q.shape
        L, mask = self._keys_and_mask(q.dtype, k_cache.shape[2])
        if self.in_range:
            k, v = k_cache[self.lo:self.lo + self.span, :, :L], v_cache[self.lo:self.lo + self.span, :, :L]
        else:
            k, v = k_cache[self.slots, :, :L], v_cache[self.slots, :, :L]
        if self.index is not None:   # queries into their rows of the slot range
            q = q.new_zeros(self.span, H, T, D).index_copy_(0, self.index, q)
        if k.dtype != q.dtype:   # a bf16 cache under an fp32 model: the rounded values, widened
            k, v = k.to(q.dtype), v.to(q.dtype)
        N, Hkv = k.shape[0], k.shape[1]
        qg = q.reshape(N, Hkv, self.rep * T, D)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale                 # [N, Hkv, rep*T, L]
        if mask is not None:
            scores = scores.masked_fill_(~mask, float("-inf"))
        o = torch.matmul(torch.softmax(scores, -1).to(q.dtype), v).view(N, H, T, D)
        return o if self.index is None else o.index_select(0, self.index)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, min(cfg.max_position_embeddings, 4096))

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    def new_cache(self, max_slots: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for this decoder; dtype: what it stores (None: the model's dtype; bf16
        under an fp32 model: each K / V value rounded to the nearest bf16 as it is written and
        read back widened, in the native layers and the torch path alike)."""
        c = self.config
        return KVCache(c.num_layers, max_slots, capacity, c.num_kv_heads, c.head_dim, dtype or self.dtype,
                       self.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] (final-normed) -> logits [..., V] in fp32."""
        if self._head_fn is not None and not torch.is_grad_enabled():
            return self._head_fn(hidden).float()
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] (final-normed) -> each position's greedy token [...] (int64):
        `logits(hidden).max(-1).indices` (the first of equal logits, a NaN above any number).
        Where the native LM head takes the rows (`linear.argmax`: up to 16, the AMX forms)
        it picks them from the same logits without writing them out (a verify block's 6 rows:
        1.2 MB of logits and a max over them saved)."""
        if self._head_fn is not None and not torch.is_grad_enabled():
            pick = getattr(self._head_fn, "argmax", None)
            idx = pick(hidden) if pick is not None else None
            if idx is not None:
                return idx
        return self.logits(hidden).max(dim=-1).indices

    _head_fn = None  # prepacked LM head (CPU) after pack_weights()
    _native_layers = None  # dflash_core.native.NativeLayers after pack_weights() where every linear is native

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,    # [R, T]
        cache: KVCache,
        slots: torch.Tensor,        # [R] int64
        cache_lens: torch.Tensor,   # [R] int64, valid cached positions per row (= start position)
        capture_layers: list[int] | tuple[int, ...] = (),
        features_only: bool = False,
        tree: torch.Tensor | None = None,
        prefill: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """-> hidden [R, T, hidden] (final norm applied), features [R, T, K*hidden] or None.
        features_only: stop after the last captured layer and return (None, features) (the
        layers above it and their cache entries are not computed: drafter training data).
        tree: a tree verify (`tree.layout`: int32 [R, T, T + 1], token t of row r reads
        the cache and then the block tokens tree[r, t, 1 .. tree[r, t, 0]], root first, at
        RoPE position cache_lens[r] + tree[r, t, 0] - 1); its K/V still go to cache_lens[r] + t.
        Only where the native layers serve the forward (`serves_tree`): their attention
        gathers those keys in order, so every token gets the bits of a one-token step.
        prefill: a prompt's forward (the engine's prefills): where the native layers run it
        and their linears take bf16 inputs, they take bf16-rounded weights too (native
        PREFILL_FORMATS: no fp32 epilogue per 32-weight block, ~1/3 less time a prompt
        token); every prompt token gets those numbers, whatever the forward's rows."""
        R, T = input_ids.shape
        dev = self.device
        slots, cache_lens = slots.to(dev), cache_lens.to(dev)
        positions = cache_lens[:, None] + torch.arange(T, device=dev)[None, :]  # [R, T]
        if int(positions.max()) >= cache.capacity:
            raise ValueError("sequence exceeds the KV cache capacity")
        x = self.embed_tokens(input_ids.to(dev))
        rope_pos = positions if tree is None else cache_lens[:, None] + tree[:, :, 0].to(dev, torch.int64) - 1
        cos, sin = self.rotary(rope_pos, x.dtype)
        if features_only and not capture_layers:
            raise ValueError("features_only needs capture_layers")
        want = {lid: None for lid in capture_layers}
        last = max(capture_layers) if features_only else len(self.layers) - 1
        nl = self._native_layers
        native_ok = nl is not None and nl.serves(x)
        if tree is not None and not native_ok:
            raise ValueError("a tree verify needs the native fp32 layers (Decoder.serves_tree)")
        if native_ok:   # every layer in one native call (dflash_core.native.NativeLayers)
            x = x.contiguous()
            want.update(nl.forward(x, slots, cache_lens, cos, sin, cache, last, want, tree=tree, prefill=prefill))
        else:
            plan = None if kernels.uses_triton(x) else CacheAttentionPlan(
                slots, cache_lens, T, self.config.num_heads // self.config.num_kv_heads)
            for i, layer in enumerate(self.layers[:last + 1]):
                x = layer(x, cos, sin, cache.k[i], cache.v[i], slots, cache_lens, positions, plan)
                if i in want:
                    want[i] = x
        feats = torch.cat([want[l] for l in capture_layers], dim=-1) if capture_layers else None
        if features_only:
            return None, feats
        # after the native layers, their own final norm (row by row, in one call: torch's five
        # ops cost ~100 us for one token once the forward has streamed the weights through the
        # caches); every forward the native layers run takes it, so a token's bits still do
        # not depend on its forward's rows
        h = native.rms_norm(x, self.norm.weight, self.norm.eps) if native_ok else None
        return (self.norm(x) if h is None else h), feats

    def native_rows(self) -> int | None:
        """The most rows (R x T) a forward of this model may have for the native layers to
        run it (their bits are the same at any row count up to it; past it the torch path
        computes other bits), or None where the native layers do not run it at all."""
        nl = self._native_layers
        if nl is None or self.device.type != "cpu" or self.dtype != torch.float32 or not nl.current():
            return None
        return nl.rows()

    def attention_rounds_kv(self) -> bool:
        """Whether every forward's attention reads the K / V values rounded to bf16 (the
        native layers' attention on AMX tiles: native.NativeLayers.amx_att), so that a bf16
        KV cache holds the same numbers as an fp32 one (kv_cache_dtype "auto" takes it)."""
        nl = self._native_layers
        return nl is not None and self.device.type == "cpu" and self.dtype == torch.float32 and nl.current() \
            and nl.amx_att and native.amx_attention_on()

    def serves_tree(self, rows: int, tokens: int) -> bool:
        """Whether a tree verify of `rows` x `tokens` runs (the native fp32 layers serve it)."""
        nl = self._native_layers   # (nl.serves of an fp32 CPU forward of rows x tokens, without making one)
        return (nl is not None and tokens <= native.TREE_MAX and self.device.type == "cpu"
                and self.dtype == torch.float32 and rows * tokens <= nl.rows() and nl.current())

    def pack_weights(self) -> "Decoder":
        """Pack q/k/v and gate/up weights per layer for inference (fewer, larger matmuls).
        Call after moving the model to its device and dtype."""
        for layer in self.layers:
            layer.self_attn.pack()
            layer.mlp.pack()
        from .layers import prepack_linear
        self._head_fn = prepack_linear(self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)
        from .. import native
        self._native_layers = native.NativeLayers.of(self.layers) if self.dtype == torch.float32 else None
        return self

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a HF-named state dict (`model.layers.N...`, `lm_head.weight`)."""
        own = {}
        for k, v in sd.items():
            if k.startswith("model."):
                k = k[len("model."):]
            if k == "lm_head.weight" and self.lm_head is None:
                continue
            if "rotary_emb" in k:
                continue
            own[k] = v
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [m for m in missing if not m.startswith("rotary")]
        if strict and (missing or unexpected):
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
