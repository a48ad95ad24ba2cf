"""`dflash bench --peers`: this engine against what a user already runs, on the same
model, prompts and settings, in one process run.

Systems (batch 1, greedy, fixed new-token count, EOS ignored, each warmed up first):
  engine-ar       this engine, autoregressive, --dtype
  engine-dflash   this engine, DFlash with --drafter, --dtype
  hf-fp32/bf16    transformers `generate` on the same weights
  hf-lookup       transformers prompt-lookup decoding (`prompt_lookup_num_tokens`, fp32),
                  the speculative method that needs no drafter
  llama.cpp       `llama-cpp-python` on the GGUF file the default target ships as (plain);
                  skipped, with the reason, where the package is not installed
Prompts: the ShareGPT holdout and HumanEval (chat template), --peer-prompts of each.
Per system and prompt set: tokens/s, the speedup of engine-dflash over it, and how far
its greedy tokens agree with engine-ar (identical rows; mean share of matching prefix).
"""
from __future__ import annotations

import time

import torch


def _prompt_sets(tok, n: int, max_prompt_tokens: int = 256) -> dict[str, list[list[int]]]:
    from .datasets import load_eval_prompts
    return {ds: load_eval_prompts(ds, tok, n, max_prompt_tokens) for ds in ("sharegpt", "humaneval")}


def _prefix_share(a: list[int], b: list[int]) -> float:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), 1)


class _Engine:
    def __init__(self, engine, speculative: bool):
        self.engine, self.speculative = engine, speculative

    def generate(self, ids: list[int], n: int) -> list[int]:
        from .sampling import SamplingParams
        [r] = self.engine.generate([ids], SamplingParams(max_new_tokens=n, ignore_eos=True,
                                                          speculative=self.speculative))
        return r.token_ids


class HFGenerate:
    """transformers' greedy `generate` (optionally with its prompt-lookup drafting), exactly n new tokens."""

    def __init__(self, folder: str, dtype, lookup: int = 0):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.lookup = lookup

    @torch.no_grad()
    def generate(self, ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids])
        kw = {"prompt_lookup_num_tokens": self.lookup} if self.lookup else {}
        y = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0, **kw)
        return y[0, len(ids):].tolist()


class _LlamaCpp:
    def __init__(self, gguf: str, threads: int, lookup: int = 0):
        from llama_cpp import Llama
        kw = {}
        if lookup:   # llama.cpp's own prompt-lookup drafting (n-gram matches in the context)
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
            kw["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=lookup)
        self.llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
                         logits_all=bool(lookup), **kw)

    def generate(self, ids: list[int], n: int) -> list[int]:
        out = []
        self.llm.reset()
        for t in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(int(t))
            if len(out) >= n:
                break
        return out


def build_systems(target: str, engine, dtype, threads: int) -> tuple[dict, dict]:
    """-> ({name: system}, {name: reason it was skipped})."""
    from .models.loader import default_gguf_path
    from .models.registry import resolve_model
    systems, skipped = {"engine-ar": _Engine(engine, False)}, {}
    if engine.speculative:
        systems["engine-dflash"] = _Engine(engine, True)
    else:
        skipped["engine-dflash"] = "no drafter loaded"
    resolved = resolve_model(target)
    if resolved.is_builtin:
        for name in ("hf-fp32", "hf-bf16", "hf-lookup", "llama.cpp", "llama.cpp-lookup"):
            skipped[name] = f"the built-in model {target!r} exists only inside this engine (no HF folder or GGUF)"
        return systems, skipped
    folder = str(resolved.folder)
    systems["hf-fp32"] = HFGenerate(folder, torch.float32)
    systems["hf-bf16"] = HFGenerate(folder, torch.bfloat16)
    systems["hf-lookup"] = HFGenerate(folder, torch.float32, lookup=10)
    try:
        gguf = str(default_gguf_path()) if target == "default" else (target if target.endswith(".gguf") else None)
        if gguf is None:
            raise FileNotFoundError("the target is not a GGUF file")
        systems["llama.cpp"] = _LlamaCpp(gguf, threads)
        systems["llama.cpp-lookup"] = _LlamaCpp(gguf, threads, lookup=10)
    except ImportError:
        for name in ("llama.cpp", "llama.cpp-lookup"):
            skipped[name] = ("llama-cpp-python is not installed: PyPI has only its source distribution, which "
                             "compiles llama.cpp on install (`make llama-cpp`, ~9 min on one core)")
    except Exception as e:  # noqa: BLE001  (a load failure is reported, not fatal)
        for name in ("llama.cpp", "llama.cpp-lookup"):
            skipped.setdefault(name, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return systems, skipped


def run_peers(systems: dict, prompt_sets: dict[str, list[list[int]]], new_tokens: int, out) -> dict:
    """Every system on every prompt, interleaved prompt by prompt (noise hits all alike)."""
    res = {ds: {name: {"tokens": 0, "seconds": 0.0, "outputs": []} for name in systems} for ds in prompt_sets}
    warm = next(iter(prompt_sets.values()))[0]
    for sys_ in systems.values():
        sys_.generate(warm, 4)
    for ds, prompts in prompt_sets.items():
        for ids in prompts:
            for name, sys_ in systems.items():
                t0 = time.perf_counter()
                toks = sys_.generate(ids, new_tokens)
                r = res[ds][name]
                r["seconds"] += time.perf_counter() - t0
                r["tokens"] += len(toks)
                r["outputs"].append(toks)
    summary = {}
    for ds, per in res.items():
        ref = per["engine-ar"]["outputs"]
        df = per.get("engine-dflash")
        df_tps = df["tokens"] / df["seconds"] if df else None
        rows = {}
        for name, r in per.items():
            tps = r["tokens"] / r["seconds"]
            rows[name] = {"tokens_per_s": round(tps, 2),
                          "dflash_speedup_over_it": round(df_tps / tps, 3) if df_tps else None,
                          "identical_to_engine_ar": sum(a == b for a, b in zip(r["outputs"], ref)),
                          "mean_matching_prefix_share": round(
                              sum(_prefix_share(b, a) for a, b in zip(r["outputs"], ref)) / len(ref), 3)}
        summary[ds] = {"num_prompts": len(ref), "systems": rows}
        print(f"{ds} ({len(ref)} prompts, {new_tokens} new tokens)", file=out)
        print(f"{'system':>14} {'tok/s':>8} {'dflash x':>9} {'identical':>9} {'prefix':>7}", file=out)
        for name, r in rows.items():
            sp = f"{r['dflash_speedup_over_it']:.2f}x" if r["dflash_speedup_over_it"] else "-"
            print(f"{name:>14} {r['tokens_per_s']:>8.2f} {sp:>9} {r['identical_to_engine_ar']:>9} "
                  f"{r['mean_matching_prefix_share']:>7.2f}", file=out)
    return summary


def write_chart(path: str, summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sets = list(summary)
    names = list(next(iter(summary.values()))["systems"])
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(sets)
    for i, ds in enumerate(sets):
        vals = [summary[ds]["systems"][n]["tokens_per_s"] for n in names]
        ax.bar([j + i * w for j in range(len(names))], vals, w, label=ds)
    ax.set_xticks([j + w * (len(sets) - 1) / 2 for j in range(len(names))], names, rotation=20)
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    ax.set_title("same model, same prompts, one run")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
