"""The EAGLE-1 draft head and tree drafting.

The head predicts the target's next feature (the post-norm hidden state that feeds the LM head):

    x = fc(concat[embed(t_{i+1}), f_i])           # [S, 2D] -> [S, D], embedding = the target's, frozen
    y = x + Attn(x);  y = y + MLP(norm(y))         # one Llama layer without its input norm, no final norm
    f_{i+1} ~ y,  draft logits = target.output(y)  # the target's own LM head

Draft position i consumes the pair (f_i, t_{i+1}) at RoPE position i. The head's KV cache has a committed region
(slots 0..T-1, one per position, always recomputed from the target's true features of accepted tokens) and a scratch
region (slots T..T+N-2, one per tree node) where tree expansion writes and which is thrown away every round.

Feature fusion (optional, after EAGLE-3): a head with feature_layers (l_1, ...) also reads the target's residual
stream entering those layers. Where a feature comes from the target (the committed pairs), it is

    g_i = fuse(concat[f_i, norm_1(r_{l_1, i}), ...])  # [S, (1 + k) D] -> [S, D], then x = fc(concat[embed, g_i])

while the tree's deeper steps still feed the head's own predicted feature, as in EAGLE-1. fuse = [I, 0, ...] is
exactly the head without fusion, which is how scripts/train_eagle.py --feature-layers starts from a trained head.

Saved as <dir>/model.safetensors + <dir>/config.json ({"args": ModelArgs fields, "fc_bias": bool, "feature_layers":
[layer indices], absent or empty without fusion}), and optionally
<dir>/draft_vocab.safetensors ({"ids": token ids by decreasing frequency in the training data, "counts"}), written by
scripts/draft_vocab.py, from which `restrict_vocab` takes a draft vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

import kernels
from model import Block, CheckpointError, ModelArgs, RMSNorm, Transformer, rope_table
from tree import DynamicTree, Tree, rank_desc, tree_from_candidates


class EagleHead(nn.Module):
    def __init__(self, args: ModelArgs, fc_bias: bool = True, feature_layers: tuple[int, ...] = ()):
        super().__init__()
        self.args, self.fc_bias, self.feature_layers = args, fc_bias, tuple(feature_layers)
        if list(self.feature_layers) != sorted(set(self.feature_layers)) or min(self.feature_layers, default=0) < 0:
            raise HeadError(f"feature_layers must be distinct layer indices in increasing order: {feature_layers}")
        self.feature_dim = args.dim * (1 + len(self.feature_layers))  # width of the target features it reads
        if self.feature_layers:
            self.tap_norms = nn.ModuleList(RMSNorm(args.dim, args.norm_eps) for _ in self.feature_layers)
            self.fuse = nn.Linear(self.feature_dim, args.dim, bias=False)
        self.fc = nn.Linear(2 * args.dim, args.dim, bias=fc_bias)
        self.layer = Block(args)
        self.layer.attention_norm = nn.Identity()  # EAGLE-1: the input feature is already normalised
        self.committed_slots = 0
        self.register_buffer("rope", torch.empty(0, 2, args.head_dim), persistent=False)
        self.register_buffer("vocab", None, persistent=False)  # draft vocabulary [V'] (restrict_vocab); None = all
        self.register_buffer("vocab_rows", None, persistent=False)  # the target LM head's rows for it: [V', D]
        self.kernel_max_m = 0  # draft-vocabulary logits of up to this many rows through kernels.wmm (use_kernels)

    def setup_cache(self, committed_slots: int, scratch_slots: int) -> None:
        from model import KVCache  # noqa: PLC0415

        a, p = self.args, self.layer.ffn_norm.weight  # a float parameter (fc may hold int8: --draft-quant)
        slots = committed_slots + scratch_slots
        self.layer.attention.kv_cache = KVCache(1, a.n_kv_heads, slots, a.head_dim, p.dtype).to(p.device)
        self.rope = rope_table(a, slots).to(p.device)
        self.committed_slots = committed_slots

    def forward(self, emb: Tensor, feats: Tensor, input_pos: Tensor, cache_pos: Tensor, mask: Tensor) -> Tensor:
        # emb, feats: [1, S, D]; input_pos, cache_pos: [S]; mask: [1, 1, S, slots] -> predicted features [1, S, D]
        return self.step(emb, feats, self.rope[input_pos], cache_pos, mask)

    def target_feature(self, feats: Tensor) -> Tensor:
        """The target's features [..., feature_dim] -> the feature the head consumes [..., D] (fused, if the head has
        feature_layers; else as they are)."""
        if not self.feature_layers:
            return feats
        D = self.args.dim
        parts = [feats[..., :D]] + [n(feats[..., (k + 1) * D : (k + 2) * D]) for k, n in enumerate(self.tap_norms)]
        return self.fuse(torch.cat(parts, dim=-1))

    def step(self, emb: Tensor, feats: Tensor, rope: Tensor, cache_pos: Tensor, mask: Tensor) -> Tensor:
        """forward with the RoPE rows rope [S, 2, hd] given instead of the positions."""
        x = self.fc(torch.cat([emb, feats], dim=-1))
        return self.layer(x, rope, cache_pos, mask)

    def restrict_vocab(self, ids: Tensor | None, target: Transformer) -> None:
        """Draft only among the tokens `ids` [V'] (EAGLE-3's draft vocabulary): each draft step's LM-head product and
        top-k then cover V' instead of V entries. Lossless (the target verifies whatever is drafted); tokens outside
        are never proposed, so tau drops by about the share of the target's tokens they make up. None = all tokens.
        The target's LM-head rows for `ids` are copied once (dequantized if the target's head is quantized)."""
        if ids is None:
            self.vocab = self.vocab_rows = None
            return
        ids = ids.to(device=self.fc.weight.device, dtype=torch.long).sort().values
        self.vocab, self.vocab_rows = ids, lm_head_rows(target, ids, self.layer.ffn_norm.weight.dtype)

    def logits(self, target: Transformer, y: Tensor) -> Tensor:
        """Draft logits for predicted features y [..., D]: over the draft vocabulary [..., V'] if one is set, else the
        target's LM head [..., V]. Map top-k positions back to token ids with `token_ids`."""
        return (
            target.output(y)
            if self.vocab is None
            else kernels.few_token_linear(y, self.vocab_rows, None, self.kernel_max_m)
        )

    def token_ids(self, idx: Tensor) -> Tensor:
        return idx if self.vocab is None else self.vocab[idx]

    def prefill(self, target: Transformer, tokens: Tensor, feats: Tensor) -> None:
        """Fill committed slots 0..S-1 with pairs (feats[i], tokens[i]). tokens: [1, S]; feats: the target's
        [1, S, feature_dim]."""
        pos = torch.arange(tokens.size(1), device=tokens.device)
        slots = torch.arange(self.rope.size(0), device=tokens.device)
        x = self.target_feature(feats)  # [1, S, D]
        self(target.tok_embeddings(tokens), x, pos, pos, (slots[None] <= pos[:, None])[None, None])


def draft_tree(head: EagleHead, target: Transformer, tree: Tree, L: Tensor, tokens: Tensor, feats: Tensor,
               n: Tensor) -> Tensor:  # fmt: skip
    """Catch up on the last round's accepted tokens, then expand the tree. Returns the node tokens [N].

    L [1]: committed target length; the root token t_L is tokens[n-1]. tokens [R], feats [R, F] (R = tree.D + 1,
    F = head.feature_dim) and
    n [1]: the pairs (f_{L-n+j}, t_{L-n+j+1}) for j < n. Rows j >= n are padding; they land in slots >= L, which the
    next round overwrites before anything attends to them.
    """
    R = tokens.size(0)
    rope, slots, mask = round_inputs(head, L, n, R, tree.fed_depth, tree.fed_ancestors)
    # 1) Catch-up: the root's predicted feature, and its top-K children.
    prev_feats, root = catch_up(head, target, tokens, feats, n, rope, slots, mask)
    prev_ids = head.token_ids(top_k(head.logits(target, prev_feats), tree.K)[1]).flatten()  # [K]

    # 2) Expansion: at step d the depth-d nodes that have children (tree.fed[d]) are fed at position L+d-1, each with
    #    its parent's predicted feature, into a scratch slot of its own; each sees the committed prefix and its scratch
    #    ancestors. Their rows of the round's tables: R + tree.fed_start[d] ...
    node_tokens = [root]  # per depth, in node order
    for d in range(1, tree.D + 1):
        lo, hi = tree.depth_start[d], tree.depth_start[d + 1]
        depth_tokens = prev_ids[tree.child_src[lo:hi]]  # [hi - lo]
        node_tokens.append(depth_tokens)
        if d == tree.D:
            break
        fed = tree.fed[d]  # [F]
        x_tok = depth_tokens[fed - lo]  # [F]
        x_feat = prev_feats[tree.parent_row[fed]]  # [F, D]
        a, b = R + tree.fed_start[d], R + tree.fed_start[d + 1]
        y = head.step(target.tok_embeddings(x_tok)[None], x_feat[None], rope[a:b], slots[a:b], mask[None, None, a:b])
        prev_feats = y[0]  # [F, D]
        prev_ids = head.token_ids(top_k(head.logits(target, prev_feats), tree.K)[1]).flatten()  # [F * K]
    return torch.cat(node_tokens)


def round_inputs(head: EagleHead, L: Tensor, n: Tensor, R: int, depth: Tensor,
                 step_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The RoPE rows [R + F, 2, hd], cache slots [R + F] and masks [R (+ F), slots] of all of a round's head passes,
    made once a round (kernels.layer_inputs: each pass then takes a slice, so the compiled round spends no kernels per
    pass on them). Row j < R: catch-up pair j, at position and slot L-n+j, causal. Row R+i: expanded node i, at
    position L+depth[i]-1 in scratch slot committed+i, seeing the committed prefix and the scratch rows step_mask[i]
    [scratch slots] marks; step_mask None: the caller makes the expansion masks (EAGLE-2)."""
    dev, C, F = L.device, head.committed_slots, depth.size(0)
    catch = L - n + torch.arange(R, device=dev)  # [R]
    pos = torch.cat([catch, L - 1 + depth])  # [R + F]
    cache = torch.cat([catch, C + torch.arange(F, device=dev)])  # [R + F]
    slots = torch.arange(head.rope.size(0), device=dev)
    mask = slots[None] <= catch[:, None]  # [R, slots]
    if step_mask is not None:
        mask = torch.cat([mask, torch.cat([(slots[:C] < L)[None].expand(F, -1), step_mask], dim=1)])
    return kernels.layer_inputs(head.rope, pos, cache, mask)


def catch_up(head: EagleHead, target: Transformer, tokens: Tensor, feats: Tensor, n: Tensor, rope: Tensor,
             slots: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Forward over the accepted pairs (rows 0..R-1 of round_inputs' tables). Returns the predicted feature of the
    root [1, D] and the root token [1]."""
    R = tokens.size(0)
    x = head.target_feature(feats)[None]  # [1, R, D]
    y = head.step(target.tok_embeddings(tokens)[None], x, rope[:R], slots[:R], mask[None, None, :R])
    last = (n - 1).reshape(1)  # index of the root's pair: [1]
    return y[0].index_select(0, last), tokens.index_select(0, last)


def draft_dynamic_tree(head: EagleHead, target: Transformer, tree: DynamicTree, L: Tensor, tokens: Tensor,
                       feats: Tensor, n: Tensor) -> tuple[Tensor, ...]:  # fmt: skip
    """EAGLE-2 drafting with constant shapes. Same inputs as draft_tree; returns (node_tokens [N], parent [N],
    depth [N], ancestors [N, N], path_nodes [N, D+1]) for this round's tree.

    Step i (1..D-1) feeds the K frontier nodes (the best K of the previous step's K*K children by cumulative
    log-probability) at position L+i-1 into scratch slots committed+(i-1)K..; each sees the committed prefix and the
    frontier rows it descends from. Every child of every expanded node is a candidate; tree_from_candidates keeps the
    N-1 best.
    """
    K, R, dev = tree.K, tokens.size(0), tokens.device
    committed = (torch.arange(head.committed_slots, device=dev) < L)[None].expand(K, -1)  # [K, committed]
    depth = torch.arange(1, tree.D, device=dev).repeat_interleave(K)  # step i's K frontier rows are at depth i
    rope, slots, mask = round_inputs(head, L, n, R, depth, None)
    root_feat, root = catch_up(head, target, tokens, feats, n, rope, slots, mask)
    f_score, f_tok = (t[0] for t in top_logp(head.logits(target, root_feat), K))  # the frontier: [K]
    f_tok = head.token_ids(f_tok)
    f_feat, f_cand = root_feat.expand(K, -1), torch.arange(K, device=dev)  # parent feature, candidate index
    f_anc = torch.zeros(K, (tree.D - 1) * K, dtype=torch.bool, device=dev)  # scratch rows each frontier row sees
    scores, cand_tokens, parents = [f_score], [f_tok], [torch.full((K,), -1, device=dev)]
    rows, cols = torch.arange(K, device=dev), torch.arange((tree.D - 1) * K, device=dev)
    for i in range(1, tree.D):
        f_anc = f_anc | (cols[None, :] == (i - 1) * K + rows[:, None])  # each row sees itself (elementwise: fuses)
        a = R + (i - 1) * K
        seen = torch.cat([committed, f_anc], dim=1)[None, None]  # [1, 1, K, slots]
        y = head.step(target.tok_embeddings(f_tok)[None], f_feat[None], rope[a : a + K], slots[a : a + K], seen)[0]
        logp, ids = top_logp(head.logits(target, y), K)  # children of each frontier row: [K, K]
        ids = head.token_ids(ids)
        cu = (f_score[:, None] + logp).flatten()  # cumulative log-probability: [K*K]
        offset = K + (i - 1) * K * K  # candidate index of this step's first child
        scores.append(cu)
        cand_tokens.append(ids.flatten())
        parents.append(f_cand.repeat_interleave(K))
        best = rank_desc(cu)[1][:K]  # the next frontier: the K best, best first [K]
        prow = best // K
        f_score, f_tok, f_feat = cu[best], ids.flatten()[best], y[prow]
        f_cand, f_anc = offset + best, f_anc[prow]
    kept, parent, depth, ancestors, path_nodes = tree_from_candidates(torch.cat(scores), torch.cat(parents), tree.N,
                                                                      tree.D)  # fmt: skip
    return (torch.cat([root, torch.cat(cand_tokens)[kept]]), parent, depth, ancestors, path_nodes)


def top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(x, k) over a vocabulary-sized last dim (values and indices, sorted), as two passes: the top k of
    each chunk of at most 1024 entries, then the top k of those. On CUDA torch.topk runs a multi-block radix select
    (about 9 launches) for a few long rows but a one-block kernel per row for many short ones, so this takes 3
    launches per draft step, and one where kernels.chunk_topk does both passes (TRITON_TOPK). Same values; among
    equal values it may pick other indices."""
    return _top_k(x, k, lse=False)[:2]


def top_logp(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most likely tokens of each row and their float32 log-probabilities: top_k of the logits minus the row's
    logsumexp (log_softmax is monotone), without writing out a [rows, V] log-softmax."""
    v, i, lse = _top_k(logits, k, lse=True)
    return v.float() - lse, i


def _top_k(x: Tensor, k: int, lse: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(top_k values in x's dtype, indices, and with lse the rows' float32 logsumexp [..., 1], else None)."""
    V = x.size(-1)
    chunk = min(V & -V, 1024)  # the largest power of two dividing V, at most 1024
    fits = k <= 16 and 128 <= chunk < V and x.numel() // V <= kernels.TOPK_MAX_ROWS
    if kernels.TRITON_TOPK and kernels.available(x) and fits:  # both passes in one Triton launch
        v, i, s = kernels.chunk_topk(x.reshape(-1, V).contiguous(), k, chunk, lse)  # [rows, k], [rows, k], [rows]
        shape = (*x.shape[:-1], k)
        return v.view(shape).to(x.dtype), i.view(shape), s.view(*x.shape[:-1], 1) if lse else None
    s = torch.logsumexp(x.float(), dim=-1, keepdim=True) if lse else None
    if chunk < 128 or V // chunk < 2 or k > chunk:
        return (*torch.topk(x, k, dim=-1), s)
    v1, i1 = torch.topk(x.unflatten(-1, (V // chunk, chunk)), k, dim=-1, sorted=False)  # [..., V/chunk, k]
    i1 = i1 + torch.arange(0, V, chunk, device=x.device)[:, None]
    v2, i2 = torch.topk(v1.flatten(-2), k, dim=-1)  # [..., k]
    return v2, i1.flatten(-2).gather(-1, i2), s


def lm_head_rows(target: Transformer, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """The target's LM-head rows for token ids [V'] as a dense [V', D] tensor of dtype (dequantized where quantize.py
    quantized the head)."""
    out = target.output
    w = out.dequantize(dtype) if hasattr(out, "dequantize") else out.weight
    return w[ids.to(w.device)].to(dtype).contiguous()


def head_tree(spec: str, folder: str | Path) -> str:
    """`--tree head`: the static tree that the head folder's config.json names ({"tree": "FILE"}, a JSON file of paths
    beside it, shaped for this head by scripts/tune_tree.py), or EAGLE-1's 'default' where it names none. Any other
    spec is returned as it is."""
    if spec != "head":
        return spec
    try:
        name = json.loads((Path(folder) / "config.json").read_text()).get("tree")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(Path(folder) / name) if name else "default"


class HeadError(CheckpointError):
    """A draft head that is missing, unreadable or does not fit the target."""


def check_feature_layers(layers: tuple[int, ...], n_layers: int, what: str) -> None:
    """HeadError unless every layer a head fuses (feature_layers) is one of the target's n_layers."""
    if any(not isinstance(i, int) or not 0 <= i < n_layers for i in layers):
        raise HeadError(f"{what} reads the target's layers {list(layers)}, but the target has {n_layers} layers")


def save_head(head: EagleHead, folder: str | Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors.tmp"))
    (folder / "model.safetensors.tmp").replace(folder / "model.safetensors")
    cfg = {"args": head.args.to_dict(), "fc_bias": head.fc_bias, "feature_layers": list(head.feature_layers),
           **(extra or {})}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


VOCAB_FILE = "draft_vocab.safetensors"


def load_draft_vocab(folder: str | Path, size: int, vocab_size: int) -> Tensor:
    """The `size` most frequent token ids of the head's training data (scripts/draft_vocab.py wrote them)."""
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(folder) / VOCAB_FILE
    if not path.is_file():
        raise HeadError(f"no draft vocabulary at {path} (scripts/draft_vocab.py writes one from the training data)")
    try:
        ids = load_file(str(path))["ids"]
    except Exception as e:  # noqa: BLE001
        raise HeadError(f"cannot read {path}: {e}") from None
    if ids.dim() != 1 or ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise HeadError(f"{path} does not fit a vocabulary of {vocab_size} tokens")
    if not 16 <= size <= ids.numel():
        raise HeadError(f"draft vocabulary size {size}: {path} holds {ids.numel()} ids; pick 16 .. {ids.numel()}")
    return ids[:size]


# The draft vocabulary used when none is asked for and the head folder has a vocabulary file with at least this many
# ids. Measured on SmolLM2 (H200, MT-bench, BENCHMARKS.md): tau -1.9%, GPU time per round -7.5%, tok/s +5.5%.
DEFAULT_DRAFT_VOCAB = 16384


def apply_draft_vocab(head: EagleHead, folder: str | Path, size: int | None, target: Transformer) -> int:
    """`--draft-vocab size`: restrict the head to the `size` most frequent ids stored beside it; 0 = all tokens;
    None = DEFAULT_DRAFT_VOCAB if the folder's vocabulary file holds that many ids and the target's vocabulary is
    larger, else all tokens. Returns the size used (0 = all)."""
    if size is None:
        path = Path(folder) / VOCAB_FILE
        if not path.is_file() or target.args.vocab_size <= DEFAULT_DRAFT_VOCAB:
            return 0
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(str(path), "pt") as f:
            held = f.get_slice("ids").get_shape()[0]
        size = DEFAULT_DRAFT_VOCAB if held >= DEFAULT_DRAFT_VOCAB else 0
    if size:
        head.restrict_vocab(load_draft_vocab(folder, size, target.args.vocab_size), target)
    return size


def load_head(folder: str | Path, target_args: ModelArgs, device="cpu", dtype=torch.float32) -> EagleHead:
    from safetensors.torch import load_file  # noqa: PLC0415

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise HeadError(f"no EAGLE head at {folder} (need config.json and model.safetensors)")
    try:
        cfg = json.loads((folder / "config.json").read_text())
        args = ModelArgs.from_dict(cfg["args"])
        sd = load_file(str(folder / "model.safetensors"))
    except Exception as e:  # noqa: BLE001
        raise HeadError(f"cannot read EAGLE head {folder}: {e}") from None
    if args.dim != target_args.dim or args.vocab_size != target_args.vocab_size:
        raise HeadError(f"EAGLE head {folder} (dim {args.dim}, vocab {args.vocab_size}) does not fit the target "
                        f"(dim {target_args.dim}, vocab {target_args.vocab_size})")  # fmt: skip
    layers = tuple(cfg.get("feature_layers") or ())
    check_feature_layers(layers, target_args.n_layers, f"EAGLE head {folder}")
    head = EagleHead(args, fc_bias=cfg.get("fc_bias", True), feature_layers=layers)
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise HeadError(f"EAGLE head {folder} does not match its config: {str(e).splitlines()[0]}") from None
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)
