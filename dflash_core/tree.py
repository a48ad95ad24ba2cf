"""Tree verification: one verify forward checks several drafts per position.

A DFlash drafter drafts every block position in one pass, each as a distribution of its
own (position k does not see which token position k-1 became). A chain verify keeps one
token per position, the argmax. A tree verify spends the same b target rows differently:
its b - 1 nodes are the drafter's most likely *paths*, picked best-first by the product
of the drafter's probabilities along them (the drafter is calibrated: see
`speculative.drafts_to_verify`), among the top TOPK tokens of each position. When the
drafter is sure of position 1, the tree goes deep along its argmax like a chain; when it
is not, the tree spends rows on position 1's runners-up instead of on positions a wrong
first draft would make worthless anyway.

    node i (block index i = 1 .. b-1): token, parent (0 = the anchor), depth
    the target reads node i at RoPE position start + depth(i), attending to the cached
    context and then its ancestors, root first (Decoder.forward's `tree`)

Greedy acceptance walks from the anchor: while the target's argmax after the current
node is the token of one of its children, move there; then emit the argmax. Each step
follows the target's own choice, so the output is the target's greedy output token for
token, whatever the tree; the K/V of the accepted nodes are moved to the positions after
the anchor (`commit_path`), where a chain's would have been written.

Measured on the shipped drafter (walk over the 100 ShareGPT holdout responses, greedy):
tau 1.788 with 3 tree nodes against 1.662 for a chain of 3 drafts, at the same 4 verified
rows; 1.975 against 1.677 at 8 rows (docs/BENCHMARKS.md).

Sampling rows verify trees of their own (below: the chain's rejection rule along their
sampled drafts, extra children of the anchor that a residual draw can land on); rows with
penalties keep the chain and its rules (speculative.accept). They all share the forward,
each row with a tree layout of its own (a chain is the tree whose node i has parent i - 1).
"""
from __future__ import annotations

import functools
import heapq

import torch

from . import kernels

TOPK = 4   # candidate tokens per block position (the tree's widest fan-out)


def chain_parents(n: int) -> list[int]:
    """Parents of a chain of n drafts: node i (1..n) follows i - 1."""
    return list(range(n))


def best_first(top_p: list[list[float]], nodes: int) -> list[tuple[int, int, int]]:
    """top_p [P][K]: the drafter's probabilities of its top-K tokens at positions 1..P,
    descending -> up to `nodes` nodes (parent block index, position - 1, rank), in
    the order picked: each node's path probability (the product of its ranks'
    probabilities from position 1 on) is the highest left, so a parent is always picked
    before its children, and node i's block index is i + 1. Ties go to the earlier node."""
    P = len(top_p)
    if not P or nodes < 1:
        return []
    K = len(top_p[0])
    heap = [(-top_p[0][k], 0, k, 0, 0) for k in range(K)]   # (-score, tiebreak, rank, parent, depth-1)
    heapq.heapify(heap)
    out: list[tuple[int, int, int]] = []
    tie = 1
    while heap and len(out) < nodes:
        score, _, k, parent, d = heapq.heappop(heap)
        out.append((parent, d, k))
        me = len(out)
        if d + 1 < P:
            for k2 in range(K):
                heapq.heappush(heap, (score * top_p[d + 1][k2], tie, k2, me, d + 1))
                tie += 1
    return out


def layout(parents: list[list[int]], T: int) -> torch.Tensor:
    """parents[r][i] = parent block index of block token i + 1 of row r (a row with fewer
    than T - 1 nodes pads the rest as a chain after its last node: computed, never read)
    -> int32 [R, T, T + 1]: row r, token t: its count c, then the block indices it reads,
    root (the anchor, 0) first, itself last (Decoder.forward's `tree`)."""
    return torch.stack([_row_layout(tuple(par), T) for par in parents])


@functools.lru_cache(maxsize=4096)
def _row_layout(par: tuple[int, ...], T: int) -> torch.Tensor:
    """One row's layout [T, T + 1] (shapes recur from step to step: cached; never written)."""
    par = par + tuple(range(len(par), T - 1))
    anc: list[list[int]] = [[0]]
    for i in range(1, T):
        anc.append(anc[par[i - 1]] + [i])
    return torch.tensor([[len(a)] + a + [0] * (T - len(a)) for a in anc], dtype=torch.int32)


def _children(parents: list[int], tokens: list[int]) -> dict[int, dict[int, int]]:
    """block index -> {token: the block index of its child with that token} (node i + 1 has
    parents[i], tokens[i]; a token repeated among siblings: its first node)."""
    children: dict[int, dict[int, int]] = {}
    for i, (par, tok) in enumerate(zip(parents, tokens)):
        children.setdefault(par, {}).setdefault(tok, i + 1)
    return children


def greedy_walk(parents: list[int], tokens: list[int], targets: list[int]) -> tuple[list[int], int]:
    """One row: parents[i] / tokens[i] of node i + 1, targets[j] = the target's argmax after
    block token j (j = 0: the anchor) -> (path: block indices from the anchor through the
    accepted nodes, the token emitted after them)."""
    children = _children(parents, tokens)
    path = [0]
    while True:
        nxt = targets[path[-1]]
        child = children.get(path[-1], {}).get(nxt)
        if child is None:
            return path, nxt
        path.append(child)


def commit_path(cache, slot: int, start: int, path: list[int]) -> None:
    """Move the K/V of the accepted nodes (block indices path[1:], written at start + i) to
    start + 1 .. start + len(path) - 1, every layer, where a chain would have put them."""
    n = len(path) - 1
    if path[1:] == list(range(1, n + 1)):
        return
    src = torch.tensor(path[1:], dtype=torch.int64, device=cache.k_all.device) + start
    for c in (cache.k_all, cache.v_all):   # every layer in one gather and one store
        c[:, slot, :, start + 1:start + 1 + n] = c[:, slot, :, src]


def merged_nodes(lookup: list[int], top_p: list[list[float]], top_tok: list[list[int]], n: int
                 ) -> tuple[list[int], list[int]]:
    """One greedy row's tree of up to n nodes: the lookup branch (lookup.py) first, as a
    chain from the anchor, then the drafter's best-first nodes (top_p / top_tok [P][K]),
    a node both propose (same parent, same token) taken once -> (parents, tokens)."""
    parents: list[int] = []
    tokens: list[int] = []
    index: dict[tuple[int, int], int] = {}   # (parent block index, token) -> block index

    def add(par: int, tok: int) -> int:
        if (par, tok) not in index:
            parents.append(par)
            tokens.append(tok)
            index[(par, tok)] = len(tokens)
        return index[(par, tok)]

    at = 0
    for t in lookup[:n]:
        at = add(at, t)
    placed = {0: 0}   # best-first node number -> its block index in this tree
    for i, (par, d, k) in enumerate(best_first(top_p, n + len(lookup))):
        if len(tokens) >= n:
            break
        placed[i + 1] = add(placed[par], top_tok[d][k])
    return parents, tokens


def scored_nodes(chains: list[tuple[list[int], list[float]]], top_p: list[list[float]], top_tok: list[list[int]],
                 n: int) -> tuple[list[int], list[int], list[bool]]:
    """One greedy row's tree of up to n nodes, best-first by path probability over every
    source at once (corpus.py): the drafter's top tokens at each position (top_p / top_tok
    [P][K], its probabilities) are children of every node at that depth; each chain
    (tokens, probabilities: the chance of each token where the ones before it were right;
    the context lookup's continuation, the corpus index's guesses) adds its next token as a
    child of the nodes on it. A token that several sources propose as the same child gets
    1 - prod(1 - p) of theirs. Depth <= P. -> (parents, tokens, on a chain: per node)."""
    P = len(top_p)
    parents: list[int] = []
    tokens: list[int] = []
    on_chain: list[bool] = []
    heap: list = []
    tie = 0

    def offer(parent: int, depth: int, score: float, chains_on) -> None:
        nonlocal tie
        if depth >= P:
            return
        probs = dict(zip(top_tok[depth], top_p[depth]))
        via: dict[int, list[int]] = {}
        for c in chains_on:
            toks, ps = chains[c]
            if depth < len(toks):
                t = toks[depth]
                probs[t] = 1.0 - (1.0 - probs.get(t, 0.0)) * (1.0 - ps[depth])
                via.setdefault(t, []).append(c)
        for t, p in probs.items():
            heapq.heappush(heap, (-score * p, tie, parent, depth, t, via.get(t, ())))
            tie += 1

    offer(0, 0, 1.0, range(len(chains)))
    while heap and len(tokens) < n:
        neg, _, parent, depth, t, via = heapq.heappop(heap)
        parents.append(parent)
        tokens.append(t)
        on_chain.append(bool(via))
        offer(len(tokens), depth + 1, -neg, via)
    return parents, tokens, on_chain


def plan_row(top_p: list[list[float]], top_tok: list[list[int]], n: int, look: list[int] | None = None,
             chains: list[tuple[list[int], list[float]]] | None = None
             ) -> tuple[list[int], list[int], set[int] | None]:
    """One greedy row's tree of up to n nodes from the drafter's top tokens (top_p / top_tok
    [P][K]): `scored_nodes` with its scored chains (corpus.py) where `chains` is given, else
    `merged_nodes` with its lookup branch where it has one, else `best_first` -> (parents,
    tokens, the block indices of its nodes that a lookup branch or chain proposed, or None
    where there are none)."""
    if chains is not None:
        parents, toks, on = scored_nodes(chains, top_p, top_tok, n)
        return parents, toks, ({i + 1 for i, o in enumerate(on) if o} if any(on) else None)
    if look:
        parents, toks = merged_nodes(look, top_p, top_tok, n)
        return parents, toks, set(range(1, min(len(look), n) + 1))
    nodes = best_first(top_p, n)
    return [p for p, _, _ in nodes], [top_tok[d][k] for _, d, k in nodes], None


def plan(top: tuple[list, list], tree_rows: list[int], draft_tokens: torch.Tensor,
         lookups: dict[int, list[int]] | None = None, lookup_nodes: dict[int, set[int]] | None = None,
         chains: dict[int, list[tuple[list[int], list[float]]]] | None = None) -> dict[int, list[int]]:
    """The greedy trees of a step (`plan_row` per row): top = the drafter's (tokens, probs)
    [R, b-1, k] per position (speculative.draft's `topk`, read to the host as nested lists),
    tree_rows the greedy rows that verify trees, lookups: row -> its lookup branch (lookup.py;
    `merged_nodes`), where it has one. Writes each tree row's node tokens into draft_tokens
    [R, b-1] (in place; other rows keep theirs), and into `lookup_nodes` (when given) each
    row's block indices of its lookup branch (the first nodes: `merged_nodes` adds them
    first) -> row -> parents of its nodes. With `chains` (row -> its scored chains,
    corpus.py) the trees are `scored_nodes` instead, and `lookup_nodes` gets the nodes any
    chain proposed."""
    n = draft_tokens.shape[1]
    top_tok, top_p = top
    parents: dict[int, list[int]] = {}
    for r in tree_rows:
        parents[r], toks, mine = plan_row(top_p[r], top_tok[r], n, lookups.get(r) if lookups else None,
                                          None if chains is None else chains.get(r, []))
        if lookup_nodes is not None and mine is not None:
            lookup_nodes[r] = mine
        draft_tokens[r, :len(toks)] = torch.tensor(toks)
    return parents


def walk_rows(targets: torch.Tensor, draft_tokens: torch.Tensor, parents: dict[int, list[int]]
              ) -> dict[int, tuple[list[int], int]]:
    """targets [Rt, b]: the target's argmax at every block token of the tree rows (in the
    order of `parents`) -> row -> (its accepted path, the token it emits after it)."""
    rows = list(parents)
    tokens = draft_tokens[torch.tensor(rows, device=draft_tokens.device)].tolist()
    return {r: greedy_walk(parents[r], tokens[j], t) for j, (r, t) in enumerate(zip(rows, targets.tolist()))}


def committed_order(paths: dict[int, list[int]], R: int, b: int, device) -> torch.Tensor:
    """[R, b] block indices in commit order: a tree row's path first (then filler), a chain
    row's block as it is. Gathering a step's tokens, hidden states and features with it
    puts every row's committed positions where a chain's would be."""
    rows = [paths[r] + list(range(len(paths[r]), b)) if r in paths else list(range(b)) for r in range(R)]
    return torch.tensor(rows, dtype=torch.int64, device=device)


# ---- sampling rows ----------------------------------------------------------------------
# A sampling row's tree: its chain of sampled drafts d_1 .. d_L (each drawn from the
# drafter's warped q at its position, as a chain's) plus E extra children of the anchor,
# the drafter's most likely first tokens other than d_1 (E = half the nodes, rounded down).
# At a node whose children hold the next sampled draft d, the chain's rule runs first:
# accept d with probability min(1, p(d) / q(d)); on a rejection x ~ normalise(max(p - q, 0))
# (else x ~ p where no draft is a child); the walk moves on to the child whose token is x,
# if there is one, else emits x. Each emitted token is distributed exactly as the target's
# p there (the rejection rule's guarantee, or a plain draw), whichever children the tree
# has; the extra children only let a residual draw the chain would emit and stop at carry
# on instead. Measured on the shipped drafter (block 4, 100 holdout prompts: a chain of 2
# sampled drafts and one extra child against a chain of 3): tau 1.478 -> 1.505 at
# temperature 1, 1.552 -> 1.605 at 0.7 (docs/BENCHMARKS.md).


def sampling_nodes(drafts: list[int], top_tokens: list[int], n: int, lookup: list[int] | None = None
                   ) -> tuple[list[int], list[int], int]:
    """drafts: the row's sampled drafts at positions 1..n; top_tokens: the drafter's most
    likely tokens at position 1, descending; lookup: the row's lookup branch (lookup.py)
    -> (parents, tokens, L) of n nodes: the chain of the first L sampled drafts, the extra
    children of the anchor, then the lookup branch's nodes off the chain. The branch takes
    up to half the nodes: where it starts with the chain's first j drafts those are its
    first j nodes, and the rest hangs off chain node j as a chain of its own; the extras
    get what the branch leaves of the half. Nodes off the chain are reached only where a
    draw of the target's (a rejected draft's residual draw, or a plain draw past the chain)
    lands on their token, so every emitted token stays the target's sample (sampling_walk)."""
    k, j = _branch_split(drafts, n, lookup)
    own = k - j                                  # the branch's nodes off the chain
    skip = {drafts[0]} | ({lookup[0]} if own and j == 0 else set())
    extras = [t for t in top_tokens if t not in skip][:max(0, n // 2 - own)]
    L = n - own - len(extras)
    parents = list(range(L)) + [0] * len(extras)
    tokens = list(drafts[:L]) + extras
    for i in range(j, k):   # chain node j (0: the anchor), then the branch's own nodes in a row
        parents.append(j if i == j else len(parents))
        tokens.append(lookup[i])
    return parents, tokens, L


def _branch_split(drafts: list[int], n: int, lookup: list[int] | None) -> tuple[int, int]:
    """A sampling tree's lookup branch: (k, j) = its length in the tree (up to half of n
    nodes), the drafts it starts with (those are chain nodes 1..j)."""
    k = min(len(lookup), n // 2) if lookup else 0
    j = 0
    while j < k and lookup[j] == drafts[j]:
        j += 1
    return k, j


def sampling_lookup_nodes(drafts: list[int], n: int, lookup: list[int] | None, total: int) -> set[int]:
    """The block indices of a sampling tree's lookup branch (`sampling_nodes` of n nodes,
    `total` of them placed): the chain nodes it starts with, then its own nodes, last."""
    k, j = _branch_split(drafts, n, lookup)
    return set(range(1, j + 1)) | set(range(total - (k - j) + 1, total + 1))


def sampling_plan(top: tuple[torch.Tensor, torch.Tensor], samp_rows: list[int], draft_tokens: torch.Tensor,
                  parents: dict[int, list[int]], lookups: dict[int, list[int]] | None = None,
                  lookup_nodes: dict[int, set[int]] | None = None) -> dict[int, int]:
    """The sampling trees of a step (`sampling_nodes` per row, with the row's lookup branch
    where `lookups` has one): writes each row's node tokens into draft_tokens [R, b-1] and
    its parents into `parents`, and into `lookup_nodes` (when given) the block indices of
    its lookup branch (in place) -> row -> the length L of its chain of sampled drafts
    (nodes 1..L)."""
    n = draft_tokens.shape[1]
    drafts, firsts = draft_tokens[samp_rows].tolist(), top[0][samp_rows, 0].tolist()
    chain_lens = {}
    for r, d, f in zip(samp_rows, drafts, firsts):
        look = lookups.get(r) if lookups else None
        parents[r], toks, chain_lens[r] = sampling_nodes(d, f, n, look)
        if look and lookup_nodes is not None:
            lookup_nodes[r] = sampling_lookup_nodes(d, n, look, len(toks))
        draft_tokens[r] = torch.tensor(toks)
    return chain_lens


def sampling_walk(parents: list[int], tokens: list[int], chain_len: int, p: torch.Tensor, q: torch.Tensor,
                  u: torch.Tensor) -> tuple[list[int], int]:
    """One sampling row: p [b, V] the target's warped distribution after each block token
    (or rows computed on first use, sampling.WarpedRows: p[i] is read only at the nodes the
    walk visits), q [b-1, V] the drafter's at positions 1..b-1 (what the drafts were drawn from), u [2b]
    uniforms; nodes 1..chain_len are the sampled chain -> (path, the token emitted after it)."""
    children = _children(parents, tokens)
    path = [0]
    while True:
        cur, depth = path[-1], len(path) - 1
        kids = children.get(cur, {})
        pc = p[cur].float()
        dist = pc
        main = cur + 1 if cur < chain_len else None        # the chain's next node: d_{depth+1}
        if main is not None and depth < q.shape[0]:
            d = tokens[main - 1]
            qd = q[depth].float()
            if float(u[2 * depth]) * float(qd[d]) < float(pc[d]):
                path.append(main)
                continue
            res = (pc - qd).clamp_min(0.0)
            if float(res.sum()) > 0:
                dist = res
        x = int(kernels.sample_from_probs(dist[None], u[2 * depth + 1:2 * depth + 2])[0])
        child = kids.get(x)
        if child is None:
            return path, x
        path.append(child)
