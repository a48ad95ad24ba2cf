"""The DFlash drafter: a small block-diffusion model conditioned on target features.

Contract (the public z-lab DFlash drafter, reimplemented):
- context features: the outputs of K target layers, concatenated per token [.., K*hidden],
  fused by `fc` (no bias) and `hidden_norm` (RMSNorm) into one hidden vector per token;
- every drafter layer is a Qwen3-style decoder layer whose attention reads queries from
  the block only and keys/values from [context ; block]: k_proj / v_proj applied to the
  fused context (no input_layernorm) and to the normed block stream; q_norm / k_norm;
  RoPE at absolute positions (context at its positions, block at anchor..anchor+B-1);
- the block [anchor, MASK x (B-1)] attends to itself bidirectionally and to all cached
  context; output position k predicts the token at anchor+k through the TARGET's LM head
  (the drafter owns neither embedding nor LM head);
- the context cache holds only projected context K/V per layer; it only ever appends.

Checkpoints use the public z-lab format: `config.json` (a Qwen3 config + `block_size`,
`num_target_layers`, `dflash_config: {target_layer_ids, mask_token_id}`) and
`model.safetensors` with keys fc.weight, hidden_norm.weight, norm.weight, layers.N.*.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels, native
from .models.config import ModelConfig, hf_shape
from .models.kv_cache import KVCache
from .models.layers import AttentionProj, GatedMLP, RMSNorm, RotaryTable


def build_target_layer_ids(num_target_layers: int, num_features: int) -> list[int]:
    """K layer ids spaced evenly from 1 to L-3 (L//2 when K == 1): the public rule.
    Qwen3-8B (L=36, K=5) -> [1, 9, 17, 25, 33]."""
    if num_features == 1:
        return [num_target_layers // 2]
    start = min(1, num_target_layers - 1)
    end = max(num_target_layers - 3, start)  # tiny targets: clamp into range
    return [int(round(start + i * (end - start) / (num_features - 1))) for i in range(num_features)]


@dataclass
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: list[int]
    mask_token_id: int
    block_size: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    extra: dict = field(default_factory=dict, repr=False)
    # Optional drafting vocabulary (this project's extension, stored beside the public
    # files as draft_vocab.json): drafts are argmax/samples over these target tokens only,
    # so the drafter's LM-head cost shrinks by V / len(draft_vocab). Lossless either way:
    # the target verifies every draft, and under rejection sampling q is simply 0 outside.
    draft_vocab: list[int] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError("drafter block_size must be >= 2")
        if not self.target_layer_ids or max(self.target_layer_ids) >= self.num_target_layers:
            raise ValueError(f"target_layer_ids {self.target_layer_ids} invalid for {self.num_target_layers} target layers")

    def to_json(self) -> dict:
        d = dict(self.extra)
        d.update({
            "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "attention_bias": False, "tie_word_embeddings": False,
            "block_size": self.block_size, "num_target_layers": self.num_target_layers,
            "dflash_config": {"target_layer_ids": list(self.target_layer_ids), "mask_token_id": self.mask_token_id},
        })
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DrafterConfig":
        dc = d.get("dflash_config") or {}
        if "target_layer_ids" not in dc:
            raise ValueError("not a DFlash drafter config: missing dflash_config.target_layer_ids")
        known = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta",
                 "rope_scaling", "max_position_embeddings", "block_size", "num_target_layers", "dflash_config"}
        return cls(
            **hf_shape(d),
            vocab_size=d.get("vocab_size", 0),
            num_target_layers=d.get("num_target_layers", max(dc["target_layer_ids"]) + 4),
            target_layer_ids=list(dc["target_layer_ids"]),
            mask_token_id=int(dc.get("mask_token_id", d.get("mask_token_id", 0))),
            block_size=int(d.get("block_size", 16)),
            rope_scaling=d.get("rope_scaling"),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            extra={k: v for k, v in d.items() if k not in known},
        )


class DrafterLayer(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = AttentionProj(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                       bias=False, qk_norm=True, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size)

    def finish(self, x, o):
        """x [R, T, hidden] residual stream, o [R, H, T, D] attention output."""
        R, _, T, _ = o.shape
        x = x + self.self_attn.output(o.transpose(1, 2).reshape(R, T, -1))
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDrafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        c = self.config = config
        K = len(c.target_layer_ids)
        self.fc = nn.Linear(K * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(DrafterLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary = RotaryTable(c.head_dim, c.rope_theta, c.rope_scaling, min(c.max_position_embeddings, 4096))

    # ---- construction / persistence -------------------------------------------------
    @classmethod
    def from_target(cls, target_cfg: ModelConfig, num_layers: int = 1, block_size: int = 16,
                    mask_token_id: int = 0, num_features: int | None = None,
                    target_layer_ids: list[int] | None = None, seed: int = 0) -> "DFlashDrafter":
        """Random init shaped after the target (its hidden size, heads, RoPE)."""
        ids = target_layer_ids or build_target_layer_ids(target_cfg.num_layers, num_features or max(num_layers, 1))
        cfg = DrafterConfig(
            hidden_size=target_cfg.hidden_size, intermediate_size=target_cfg.intermediate_size,
            num_layers=num_layers, num_heads=target_cfg.num_heads, num_kv_heads=target_cfg.num_kv_heads,
            head_dim=target_cfg.head_dim, vocab_size=target_cfg.vocab_size,
            num_target_layers=target_cfg.num_layers, target_layer_ids=ids, mask_token_id=mask_token_id,
            block_size=block_size, rms_norm_eps=target_cfg.rms_norm_eps, rope_theta=target_cfg.rope_theta,
            rope_scaling=target_cfg.rope_scaling, max_position_embeddings=target_cfg.max_position_embeddings)
        g = torch.Generator().manual_seed(seed)
        m = cls(cfg)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return m.eval()

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous()
              for k, v in self.state_dict().items() if not k.startswith("rotary")}
        cfg = self.config.to_json()
        cfg["torch_dtype"] = str(dtype or self.fc.weight.dtype).replace("torch.", "")
        save_file(sd, str(folder / "model.safetensors.tmp"))
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        if self.config.draft_vocab:
            (folder / "draft_vocab.json").write_text(json.dumps(list(self.config.draft_vocab)))
        (folder / "model.safetensors.tmp").replace(folder / "model.safetensors")

    @classmethod
    def load(cls, folder: str | Path, device="cpu", dtype=torch.float32) -> "DFlashDrafter":
        from .models.loader import read_state_dict
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise ValueError(f"drafter folder {folder} has no config.json")
        cfg = DrafterConfig.from_json(json.loads((folder / "config.json").read_text()))
        if (folder / "draft_vocab.json").exists():
            cfg.draft_vocab = [int(t) for t in json.loads((folder / "draft_vocab.json").read_text())]
        m = cls(cfg)
        sd = read_state_dict(folder)
        missing, unexpected = m.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
        missing = [k for k in missing if not k.startswith("rotary")]
        if missing or unexpected:
            raise ValueError(f"drafter checkpoint {folder} does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return m.to(device=device, dtype=dtype).eval()

    WEIGHT_FORMATS = ("stored", "q8_0")

    @torch.no_grad()
    def round_weights(self, fmt: str = "q8_0") -> int:
        """Inference, before pack_weights(): every linear weight (fc, q/k/v/o, gate/up/down)
        rounded in place onto `fmt`'s grid (native.round_to_q8_0), so that the native kernel
        reads it in that format. Drafts change a little, the output not at all (the target
        verifies every token). fp32 only (rounding then casting to bf16 would round twice).
        -> the number of weights rounded. "stored": no change."""
        if fmt not in self.WEIGHT_FORMATS:
            raise ValueError(f"drafter weights must be one of {', '.join(self.WEIGHT_FORMATS)}, got {fmt!r}")
        if fmt == "stored":
            return 0
        if self.fc.weight.dtype != torch.float32:
            raise ValueError(f"drafter weights {fmt} are for a float32 drafter, this one is "
                             f"{str(self.fc.weight.dtype).replace('torch.', '')}")
        if self._fc_fn is not None or any(layer.self_attn._qkv_w is not None for layer in self.layers):
            raise ValueError("round_weights() must run before pack_weights()")
        n = 0
        for name, p in self.named_parameters():
            if name.endswith(".weight") and p.dim() == 2 and p.shape[1] % 32 == 0:
                p.copy_(native.round_to_q8_0(p).to(p.device))
                n += 1
        return n

    def pack_weights(self) -> "DFlashDrafter":
        """Inference: packed q/k/v and gate/up weights, prepacked oneDNN linears on bf16
        CPUs (see models/layers.py). Call after moving to the device and dtype."""
        from . import native
        from .models.layers import prepack_linear
        for layer in self.layers:
            layer.self_attn.pack()
            layer.mlp.pack()
        self._native_layers = native.NativeLayers.of(self.layers) if self.fc.weight.dtype == torch.float32 else None
        if self._native_layers is not None:
            # the fp32 attention: the held-out walk (training/walk.py) replays the engine's drafts
            # through the training path's fp32 attention, and bf16 q / k / p / v would flip more of
            # its near-tie argmaxes (the drafter's attention is one layer over a few rows: little to gain)
            self._native_layers.amx_att = False
        self._fc_fn = prepack_linear(self.fc.weight)
        for a in (layer.self_attn for layer in self.layers):   # the context's [k_proj; v_proj]
            a._ctx_kv_fn = prepack_linear(a._qkv_w[a.heads * a.head_dim:]) if a._qkv_b is None else None
        return self

    # after pack_weights() (inference; each None where not available):
    _native_layers = None   # dflash_core.native.NativeLayers where every linear is native
    _fc_fn = None           # prepacked fc (and each layer's self_attn._ctx_kv_fn: its context [k_proj; v_proj])

    def check_target(self, target_cfg: ModelConfig) -> None:
        c = self.config
        if c.hidden_size != target_cfg.hidden_size or c.num_target_layers != target_cfg.num_layers:
            raise ValueError(f"drafter (hidden {c.hidden_size}, {c.num_target_layers} target layers) does not fit "
                             f"the target (hidden {target_cfg.hidden_size}, {target_cfg.num_layers} layers)")
        if c.mask_token_id >= target_cfg.vocab_size:
            raise ValueError("drafter mask_token_id is outside the target vocabulary")

    # ---- forward paths ---------------------------------------------------------------
    def new_cache(self, max_slots: int, capacity: int) -> KVCache:
        c = self.config
        p = self.fc.weight
        return KVCache(c.num_layers, max_slots, capacity, c.num_kv_heads, c.head_dim, p.dtype, p.device)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """[.., K*hidden] -> [.., hidden]: hidden_norm(fc(concat of target layer outputs))."""
        x = features.to(self.fc.weight.dtype)
        if self._fc_fn is not None and not torch.is_grad_enabled():
            return self._norm(self.hidden_norm, self._fc_fn(x))
        return self.hidden_norm(self.fc(x))

    @staticmethod
    def _norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        """Inference: `norm`(x) in one native call where it serves (native.rms_norm: the
        drafter's numbers only, in another summation order than torch's; drafts may move,
        never the output), else the module."""
        y = native.rms_norm(x, norm.weight, norm.eps)
        return norm(x) if y is None else y

    @torch.no_grad()
    def append_context(self, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor,
                       features: torch.Tensor) -> None:
        """Append committed tokens' context K/V. slots/positions [N], features [N, K*hidden]."""
        if features.shape[0] == 0:
            return
        self.write_context(cache, slots, positions, self.context_kv(features))

    @property
    def context_kv_dim(self) -> int:
        """Values per context token of `context_kv`: layers x (k, v) x KV heads x head dim."""
        c = self.config
        return c.num_layers * 2 * c.num_kv_heads * c.head_dim

    # the weights `context_kv` reads: all a target needs to stream K/V instead of features
    CONTEXT_KV_KEYS = ("fc.", "hidden_norm.", ".self_attn.k_proj.", ".self_attn.v_proj.")

    @torch.no_grad()
    def context_kv(self, features: torch.Tensor) -> torch.Tensor:
        """[N, K*hidden] target features -> [N, layers, 2, KV heads, head dim]: each layer's
        context keys and values before k_norm and RoPE (what `write_context` stores)."""
        fused = self.fuse(features.to(self.fc.weight.device))   # [N, hidden]
        N = fused.shape[0]
        attns = [layer.self_attn for layer in self.layers]
        if all(getattr(a, "_ctx_kv_fn", None) is not None for a in attns):
            # packed (pack_weights): the k and v rows of each layer's q/k/v weight in one product
            return torch.stack([a._ctx_kv_fn(fused).view(N, 2, a.kv_heads, a.head_dim) for a in attns], 1)
        kv = [torch.stack([a.k_proj(fused).view(N, a.kv_heads, a.head_dim),
                           a.v_proj(fused).view(N, a.kv_heads, a.head_dim)], 1)
              for a in (layer.self_attn for layer in self.layers)]
        return torch.stack(kv, 1)

    @torch.no_grad()
    def write_context(self, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor) -> None:
        """Store context K/V [N, layers, 2, KV heads, head dim] (from `context_kv`, here or on
        the target's side of a disaggregated pair) at slots/positions [N]: k_norm and RoPE
        applied to the keys by the context-KV kernel."""
        if kv.shape[0] == 0:
            return
        dev = self.fc.weight.device
        slots, positions = slots.to(dev), positions.to(dev)
        kv = kv.to(dev, self.fc.weight.dtype)
        rot = self.rotary
        written = kv.dtype == torch.float32 and dev.type == "cpu"   # one native call per layer where it serves
        if written:
            rot.reserve(positions)
            written = all([native.write_context(kv[:, i], a.k_norm.weight, a.k_norm.eps, rot.cos, rot.sin,
                                                cache.k[i], cache.v[i], slots, positions)
                           for i, a in enumerate(layer.self_attn for layer in self.layers)])
        if not written:   # every layer through the context-KV kernel (what the native call did is rewritten)
            cos, sin = rot(positions, kv.dtype)                   # [N, D]
            for i, layer in enumerate(self.layers):
                a = layer.self_attn
                kernels.write_context_kv(kv[:, i, 0], kv[:, i, 1], a.k_norm.weight, a.k_norm.eps, cos, sin,
                                         cache.k[i], cache.v[i], slots, positions)
        # context is contiguous per slot: the new length is the last position + 1
        end = torch.zeros_like(cache.lens).scatter_reduce(0, slots.cpu(), positions.cpu() + 1, reduce="amax")
        cache.lens.copy_(torch.maximum(cache.lens, end))

    def context_state(self) -> dict[str, torch.Tensor]:
        """The weights `context_kv` reads (CPU copies), for a target that streams K/V."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()
                if k.startswith(self.CONTEXT_KV_KEYS[:2]) or any(x in k for x in self.CONTEXT_KV_KEYS[2:])}

    @classmethod
    def context_only(cls, config: DrafterConfig, state: dict[str, torch.Tensor], device="cpu",
                     dtype=torch.float32) -> "DFlashDrafter":
        """A drafter whose `context_kv` equals the one `state` (context_state()) came from;
        its other weights are never read."""
        m = cls(config)
        unknown = [k for k in state if k not in m.state_dict()]
        if unknown:
            raise ValueError(f"context weights do not fit this drafter config: {unknown[:4]}")
        m.load_state_dict(state, strict=False)
        return m.to(device=device, dtype=dtype).eval().pack_weights()

    @torch.no_grad()
    def forward_cached(self, cache: KVCache, slots: torch.Tensor, block_emb: torch.Tensor,
                       block_pos: torch.Tensor, positions: tuple[int, int] | None = None) -> torch.Tensor:
        """Draft one block per row from the cached context.
        slots [R], block_emb [R, B, hidden] (target embedding of [anchor, MASK..]),
        block_pos [R, B] absolute positions -> hidden [R, B, hidden] (final norm).
        positions=(lo, n): only block positions lo .. lo+n-1 are wanted -> hidden [R, n,
        hidden], the same numbers (the native path then skips the rest of the last layer)."""
        dev = self.fc.weight.device
        slots = slots.to(dev)
        ctx_lens = cache.lens[slots.cpu()].to(dev)
        x = block_emb.to(self.fc.weight.dtype)
        cos, sin = self.rotary(block_pos.to(dev), x.dtype)
        nl = self._native_layers
        if nl is not None and nl.serves(x) and int(ctx_lens.max()) + x.shape[1] <= cache.capacity:
            # one native call per layer: the block's K/V go past each row's context in the
            # cache (read there, overwritten by the next context), every block token reads all
            x = x.contiguous().clone()
            nl.forward(x, slots, ctx_lens, cos, sin, cache, len(self.layers) - 1, (), causal=False, out=positions)
        else:
            for i, layer in enumerate(self.layers):
                a = layer.self_attn
                h = layer.input_layernorm(x)
                q, k, v = a.project_qkv(h, cos, sin)          # one packed matmul once pack() ran
                o = kernels.block_attention(q, cache.k[i], cache.v[i], slots, ctx_lens, k, v, False, a.scale)
                x = layer.finish(x, o)
        return self._norm(self.norm, x if positions is None else x[:, positions[0]:positions[0] + positions[1]])

    def forward_blocks(self, block_emb: torch.Tensor, block_pos: torch.Tensor, ctx_features: torch.Tensor,
                       ctx_pos: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """Training path (differentiable, no cache).
        block_emb [R, T, hidden], block_pos [R, T]: all blocks of a row laid side by side;
        ctx_features [R, C, K*hidden], ctx_pos [R, C]; attn_mask [R, T, C+T] bool
        (True = query may read key; keys are [context ; blocks]) -> hidden [R, T, hidden]."""
        ctx = self.fuse(ctx_features)
        x = block_emb.to(ctx.dtype)
        cos_b, sin_b = self.rotary(block_pos, x.dtype)
        cos_c, sin_c = self.rotary(ctx_pos, x.dtype)
        mask = attn_mask[:, None]                                   # [R, 1, T, C+T]
        for layer in self.layers:
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.project_q(h, cos_b, sin_b)                        # [R, H, T, D]
            kb, vb = a.project_kv(h, cos_b, sin_b)                  # [R, Hkv, T, D]
            kc, vc = a.project_kv(ctx, cos_c, sin_c)                # [R, Hkv, C, D]
            k, v = torch.cat([kc, kb], 2), torch.cat([vc, vb], 2)
            rep = a.heads // a.kv_heads
            if rep > 1:
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scale)
            x = layer.finish(x, o)
        return self.norm(x)


class LocalDraftBackend:
    """Colocated placement: the drafter and its context cache live in this process."""

    def __init__(self, drafter: DFlashDrafter, max_slots: int, capacity: int):
        self.drafter = drafter
        self.cache = drafter.new_cache(max_slots, capacity)

    @property
    def config(self) -> DrafterConfig:
        return self.drafter.config

    takes_positions = True   # draft(..., positions=(lo, n)) returns those block positions only

    def draft(self, ctx_slots, ctx_positions, ctx_features, slots, block_emb, block_positions, ctx_kv=None,
              positions=None):
        """ctx_kv: the context's K/V already projected (`DFlashDrafter.context_kv`, e.g. by a
        disaggregated target) instead of ctx_features. positions: see forward_cached."""
        if ctx_kv is not None:
            self.drafter.write_context(self.cache, ctx_slots, ctx_positions, ctx_kv)
        else:
            self.drafter.append_context(self.cache, ctx_slots, ctx_positions, ctx_features)
        return self.drafter.forward_cached(self.cache, slots, block_emb, block_positions, positions)

    def free(self, slot: int) -> None:
        self.cache.lens[slot] = 0


def build_draft_vocab(token_lists, size: int, always: tuple[int, ...] = ()) -> list[int]:
    """The `size` most frequent token ids in `token_lists` (e.g. the target's own
    responses), plus `always` (EOS...), sorted. Ties break towards the smaller id."""
    counts: dict[int, int] = {}
    for toks in token_lists:
        for t in toks:
            counts[int(t)] = counts.get(int(t), 0) + 1
    top = sorted(counts, key=lambda t: (-counts[t], t))[:size]
    return sorted(set(top) | {int(t) for t in always})
