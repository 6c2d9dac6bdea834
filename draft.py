"""The EAGLE-1 draft head and tree drafting.

The head predicts the target's next feature (the post-norm hidden state that feeds the LM head):

    x = fc(concat[embed(t_{i+1}), f_i])           # [S, 2D] -> [S, D], embedding = the target's, frozen
    y = x + Attn(x);  y = y + MLP(norm(y))         # one Llama layer without its input norm, no final norm
    f_{i+1} ~ y,  draft logits = target.output(y)  # the target's own LM head

Draft position i consumes the pair (f_i, t_{i+1}) at RoPE position i. The head's KV cache has a committed region
(slots 0..T-1, one per position, always recomputed from the target's true features of accepted tokens) and a scratch
region (slots T..T+N-2, one per tree node) where tree expansion writes and which is thrown away every round.

Saved as <dir>/model.safetensors + <dir>/config.json ({"args": ModelArgs fields, "fc_bias": bool}).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from model import Block, CheckpointError, ModelArgs, Transformer, rope_table
from tree import Tree


class EagleHead(nn.Module):
    def __init__(self, args: ModelArgs, fc_bias: bool = True):
        super().__init__()
        self.args, self.fc_bias = args, fc_bias
        self.fc = nn.Linear(2 * args.dim, args.dim, bias=fc_bias)
        self.layer = Block(args)
        self.layer.attention_norm = nn.Identity()  # EAGLE-1: the input feature is already normalised
        self.committed_slots = 0
        self.register_buffer("rope", torch.empty(0, 2, args.head_dim), persistent=False)

    def setup_cache(self, committed_slots: int, scratch_slots: int) -> None:
        from model import KVCache  # noqa: PLC0415

        a, p = self.args, self.fc.weight
        slots = committed_slots + scratch_slots
        self.layer.attention.kv_cache = KVCache(1, a.n_kv_heads, slots, a.head_dim, p.dtype).to(p.device)
        self.rope = rope_table(a, slots).to(p.device)
        self.committed_slots = committed_slots

    def forward(self, emb: Tensor, feats: Tensor, input_pos: Tensor, cache_pos: Tensor, mask: Tensor) -> Tensor:
        # emb, feats: [1, S, D]; input_pos, cache_pos: [S]; mask: [1, 1, S, slots] -> predicted features [1, S, D]
        x = self.fc(torch.cat([emb, feats], dim=-1))
        return self.layer(x, self.rope[input_pos], cache_pos, mask)

    def prefill(self, target: Transformer, tokens: Tensor, feats: Tensor) -> None:
        """Fill committed slots 0..S-1 with pairs (feats[i], tokens[i]). tokens: [1, S]; feats: [1, S, D]."""
        pos = torch.arange(tokens.size(1), device=tokens.device)
        slots = torch.arange(self.rope.size(0), device=tokens.device)
        self(target.tok_embeddings(tokens), feats, pos, pos, (slots[None] <= pos[:, None])[None, None])


def draft_tree(head: EagleHead, target: Transformer, tree: Tree, L: Tensor, tokens: Tensor, feats: Tensor,
               n: Tensor) -> Tensor:  # fmt: skip
    """Catch up on the last round's accepted tokens, then expand the tree. Returns the node tokens [N].

    L [1]: committed target length; the root token t_L is tokens[n-1]. tokens [R], feats [R, D] (R = tree.D + 1) and
    n [1]: the pairs (f_{L-n+j}, t_{L-n+j+1}) for j < n. Rows j >= n are padding; they land in slots >= L, which the
    next round overwrites before anything attends to them.
    """
    R, dev = tokens.size(0), tokens.device
    slots = torch.arange(head.rope.size(0), device=dev)  # [slots]
    committed = slots < L  # [slots]

    # 1) Catch-up forward over the accepted pairs: positions/slots L-n .. L-n+R-1, causal.
    pos = L - n + torch.arange(R, device=dev)  # [R]
    y = head(target.tok_embeddings(tokens)[None], feats[None], pos, pos, (slots[None] <= pos[:, None])[None, None])
    last = (n - 1).reshape(1)  # index of the root's pair: [1]
    prev_feats = y[0].index_select(0, last)  # predicted f_L for the root: [1, D]
    prev_ids = torch.topk(target.output(prev_feats), tree.K, dim=-1).indices.flatten()  # [K]

    # 2) Expansion: at step d the depth-d nodes that have children are fed at position L+d-1, each with its parent's
    #    predicted feature, into its own scratch slot; it sees the committed prefix and its scratch ancestors.
    node_tokens = [tokens.index_select(0, last)]  # per depth, in node order
    for d in range(1, tree.D + 1):
        lo, hi = tree.depth_start[d], tree.depth_start[d + 1]
        depth_tokens = prev_ids[tree.child_src[lo:hi]]  # [hi - lo]
        node_tokens.append(depth_tokens)
        if d == tree.D:
            break
        fed = tree.fed[d]  # [F]
        F_ = fed.size(0)
        x_tok = depth_tokens[fed - lo]  # [F]
        x_feat = prev_feats[tree.parent_row[fed]]  # [F, D]
        scratch = head.committed_slots + fed - 1  # [F]
        mask = torch.cat([committed[None].expand(F_, -1)[:, : head.committed_slots], tree.ancestors[fed, 1:]], dim=1)
        pos_d = (L + d - 1).expand(F_)
        y = head(target.tok_embeddings(x_tok)[None], x_feat[None], pos_d, scratch, mask[None, None])[0]  # [F, D]
        prev_feats = y
        prev_ids = torch.topk(target.output(y), tree.K, dim=-1).indices.flatten()  # [F * K]
    return torch.cat(node_tokens)


class HeadError(CheckpointError):
    """A draft head that is missing, unreadable or does not fit the target."""


def save_head(head: EagleHead, folder: str | Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors.tmp"))
    (folder / "model.safetensors.tmp").replace(folder / "model.safetensors")
    cfg = {"args": head.args.to_dict(), "fc_bias": head.fc_bias, **(extra or {})}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


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
    head = EagleHead(args, fc_bias=cfg.get("fc_bias", True))
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise HeadError(f"EAGLE head {folder} does not match its config: {str(e).splitlines()[0]}") from None
    return head.to(device=device, dtype=dtype).eval().requires_grad_(False)
