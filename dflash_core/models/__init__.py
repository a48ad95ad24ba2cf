"""Target runtime: one compact decoder for the Llama / Qwen2 / Qwen3 families, a per-slot
KV cache, and the weight loader (HF folder, hub id, GGUF, the embedded default)."""
from .config import ModelConfig
from .decoder import Decoder
from .kv_cache import KVCache

__all__ = ["ModelConfig", "Decoder", "KVCache"]
