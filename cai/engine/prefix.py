"""Shared prompt prefixes: which token prefixes the prompts of a batch share, and an order that
keeps the prompts sharing one together.

cai's templates put their static text first (system prompt, few-shot exemplars, then the
principle, then the example), so a stage's requests share long token prefixes: all of them the
exemplars, those of one principle a little more, both orders of a judged pair their
conversation, the ``n`` samples of a request all of it. ``prefix_tree`` finds these prefixes as
the nodes of a radix tree over the prompts' token ids; the HF engine computes each node's keys
and values once and continues every prompt from its deepest node (``cai.engine.hf``).

Prefixes are found on the token ids of the whole encoded prompts, never by encoding a prefix
string apart, so a request's tokens never change (a shared text that ends mid-token shares only
the tokens both encodings have).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise


@dataclass
class Node:
    """A token prefix that two or more prompts share: ``prompt[:end]`` of each of ``rows``."""

    parent: int | None
    """Index of the node this one extends (whose tokens are ``prompt[:start]``); None: none."""
    start: int
    end: int
    rows: list[int] = field(default_factory=list)
    """Every prompt under this node, in the tree's sorted order."""

    @property
    def row(self) -> int:
        """One prompt holding the node's tokens (``prompts[node.row][start:end]``)."""
        return self.rows[0]


def common_start(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """How many tokens ``a`` and ``b`` share at their start (at most ``limit``)."""
    limit = min(len(a), len(b)) if limit is None else limit
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def shared_tokens(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens ``a`` and ``b`` share at their start, leaving each at least one of its own (the
    last prompt position gives the next token's logits, so every prompt runs at least one)."""
    return common_start(a, b, min(len(a), len(b)) - 1)


def prefix_tree(
    prompts: Sequence[Sequence[int]], min_tokens: int, min_saved: int = 0
) -> tuple[list[Node], list[int | None]]:
    """The shared prefixes of ``prompts``: nodes of at least ``min_tokens`` tokens beyond their
    parent, each shared by at least two prompts and saving at least ``min_saved`` tokens of
    compute (a node of n prompts and t tokens saves (n - 1) × t; a smaller one is not a node of
    its own, its tokens go to its children or its prompts), parents before children; and each
    prompt's deepest node (None: it shares no prefix worth computing once).

    In lexicographic order the prompts under any prefix are contiguous, and the prefix a run of
    them shares is the least of their neighbours' common prefixes; so a node is a maximal run
    whose neighbours share ``min_tokens`` more than the parent, and its children are found the
    same way inside it.
    """
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    common = [shared_tokens(prompts[a], prompts[b]) for a, b in pairwise(order)]
    nodes: list[Node] = []
    deepest: list[int | None] = [None] * len(prompts)
    # (lo, hi, start, need, parent): order[lo:hi] share prompt[:start], their parent's; a run
    # inside them is a node when its neighbours share at least ``need`` tokens.
    todo: list[tuple[int, int, int, int, int | None]] = [(0, len(prompts), 0, min_tokens, None)]
    while todo:
        lo, hi, start, need, parent = todo.pop()
        i = lo
        while i < hi:
            j = i
            while j + 1 < hi and common[j] >= need:
                j += 1
            if j > i:
                end = min(common[i:j])
                if (j - i) * (end - start) < min_saved:  # too little saved: look deeper
                    todo.append((i, j + 1, start, end + 1, parent))
                else:
                    nodes.append(Node(parent, start, end, order[i : j + 1]))
                    for r in nodes[-1].rows:
                        deepest[r] = len(nodes) - 1
                    todo.append((i, j + 1, end, end + min_tokens, len(nodes) - 1))
            i = j + 1
    return nodes, deepest


def sharing_order(
    prompts: Sequence[Sequence[int]], min_tokens: int, min_saved: int = 0
) -> list[int]:
    """Prompt indices with the prompts under each shared prefix together (a walk of the prefix
    tree), longest first at every level: with no shared prefix, the prompts by length,
    longest first, so that consecutive prompts cut into micro-batches pad little."""
    nodes, deepest = prefix_tree(prompts, min_tokens, min_saved)
    children: dict[int | None, list[tuple[int, bool, int]]] = {}
    longest = [max(len(prompts[r]) for r in n.rows) for n in nodes]
    for i, n in enumerate(nodes):
        children.setdefault(n.parent, []).append((longest[i], True, i))
    for r, node in enumerate(deepest):
        children.setdefault(node, []).append((len(prompts[r]), False, r))
    out: list[int] = []
    stack: list[tuple[bool, int | None]] = [(True, None)]  # (is a node, node or prompt index)
    while stack:
        is_node, i = stack.pop()
        if not is_node:
            out.append(i)
            continue
        # Longest first (a stable sort: equal lengths keep the tree's order), pushed reversed
        # so that the stack pops them in that order.
        items = sorted(children.get(i, []), key=lambda c: -c[0])
        stack.extend((is_node, j) for _, is_node, j in reversed(items))
    return out
