"""Lookup branches: a greedy draft tree also verifies what followed the row's last tokens
the last time they occurred in its own context (prompt and output).

Small models repeat themselves, and answers quote their prompts: that continuation is
often right where the drafter is wrong, and the reverse, so a tree holding both gains
more than either. `tree.plan` puts the lookup continuation in first, as a chain from the
anchor, and fills the rest of the tree's nodes with the drafter's best-first paths, taking
a node both propose once. Replayed over the default target's greedy responses to the 100
ShareGPT holdout prompts (training/walk.py `tree_walk_tau`), the shipped drafter: tau 1.79
-> 2.16 at 4 verified rows, 1.90 -> 2.45 at 6, 1.97 -> 2.59 at 8 (docs/BENCHMARKS.md
"Lookup branches").

The target verifies the lookup nodes like any others (tree.greedy_walk follows its own
argmax), so the output stays the target's greedy output token for token. Sampling rows'
trees carry the branch too, off their chain of sampled drafts (tree.sampling_nodes): a
lookup node is entered only where the target's own draw (a rejected draft's residual
draw, or a plain draw past the chain) is its token, so every token is still the target's
sample (tau at temperature 1, block 4: docs/BENCHMARKS.md "Lookup branches").
"""
from __future__ import annotations

MAX_N = 4   # the longest suffix looked up (tokens)
UNSURE = 0.3   # a drafter's first-position probability below this: it is unsure there


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


def branch_length(nodes: int, matched: int, drafter_p1: float | None = None, agrees: bool = False) -> int:
    """How many of a tree's `nodes` the lookup branch may take, given the length of the
    suffix that matched: two thirds when two tokens or more matched, else half (a
    one-token match is a weaker guess). Where the drafter's first position is known
    (greedy trees): all of them when the branch starts with the drafter's own first choice
    (`agrees`: that node is shared, the branch goes deeper where the drafter would), or
    when the drafter is unsure there (`drafter_p1` < UNSURE) and two tokens or more
    matched. Picked on the holdout walk (docs/BENCHMARKS.md "Lookup branches")."""
    if nodes < 1 or matched < 1:
        return 0
    if agrees or (drafter_p1 is not None and drafter_p1 < UNSURE and matched >= 2):
        return nodes
    return nodes - nodes // 3 if matched >= 2 else max(1, nodes // 2)


def propose(index: NgramIndex, tokens: list[int], nodes: int,
            drafter_first: tuple[int, float] | None = None) -> list[int]:
    """The lookup branch for a tree of `nodes` nodes at the anchor tokens[-1]: the tokens
    that followed the latest earlier occurrence of the longest matching suffix, as many
    as `branch_length` gives. drafter_first: the drafter's most likely token at position
    1 and its probability (greedy trees), or None."""
    e, n = index.find(tokens)
    if not n:
        return []
    cont = tokens[e + 1:e + 1 + nodes]
    k = branch_length(nodes, n, None if drafter_first is None else drafter_first[1],
                      drafter_first is not None and bool(cont) and cont[0] == drafter_first[0])
    return cont[:k]
