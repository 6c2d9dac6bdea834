"""Train an EAGLE-1 draft head for a checkpoint on make_eagle_data.py output and/or ShareGPT conversations.

    python scripts/train_eagle.py --checkpoint checkpoints/SmolLM2-135M-Instruct --data data/eagle_smollm2.pt \\
        --out heads/SmolLM2-135M-Instruct

The target stays frozen; its features f (post-norm hidden states) are computed per batch with a cache-free causal
forward. Draft position i consumes (f_i + noise, t_{i+1}) and predicts f_{i+1} (see draft.py). Per position i
whose next-next token t_{i+2} is an assistant token:

    loss_i = w_f * SmoothL1(f_hat_{i+1}, f_{i+1}) (mean over D)
             + w_ce * CE(softmax(lm_head(f_{i+1})) as teacher, log_softmax(lm_head(f_hat_{i+1})))

with EAGLE-1's weights w_f = 1 and w_ce = 0.1 by default (--feature-weight, --ce-weight). EAGLE-3 drops the feature
term and trains the token distribution alone over several unrolled steps; --feature-weight 0.1 --ce-weight 1
--ttt-steps 4 moves this head that way while keeping its architecture. --feature-layers 2,15 adds EAGLE-3's other
change, feature fusion (draft.py): the head also reads the target's residual streams entering those layers.
--draft-vocab N trains the cross-entropy over the N most frequent answer tokens only (the --init head's
draft_vocab.safetensors), as generate.py drafts by default: on SmolLM2 a third of the logits, which is where most of
a batch's GPU time goes (element-wise passes over [positions, vocabulary]).

Noise: uniform in [-noise, noise] (default 0.1, about 5% of SmolLM2's feature RMS) on the input features only;
unlike the official code it does not scale with 512 / sequence length. --ttt-steps k adds k unrolled steps
("training-time test"): step j feeds the head's own step j-1 output as the feature, at RoPE position i + j,
attending to step 0's keys at positions <= i and to its own chain's keys of steps 1..j, with weight 0.8^j; this is
exactly what a drafted chain sees at inference.

Each epoch logs the training loss and, on a 5% held-out split (by conversation): the step-0 loss, the top-1 draft
accuracy per unrolled step (draft argmax == target argmax) and tau_chain: 1 + the mean number of leading correct
steps of a --eval-steps chain started at every scored position (the tokens fed are the data's, so it estimates a
greedy chain's acceptance). The head is saved after every epoch (draft.save_head) and when --max-minutes runs out.
AdamW (betas 0.9/0.95), gradient-norm clipping, linear warmup, cosine decay to 10% of the peak lr.
Every user error prints one line `error: ...` on stderr and exits with status 2.

Several GPUs (data parallel): `torchrun --nproc_per_node 4 scripts/train_eagle.py ...`. Every process builds the same
batches and takes every n-th (--batch-tokens is per GPU), the gradients are averaged over the processes after each
backward (one all-reduce), and the clock that drives --max-minutes and the lr is the slowest process's, so all stop
together and step alike. Process 0 evaluates, logs and saves. On the CPU (tests) the processes talk through gloo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from draft import (  # noqa: E402
    VOCAB_FILE,
    EagleHead,
    HeadError,
    check_feature_layers,
    head_tree,
    lm_head_rows,
    load_draft_vocab,
    load_head,
    save_head,
)
from model import Attention, Block, CheckpointError, ModelArgs, Transformer, apply_rope, load_model, rope_table  # noqa: E402
from tokenizer import Tokenizer, TokenizerError, load_tokenizer  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))  # the sibling script that cuts the chat template
from make_eagle_data import cut_template  # noqa: E402

STEP_DECAY = 0.8  # the weight of unrolled step j is STEP_DECAY**j
PAD_TO = 16  # batch lengths are rounded up to this
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "system": "system"}  # fmt: skip


class UserError(Exception):
    """Bad input: one line on stderr, exit 2."""


# ---------------------------------------------------------------------------------------------------------------
# Cache-free forwards over whole sequences (the modules of model.py, no KV cache).


def qkv(attn: Attention, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x: [B, S, D], rope [S, 2, hd] -> q [B, H, S, hd], k and v [B, KV, S, hd] (q and k rotated)."""
    B, S, _ = x.shape
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.wqkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
    q = apply_rope(q.view(B, S, H, hd).transpose(1, 2), rope)
    k = apply_rope(k.view(B, S, KV, hd).transpose(1, 2), rope)
    return q, k, v.view(B, S, KV, hd).transpose(1, 2)


def merge_heads(attn: Attention, y: Tensor) -> Tensor:
    """y: [B, H, S, hd] -> the output projection [B, S, D]."""
    B, H, S, hd = y.shape
    return attn.wo(y.transpose(1, 2).reshape(B, S, H * hd))


def causal_block(layer: Block, x: Tensor, rope: Tensor) -> Tensor:
    """model.Block.forward with a plain causal mask over the sequence. x: [B, S, D]."""
    attn = layer.attention
    q, k, v = qkv(attn, layer.attention_norm(x), rope)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.n_heads != attn.n_kv_heads)
    h = x + merge_heads(attn, y)
    return h + layer.feed_forward(layer.ffn_norm(h))


def target_features(model: Transformer, tokens: Tensor, rope: Tensor, taps: tuple[int, ...] = ()) -> Tensor:
    """tokens: [B, S] at positions 0..S-1 -> the features a head with feature_layers `taps` reads [B, S, F]
    (model.hidden without the cache): the post-norm hidden state, then the residual streams entering those layers."""
    x, tapped = model.tok_embeddings(tokens), []
    for i, layer in enumerate(model.layers):
        if i in taps:
            tapped.append(x)
        x = causal_block(layer, x, rope[: tokens.size(1)])
    return torch.cat([model.norm(x), *tapped], dim=-1)


def chain_attention(q: Tensor, k0: Tensor, v0: Tensor, chain: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Step-j attention of the unrolled head: query i sees step 0's keys <= i and the chain's own keys at i.

    q: [B, H, S, hd]; k0, v0: [B, KV, S, hd] (step 0); chain: j (k, v) pairs [B, KV, S, hd] of steps 1..j.
    -> [B, H, S, hd]
    """
    B, H, S, hd = q.shape
    KV = k0.size(1)
    qg = q.reshape(B, KV, H // KV, S, hd)  # query head h reads kv head h // G
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    s0 = torch.einsum("bkgsd,bktd->bkgst", qg, k0).float().masked_fill(~causal, float("-inf"))  # [B, KV, G, S, S]
    kc, vc = torch.stack([k for k, _ in chain], 3), torch.stack([v for _, v in chain], 3)  # [B, KV, S, j, hd]
    sc = torch.einsum("bkgsd,bksjd->bkgsj", qg, kc).float()  # [B, KV, G, S, j]
    p = (torch.cat([s0, sc], -1) * hd**-0.5).softmax(-1).to(v0.dtype)
    y = torch.einsum("bkgst,bktd->bkgsd", p[..., :S], v0) + torch.einsum("bkgsj,bksjd->bkgsd", p[..., S:], vc)
    return y.reshape(B, H, S, hd)


def head_unrolled(head: EagleHead, emb: Tensor, feats: Tensor, rope: Tensor, steps: int) -> list[Tensor]:
    """The head's training forward: step 0 over pairs (feats[i], emb[i]) at positions i, then steps 1..steps-1.

    emb: [B, S, D], the embedding of t_{i+1} at index i (steps j > 0 use emb shifted left by j); feats: the target's
    [B, S, F] (F = head.feature_dim; fused into [B, S, D] for step 0);
    rope: [S + steps - 1, 2, hd]. Returns per step the predicted features [B, S, D]: step j at index i predicts
    f_{i+j+1} from (its step j-1 prediction, t_{i+j+1}) at RoPE position i + j.
    """
    S, layer = feats.size(1), head.layer
    attn = layer.attention
    outs, kv0, chain = [], None, []
    x_feat = head.target_feature(feats)
    for j in range(steps):
        x = head.fc(torch.cat([shift(emb, j), x_feat], dim=-1))  # [B, S, D]
        q, k, v = qkv(attn, layer.attention_norm(x), rope[j : j + S])
        if j == 0:
            kv0 = (k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.n_heads != attn.n_kv_heads)
        else:
            chain.append((k, v))
            y = chain_attention(q, *kv0, chain)
        h = x + merge_heads(attn, y)
        x_feat = h + layer.feed_forward(layer.ffn_norm(h))
        outs.append(x_feat)
    return outs


def shift(x: Tensor, n: int) -> Tensor:
    """x[:, i] <- x[:, i + n], zero past the end. x: [B, S, ...]."""
    if n == 0:
        return x
    return torch.cat([x[:, n:], torch.zeros_like(x[:, :n])], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Loss and metrics of one batch.


def batch_loss(target: Transformer, head: EagleHead, tokens: Tensor, mask: Tensor, feats: Tensor, rope: Tensor,
               steps: int, noise: float, gen: torch.Generator | None, weights: tuple[float, float] = (1.0, 0.1),
               vocab: Tensor | None = None) -> tuple[Tensor, dict]:  # fmt: skip
    """tokens, mask: [B, S] (mask: t is an assistant token); feats: the target's [B, S, F]; weights: (feature,
    cross-entropy); vocab: sorted token ids [V'] of a draft vocabulary (None: all V) -> (weighted loss, per-step
    sums for metrics).

    Scored positions: i with mask[i + 2] (step 0). Step j scores the same chains, at those i where mask[i + j + 2].
    The teacher of step j at chain i is the target's distribution at position i + j + 1, the same table for every
    step: it is computed once, at the positions q whose next token is scored (mask[q + 1]).
    With a draft vocabulary the draft's logits cover V' only (as generate.py --draft-vocab drafts), the teacher's
    probabilities are those of the full softmax at V' (they sum to mass <= 1), the cross-entropy is
    sum_v p_v * (logsumexp(draft) - draft_v) over V' (minimized by the draft matching p restricted to V'), and a step
    is correct iff the draft's argmax in V' is the target's argmax over all V.
    """
    D = head.args.dim
    need = shift(mask, 1)  # [B, S]: position q's distribution is read by some step
    with torch.no_grad():
        logits = target.output(feats[..., :D][need]).float()  # [Q, V]
        teacher_top = logits.argmax(-1)  # [Q]
        probs = logits.softmax(-1)  # [Q, V]
        if vocab is not None:
            probs = probs[:, vocab]  # [Q, V']
        del logits
    row = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    row[need] = torch.arange(probs.size(0), device=mask.device)  # [B, S]: index into probs, -1 = not read
    rows = None if vocab is None else lm_head_rows(target, vocab, feats.dtype)  # [V', D]
    emb = shift(target.tok_embeddings(tokens), 1)  # t_{i+1} at index i
    x0 = feats
    if noise > 0 and gen is not None:
        x0 = feats + (torch.rand(feats.shape, generator=gen, device=feats.device) * 2 - 1) * noise
    preds = head_unrolled(head, emb, x0, rope, steps)
    sel = shift(mask, 2)  # [B, S]: chains to score
    total = torch.zeros((), device=tokens.device)
    sums: list[Tensor] = []  # per step: loss sum, scored count, correct count (one host sync at the end)
    chain_ok = torch.ones(int(sel.sum()), dtype=torch.bool, device=tokens.device)  # [chains]: all steps right
    accepted = torch.zeros_like(chain_ok, dtype=torch.long)
    for j, pred in enumerate(preds):
        r = shift(row, j + 1)[sel]  # [M]: teacher row of step j's target, -1 where t_{i+j+2} is not scored
        valid = r >= 0  # == shift(mask, j + 2)[sel]
        r = r.clamp(min=0)
        p, f = pred[sel].float(), shift(feats[..., :D], j + 1)[sel].float()  # [M, D]
        draft = (target.output(p) if rows is None else F.linear(p, rows)).float()  # [M, V or V']
        teacher = probs[r]  # [M, V or V']
        mass = 1.0 if vocab is None else teacher.sum(-1)
        reg = F.smooth_l1_loss(p, f, reduction="none").mean(-1)  # [M]
        ce = mass * torch.logsumexp(draft, -1) - (teacher * draft).sum(-1)  # soft cross-entropy: [M]
        per_pos = (weights[0] * reg + weights[1] * ce) * valid
        n = valid.sum()
        loss_j = per_pos.sum() / n.clamp(min=1)
        total = total + STEP_DECAY**j * loss_j
        top = draft.argmax(-1) if vocab is None else vocab[draft.argmax(-1)]
        correct = (top == teacher_top[r]) & valid
        chain_ok &= correct
        accepted += chain_ok
        sums.append(torch.stack([per_pos.sum().detach().double(), n.double(), correct.sum().double()]))
    loss_sum, n_sum, correct_sum = torch.stack(sums).T.tolist()
    stats = {"loss": loss_sum, "n": [int(x) for x in n_sum], "correct": [int(x) for x in correct_sum],
             "chains": chain_ok.numel(), "accepted": int(accepted.sum())}  # fmt: skip
    return total, stats


# ---------------------------------------------------------------------------------------------------------------
# Data: generated files and ShareGPT, as (tokens, loss mask) per conversation.


@dataclass
class Conversations:
    tokens: Tensor  # int32 [N]
    mask: Tensor  # bool [N]: assistant tokens (the loss is on positions predicting them)
    offsets: Tensor  # int64 [n + 1]

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]


def load_generated(path: str, vocab_size: int) -> Conversations:
    if not Path(path).is_file():
        raise UserError(f"data file not found: {path}")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        c = Conversations(d["tokens"].to(torch.int32), d["loss_mask"].bool(), d["offsets"].long())
    except Exception as e:  # noqa: BLE001 - a wrong file can raise many things
        raise UserError(f"{path} is not a make_eagle_data.py file: {str(e).splitlines()[0] if str(e) else e}") from None
    if len(c.tokens) != len(c.mask) or int(c.offsets[-1]) != len(c.tokens):
        raise UserError(f"{path}: tokens, loss_mask and offsets do not agree")
    if len(c.tokens) and int(c.tokens.max()) >= vocab_size:
        raise UserError(f"{path} has token ids >= the checkpoint's vocab ({vocab_size}): made for another model?")
    return c


def encode_chat(tok: Tokenizer, messages: list[dict], eot_text: str) -> tuple[list[int], list[int]] | None:
    """Tokenize a conversation with the chat template, message by message -> (ids, mask), mask 1 on each assistant
    message's content and its end-of-turn token. None when the template does not render it incrementally."""
    ids, mask, prev = [], [], ""
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            head = tok.render_chat(messages[:k], add_generation_prompt=True)
            if not head.startswith(prev):
                return None
            part = tok.encode(head[len(prev) :])
            ids, mask, prev = ids + part, mask + [0] * len(part), head
        text = tok.render_chat(messages[: k + 1], add_generation_prompt=False)
        if not text.startswith(prev):
            return None
        piece, cut = text[len(prev) :], len(text[len(prev) :])
        if m["role"] == "assistant":
            end = piece.find(eot_text)
            if end < 0:
                return None
            cut = end + len(eot_text)
        body, rest = tok.encode(piece[:cut]), tok.encode(piece[cut:])
        ids += body + rest
        mask += [int(m["role"] == "assistant")] * len(body) + [0] * len(rest)
        prev = text
    return ids, mask


def load_sharegpt(path: str, tok: Tokenizer, vocab_size: int, max_len: int) -> Conversations:
    """JSONL (or a JSON list) of {"conversations": [{"from": "human"|"gpt"|..., "value": str}, ...]}."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"ShareGPT file not found: {path}")
    text = p.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(s) for s in text.splitlines() if s]
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSONL / JSON: {e}") from None
    eot_text = tok.decode([cut_template(tok, vocab_size).eot])
    all_ids, all_mask, lengths, skipped = [], [], [], 0
    for row in tqdm(rows, desc=f"tokenizing {p.name}", unit="conv", dynamic_ncols=True):
        turns = row.get("conversations") if isinstance(row, dict) else None
        try:
            messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns or []]
            enc = encode_chat(tok, messages, eot_text) if any(m["role"] == "assistant" for m in messages) else None
        except Exception:  # noqa: BLE001 - unknown roles, missing keys, template errors
            enc = None
        if enc is None or not any(enc[1][2:max_len]):
            skipped += 1
            continue
        ids, mask = enc[0][:max_len], enc[1][:max_len]
        all_ids += ids
        all_mask += mask
        lengths.append(len(ids))
    log(f"{path}: {len(lengths)} conversations, {skipped} skipped (no assistant turn, bad roles, template errors)")
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths, dtype=torch.long).cumsum(0)])
    return Conversations(torch.tensor(all_ids, dtype=torch.int32), torch.tensor(all_mask, dtype=torch.bool), offsets)


def concat(parts: list[Conversations]) -> Conversations:
    offsets, base = [torch.zeros(1, dtype=torch.long)], 0
    for c in parts:
        offsets.append(c.offsets[1:] + base)
        base += len(c.tokens)
    return Conversations(torch.cat([c.tokens for c in parts]), torch.cat([c.mask for c in parts]), torch.cat(offsets))


def make_batches(data: Conversations, ids: list[int], batch_tokens: int, max_len: int,
                 g: torch.Generator | None) -> list[list[int]]:  # fmt: skip
    """Group conversations of similar length: batches of at most batch_tokens padded tokens, in random order
    (g) or as given (g None)."""
    lengths = data.lengths().clamp(max=max_len).tolist()
    order = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()] if g is not None else list(ids)
    batches = []
    mean_len = max(1.0, sum(lengths[i] for i in ids) / max(1, len(ids)))
    window = max(1, int(64 * batch_tokens / mean_len))  # sort by length within windows of ~64 batches
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: -lengths[i])
        batch: list[int] = []
        for i in chunk:
            if batch and (len(batch) + 1) * round_up(lengths[batch[0]], PAD_TO) > batch_tokens:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    if g is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def collate(data: Conversations, batch: list[int], max_len: int, device) -> tuple[Tensor, Tensor]:
    """-> tokens [B, S] (long, padded with 0), mask [B, S] (bool, False on padding); S rounded up to PAD_TO."""
    spans = [(int(data.offsets[i]), min(int(data.offsets[i + 1]), int(data.offsets[i]) + max_len)) for i in batch]
    S = round_up(max(b - a for a, b in spans), PAD_TO)
    tokens = torch.zeros(len(batch), S, dtype=torch.long)
    mask = torch.zeros(len(batch), S, dtype=torch.bool)
    for r, (a, b) in enumerate(spans):
        tokens[r, : b - a] = data.tokens[a:b]
        mask[r, : b - a] = data.mask[a:b]
    return tokens.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


# ---------------------------------------------------------------------------------------------------------------
# Training.


def new_head(target: Transformer, init: str, feature_layers: tuple[int, ...] | None = None) -> EagleHead:
    """A fresh head shaped like one layer of the target; init "last-layer" copies the target's last layer, and any
    other init names a saved head to train further (in float32). feature_layers (None: the init head's, or none) adds
    feature fusion (draft.py): a head without it gains fuse = [I, 0, ...], so that it starts out unchanged."""
    if init not in ("random", "last-layer"):
        try:
            head = load_head(init, target.args, dtype=torch.float32).requires_grad_(True)
        except HeadError as e:
            raise UserError(f"--init: {e}") from None
    else:
        head = EagleHead(ModelArgs(**{**target.args.to_dict(), "n_layers": 1}), fc_bias=True)
        if init == "last-layer":
            sd = {k: v.float() for k, v in target.layers[-1].state_dict().items() if not k.startswith("attention_norm")}
            head.layer.load_state_dict(sd, strict=True)
    if feature_layers is None or tuple(feature_layers) == head.feature_layers:
        return head
    if head.feature_layers:
        raise UserError(f"--feature-layers {list(feature_layers)}: the --init head already fuses layers "
                        f"{list(head.feature_layers)}")  # fmt: skip
    try:
        check_feature_layers(tuple(feature_layers), target.args.n_layers, "the head")
        fused = EagleHead(head.args, head.fc_bias, tuple(feature_layers))
    except HeadError as e:
        raise UserError(f"--feature-layers: {e}") from None
    fused.load_state_dict(head.state_dict(), strict=False)  # all but fuse and tap_norms
    D = head.args.dim
    with torch.no_grad():
        fused.fuse.weight.zero_()
        fused.fuse.weight[:, :D] = torch.eye(D)
    return fused


def draft_vocab(a: argparse.Namespace, vocab_size: int, device: torch.device) -> Tensor | None:
    """--draft-vocab N: the N most frequent ids of the --init head's draft_vocab.safetensors, sorted; None for 0."""
    if not a.draft_vocab:
        return None
    if a.init in ("random", "last-layer"):
        raise UserError("--draft-vocab reads draft_vocab.safetensors beside the --init head: give --init HEAD_DIR")
    try:
        return load_draft_vocab(a.init, a.draft_vocab, vocab_size).to(device).sort().values
    except HeadError as e:
        raise UserError(f"--draft-vocab: {e}") from None


def keep_init_files(init: str, out: str) -> dict:
    """A head trained further keeps its init's draft vocabulary file (statistics of the same kind of data) and the
    static tree file its config names (draft.head_tree; shaped for a close relative of the new head). Returns the
    config entries that go with them: {"tree": FILE} or {}."""
    if init in ("random", "last-layer"):
        return {}
    tree = head_tree("head", init)
    names = [VOCAB_FILE] + ([Path(tree).name] if tree != "default" else [])
    Path(out).mkdir(parents=True, exist_ok=True)
    for name in names:
        src, dst = Path(init) / name, Path(out) / name
        if src.is_file() and not dst.is_file():
            shutil.copyfile(src, dst)
    return {"tree": Path(tree).name} if tree != "default" and (Path(out) / Path(tree).name).is_file() else {}


@dataclass
class Ranks:
    """This process's place among the data-parallel ones (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    def mean_grads(self, params: list[Tensor]) -> None:
        """Average the gradients over the processes: one all-reduce of them all, flattened."""
        if self.world == 1:
            return
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def share(self, params: list[Tensor]) -> None:
        """Every process starts from process 0's weights."""
        if self.world == 1:
            return
        for p in params:
            dist.broadcast(p.data, 0)

    def slowest(self, seconds: float, device: torch.device) -> float:
        """The largest of the processes' values (their elapsed time), so that all take the same lr and stop alike."""
        if self.world == 1:
            return seconds
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def check_in_sync(self, params: list[Tensor]) -> None:
        """Every process must hold the same weights (same averaged gradients, same lr): compare checksums."""
        if self.world == 1:
            return
        x = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()]) for p in params])
        lo, hi = x.clone(), x.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError("data-parallel processes hold different head weights")


def start_ranks(a: argparse.Namespace) -> tuple[Ranks, torch.device]:
    """torchrun's WORLD_SIZE / RANK / LOCAL_RANK: join the process group (NCCL on CUDA, gloo on the CPU) and take
    this process's GPU. Without them: one process, check_args' device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = check_args(a)
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(f"{world} processes per node, but only {torch.cuda.device_count()} CUDA GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), world), device


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% of the peak as progress goes from 0 to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(target: Transformer, head: EagleHead, data: Conversations, batches: list[list[int]], a, rope: Tensor,
             device: torch.device) -> dict:  # fmt: skip
    """Held-out metrics: step-0 loss, top-1 accuracy per unrolled step, tau_chain (see the module docstring)."""
    head.eval()
    steps = max(a.eval_steps, a.ttt_steps + 1)
    loss = [0.0] * steps
    n, correct, chains, accepted = [0] * steps, [0] * steps, 0, 0
    for batch in batches:
        tokens, mask = collate(data, batch, a.max_len, device)
        with autocast(device):
            feats = target_features(target, tokens, rope, head.feature_layers)
            _, s = batch_loss(target, head, tokens, mask, feats, rope, steps, 0.0, None, a.weights, a.vocab)
        loss = [x + y for x, y in zip(loss, s["loss"], strict=True)]
        n = [x + y for x, y in zip(n, s["n"], strict=True)]
        correct = [x + y for x, y in zip(correct, s["correct"], strict=True)]
        chains, accepted = chains + s["chains"], accepted + s["accepted"]
    head.train()
    return {"loss": loss[0] / max(n[0], 1), "acc": [round(c / max(k, 1), 4) for c, k in zip(correct, n, strict=True)],
            f"tau_chain{steps}": 1 + accepted / max(chains, 1), "positions": n[0]}  # fmt: skip


def train(target: Transformer, head: EagleHead, data: Conversations, a, device: torch.device,
          ranks: Ranks | None = None) -> dict:  # fmt: skip
    """The training loop. Saves the head after every epoch; returns the training record saved with it. With several
    processes (ranks) each takes every world-th batch; process 0 evaluates and saves."""
    ranks = ranks or Ranks()
    g = torch.Generator().manual_seed(a.seed)
    perm = torch.randperm(len(data), generator=g).tolist()
    n_held = max(1, round(len(data) * a.holdout)) if len(data) > 1 else 0
    held, train_ids = sorted(perm[:n_held]), perm[n_held:]
    held_batches = make_batches(data, held, a.batch_tokens, a.max_len, None)
    steps = a.ttt_steps + 1
    rope = rope_table(head.args, a.max_len + max(a.eval_steps, steps) + PAD_TO).to(device)
    noise_gen = torch.Generator(device).manual_seed(a.seed + ranks.rank)
    params = [p for p in head.parameters() if p.requires_grad]
    ranks.share(params)
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay)
    per_epoch = len(make_batches(data, train_ids, a.batch_tokens, a.max_len, torch.Generator().manual_seed(0)))
    if per_epoch < ranks.world:
        raise UserError(
            f"{per_epoch} training batches cannot feed {ranks.world} processes: more data or fewer processes"
        )
    total_steps = per_epoch // ranks.world * a.epochs
    warmup = max(1, min(a.warmup, total_steps // 10))
    t0 = time.perf_counter()

    def progress(step: int, elapsed: float) -> float:  # through the schedule: by steps, or by time if shorter
        by_time = elapsed / (60 * a.max_minutes) if a.max_minutes else 0.0
        return max((step - warmup) / max(1, total_steps - warmup), by_time)

    lead = ranks.rank == 0

    record = {"command": "python scripts/train_eagle.py " + shlex.join(a.argv), "data": a.data,
              "sharegpt": a.sharegpt, "epochs": a.epochs, "lr": a.lr, "batch_tokens": a.batch_tokens,
              "ttt_steps": a.ttt_steps, "feature_layers": list(head.feature_layers), "feature_weight": a.weights[0],
              "ce_weight": a.weights[1], "draft_vocab": a.draft_vocab, "init": a.init,
              "noise": a.noise, "seed": a.seed, "max_len": a.max_len,
              "conversations": len(data), "processes": ranks.world,
              "train_conversations": len(train_ids), "heldout_conversations": len(held),
              "tokens": len(data.tokens), "assistant_tokens": int(data.mask.sum()), "history": []}  # fmt: skip
    ev = evaluate(target, head, data, held_batches, a, rope, device) if lead else {}
    if lead:
        log(f"epoch 0: held-out {fmt(ev)}")
    record["history"].append({"epoch": 0, "heldout": ev})
    step = 0
    for epoch in range(1, a.epochs + 1):
        t_epoch = time.perf_counter()
        batches = make_batches(data, train_ids, a.batch_tokens, a.max_len, g)  # the same on every process
        batches = batches[ranks.rank : len(batches) // ranks.world * ranks.world : ranks.world]  # this one's share
        bar = tqdm(batches, desc=f"epoch {epoch}/{a.epochs}", unit="batch", dynamic_ncols=True, disable=not lead)
        sums, count, tokens_seen, out_of_time = 0.0, 0, 0, False
        for batch in bar:
            elapsed = ranks.slowest(time.perf_counter() - t0, device)
            if a.max_minutes and elapsed > 60 * a.max_minutes:
                out_of_time = True
                break
            tokens, mask = collate(data, batch, a.max_len, device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, progress(step, elapsed), a.lr, warmup)
            with autocast(device):
                with torch.no_grad():
                    feats = target_features(target, tokens, rope, head.feature_layers)  # [B, S, F]
                loss, s = batch_loss(
                    target, head, tokens, mask, feats, rope, steps, a.noise, noise_gen, a.weights, a.vocab
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            ranks.mean_grads(params)
            torch.nn.utils.clip_grad_norm_(params, a.clip)
            opt.step()
            step += 1
            sums, count, tokens_seen = sums + loss.item(), count + 1, tokens_seen + tokens.numel()
            bar.set_postfix(loss=f"{sums / count:.4f}", acc=f"{s['correct'][0] / max(s['n'][0], 1):.3f}",
                            lr=f"{opt.param_groups[0]['lr']:.1e}")  # fmt: skip
        bar.close()
        ranks.check_in_sync(params)
        tok_s = tokens_seen * ranks.world / (time.perf_counter() - t_epoch)  # all processes (process 0's count)
        if not lead:  # process 0 evaluates and saves; the others go on to the next epoch's first all-reduce
            if out_of_time:
                break
            continue
        ev = evaluate(target, head, data, held_batches, a, rope, device)
        minutes = (time.perf_counter() - t0) / 60
        log(f"epoch {epoch}: train loss {sums / max(count, 1):.4f} over {count} batches ({tok_s:.0f} padded tok/s), "
            f"held-out {fmt(ev)}, {minutes:.1f} min" + (" (out of time)" if out_of_time else ""))  # fmt: skip
        record["history"].append({"epoch": epoch, "train_loss": sums / max(count, 1), "batches": count, "heldout": ev,
                                  "tokens_per_s": round(tok_s), "minutes": round(minutes, 2),
                                  "stopped_early": out_of_time})  # fmt: skip
        record.update(epochs_done=epoch, final=ev, minutes=round(minutes, 2))
        save_head(head, a.out, extra={**keep_init_files(a.init, a.out), "training": record})
        if out_of_time:
            break
    return record


def fmt(ev: dict) -> str:
    tau = next(f"{k} {v:.3f}" for k, v in ev.items() if k.startswith("tau_chain"))
    return f"loss {ev['loss']:.4f}, acc {ev['acc']}, {tau}"


# ---------------------------------------------------------------------------------------------------------------
# The CLI.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the target: checkpoint folder (config.json + model.pth)")
    p.add_argument("--data", default=None, help="make_eagle_data.py output file(s), comma-separated")
    p.add_argument("--sharegpt", default=None, help="ShareGPT-style JSONL, tokenized with the chat template")
    p.add_argument("--out", required=True, help="folder for the head (config.json + model.safetensors)")
    p.add_argument("--epochs", type=int, default=6, help="passes over the training split (6)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps, then cosine to 10%% (200)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (1.0)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per batch (16384)")
    p.add_argument("--max-len", type=int, default=2048, help="conversations are cut to this many tokens (2048)")
    p.add_argument("--noise", type=float, default=0.1, help="uniform noise half-width on input features (0.1)")
    p.add_argument("--ttt-steps", type=int, default=2, help="extra unrolled steps trained (training-time test; 2)")
    p.add_argument(
        "--feature-weight",
        type=float,
        default=1.0,
        help="weight of the Smooth-L1 loss on the predicted feature (1.0, EAGLE-1's)",
    )
    p.add_argument(
        "--ce-weight",
        type=float,
        default=0.1,
        help="weight of the cross-entropy against the target's next-token distribution (0.1, EAGLE-1's)",
    )
    p.add_argument("--feature-layers", type=layer_list, default=None, metavar="L,L,...",
                   help="fuse the target's residual streams entering these layers into the head's input\n"
                        "feature (draft.py; after EAGLE-3, which reads layers 2, L/2 and L-3). A head given by\n"
                        "--init without fusion starts with fuse = [I, 0, ...], i.e. unchanged. Default: the\n"
                        "--init head's")  # fmt: skip
    p.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                   help="train the draft's token distribution over the N most frequent answer tokens only, as\n"
                        "generate.py --draft-vocab N drafts (draft_vocab.safetensors of the --init head):\n"
                        "a third of the logits for N = 16384 on SmolLM2. Accuracies and tau_chain then count\n"
                        "a step right iff the draft's pick there is the target's token. 0 = all (0)")  # fmt: skip
    p.add_argument("--eval-steps", type=int, default=5, help="chain length of the held-out tau estimate (5)")
    p.add_argument("--init", default="random",
                   help="head layer: random (default), last-layer = a copy of the target's last layer (slower start:\n"
                        "its output has the residual stream's scale, not the normed feature's), or a head folder to\n"
                        "train further (e.g. heads/SmolLM2-135M-Instruct with new data and a lower --lr)")  # fmt: skip
    p.add_argument("--holdout", type=float, default=0.05, help="held-out share of the conversations (0.05)")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop (evaluate, save) after this many minutes; the lr decay then also follows the clock,\n"
                        "so that it ends annealed (and the run is no longer deterministic). 0 = no limit")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    return p.parse_args(argv)


def layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of layer indices: {text!r}") from None
    return layers


def check_args(a: argparse.Namespace) -> torch.device:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available")
    if not a.data and not a.sharegpt:
        raise UserError("give training data: --data FILE[,FILE...] and/or --sharegpt JSONL")
    if a.draft_vocab < 0:
        raise UserError("--draft-vocab must be >= 0 (0 = all tokens)")
    if a.epochs < 1 or a.lr <= 0 or a.batch_tokens < 1 or a.max_len < 4 or a.ttt_steps < 0 or a.eval_steps < 1:
        raise UserError("need --epochs >= 1, --lr > 0, --batch-tokens >= 1, --max-len >= 4, --ttt-steps >= 0, "
                        "--eval-steps >= 1")  # fmt: skip
    if a.feature_weight < 0 or a.ce_weight < 0 or a.feature_weight + a.ce_weight == 0:
        raise UserError("--feature-weight and --ce-weight must be >= 0 and not both 0")
    a.weights = (a.feature_weight, a.ce_weight)
    if a.batch_tokens < a.max_len:
        a.max_len = a.batch_tokens  # a batch must hold one conversation
    if not 0 <= a.holdout < 1:
        raise UserError("--holdout must be in [0, 1)")
    return device


def main(argv=None) -> dict:
    a = parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else list(argv)
    ranks = Ranks()
    try:
        ranks, device = start_ranks(a)
        torch.manual_seed(a.seed)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        target = load_model(a.checkpoint, device=device, dtype=dtype)
        tok = load_tokenizer(Path(a.checkpoint) if Path(a.checkpoint).is_dir() else Path(a.checkpoint).parent)
        V = target.args.vocab_size
        parts = [load_generated(f, V) for f in (a.data or "").split(",") if f]
        if a.sharegpt:
            parts.append(load_sharegpt(a.sharegpt, tok, V, a.max_len))
        data = concat(parts)
        if len(data) < 2:
            raise UserError(f"need at least 2 conversations, got {len(data)}")
        if a.max_len > target.args.max_seq_len:
            raise UserError(f"--max-len {a.max_len} exceeds the model's context of {target.args.max_seq_len}")
        head = new_head(target, a.init, a.feature_layers).to(device)
        a.vocab = draft_vocab(a, V, device)
        if ranks.rank == 0:
            on = f"{device}" if ranks.world == 1 else f"{ranks.world} processes ({device.type})"
            log(f"{len(data)} conversations, {len(data.tokens)} tokens ({int(data.mask.sum())} assistant) on {on}; "
                f"head {sum(p.numel() for p in head.parameters()) / 1e6:.1f}M parameters")  # fmt: skip
        record = train(target, head, data, a, device, ranks)
    except (UserError, CheckpointError, TokenizerError) as e:
        if ranks.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    if ranks.world > 1:
        dist.barrier()  # process 0 has saved the head
        dist.destroy_process_group()
    if ranks.rank == 0:
        print(json.dumps({"out": a.out, "epochs": record.get("epochs_done", 0), "final": record.get("final")}))
    return record


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
