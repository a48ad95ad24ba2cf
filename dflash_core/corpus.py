"""Corpus branches: a greedy draft tree also verifies what the target itself wrote after
the row's last tokens, in a corpus of its own responses.

The target's responses to thousands of training prompts (the data folders a drafter is
trained on: token ids, in the repository) repeat its phrasing: list openings, hedges,
closing offers, code idioms. A `CorpusIndex` holds, for every 1..MAX_N-token context that
occurred at least `min_count` times before a response token, the token the target wrote
next most often there, and the calibrated probability that it is right. `chain` follows
it greedily from a row's last tokens, the longest matching context first (an n-gram model
with backoff), into a chain of guesses with a probability each.

The index also holds the calibrated probabilities of the context lookup (lookup.py): the
chance that the token after the latest earlier occurrence of the row's last m tokens is
right, by m and depth. With both, a greedy tree is planned best-first over one score, the
probability of each path (tree.scored_nodes): the drafter's top tokens per position, the
lookup's continuation and the corpus's chain each propose children with their own
probability, and a token two sources propose gets both. Every probability is measured at
build time on records of the same folders that the index leaves out (`calibration_share`).

The target verifies every node (tree.greedy_walk follows its own argmax), so the output is
the target's greedy output token for token, whatever the index says: a wrong guess costs a
verified row, never a token. Keys are 64-bit hashes of the context cut to 32 bits; two
contexts that share a key can only make a guess wrong.

Replayed over the target's greedy responses to the 100 ShareGPT holdout prompts
(training/walk.py `tree_walk_tau`), the shipped drafter's trees with lookup branches and
with the shipped index (dflash_core/assets/drafter-smollm2-135m/corpus.npz): tau 2.447 ->
2.554 at 6 verified rows, 2.593 -> 2.715 at 8, 2.756 -> 2.959 at 16 (docs/BENCHMARKS.md
"Corpus branches"). Sampling rows keep their trees (tree.sampling_nodes): the index is
read for greedy rows only.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MAX_N = 4                    # the longest context looked up (tokens)
SEED = 0x243F6A8885A308D3
MUL = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
LOOKUP_DEPTHS = 4            # lookup probabilities by depth 0..3 (deeper: depth 3's)
FORMAT_VERSION = 1
FILE_NAME = "corpus.npz"     # a drafter folder's index (EngineConfig.draft_corpus "auto")


def tail_keys(tokens: list[int]) -> list[int]:
    """32-bit keys of the contexts ending at tokens[-1], n = 1 .. min(MAX_N, len) tokens
    (key n - 1 is the last n tokens'): each extends the previous hash by one more token to
    the left."""
    out, h = [], SEED
    for t in reversed(tokens[-MAX_N:]):
        h = ((h ^ (int(t) + 1)) * MUL) & MASK
        out.append(h >> 32)
    return out


def _keys_at(t: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """tail_keys' key for the n tokens ending at each position idx of t (int64; -1 pads)."""
    h = np.full(len(idx), SEED, dtype=np.uint64)
    mul = np.uint64(MUL)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = (h ^ (t[idx - i] + 1).astype(np.uint64)) * mul
    return (h >> np.uint64(32)).astype(np.uint32)


def _bucket(n: np.ndarray, total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """An entry's calibration bucket: its context length, how often the context occurred
    (2, 3, 4+) and the share of those the best next token took (<1/2, <4/5, more)."""
    share = count / np.maximum(total, 1)
    s = np.where(share < 0.5, 0, np.where(share < 0.8, 1, 2))
    return ((n - 1) * 3 + np.minimum(np.maximum(total, 2), 4) - 2) * 3 + s


NUM_BUCKETS = MAX_N * 3 * 3


class CorpusIndex:
    """A corpus index (module docstring). keys uint32 [E] ascending, tokens [E], buckets
    uint8 [E] (`_bucket`), bucket_probs float32 [NUM_BUCKETS, 2]: the chance an entry of
    the bucket is right as the chain's first guess / a later one; lookup_probs
    [lookup.MAX_N, LOOKUP_DEPTHS]; meta: how it was built."""

    def __init__(self, keys, tokens, buckets, bucket_probs, lookup_probs, meta: dict):
        self.keys = np.ascontiguousarray(keys, dtype=np.uint32)
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self.buckets = np.ascontiguousarray(buckets, dtype=np.uint8)
        self.bucket_probs = np.asarray(bucket_probs, dtype=np.float32)
        self.lookup_probs = np.asarray(lookup_probs, dtype=np.float32)
        self.meta = dict(meta)
        if not (len(self.keys) == len(self.tokens) == len(self.buckets)):
            raise ValueError("corpus index arrays differ in length")
        if self.bucket_probs.shape != (NUM_BUCKETS, 2):
            raise ValueError(f"corpus index bucket_probs must be [{NUM_BUCKETS}, 2], got {list(self.bucket_probs.shape)}")
        if len(self.buckets) and int(self.buckets.max()) >= NUM_BUCKETS:
            raise ValueError("corpus index buckets out of range")
        if len(self.keys) > 1 and not bool(np.all(self.keys[1:] > self.keys[:-1])):
            raise ValueError("corpus index keys must be unique and ascending")
        from .lookup import MAX_N as LOOKUP_N
        if self.lookup_probs.shape != (LOOKUP_N, LOOKUP_DEPTHS):
            raise ValueError(f"corpus index lookup_probs must be [{LOOKUP_N}, {LOOKUP_DEPTHS}], "
                             f"got {list(self.lookup_probs.shape)}")
        # numpy arrays only, no per-entry Python objects: lists of millions of ints would
        # make every full garbage collection of the serving process walk them
        self._bp = self.bucket_probs.tolist()

    @property
    def vocab_size(self) -> int:
        return int(self.meta.get("vocab_size", 0))

    def __len__(self) -> int:
        return len(self.keys)

    # ---- use --------------------------------------------------------------------------
    def next_token(self, tokens: list[int], later: bool = False) -> tuple[int, float] | None:
        """The index's guess after tokens[-1]: (token, probability) of the longest
        context it holds, or None; `later`: the probability of a guess after earlier
        guesses of the chain."""
        i = self.find(tokens)
        return None if i is None else (int(self.tokens[i]), self._bp[int(self.buckets[i])][int(later)])

    def find(self, tokens: list[int]) -> int | None:
        """The entry of the longest context ending at tokens[-1] that the index holds, or
        None."""
        if not tokens or not len(self.keys):
            return None
        keys = np.array(tail_keys(tokens), dtype=np.uint32)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = np.flatnonzero(self.keys[pos] == keys)
        return int(pos[hit[-1]]) if len(hit) else None   # the longest context first

    def chain(self, tokens: list[int], k: int) -> tuple[list[int], list[float]]:
        """Up to k guesses after tokens[-1], each read with the previous ones appended ->
        (tokens, probabilities: each the chance the guess is right where the ones before
        it were)."""
        toks, buckets = self.guesses(tokens, k)
        return toks, [self._bp[b][int(j > 0)] for j, b in enumerate(buckets)]

    def guesses(self, tokens: list[int], k: int) -> tuple[list[int], list[int]]:
        """`chain`'s guesses and their buckets: one native call where the kernel is loaded
        (native.corpus_chain), else numpy's search (`find` per guess): the same guesses."""
        from . import native
        got = native.corpus_chain(self.keys, self.tokens, self.buckets, tokens, k, MAX_N, SEED, MUL) \
            if len(self.keys) else None
        return got if got is not None else self._guesses_numpy(tokens, k)

    def _guesses_numpy(self, tokens: list[int], k: int) -> tuple[list[int], list[int]]:
        ctx = list(tokens[-MAX_N:])
        out, buckets = [], []
        for _ in range(k):
            i = self.find(ctx)
            if i is None:
                break
            out.append(int(self.tokens[i]))
            buckets.append(int(self.buckets[i]))
            ctx = (ctx + [out[-1]])[-MAX_N:]
        return out, buckets

    def lookup_prob(self, matched: int, depth: int) -> float:
        """The calibrated chance that the context lookup's token at `depth` (0: the first
        after the anchor) is right where the ones before it were, for a match of
        `matched` tokens."""
        return float(self.lookup_probs[min(matched, len(self.lookup_probs)) - 1, min(depth, LOOKUP_DEPTHS - 1)])

    # ---- files ------------------------------------------------------------------------
    def save(self, path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tok_dtype = np.uint16 if self.vocab_size and self.vocab_size <= 1 << 16 else np.int32
        with open(tmp, "wb") as f:
            # keys as their differences (ascending: small numbers, which compress)
            deltas = np.diff(self.keys.astype(np.int64), prepend=0).astype(np.uint32)
            np.savez_compressed(f, key_deltas=deltas, tokens=self.tokens.astype(tok_dtype), buckets=self.buckets,
                                bucket_probs=self.bucket_probs, lookup_probs=self.lookup_probs,
                                meta=np.array(json.dumps(self.meta | {"format": FORMAT_VERSION})))
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "CorpusIndex":
        """Raises ValueError (one line) for a file that is not a corpus index."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != FORMAT_VERSION:
                    raise ValueError(f"format {meta.get('format')!r}, this build reads {FORMAT_VERSION}")
                keys = np.cumsum(z["key_deltas"].astype(np.int64))
                if len(keys) and keys[-1] >= 1 << 32:
                    raise ValueError("keys out of range")
                return cls(keys, z["tokens"], z["buckets"], z["bucket_probs"], z["lookup_probs"], meta)
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a corpus index: {e}") from None

    # ---- build ------------------------------------------------------------------------
    @classmethod
    def build(cls, records: list[dict], vocab_size: int, min_count: int = 2, calibration_share: float = 0.02,
              max_calibration_records: int = 1000, min_prob: float = 0.25, meta: dict | None = None) -> "CorpusIndex":
        """An index over records {conv_id, prompt_ids, response_ids[, sampled]} (the
        target's own responses): every record whose conversation id hashes into the first
        `calibration_share` is left out and measures the probabilities instead (its greedy
        responses, at most `max_calibration_records`, the first 128 tokens of each); a
        record with `calibration_pool` False is never left out. Entries whose bucket was
        right less often than `min_prob` as a chain's first guess are then dropped (a
        shorter context answers there instead) and the rest measured again: a smaller
        file, the same tau (docs/BENCHMARKS.md "Corpus branches")."""
        if not 0 < calibration_share < 1:
            raise ValueError(f"calibration_share must be in (0, 1), got {calibration_share}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if not 0 <= min_prob < 1:
            raise ValueError(f"min_prob must be in [0, 1), got {min_prob}")
        calib, corpus = [], []
        for r in records:   # a record with calibration_pool False always stays in the index
            out = r.get("calibration_pool", True) and _held_out(r.get("conv_id", ""), calibration_share)
            (calib if out else corpus).append(r)
        if not corpus:
            raise ValueError("no records to index")
        keys, tokens, n_of, total, count = _count(corpus, min_count)
        index = cls(keys, tokens, _bucket(n_of, total, count), np.full((NUM_BUCKETS, 2), 0.5, np.float32),
                    _default_lookup_probs(), {})
        calib = [r for r in calib if not r.get("sampled")][:max_calibration_records]
        index.bucket_probs, index.lookup_probs, stats = _calibrate(index, calib)
        index._bp = index.bucket_probs.tolist()
        if min_prob > 0:
            keep = index.bucket_probs[index.buckets, 0] >= min_prob
            index = cls(index.keys[keep], index.tokens[keep], index.buckets[keep], index.bucket_probs,
                        index.lookup_probs, {})
            index.bucket_probs, index.lookup_probs, stats = _calibrate(index, calib)
            index._bp = index.bucket_probs.tolist()
        index.meta = (meta or {}) | {
            "vocab_size": int(vocab_size), "records": len(corpus), "min_count": min_count,
            "response_tokens": int(sum(len(r["response_ids"]) for r in corpus)), "entries": len(index),
            "contexts_counted": len(keys), "min_prob": min_prob,
            "calibration_records": len(calib), "calibration_anchors": stats}
        return index


def row_chains(index: CorpusIndex, ngrams, tokens: list[int], nodes: int) -> list[tuple[list[int], list[float]]]:
    """A greedy tree row's scored chains (tree.scored_nodes) at the anchor tokens[-1]: the
    context lookup's continuation (ngrams: the row's lookup.NgramIndex) with the index's
    lookup probabilities, and the index's own chain; each up to `nodes` tokens."""
    chains = []
    e, m = ngrams.find(tokens)
    if m:
        cont = tokens[e + 1:e + 1 + nodes]
        chains.append((cont, [index.lookup_prob(m, j) for j in range(len(cont))]))
    guess = index.chain(tokens, nodes)
    if guess[0]:
        chains.append(guess)
    return chains


def _held_out(conv_id: str, share: float) -> bool:
    h = int.from_bytes(hashlib.sha1(f"corpus-calibration:{conv_id}".encode()).digest()[:8], "big")
    return h / 2 ** 64 < share


def _count(records: list[dict], min_count: int):
    """-> (keys, best tokens, context lengths, context counts, best-token counts) of every
    context seen >= min_count times before a response token, sorted by key."""
    pad = [-1] * MAX_N
    parts, resp = [], []
    for r in records:
        p, s = list(r["prompt_ids"]), list(r["response_ids"])
        parts += pad + p + s
        resp += [False] * (MAX_N + len(p)) + [True] * len(s)
    t = np.array(parts, dtype=np.int64)
    is_resp = np.array(resp, dtype=bool)
    idx = np.nonzero(is_resp[1:])[0]          # positions whose next token is a response token
    nxt = t[idx + 1].astype(np.uint64)
    out = []
    for n in range(1, MAX_N + 1):
        real = t[idx - n + 1] >= 0            # contexts of n real tokens
        k = _keys_at(t, idx[real], n).astype(np.uint64)
        combined = np.sort((k << np.uint64(32)) | nxt[real])
        u, c = np.unique(combined, return_counts=True)
        key = (u >> np.uint64(32)).astype(np.uint32)
        tok = (u & np.uint64(0xFFFFFFFF)).astype(np.int64)
        start = np.concatenate(([0], np.nonzero(key[1:] != key[:-1])[0] + 1))
        tot = np.add.reduceat(c, start)
        best_c = np.maximum.reduceat(c, start)
        grp = np.repeat(np.arange(len(start)), np.diff(np.append(start, len(key))))
        first_best = np.nonzero(c == best_c[grp])[0]
        first_best = first_best[np.concatenate(([True], grp[first_best][1:] != grp[first_best][:-1]))]
        keep = tot >= min_count
        out.append((key[start][keep], tok[first_best][keep], np.full(int(keep.sum()), n), tot[keep], best_c[keep]))
    keys, tokens, ns, tots, cnts = (np.concatenate([o[i] for o in out]) for i in range(5))
    order = np.lexsort((-tots, keys))          # a key two contexts share: the more frequent one
    keys, tokens, ns, tots, cnts = keys[order], tokens[order], ns[order], tots[order], cnts[order]
    first = np.concatenate(([True], keys[1:] != keys[:-1])) if len(keys) else np.zeros(0, bool)
    return keys[first], tokens[first], ns[first], tots[first], cnts[first]


def _default_lookup_probs() -> np.ndarray:
    from .lookup import MAX_N as LOOKUP_N
    return np.full((LOOKUP_N, LOOKUP_DEPTHS), 0.5, dtype=np.float32)


def _calibrate(index: CorpusIndex, calib: list[dict]):
    """Walk the calibration responses: at every anchor the index's chain and the context
    lookup's continuation against what the target wrote -> (bucket probabilities, lookup
    probabilities, anchors walked). Smoothed counts (right + 1) / (seen + 2)."""
    from . import lookup as lk
    seen_c, right_c = np.zeros((NUM_BUCKETS, 2)), np.zeros((NUM_BUCKETS, 2))
    seen_l, right_l = np.zeros((lk.MAX_N, LOOKUP_DEPTHS)), np.zeros((lk.MAX_N, LOOKUP_DEPTHS))
    anchors = 0
    for r in calib:
        p, resp = list(r["prompt_ids"]), list(r["response_ids"])[:128]
        seq = p + resp
        ngrams = lk.NgramIndex()
        for a in range(len(resp) - 1):
            ctx = seq[:len(p) + a + 1]
            truth = resp[a + 1:a + 8]
            anchors += 1
            e, m = ngrams.find(ctx)
            for j, t in enumerate(ctx[e + 1:e + 1 + len(truth)] if m else []):
                d = min(j, LOOKUP_DEPTHS - 1)
                seen_l[m - 1, d] += 1
                if t != truth[j]:
                    break
                right_l[m - 1, d] += 1
            # the chain up to its first wrong guess (each guess extends the tail as the
            # target's token would where the ones before it were right)
            for j, (guess, bucket) in enumerate(zip(*index.guesses(ctx, len(truth)))):
                b = (bucket, int(j > 0))
                seen_c[b] += 1
                if guess != truth[j]:
                    break
                right_c[b] += 1
    return ((right_c + 1) / (seen_c + 2)).astype(np.float32), ((right_l + 1) / (seen_l + 2)).astype(np.float32), anchors


def build_from_folders(folders: list[str], vocab_size: int, calibration_folders: list[str] | None = None,
                       **kw) -> CorpusIndex:
    """An index over every shard of these data folders (training/shards.py). Its
    probabilities are measured on records left out of the folders in `calibration_folders`
    (default: all of them): the ones whose prompts are most like the traffic served."""
    from .training.shards import read_shard
    calibration_folders = [Path(f).resolve() for f in (calibration_folders or folders)]
    folders = [Path(f) for f in folders]
    if any(c not in [f.resolve() for f in folders] for c in calibration_folders):
        raise ValueError("calibration folders must be among the indexed folders")
    records = []
    for f in folders:
        shards = sorted(f.glob("shard_*.npz")) + sorted(f.glob("shard_*.pt"))
        if not shards:
            raise ValueError(f"{f} holds no data shards")
        pool = f.resolve() in calibration_folders
        for s in shards:
            records += [r | {"calibration_pool": pool} for r in read_shard(s)]
    return CorpusIndex.build(records, vocab_size, meta={"folders": [f.name for f in folders],
                                                        "calibration_folders": [c.name for c in calibration_folders]},
                             **kw)

