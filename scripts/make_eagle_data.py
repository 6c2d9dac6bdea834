"""Synthesize chat conversations with the target model alone: training data for an EAGLE draft head.

    python scripts/make_eagle_data.py --checkpoint checkpoints/SmolLM2-135M-Instruct --out data/eagle_smollm2.pt

Every row of a batch starts from the chat template's prefix up to the start of a user turn (for SmolLM2 the default
system prompt, then "<|im_start|>user\\n"). All rows advance one position per step, so one batched forward of B
single tokens serves them all, without padding. Per row, a small state machine in tensor ops:

  user    sample the user turn (--user-temperature, top-p) until the end-of-turn token or --max-user-len tokens
  header  feed the assistant header the template writes after the user's end-of-turn token, one token per step
  answer  sample the answer (a --greedy-frac share of the rows greedy, the rest at a temperature in [0.7, 1.0])
          until the end-of-turn token or --max-len
  done    idle: the row's tokens are ignored

Rows whose user turn or answer is empty or was cut off are dropped; the rest are deduplicated by user text and
filtered against MT-bench (--exclude): a user text that equals or contains a question turn (lowercased, whitespace
collapsed) or shares a word 8-gram with one is dropped. The output (torch.save) is
  {"tokens": int32 [N], "offsets": int64 [n+1], "loss_mask": uint8 [N], "meta": {...}}
with conversation i = tokens[offsets[i]:offsets[i+1]] and loss_mask 1 on the answer tokens, its final end-of-turn
token included. Batches go to <out>.shards/ as they finish; a rerun with the same settings reuses them. Same seed and
device, same file. Sampling looks at the 256 most likely tokens only (top-p is applied within them); special tokens
other than end-of-turn are never sampled.

On CUDA each step runs as a CUDA graph (one per 64-slot context bucket: attention reads only the filled part of
the cache). Every user error prints one line `error: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import Attention, CheckpointError, Transformer, apply_rope, load_model, resolve_checkpoint  # noqa: E402
from tokenizer import Tokenizer, TokenizerError, load_tokenizer  # noqa: E402

USER, HEADER, ANSWER, DONE = 0, 1, 2, 3  # row phases
TOP_K = 256  # sampling candidates per row
BUCKET = 64  # context granularity of the attention (one CUDA graph per bucket)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MARK = "@@EAGLE-DATA@@"  # placeholder message content used to cut the rendered chat template


class UserError(Exception):
    """Bad input: one line on stderr, exit 2."""


# ---------------------------------------------------------------------------------------------------------------
# The chat template, cut into the pieces the state machine needs.


@dataclass
class Template:
    prefix: list[int]  # rendered conversation up to the user's content (system prompt, user header)
    eot: int  # the token that closes a message (user and assistant alike)
    header: list[int]  # what follows the user's eot before the answer (e.g. "\n<|im_start|>assistant\n")
    banned: list[int]  # never sampled: special tokens other than eot, ids past the tokenizer's vocab


def cut_template(tok: Tokenizer, vocab_size: int) -> Template:
    """Render a system-less one-turn conversation and cut it around the user's and the assistant's content."""
    if tok.chat_template is None:
        raise UserError("the checkpoint's tokenizer has no chat template")
    user = [{"role": "user", "content": MARK}]
    prompt = tok.render_chat(user, add_generation_prompt=True)
    full = tok.render_chat(user + [{"role": "assistant", "content": MARK}], add_generation_prompt=False)
    if prompt.count(MARK) != 1 or full.count(MARK) != 2:
        raise UserError("cannot find the message content in the rendered chat template")
    cut = prompt.index(MARK)
    after_user = tok.encode(prompt[cut + len(MARK) :])  # e.g. <|im_end|> \n <|im_start|> assistant \n
    after_answer = tok.encode(full[full.rindex(MARK) + len(MARK) :])  # e.g. <|im_end|> \n
    if not after_user or after_user[0] not in tok.stop_ids:
        raise UserError("the chat template does not close the user turn with an end-of-turn token")
    eot = after_user[0]
    if not after_answer or after_answer[0] != eot:
        raise UserError("the chat template closes user and assistant turns with different tokens")
    prefix, header = tok.encode(prompt[:cut]), after_user[1:]
    special = special_ids(tok) | set(tok.stop_ids) | ({tok.bos_id} if tok.bos_id is not None else set())
    special |= {i for i in prefix + header if len(tok.encode(tok.decode([i]), allow_special=False)) > 1}
    banned = sorted((special - {eot}) | set(range(tok.vocab_size, vocab_size)))
    return Template(prefix, eot, header, [i for i in banned if i < vocab_size])


def special_ids(tok: Tokenizer) -> set[int]:
    """The tokenizer's special (control) tokens, as far as its backend lists them."""
    specials = getattr(tok.backend, "specials", None)  # sentencepiece, tiktoken: {piece: id}
    if isinstance(specials, dict):
        return set(specials.values())
    added = getattr(getattr(tok.backend, "tok", None), "get_added_tokens_decoder", None)  # HF tokenizers
    return {i for i, t in added().items() if t.special} if added else set()


# ---------------------------------------------------------------------------------------------------------------
# One decode step for B rows at the same position, attending to the first `ctx` cache slots only.


def decode_attention(attn: Attention, x: Tensor, rope: Tensor, pos: Tensor, visible: Tensor) -> Tensor:
    """x: [B, 1, D] at position/slot pos [1]; rope [1, 2, hd]; visible [ctx] (bool) -> [B, 1, D].

    Same result as model.Attention with a causal mask, but grouped-query attention without repeating K/V (SDPA with
    a mask and enable_gqa would fall back to its math kernel) and reading only `ctx` slots.
    """
    B = x.size(0)
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.wqkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
    q = apply_rope(q.view(B, KV, H // KV, hd), rope)  # [B, KV, G, hd]: query head h reads kv head h // G
    k = apply_rope(k.view(B, KV, 1, hd), rope)  # [B, KV, 1, hd]
    keys, values = attn.kv_cache.update(pos, k, v.view(B, KV, 1, hd))  # [B, KV, T, hd]
    ctx = visible.size(0)
    scores = (q @ keys[:, :, :ctx].transpose(-1, -2)).float() * hd**-0.5  # [B, KV, G, ctx]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(values.dtype)
    y = probs @ values[:, :, :ctx]  # [B, KV, G, hd]
    return attn.wo(y.reshape(B, 1, H * hd))


def decode_features(model: Transformer, tok: Tensor, pos: Tensor, ctx: int) -> Tensor:
    """tok: [B] at position/slot pos [1] (cache filled below pos) -> post-norm hidden [B, D]; needs ctx > pos."""
    x = model.tok_embeddings(tok)[:, None]  # [B, 1, D]
    rope = model.rope[pos]  # [1, 2, hd]
    visible = torch.arange(ctx, device=tok.device) <= pos  # [ctx]
    for layer in model.layers:
        x = x + decode_attention(layer.attention, layer.attention_norm(x), rope, pos, visible)
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return model.norm(x)[:, 0]


def sample_rows(logits: Tensor, temp: Tensor, top_p: float, noise: Tensor) -> Tensor:
    """logits [B, V] (float), temp [B] (0 = greedy), noise [B, K] uniform in [0, 1) -> tokens [B]."""
    greedy = temp <= 0
    vals, idx = torch.topk(logits, noise.size(1), dim=-1)  # [B, K], sorted
    probs = (vals / torch.where(greedy, 1.0, temp)[:, None]).softmax(-1)
    probs = probs * ((probs.cumsum(-1) - probs) < top_p)  # nucleus: smallest prefix with mass >= top_p
    choice = (probs / -noise.log()).argmax(-1, keepdim=True)  # exponential race: picks k with prob. probs[k]
    return torch.where(greedy, idx[:, 0], idx.gather(1, choice)[:, 0])


class Rows(torch.nn.Module):
    """The batch's state, as buffers with fixed addresses (CUDA graphs read and write them in place).

    tok [B]: the token fed at position pos [1]; out [B, T]: every row's tokens so far (int32); phase, hdr (header
    tokens fed), n_user / n_ans (user / answer tokens sampled, end-of-turn included) [B]; temp [B]: answer
    temperature (0 = greedy); noise [B, K]: this step's uniforms for sampling.
    """

    def __init__(self, B: int, T: int, tpl: Template, vocab_size: int, device: torch.device):
        super().__init__()
        z = lambda *shape, dt=torch.long: torch.zeros(shape, dtype=dt, device=device)
        bufs = dict(tok=z(B), pos=z(1), phase=z(B), hdr=z(B), n_user=z(B), n_ans=z(B), temp=z(B, dt=torch.float),
                    noise=z(B, min(TOP_K, vocab_size), dt=torch.float), out=z(B, T, dt=torch.int32))  # fmt: skip
        banned = torch.zeros(vocab_size, dtype=torch.bool)
        banned[tpl.banned] = True
        consts = dict(prefix=torch.tensor(tpl.prefix), header=torch.tensor(tpl.header or [tpl.eot]), banned=banned)
        for name, t in {**bufs, **consts}.items():
            self.register_buffer(name, t.to(device), persistent=False)
        self.P, self.Hn, self.eot = len(tpl.prefix), len(tpl.header), tpl.eot

    def reset(self, temps: Tensor) -> None:
        """Every row at position 0 of the prefix, in the user phase. In place: graphs hold these addresses."""
        self.tok.fill_(int(self.prefix[0]))
        self.out.zero_()
        self.out[:, 0] = self.prefix[0]
        for t in (self.pos, self.phase, self.hdr, self.n_user, self.n_ans):
            t.zero_()
        self.temp.copy_(temps)


def step(model: Transformer, r: Rows, ctx: int, max_user: int, user_temp: float, top_p: float) -> None:
    """Feed r.tok at r.pos, pick every row's next token, advance the state machine and the position."""
    logits = model.output(decode_features(model, r.tok, r.pos, ctx)).float()  # [B, V]
    sampled = sample_rows(logits.masked_fill(r.banned, float("-inf")),
                          torch.where(r.phase == USER, user_temp, r.temp), top_p, r.noise)  # fmt: skip
    nxt_pos = r.pos + 1  # [1]
    live = nxt_pos >= r.P  # [1]: past the shared prefix, the rows' own turns
    user, header, answer = (r.phase == USER) & live, (r.phase == HEADER) & live, (r.phase == ANSWER) & live
    nxt = torch.where(header, r.header[r.hdr.clamp(max=r.header.size(0) - 1)], sampled)
    nxt = torch.where(r.phase == DONE, r.eot, nxt)
    nxt = torch.where(live, nxt, r.prefix[nxt_pos.clamp(max=r.P - 1)])  # [B]
    eot = nxt == r.eot
    r.n_user.add_(user.long())
    r.n_ans.add_(answer.long())
    r.hdr.add_(header.long())
    phase = r.phase
    phase = torch.where(user & eot, HEADER if r.Hn else ANSWER, phase)
    phase = torch.where(user & ~eot & (r.n_user >= max_user), DONE, phase)  # user turn too long: dropped later
    phase = torch.where(header & (r.hdr >= r.Hn), ANSWER, phase)
    phase = torch.where(answer & eot, DONE, phase)
    r.phase.copy_(phase)
    r.tok.copy_(nxt)
    r.out.index_copy_(1, nxt_pos, nxt[:, None].to(r.out.dtype))
    r.pos.copy_(nxt_pos)


def bucket(pos: int, T: int) -> int:
    """Cache slots the step at `pos` must read: pos + 1 rounded up to BUCKET, at most T."""
    return min(T, math.ceil((pos + 1) / BUCKET) * BUCKET)


def capture_graphs(run, T: int) -> dict:
    """One CUDA graph of run(ctx) per context bucket, sharing one memory pool (replayed one at a time)."""
    ctxs = sorted({bucket(p, T) for p in range(T)})
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuBLAS workspaces, allocator) off the capture
        for ctx in ctxs:
            run(ctx)
    torch.cuda.current_stream().wait_stream(side)
    pool, graphs = torch.cuda.graph_pool_handle(), {}
    for ctx in ctxs:
        graphs[ctx] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[ctx], pool=pool):
            run(ctx)
    return graphs


# ---------------------------------------------------------------------------------------------------------------
# A batch of rows -> records (one shard).


def row_temperatures(B: int, greedy_frac: float, g: torch.Generator) -> Tensor:
    """[B]: 0 (greedy) for about greedy_frac of the rows, uniform in [0.7, 1.0] for the rest."""
    u, t = torch.rand(B, generator=g), 0.7 + 0.3 * torch.rand(B, generator=g)
    return torch.where(u < greedy_frac, 0.0, t)


@torch.inference_mode()
def generate_batch(r: Rows, run_step, seed: int, greedy_frac: float) -> dict[str, Tensor]:
    """Run one batch from the prefix until every row is done or the cache is full -> host copies of the state."""
    B, T = r.out.shape
    r.reset(row_temperatures(B, greedy_frac, torch.Generator().manual_seed(seed)))
    g = torch.Generator(r.out.device).manual_seed(seed)
    for p in range(T - 1):
        torch.rand(r.noise.shape, generator=g, device=r.noise.device, out=r.noise)
        run_step(bucket(p, T))
        if p % 32 == 31 and p >= r.P and bool((r.phase == DONE).all()):
            break
    return {k: getattr(r, k).cpu() for k in ("out", "phase", "n_user", "n_ans")}


def batch_records(state: dict[str, Tensor], tpl: Template, tok: Tokenizer) -> dict:
    """Keep the rows with a complete, non-empty user turn and answer; count the others by reason."""
    P, Hn = len(tpl.prefix), len(tpl.header)
    counts = dict(rows=0, user_cut=0, answer_cut=0, empty_user=0, empty_answer=0)
    tokens, answer_start, users = [], [], []
    columns = (state[k].tolist() for k in ("out", "phase", "n_user", "n_ans"))
    for out, phase, n_user, n_ans in zip(*columns, strict=True):
        counts["rows"] += 1
        user_text = tok.decode(out[P : P + n_user - 1]) if n_user else ""
        start = P + n_user + Hn
        if phase != DONE and phase != ANSWER or phase == DONE and n_ans == 0:  # max-len or --max-user-len
            counts["user_cut"] += 1
        elif phase == ANSWER:
            counts["answer_cut"] += 1
        elif not user_text.strip():
            counts["empty_user"] += 1
        elif not tok.decode(out[start : start + n_ans - 1]).strip():
            counts["empty_answer"] += 1
        else:
            tokens.append(out[: start + n_ans])
            answer_start.append(start)
            users.append(user_text)
    return dict(tokens=tokens, answer_start=answer_start, user_text=users, counts=counts)


# ---------------------------------------------------------------------------------------------------------------
# Filters: duplicates and MT-bench questions.


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def read_questions(path: str) -> list[str]:
    """Every turn of an MT-bench-style JSONL ({"turns": [...]} per line)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--exclude file not found: {path}")
    turns = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                turns += [t for t in json.loads(line)["turns"] if isinstance(t, str)]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{i}: not a JSON object with a 'turns' list") from None
    return turns


class Filter:
    """Decides, in order, which user texts to keep: first occurrence only, nothing close to an excluded question."""

    def __init__(self, questions: list[str]):
        self.questions = [normalize(q) for q in questions if q.strip()]
        self.grams = set().union(*(ngrams(q) for q in questions)) if questions else set()
        self.seen: set[str] = set()
        self.counts = dict(duplicate=0, excluded=0)

    def keep(self, user_text: str) -> bool:
        u = normalize(user_text)
        if u in self.seen:
            self.counts["duplicate"] += 1
            return False
        self.seen.add(u)
        if any(q in u for q in self.questions) or not self.grams.isdisjoint(ngrams(user_text)):
            self.counts["excluded"] += 1
            return False
        return True


# ---------------------------------------------------------------------------------------------------------------
# The dataset: shards on disk, then one file.


def settings_of(a: argparse.Namespace, dtype: torch.dtype) -> dict:
    keys = ("batch", "max_len", "max_user_len", "seed", "user_temperature", "top_p", "greedy_frac")
    return {"checkpoint": str(a.checkpoint), **{k: getattr(a, k) for k in keys}, "dtype": str(dtype)}


def open_shards(folder: Path, settings: dict) -> None:
    """Create the shard folder, or check that its shards were made with the same settings."""
    meta = folder / "settings.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        if old != settings:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
            raise UserError(f"{folder} holds batches made with other settings ({diff}); delete it or change --out")
        return
    folder.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(settings, indent=2) + "\n")


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def make_dataset(model: Transformer, tok: Tokenizer, a: argparse.Namespace, device: torch.device) -> dict:
    """Generate (or reload) shards until `a.num` conversations pass the filters -> the dataset dict."""
    dtype = model.norm.weight.dtype
    T = a.max_len
    tpl = cut_template(tok, model.args.vocab_size)
    if len(tpl.prefix) + len(tpl.header) + 4 > T:
        raise UserError(f"--max-len {T} leaves no room after the {len(tpl.prefix)}-token chat prefix")
    settings = settings_of(a, dtype)
    shard_dir = Path(str(a.out) + ".shards")
    open_shards(shard_dir, settings)
    flt = Filter(read_questions(a.exclude) if a.exclude else [])

    rows, run_step = None, None
    counts = dict(rows=0, user_cut=0, answer_cut=0, empty_user=0, empty_answer=0)
    kept: list[tuple[list[int], int]] = []
    t0, generated_s = time.perf_counter(), 0.0
    bar = tqdm(total=a.num, unit="conv", desc="conversations", dynamic_ncols=True)
    i = 0
    while len(kept) < a.num:
        path = shard_dir / f"batch_{i:05d}.pt"
        if path.exists():
            shard = torch.load(path, weights_only=True)
        else:
            if rows is None:  # first batch to generate: allocate and capture once
                rows, run_step = prepare(model, tpl, a, device)
            t1 = time.perf_counter()
            shard = batch_records(generate_batch(rows, run_step, a.seed * 1_000_003 + i, a.greedy_frac), tpl, tok)
            generated_s += time.perf_counter() - t1
            save_atomic(shard, path)
        for k, v in shard["counts"].items():
            counts[k] += v
        before = len(kept)
        for ids, start, user in zip(shard["tokens"], shard["answer_start"], shard["user_text"], strict=True):
            if len(kept) < a.num and flt.keep(user):
                kept.append((ids, start))
        bar.update(len(kept) - before)
        bar.set_postfix(batches=i + 1, kept=f"{len(kept) / max(counts['rows'], 1):.0%}")
        i += 1
        if i >= 4 and not kept:
            bar.close()
            raise UserError(f"no usable conversation in the first {counts['rows']} rows ({counts}); "
                            "try a larger --max-len / --max-user-len")  # fmt: skip
    bar.close()

    lengths = torch.tensor([len(ids) for ids, _ in kept])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    tokens = torch.tensor([t for ids, _ in kept for t in ids], dtype=torch.int32)
    loss_mask = torch.zeros(len(tokens), dtype=torch.uint8)
    for (ids, start), o in zip(kept, offsets[:-1].tolist(), strict=True):
        loss_mask[o + start : o + len(ids)] = 1
    counts.update(flt.counts, kept=len(kept), batches=i)
    meta = dict(settings, num=a.num, exclude=str(a.exclude or ""), counts=counts, prefix=tpl.prefix, eot=tpl.eot,
                header=tpl.header, vocab_size=model.args.vocab_size, tokens=len(tokens),
                answer_tokens=int(loss_mask.sum()), generate_seconds=round(generated_s, 1),
                total_seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    return {"tokens": tokens, "offsets": offsets, "loss_mask": loss_mask, "meta": meta}


def prepare(model: Transformer, tpl: Template, a: argparse.Namespace, device: torch.device):
    """Allocate the cache and the row state; on CUDA capture the step graphs. -> (rows, run_step(ctx))."""
    model.setup_caches(a.batch, a.max_len)
    rows = Rows(a.batch, a.max_len, tpl, model.args.vocab_size, device)
    run = lambda ctx: step(model, rows, ctx, a.max_user_len, a.user_temperature, a.top_p)
    if device.type != "cuda" or not a.cuda_graphs:
        return rows, run
    with torch.inference_mode():
        rows.reset(torch.zeros(a.batch, device=device))
        graphs = capture_graphs(run, a.max_len)
    return rows, lambda ctx: graphs[ctx].replay()


# ---------------------------------------------------------------------------------------------------------------
# The CLI.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + model.pth + tokenizer)")
    p.add_argument("--out", required=True, help="output file (torch.save); batches are kept in <out>.shards/")
    p.add_argument("--num", type=int, default=24000, help="conversations to keep (default 24000)")
    p.add_argument("--batch", type=int, default=None, help="rows per batch (default 2048 on CUDA, 16 on CPU)")
    p.add_argument("--max-len", type=int, default=768, help="tokens per conversation, prefix included (768)")
    p.add_argument("--max-user-len", type=int, default=256, help="user-turn tokens, end-of-turn included (256)")
    p.add_argument("--user-temperature", type=float, default=1.0, help="sampling temperature of user turns (1.0)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass for every sampled token (0.95)")
    p.add_argument("--greedy-frac", type=float, default=0.5, help="share of rows whose answer is greedy (0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--exclude", default=str(REPO / "data" / "mt_bench" / "question.jsonl"),
                   help="JSONL of {'turns': [...]} to keep out of the data ('' = none; default MT-bench)")  # fmt: skip
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="replay each step as a CUDA graph (default on; CUDA only)")  # fmt: skip
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> torch.device:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is available")
    a.batch = a.batch or (2048 if device.type == "cuda" else 16)
    if a.num < 1 or a.batch < 1:
        raise UserError("--num and --batch must be at least 1")
    if a.max_len < 16 or a.max_user_len < 2:
        raise UserError("need --max-len >= 16 and --max-user-len >= 2")
    if not 0 < a.top_p <= 1 or a.user_temperature <= 0 or not 0 <= a.greedy_frac <= 1:
        raise UserError("need 0 < --top-p <= 1, --user-temperature > 0 and 0 <= --greedy-frac <= 1")
    return device


def main(argv=None) -> None:
    a = parse_args(argv)
    try:
        device = check_args(a)
        dtype = DTYPES[a.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
        folder, _ = resolve_checkpoint(a.checkpoint)
        model = load_model(a.checkpoint, device=device, dtype=dtype)
        if a.max_len > model.args.max_seq_len:
            raise UserError(f"--max-len {a.max_len} exceeds the model's context of {model.args.max_seq_len}")
        data = make_dataset(model, load_tokenizer(folder), a, device)
    except (UserError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(data, out)
    m = data["meta"]
    print(json.dumps({"out": str(out), "conversations": m["counts"]["kept"], "tokens": m["tokens"],
                      "answer_tokens": m["answer_tokens"], "counts": m["counts"],
                      "generate_seconds": m["generate_seconds"]}))  # fmt: skip


if __name__ == "__main__":
    main()
