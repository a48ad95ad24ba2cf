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

from .. import kernels
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

    def forward(self, x, cos, sin, k_cache, v_cache, slots, cache_lens, positions):
        # x: [R, T, hidden]; cos/sin: [R, T, D]; positions: [R, T]
        attn = self.self_attn
        h = self.input_layernorm(x)
        q, k, v = attn.project_qkv(h, cos, sin)  # [R, H, T, D], [R, Hkv, T, D] x 2
        o = kernels.block_attention(q, k_cache, v_cache, slots, cache_lens, k, v, True, attn.scale)
        # append: cache[slot, :, pos] = k  (index [R,1] x [R,T] -> [R, T, Hkv, D])
        k_cache[slots[:, None], :, positions] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[slots[:, None], :, positions] = v.transpose(1, 2).to(v_cache.dtype)
        R, _, T, _ = o.shape
        x = x + attn.o_proj(o.transpose(1, 2).reshape(R, T, -1))
        return x + self.mlp(self.post_attention_layernorm(x))


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

    def new_cache(self, max_slots: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, max_slots, capacity, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] (final-normed) -> logits [..., V] in fp32."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,    # [R, T]
        cache: KVCache,
        slots: torch.Tensor,        # [R] int64
        cache_lens: torch.Tensor,   # [R] int64, valid cached positions per row (= start position)
        capture_layers: list[int] | tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> hidden [R, T, hidden] (final norm applied), features [R, T, K*hidden] or None."""
        R, T = input_ids.shape
        dev = self.device
        slots, cache_lens = slots.to(dev), cache_lens.to(dev)
        positions = cache_lens[:, None] + torch.arange(T, device=dev)[None, :]  # [R, T]
        if int(positions.max()) >= cache.capacity:
            raise ValueError("sequence exceeds the KV cache capacity")
        x = self.embed_tokens(input_ids.to(dev))
        cos, sin = self.rotary(positions, x.dtype)
        want = {lid: None for lid in capture_layers}
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], slots, cache_lens, positions)
            if i in want:
                want[i] = x
        feats = torch.cat([want[l] for l in capture_layers], dim=-1) if capture_layers else None
        return self.norm(x), feats

    def pack_weights(self) -> "Decoder":
        """Pack q/k/v and gate/up weights per layer for inference (fewer, larger matmuls).
        Call after moving the model to its device and dtype."""
        for layer in self.layers:
            layer.self_attn.pack()
            layer.mlp.pack()
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
