"""`ModelConfig`: the decoder hyper-parameters we need, read from a HF config dict.

Works with both transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
(`rope_parameters`) spellings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def hf_shape(d: dict) -> dict:
    """The transformer shape fields of a HF config.json (targets and drafters alike):
    hidden/intermediate sizes, layers, heads, KV heads, head dim, norm eps, RoPE theta."""
    heads = d["num_attention_heads"]
    rope = d.get("rope_parameters") or {}
    return dict(
        hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))))


@dataclass
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    qk_norm: bool = False         # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3")

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        family = d.get("model_type", "llama")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling")
        if rope and rope.get("rope_type", "default") != "default":
            scaling = dict(rope)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            family=family,
            vocab_size=d["vocab_size"],
            **hf_shape(d),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", family != "qwen2")),
            attention_bias=bool(d.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hf_config=dict(d),
        )

    def to_hf(self) -> dict:
        """A HF-style config dict (used to save converted checkpoints)."""
        d = dict(self.hf_config)
        d.update(
            model_type=self.family, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
        )
        if self.rope_scaling:
            d["rope_scaling"] = self.rope_scaling
        d.pop("rope_parameters", None)
        d.pop("quantization_config", None)
        return d

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
