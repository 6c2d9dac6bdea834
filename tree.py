"""Draft trees for EAGLE: specs, the fixed-size buffers built from them, tree masks and verification.

A tree spec is a list of paths; each path lists child ranks from the root (0 = the draft's most likely child).
[[0], [1], [0, 0]] = two children of the root, and the best child of the first one. Nodes are numbered root = 0,
then paths sorted by (length, ranks), so parents come before children and depth is non-decreasing.

Everything here has static shapes: N nodes, depth at most D. Verification needs no host sync.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# torch.compile skips modules named `tree` (it mistakes this file for the dm-tree package), so the two functions
# that run inside compiled decoding opt back in explicitly.
traced = getattr(torch._dynamo, "dont_skip_tracing", lambda fn: fn)

# EAGLE-1's default tree (`mc_sim_7b_63` in the official code): 25 draft nodes + root = 26 tokens, depth 5.
EAGLE1_TREE = [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0],
               [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [1, 0, 0],
               [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]  # fmt: skip


class TreeError(ValueError):
    """A bad tree spec (user input)."""


def parse_tree_spec(spec: str) -> list[list[int]]:
    """'default', 'chain:K', or a JSON file holding a list of paths. ('head', the tree a head folder names, is
    resolved to one of these by draft.head_tree.)"""
    if spec == "default":
        return [list(p) for p in EAGLE1_TREE]
    if spec.startswith("chain:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise TreeError(f"bad tree spec {spec!r}: chain:K needs an integer K") from None
        if k < 1:
            raise TreeError(f"bad tree spec {spec!r}: K must be at least 1")
        return [[0] * d for d in range(1, k + 1)]
    p = Path(spec)
    if not p.is_file():
        raise TreeError(f"bad tree spec {spec!r}: not 'default', 'chain:K' or an existing JSON file")
    try:
        paths = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TreeError(f"cannot read tree file {spec}: {e}") from None
    return paths


@dataclass
class Tree:
    """Fixed-size buffers for one tree. N nodes (root included), depth D, K = top-k taken per expanded node."""

    paths: list[list[int]]  # sorted, without the root
    parent: Tensor  # [N] int64, parent[0] = 0
    depth: Tensor  # [N] int64
    ancestors: Tensor  # [N, N] bool: ancestors[n, m] = m is n or an ancestor of n (the tree attention mask)
    path_nodes: Tensor  # [N, D+1] int64: path_nodes[n, j] = ancestor of n at depth j (padded with n)
    # Drafting: depth d's nodes that have children are fed to the draft at step d (d = 1..D-1); step 0 is the root.
    fed: list[Tensor]  # fed[d] = node ids [n_fed_d] expanded at draft step d (fed[0] = [0], the root)
    parent_row: Tensor  # [N] int64: row of n's parent inside its step's fed list
    child_src: Tensor  # [N] int64: for node n >= 1, index into its step's flat top-k ids [n_fed * K]
    depth_start: list[int]  # nodes of depth d are depth_start[d] .. depth_start[d+1]-1
    # The fed nodes of steps 1..D-1 in order, F in all (one scratch slot and one row of draft.round_inputs each):
    fed_start: list[int]  # step d's are fed_start[d] .. fed_start[d+1]-1 (fed_start[0] = fed_start[1] = 0)
    fed_depth: Tensor  # [F] int64: each one's depth (= its step)
    fed_ancestors: Tensor  # [F, F] bool: fed_ancestors[i, j] = fed node j is fed node i or an ancestor of it
    K: int
    N: int
    D: int

    def static_tensors(self) -> list[Tensor]:
        return [v for k, v in self.__dict__.items() if isinstance(v, Tensor)] + list(self.fed)

    def to(self, device) -> Tree:
        move = lambda v: v.to(device) if isinstance(v, Tensor) else [move(x) for x in v] if isinstance(v, list) else v
        t = {k: (v if k == "paths" else move(v)) for k, v in self.__dict__.items()}
        return Tree(**t)


def build_tree(paths: list[list[int]]) -> Tree:
    if not isinstance(paths, list) or not paths:
        raise TreeError("a tree needs at least one path")
    try:
        paths = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
    except (TypeError, ValueError):
        raise TreeError("a tree is a list of paths, each a list of non-negative integers") from None
    if any(len(p) == 0 or min(p) < 0 for p in paths):
        raise TreeError("every path must be a non-empty list of non-negative ranks")
    index = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
    for p in paths:
        if p[:-1] not in index:
            raise TreeError(f"path {list(p)} has no parent path {list(p[:-1])} in the tree")
    N, D = len(paths) + 1, max(len(p) for p in paths)
    parent = [0] + [index[p[:-1]] for p in paths]
    depth = [0] + [len(p) for p in paths]
    anc = torch.zeros(N, N, dtype=torch.bool)
    path_nodes = torch.zeros(N, D + 1, dtype=torch.long)
    for n, p in enumerate([()] + paths):
        for j in range(len(p) + 1):
            anc[n, index[p[:j]]] = True
            path_nodes[n, j] = index[p[:j]]
        path_nodes[n, len(p) + 1 :] = n
    has_children = {parent[n] for n in range(1, N)}
    fed = [[n for n in range(N) if depth[n] == d and n in has_children] for d in range(D)]
    K = max(p[-1] for p in paths) + 1
    # Row of each fed node inside its step, so a child's token is topk_ids[step][row * K + rank].
    row = {n: i for step in fed for i, n in enumerate(step)}
    child_src = [0] + [row[parent[n]] * K + p[-1] for n, p in enumerate(paths, 1)]
    parent_row = [0] + [row[parent[n]] for n in range(1, N)]
    depth_start = [depth.index(d) for d in range(D + 1)] + [N]
    fed_all = [n for step in fed[1:] for n in step]
    fed_start = [0, 0]
    for step in fed[1:]:
        fed_start.append(fed_start[-1] + len(step))
    return Tree(
        paths=[list(p) for p in paths],
        parent=torch.tensor(parent),
        depth=torch.tensor(depth),
        ancestors=anc,
        path_nodes=path_nodes,
        fed=[torch.tensor(f, dtype=torch.long) for f in fed],
        parent_row=torch.tensor(parent_row),
        child_src=torch.tensor(child_src),
        depth_start=depth_start,
        fed_start=fed_start,
        fed_depth=torch.tensor([depth[n] for n in fed_all], dtype=torch.long),
        fed_ancestors=anc[fed_all][:, fed_all],
        K=K,
        N=N,
        D=D,
    )


@traced
def target_tree_mask(ancestors: Tensor, L: Tensor, T: int) -> Tensor:
    """[1, 1, N, T] bool: node n sees committed slots < L and its own ancestors at slots L..L+N-1."""
    N = ancestors.size(0)
    rel = torch.arange(T, device=L.device) - L  # slot - L: [T]
    in_tree = (rel >= 0) & (rel < N)
    tree_bits = ancestors[:, rel.clamp(0, N - 1)]  # [N, T]
    return ((rel < 0)[None] | (in_tree[None] & tree_bits))[None, None]


@traced
def verify(node_tokens: Tensor, target_choice: Tensor, tree: Tree) -> tuple[Tensor, Tensor]:
    """Accept the longest path whose every token equals the target's choice at its parent.

    node_tokens: [N] drafted tokens (node 0 = root, already emitted); target_choice: [..., N] the target's token at
    each node (argmax for greedy, one sample from the processed distribution otherwise; leading dims batch independent
    draws). Returns (best node [..., 1], accepted depth [..., 1]). Siblings carry distinct tokens, so at most one
    child of a node can match: the accepted nodes form one path and the deepest one is unique.

    Why sampling stays exact (the target's distribution is kept): let y_n ~ p(. | prefix of n) be drawn
    independently at every node. The walk starts at the root; at node n it emits y_n's value either as an accepted
    child (a child whose token equals y_n) or, if no child carries y_n, as the bonus token, and stops. Either way the
    token emitted after prefix(n) is y_n, a sample of the target's conditional given exactly that prefix, and the
    choice of next node depends only on y_n. By induction every emitted sequence has the target's probability.
    The draft's tokens only decide how many of the y_n are used per target forward, never their values. A variant
    that accepted a child with the draft's probability without drawing the bonus from the residual would not have
    this property (tests/test_eagle.py checks that it fails).
    """
    ok = (node_tokens == target_choice[..., tree.parent]) | (tree.depth == 0)  # [..., N]; the root always matches
    accepted = (tree.ancestors & ~ok[..., None, :]).sum(-1) == 0  # every node on the path root..n matches: [..., N]
    score = torch.where(accepted, tree.depth, -1)
    best = score.argmax(-1, keepdim=True)  # [..., 1]
    return best, tree.depth[best]


# ---------------------------------------------------------------------------------------------------------------
# EAGLE-2 dynamic trees with constant shapes: the draft ranks candidates by cumulative log-probability each round.


@dataclass
class DynamicTree:
    """EAGLE-2: the draft expands its K best frontier nodes by K children each, D levels deep, and keeps the N-1 best
    candidates (plus the root). K, D, N fix every shape: C = K + (D-1)*K*K candidates, N nodes, depth <= D."""

    K: int = 10
    D: int = 6
    N: int = 60


def parse_dynamic_spec(spec: str) -> DynamicTree | None:
    """'eagle2' or 'eagle2:K=10,D=6,N=60' -> DynamicTree; any other spec -> None."""
    if spec != "eagle2" and not spec.startswith("eagle2:"):
        return None
    t = DynamicTree()
    for item in filter(None, spec.partition(":")[2].split(",")):
        key, _, value = item.partition("=")
        if key not in ("K", "D", "N") or not value.isdigit():
            raise TreeError(f"bad tree spec {spec!r}: expected eagle2:K=..,D=..,N=.. with integer values")
        setattr(t, key, int(value))
    if t.K < 1 or t.D < 1 or t.N < 2 or t.N - 1 > t.K + (t.D - 1) * t.K * t.K:
        raise TreeError(f"bad tree spec {spec!r}: need K, D >= 1 and 2 <= N <= 1 + K + (D-1)*K*K")
    return t


def make_tree(spec: str) -> Tree | DynamicTree:
    """A spec of any kind but 'auto' (generate.py's, which times the GPU) and 'head' (draft.head_tree resolves it
    first): 'eagle2[:K=..,D=..,N=..]' -> DynamicTree, else a static Tree (parse_tree_spec)."""
    return parse_dynamic_spec(spec) or build_tree(parse_tree_spec(spec))


@traced
def rank_desc(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rank the entries of a short 1-D x from high to low, ties to the lower index: (rank [C], each entry's place,
    a permutation of 0..C-1; order [C], the entries' indices in that order, so order[rank[i]] = i).

    For EAGLE-2's few hundred candidates, by counting: rank[i] = how many entries come before entry i, one [C, C]
    comparison that Inductor reduces in one kernel, then one scatter. torch.topk and torch.sort take two ATen launches
    each there (a radix select and a sort), outside the chain of Triton kernels that overlap their launches (PDL)."""
    C = x.size(0)
    i = torch.arange(C, device=x.device)
    before = (x[None, :] > x[:, None]) | ((x[None, :] == x[:, None]) & (i[None, :] < i[:, None]))  # [C, C]: j before i
    rank = before.sum(1)  # [C]
    return rank, torch.zeros_like(rank).scatter_(0, rank, i)  # (zeros: a NaN score cannot leave an index unset)


@traced
def tree_from_candidates(scores: Tensor, parents: Tensor, N: int, D: int) -> tuple[Tensor, ...]:
    """Keep the N-1 best candidates and build the tree buffers, all with fixed shapes.

    scores [C]: cumulative draft log-probability; parents [C]: the parent's candidate index (-1 = the root). A parent
    comes before its children and scores no lower, and ties go to the lower index (rank_desc), so the kept set is
    closed under ancestors, and in rank order parents come before their children. Returns (kept [N-1] candidate
    indices, best first, parent [N], depth [N], ancestors [N, N], path_nodes [N, D+1]), the same buffers a static Tree
    has.
    """
    dev = scores.device
    rank, order = rank_desc(scores)
    kept = order[: N - 1]  # [N-1]: node n = candidate kept[n - 1]
    node_of = torch.where(rank < N - 1, rank + 1, 0)  # [C]: a kept candidate's node
    par = parents[kept]
    parent = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), torch.where(par < 0, 0, node_of[par.clamp(0)])])
    nodes = torch.arange(N, device=dev)
    chain = [nodes]  # chain[d]: each node's ancestor d generations up (the root's is the root): D gathers of [N]
    for _ in range(D):
        chain.append(parent[chain[-1]])
    up = torch.stack(chain, dim=1)  # [N, D+1]
    depth = (up[:, :D] != 0).sum(1)  # [N]: generations to the root
    ancestors = (up[:, :, None] == nodes[None, None, :]).any(1)  # [N, N]: the node itself, the root and between
    j = torch.arange(D + 1, device=dev)
    at_j = up.gather(1, (depth[:, None] - j[None, :]).clamp(min=0))  # [N, D+1]: the path's node at depth j
    return kept, parent, depth, ancestors, torch.where(j[None, :] <= depth[:, None], at_j, nodes[:, None])
