"""Lookup branches: a greedy draft tree also verifies what followed the row's last tokens
the last time they occurred in its own context (prompt and output).

Small models repeat themselves, and answers quote their prompts: on the 100 ShareGPT
holdout responses of the default target, the continuation of the latest earlier occurrence
of the last 1-4 tokens is right for its first token at 38% of the anchors, and alone, as a
chain of 4 drafts, gives tau 1.59 (the drafter's chain of 4: 1.66). The two are wrong at
different places, so a tree holding both gains more than either: `tree.plan` puts the
lookup continuation in first, as a chain from the anchor, and fills the rest of the
tree's nodes with the drafter's best-first paths, sharing the nodes both propose (tau at
4 verified rows: 1.79 drafter tree, 2.08 with the lookup branch; at 8 rows 1.98 -> 2.58;
docs/BENCHMARKS.md "Lookup branches").

The target verifies the lookup nodes like any others (tree.greedy_walk follows its own
argmax), so the output stays the target's greedy output token for token. Only greedy tree
rows carry lookup branches; sampling rows keep their trees (tree.sampling_nodes).
"""
from __future__ import annotations

MAX_N = 4   # the longest suffix looked up (tokens)


class NgramIndex:
    """Where each 1..MAX_N-gram of a growing token list last ended. One per sequence; it
    indexes new tokens as the list grows (the list only grows: prompt, then output)."""

    __slots__ = ("last", "done")

    def __init__(self):
        self.last: dict[tuple[int, ...], int] = {}
        self.done = 0   # n-grams ending before this position are indexed

    def find(self, tokens: list[int]) -> tuple[int, int]:
        """-> (e, n): the longest suffix of `tokens` (n <= MAX_N tokens) that also ends at an
        earlier position, e the latest such end; (-1, 0) if the last token never occurred
        before."""
        L = len(tokens)
        for e in range(self.done, L - 1):   # never the suffix's own end, L - 1
            for n in range(1, min(MAX_N, e + 1) + 1):
                self.last[tuple(tokens[e - n + 1:e + 1])] = e
        self.done = max(self.done, L - 1)
        for n in range(min(MAX_N, L - 1), 0, -1):
            e = self.last.get(tuple(tokens[L - n:]))
            if e is not None:
                return e, n
        return -1, 0


def branch_length(nodes: int, matched: int) -> int:
    """How many of a tree's `nodes` the lookup branch may take, given the length of the
    suffix that matched: two thirds when two tokens or more matched, else half (a
    one-token match is a weaker guess). Picked on the holdout walk (docs/BENCHMARKS.md)."""
    if nodes < 1 or matched < 1:
        return 0
    return nodes - nodes // 3 if matched >= 2 else max(1, nodes // 2)


def propose(index: NgramIndex, tokens: list[int], nodes: int) -> list[int]:
    """The lookup branch for a tree of `nodes` nodes at the anchor tokens[-1]: the tokens
    that followed the latest earlier occurrence of the longest matching suffix."""
    e, n = index.find(tokens)
    k = branch_length(nodes, n)
    return tokens[e + 1:e + 1 + k] if k else []
