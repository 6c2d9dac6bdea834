"""Batch-1 generation: prefill, a compiled decode loop, and EAGLE speculative decoding.

    python generate.py --checkpoint checkpoints/SmolLM2-135M-Instruct --prompt "Hello"
    python generate.py --checkpoint checkpoints/SmolLM2-135M-Instruct --eagle --prompt "Hello"

Decode loop design (both plain and EAGLE): every step/round reads and writes device tensors only, so the next
step can be launched before the host looks at the previous one. The host reads each step's tokens through a
pinned buffer and a CUDA event (`Pipe`), one read per step/round, and stops on EOS or the token budget; the one
step launched past the stop is simply discarded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

import kernels
import quantize
from draft import EagleHead, apply_draft_vocab, draft_dynamic_tree, draft_tree, head_tree, load_head
from model import CheckpointError, Transformer, load_model
from tokenizer import StreamDecoder, Tokenizer, TokenizerError, load_tokenizer
from tree import DynamicTree, Tree, TreeError, make_tree, target_tree_mask, verify


class UserError(Exception):
    """Bad input: reported as one line on stderr with a non-zero exit."""


# ---------------------------------------------------------------------------------------------------------------
# Sampling. `Sampling` is fixed for a run, so compiled functions specialise on it (no per-step guards change).


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def logits_to_probs(logits: Tensor, s: Sampling) -> Tensor:
    """Processed target distribution. logits: [..., V] -> probs [..., V] (float32)."""
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest prefix with mass >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def argmax(x: Tensor) -> Tensor:
    """x.argmax(-1) for vocabulary-sized rows, in two passes: the argmax of each chunk of 1024 entries, then of the
    chunk maxima. Under torch.compile a plain argmax gives each row one program that walks all V entries (~10 us for
    49k on an H200, as much as three matmuls of a SmolLM2 layer). Same result, ties included: the first index of the
    maximum."""
    V = x.size(-1)
    chunk = min(V & -V, 1024)  # the largest power of two dividing V, at most 1024
    if chunk < 128 or V // chunk < 2:
        return x.argmax(-1)
    xc = x.unflatten(-1, (V // chunk, chunk))  # [..., V/chunk, chunk]
    i = xc.argmax(-1, keepdim=True)  # [..., V/chunk, 1]
    c = xc.gather(-1, i).squeeze(-1).argmax(-1, keepdim=True)  # the first chunk holding the maximum: [..., 1]
    return (c * chunk + i.squeeze(-1).gather(-1, c)).squeeze(-1)


def sample(logits: Tensor, s: Sampling) -> Tensor:
    """One token per row without a host sync. logits: [..., V] -> ids [...] (int64)."""
    if s.greedy:
        return argmax(logits)
    probs = logits_to_probs(logits, s)
    # Exponential race: argmax(p / E) with E ~ Exp(1) picks index i with probability p_i.
    return argmax(probs / torch.empty_like(probs).exponential_(1))


# ---------------------------------------------------------------------------------------------------------------
# Plain decoding.


def prefill(model: Transformer, tokens: Tensor, s: Sampling, head: EagleHead | None = None,
            n: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """tokens: [1, P] at positions 0..P-1 -> (next token [1, 1], the head's target features [1, P, F]: the post-norm
    hidden state (F = D), followed by the residual streams the head fuses, if it has feature_layers).

    n [1]: only the first n tokens are the prompt and the rest is padding (`Prefill` pads prompts to a bucket); the
    padding's cache slots n.. hold junk that decoding rewrites before anything attends to them. head: also fill the
    EAGLE head's committed slots from the pairs (f_i, t_{i+1}), i < P-1 (padding again lands past the prompt).
    """
    pos = torch.arange(tokens.size(1), device=tokens.device)
    h, feats = model.hidden(tokens, pos, taps=head.feature_layers if head is not None else ())
    last = h[:, -1:] if n is None else h.index_select(1, n - 1)  # only the last prompt position's logits are needed
    token = sample(model.output(last), s)
    if head is not None and tokens.size(1) > 1:
        head.prefill(model, tokens[:, 1:], feats[:, :-1])
    return token, feats


def decode_step(model: Transformer, token: Tensor, pos: Tensor, s: Sampling) -> Tensor:
    """token: [1, 1] at RoPE position/slot pos [1] -> next token [1, 1]."""
    return sample(model(token, pos), s)


class Pipe:
    """Reads small device tensors on the host one step late, so the GPU never waits for the host.

    push(t) queues a copy into pinned memory and records an event; pop() waits for the oldest copy only and returns
    the host tensor, valid until the next push (its buffer and event are reused: no allocation per step).
    On the CPU it is a plain copy.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.queue: list[tuple[Tensor, torch.cuda.Event | None]] = []
        self.free: list[tuple[Tensor, torch.cuda.Event]] = []

    def push(self, t: Tensor) -> None:
        if not self.cuda:
            self.queue.append((t.clone(), None))
            return
        slot = next((x for x in self.free if x[0].shape == t.shape and x[0].dtype == t.dtype), None)
        if slot is None:
            slot = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True), torch.cuda.Event())
        else:
            self.free.remove(slot)
        host, ev = slot
        host.copy_(t, non_blocking=True)
        ev.record()
        self.queue.append(slot)

    def pop(self) -> Tensor:
        host, ev = self.queue.pop(0)
        if ev is not None:
            ev.synchronize()
            self.free.append((host, ev))  # reused by a later push, after the caller has read it
        return host

    def __len__(self) -> int:
        return len(self.queue)


@dataclass
class Result:
    output_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    stats: dict = field(default_factory=dict)  # EAGLE: accept_len_mean, accept_hist, rounds, ...


class Emitter:
    """Collects emitted tokens, enforces eos / max_new_tokens exactly, and streams text."""

    def __init__(self, max_new: int, stop_ids: set[int], ignore_eos: bool, on_text=None, tok: Tokenizer | None = None):
        self.max_new, self.stop_ids, self.ignore_eos = max_new, stop_ids, ignore_eos
        self.ids: list[int] = []
        self.done = max_new <= 0
        self.stream = StreamDecoder(tok) if (on_text and tok) else None
        self.on_text = on_text

    def add(self, ids: list[int]) -> None:
        for t in ids:
            if self.done:
                return
            self.ids.append(t)
            if self.stream:
                self.on_text(self.stream.push([t]))
            if len(self.ids) >= self.max_new or (not self.ignore_eos and t in self.stop_ids):
                self.done = True


class GraphedStep:
    """fn(*args), compiled by Inductor and captured once as one CUDA graph that every later call replays.

    Every tensor fn reads or writes lives at a fixed address (module buffers: the KV caches, the step state), so a
    replay copies no inputs and costs the host one cudaGraphLaunch: less than CUDA graph trees, which check and copy
    inputs on each call. `state` lists the tensors that the warm-up calls (real steps, run before the capture to
    compile and autotune) change and that must be put back; capturing runs nothing. Returns fn's output tensor,
    rewritten by each replay (read it, or queue a copy of it, before the next one).
    """

    def __init__(self, fn, args: tuple, state: list[Tensor], compile: bool = True):
        self.fn = torch.compile(fn, fullgraph=True, dynamic=False) if compile else fn
        self.args, self.state = args, state
        self.cuda = state[0].is_cuda
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None
        self.warm = False

    def _warm_up(self) -> None:
        """Two real calls (compilation, autotuning, allocations), then the state is put back as it was."""
        saved = [t.clone() for t in self.state]
        side = torch.cuda.Stream() if self.cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():  # capture needs a side stream
            for _ in range(2):
                self.fn(*self.args)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        for t, v in zip(self.state, saved, strict=True):
            t.copy_(v)
        self.warm = True

    def __call__(self) -> Tensor:
        if not self.warm:
            self._warm_up()
        if not self.cuda:  # CPU (tests): the same warm-up and restore, then plain calls
            return self.fn(*self.args)
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with capture(self.graph):
                self.out = self.fn(*self.args)
        self.graph.replay()
        return self.out


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph):
    """torch.cuda.graph(graph) with Python's garbage collector off inside. A collection during the capture may free
    another CUDA graph (an earlier generator's, left in a reference cycle), whose reset is not permitted while a
    stream captures, and the capture fails (cudaErrorStreamCaptureInvalidated: bench.py with a third generator in one
    process, fourteenth session). (torch.cuda.graph no longer collects before it captures: torch.compiler.config
    .force_cudagraph_gc.) Garbage left meanwhile is collected later, outside the capture."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph):
            yield
    finally:
        if was_on:
            gc.enable()


class Prefill:
    """The prompt's forward for one generator: prompt [1, P] -> (next token [1, 1], post-norm hidden [1, P, D]).

    mode "graphs" (the default on CUDA with --compile): the eager code captured as one CUDA graph per prompt-length
    bucket (prompts padded with zeros to a multiple of BUCKET tokens), so a prompt costs one graph launch instead of
    ~1500 eager kernel launches (25-35 ms of host time per prompt on SmolLM2, BENCHMARKS.md) and nothing is compiled:
    a bucket's first prompt runs it eagerly three times (two warm-ups and the capture). Each bucket's graph keeps its
    own activation memory, so only prompts of up to MAX_GRAPHED tokens are graphed (at most 8 graphs); longer ones
    run eagerly, where the GPU time of the forward hides more of the launch cost. "compiled" (--compile-prefill):
    torch.compile with dynamic shapes (measured: +60 s on the first call). "eager": plain calls.
    """

    BUCKET = 64
    MAX_GRAPHED = 512

    def __init__(self, model: Transformer, sampling: Sampling, max_seq_length: int, mode: str,
                 head: EagleHead | None = None):  # fmt: skip
        self.model, self.sampling, self.head, self.mode = model, sampling, head, mode
        self.max_seq_length = max_seq_length
        self.fn = torch.compile(prefill, fullgraph=True, dynamic=True) if mode == "compiled" else prefill
        self.graphs: dict[int, GraphedStep] = {}

    def __call__(self, prompt: Tensor) -> tuple[Tensor, Tensor]:
        P = prompt.size(1)
        if self.mode != "graphs" or P > self.MAX_GRAPHED:
            return self.fn(self.model, prompt, self.sampling, self.head)
        B = min(round_up(P, self.BUCKET), self.MAX_GRAPHED, self.max_seq_length)
        if B not in self.graphs:
            tokens = torch.zeros(1, B, dtype=torch.long, device=prompt.device)
            n = torch.zeros(1, dtype=torch.long, device=prompt.device)
            args = (self.model, tokens, self.sampling, self.head, n)
            self.graphs[B] = GraphedStep(prefill, args, [tokens], compile=False)
        step = self.graphs[B]
        tokens, n = step.args[1], step.args[4]
        tokens.zero_()
        tokens[:, :P] = prompt
        n.fill_(P)
        token, h = step()
        return token, h[:, :P]


class StepState(torch.nn.Module):
    """Plain decoding's state between steps, in module buffers: token [1, 1] (last token, not yet in the cache) at
    RoPE position / cache slot pos [1]."""

    def __init__(self, device):
        super().__init__()
        self.register_buffer("token", torch.zeros(1, 1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long, device=device), persistent=False)


def plain_step(model: Transformer, st: StepState, s: Sampling) -> Tensor:
    """One decode step on the state: returns the next token [1, 1] and moves the state on to it."""
    nxt = decode_step(model, st.token, st.pos, s)
    st.token.copy_(nxt)
    st.pos.add_(1)
    return nxt


def graphs_wanted(device: torch.device, compile: bool) -> bool:
    """Our own CUDA graph per step (GraphedStep) unless LLM_GEN_GRAPHS=trees asks for torch's CUDA graph trees."""
    return compile and device.type == "cuda" and os.environ.get("LLM_GEN_GRAPHS", "manual") != "trees"


class Generator:
    """Plain decoding for one run: the model, its cache, the compiled step (fixed sampling, fixed cache size).

    `generate` is the decode loop for plain and EAGLE decoding alike: `_start` runs the prompt and returns the
    first token(s), `_launch` queues one more step/round on the device; both return a small device tensor that
    the host reads one step late. `_tokens` turns what was read into the emitted token ids.
    """

    tokens_per_launch = 1  # at most this many tokens come out of one `_launch`

    def __init__(self, model: Transformer, sampling: Sampling, max_seq_length: int, compile: bool = False,
                 compile_prefill: bool = False, head: EagleHead | None = None):  # fmt: skip
        self.model, self.sampling = model, sampling
        self.device = model.norm.weight.device
        model.setup_caches(1, max_seq_length)
        self.max_seq_length = max_seq_length
        mode = "compiled" if compile_prefill else "graphs" if graphs_wanted(self.device, compile) else "eager"
        self.prefill = Prefill(model, sampling, max_seq_length, mode, head)
        if type(self) is Generator:
            self.state = StepState(self.device)
            if graphs_wanted(self.device, compile):
                self.step = GraphedStep(plain_step, (model, self.state, sampling), [self.state.token, self.state.pos])
            else:
                step = compile_step(plain_step, self.device) if compile else plain_step
                self.step = lambda: step(self.model, self.state, self.sampling)

    def _start(self, prompt: Tensor) -> Tensor:
        token, _ = self.prefill(prompt)  # [1, 1]
        self.state.token.copy_(token)
        self.state.pos.fill_(prompt.size(1))
        return token

    def _launch(self) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # (CUDA graph trees only) the last output was copied out
        return self.step()

    def _tokens(self, host: Tensor) -> list[int]:
        return host.flatten().tolist()

    def _stats(self) -> dict:
        return {}

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new: int, stop_ids: set[int], ignore_eos=False, on_text=None,
                 tok=None) -> Result:  # fmt: skip
        if len(prompt) + max_new > self.max_seq_length:
            raise UserError(f"prompt ({len(prompt)} tokens) + max new tokens ({max_new}) exceed the cache "
                            f"({self.max_seq_length} slots)")  # fmt: skip
        out = Emitter(max_new, stop_ids, ignore_eos, on_text, tok)
        sync(self.device)
        t0, p0 = time.perf_counter(), timer(self.device)
        pipe = Pipe(self.device)
        pipe.push(self._start(torch.tensor([prompt], device=self.device)))
        p1 = timer(self.device)
        # Launch one step/round ahead of the host, but never past max_new tokens in all, so the cache cannot overflow.
        launch_s = wait_s = 0.0  # host time spent launching steps / blocked on the device (where wall time goes)
        while not out.done:
            if len(pipe) == 0 or len(out.ids) + len(pipe) * self.tokens_per_launch < max_new:
                h0 = time.perf_counter()
                pipe.push(self._launch())
                launch_s += time.perf_counter() - h0
            h0 = time.perf_counter()
            host = pipe.pop()
            wait_s += time.perf_counter() - h0
            out.add(self._tokens(host))
        if out.stream:
            out.on_text(out.stream.flush())  # text held back for an unfinished character
        sync(self.device)
        stats = {**self._stats(), "host_launch_seconds": launch_s, "host_wait_seconds": wait_s}
        return Result(out.ids, time.perf_counter() - t0, elapsed(p0, p1), stats)


class EagleState(torch.nn.Module):
    """Device-resident state carried between EAGLE rounds (module buffers: static addresses for CUDA graphs).

    L [1]: committed target length; the root t_L (last emitted token, not yet in the target cache) is tokens[n-1].
    tokens [R], feats [R, F], n [1]: the last round's emitted tokens and the target features before each of them,
    i.e. the draft pairs to catch up on. node_tokens [N]: this round's draft tree, whose shape is parent [N],
    depth [N], ancestors [N, N] and path_nodes [N, R] (constant for a static tree, rebuilt each round for EAGLE-2).
    """

    def __init__(self, R: int, N: int, dim: int, device, dtype):
        super().__init__()
        z = lambda *shape, dt=torch.long: torch.zeros(shape, dtype=dt, device=device)
        buffers = dict(L=z(1), n=z(1), tokens=z(R), feats=z(R, dim, dt=dtype), node_tokens=z(N), parent=z(N),
                       depth=z(N), ancestors=z(N, N, dt=torch.bool), path_nodes=z(N, R))  # fmt: skip
        for name, t in buffers.items():
            self.register_buffer(name, t, persistent=False)


def eagle_draft(head: EagleHead, target: Transformer, tree: Tree | DynamicTree, st: EagleState) -> None:
    if isinstance(tree, DynamicTree):  # EAGLE-2: the tree's shape changes every round
        built = draft_dynamic_tree(head, target, tree, st.L, st.tokens, st.feats, st.n)
        for buf, t in zip((st.node_tokens, st.parent, st.depth, st.ancestors, st.path_nodes), built, strict=True):
            buf.copy_(t)
    else:
        st.node_tokens.copy_(draft_tree(head, target, tree, st.L, st.tokens, st.feats, st.n))


def eagle_verify(target: Transformer, tree: Tree | DynamicTree, st: EagleState, s: Sampling,
                 taps: tuple[int, ...] = ()) -> Tensor:  # fmt: skip
    """One target forward over the N tree tokens, acceptance, KV compaction. Returns [R + 1]: tokens, count.
    taps: the head's feature_layers (their residual streams join the features kept for the next round)."""
    N, R, dev = tree.N, tree.D + 1, st.L.device
    pos = st.L + st.depth  # RoPE position = committed length + depth: [N]
    slots = st.L + torch.arange(N, device=dev)  # consecutive cache slots: [N]
    mask = target_tree_mask(st.ancestors, st.L, target.max_seq_length)  # [1, 1, N, T]
    logits, h = target(st.node_tokens[None], pos, slots, mask, return_hidden=True, taps=taps)  # [1, N, V], [1, N, F]
    choice = sample(logits[0], s)  # the target's token at every node: [N]
    best, acc = verify(st.node_tokens, choice, st)
    path = st.path_nodes.index_select(0, best)[0]  # root .. best, padded with best: [R]
    j = torch.arange(R, device=dev)
    target.copy_slots(st.L + path, st.L + j)  # accepted rows down to L .. L+acc (rows past acc are junk)
    path_tokens = st.node_tokens[path]
    bonus = choice.index_select(0, best)  # [1]
    emitted = torch.where(j < acc, torch.roll(path_tokens, -1), bonus)  # accepted drafts, then the bonus
    st.feats.copy_(h[0, path])
    st.tokens.copy_(emitted)
    st.n.copy_(acc + 1)
    st.L.add_(acc + 1)
    return torch.cat([emitted, acc + 1])


def eagle_round(head: EagleHead, target: Transformer, tree: Tree | DynamicTree, st: EagleState, s: Sampling) -> Tensor:
    eagle_draft(head, target, tree, st)
    return eagle_verify(target, tree, st, s, head.feature_layers)


class EagleGenerator(Generator):
    """EAGLE speculative decoding: per round, draft a tree (compiled), verify it with one target forward (compiled),
    keep the longest accepted path. Lossless: see tree.verify."""

    def __init__(self, model: Transformer, head: EagleHead, tree: Tree | DynamicTree, sampling: Sampling, need: int,
                 compile: bool = False, compile_prefill: bool = False, split_timing: bool = False):  # fmt: skip
        R, N = tree.D + 1, tree.N
        # A launched-ahead round may start up to R tokens past the budget and writes N slots from there.
        super().__init__(model, sampling, round_up(need + 2 * R + N, 64), compile, compile_prefill, head)
        self.head, self.tokens_per_launch = head, R
        self.state = EagleState(R, N, head.feature_dim, self.device, model.norm.weight.dtype)
        if isinstance(tree, DynamicTree):
            self.tree = tree
            head.setup_cache(self.max_seq_length, (tree.D - 1) * tree.K)  # one scratch slot per expanded node
        else:
            self.tree = tree.to(self.device)
            for t in self.tree.static_tensors():  # constant inputs: CUDA graphs need not copy them in each round
                torch._dynamo.mark_static_address(t)
            for name in ("parent", "depth", "ancestors", "path_nodes"):  # the verification reads the state's copy
                getattr(self.state, name).copy_(getattr(self.tree, name))
            head.setup_cache(self.max_seq_length, self.tree.fed_depth.numel())  # one scratch slot per expanded node
        self.draft = compile_step(eagle_draft, self.device) if compile else eagle_draft
        self.verify = compile_step(eagle_verify, self.device) if compile else eagle_verify
        # One CUDA graph per round (1.28x faster than two on SmolLM2, BENCHMARKS.md); split_timing runs the draft and
        # the verification as two graphs so that each can be timed.
        self.split_timing = split_timing
        round_args = (head, model, self.tree, self.state, sampling)
        if graphs_wanted(self.device, compile):
            # the warm-up rounds change the round state (the caches only past the committed length: rewritten later)
            self.round = GraphedStep(eagle_round, round_args, list(self.state.buffers()))
        else:
            compiled = compile_step(eagle_round, self.device) if compile else eagle_round
            self.round = lambda: compiled(*round_args)

    def _start(self, prompt: Tensor) -> Tensor:
        root, h = self.prefill(prompt)  # [1, 1], [1, P, F]; the head's committed slots filled too
        st, R = self.state, self.tree.D + 1
        st.L.fill_(prompt.size(1))
        st.n.fill_(1)
        st.tokens.zero_()
        st.tokens[0] = root[0, 0]
        st.feats.zero_()
        st.feats[0] = h[0, -1]
        self.rounds, self.hist, self.timing, self.first = 0, [0] * R, [], True
        return torch.cat([st.tokens, st.n])

    def _launch(self) -> Tensor:
        # Each graph starts a new CUDA-graph "generation": the round state lives in module buffers, not in graph
        # outputs, so nothing from the previous replay is needed, and CUDA graph trees need not checkpoint memory.
        t0 = timer(self.device)
        torch.compiler.cudagraph_mark_step_begin()
        if not self.split_timing:
            out = self.round()
            self.timing.append((t0, t0, timer(self.device)))
            return out
        self.draft(self.head, self.model, self.tree, self.state)
        t1 = timer(self.device)
        torch.compiler.cudagraph_mark_step_begin()
        out = self.verify(self.model, self.tree, self.state, self.sampling, self.head.feature_layers)
        self.timing.append((t0, t1, timer(self.device)))
        return out

    def _tokens(self, host: Tensor) -> list[int]:
        n = int(host[-1])
        if self.first:  # the prompt's own next token
            self.first = False
        else:
            self.rounds += 1
            self.hist[n - 1] += 1
        return host[:n].tolist()

    def _stats(self) -> dict:
        timing = self.timing[: self.rounds]  # rounds launched past the stop are not counted
        rounds = max(self.rounds, 1)
        return {
            "accept_len_mean": sum((i + 1) * c for i, c in enumerate(self.hist)) / rounds,
            "accept_hist": self.hist,  # accept_hist[a] = rounds that accepted a drafted tokens (a + 1 emitted)
            "rounds": self.rounds,
            "round_seconds": sum(elapsed(a, c) for a, _, c in timing),
            # Measured only with split_timing (--eagle-timing): one graph per round has no boundary inside.
            "draft_seconds": sum(elapsed(a, b) for a, b, _ in timing) if self.split_timing else None,
            "verify_seconds": sum(elapsed(b, c) for _, b, c in timing) if self.split_timing else None,
        }


def timer(device: torch.device):
    """A point in time on the device's stream (CUDA event) or the host clock (CPU: every op is synchronous)."""
    if device.type != "cuda":
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def elapsed(a, b) -> float:
    if isinstance(a, float):
        return b - a
    b.synchronize()
    return a.elapsed_time(b) / 1000


def compile_step(fn, device: torch.device):
    """One compiled graph for every step: fixed shapes, fullgraph, CUDA graphs on the GPU."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_inductor_flags(tuned: bool = False) -> None:
    """fx_graph_cache makes warm restarts reuse compiled code. `tuned` adds gpt-fast's coordinate-descent tuning of
    every kernel (slower compile; see BENCHMARKS.md for whether it pays)."""
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    inductor_config.fx_graph_cache = True
    inductor_config.coordinate_descent_tuning = tuned


# ---------------------------------------------------------------------------------------------------------------
# Prompts and the CLI.


@dataclass
class Prompt:
    id: str
    turns: list[str]


def read_prompts(path: str) -> list[Prompt]:
    """JSONL with {"turns": [...], "question_id"?} per line (MT-bench), or plain text: one prompt per line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompts file not found: {path}")
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompts file {path}: {e}") from None
    if not lines:
        raise UserError(f"prompts file is empty: {path}")
    prompts = []
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                turns = obj["turns"]
                if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                    raise ValueError('"turns" must be a non-empty list of strings')
            except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
                raise UserError(f"{path}:{i}: malformed prompt line ({e})") from None
            prompts.append(Prompt(str(obj.get("question_id", i)), turns))
        else:
            prompts.append(Prompt(str(i), [line]))
    return prompts


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
KERNEL_CHOICES = ("auto", "triton", "torch")


def set_kernels(choice: str) -> None:
    """--kernels for quantized checkpoints: call before load_model (it picks the int8/int4 kernels at load)."""
    quantize.RUNTIME.update(int8_kernel=choice, int4_kernel=choice)


def use_kernels(choice: str, *modules: torch.nn.Module) -> int:
    """--kernels for bf16/fp16 linears: swap them for kernels.FewTokenLinear unless 'torch' or unavailable."""
    if choice == "torch" or kernels.triton is None:
        return 0
    # 2-64 tokens (EAGLE verification, the draft's tree steps): cuBLAS is as fast as kernels.py's tl.dot kernel on its
    # own, but with programmatic dependent launch (kernels.PDL) only the Triton kernel's launch overlaps the kernel
    # before it (an EAGLE round 10% shorter, BENCHMARKS.md)
    max_m = kernels.MAX_M if choice == "triton" or kernels.PDL else 1
    return sum(kernels.use_triton_linears(m, max_m) for m in modules)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + model.pth) or a .pth in one")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text (default: a short greeting)")
    src.add_argument("--prompts-file", "--prompts_file", help="JSONL with {'turns': [...]} per line, or plain text")
    p.add_argument(
        "--max-turns",
        "--max_turns",
        type=int,
        default=0,
        help="with --prompts-file: use at most this many turns per conversation (0 = all)",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the checkpoint's chat template (default: on when it has one)",
    )
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=256, help="tokens to generate per turn")
    p.add_argument("--ignore-eos", "--ignore_eos", action="store_true", help="do not stop at end-of-turn tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", "--top_k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", "--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument(
        "--dtype", default=None, help="bfloat16, float16 or float32 (default: bfloat16 on GPU, float32 on CPU)"
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the decode step with CUDA graphs (default: on with CUDA)",
    )
    p.add_argument(
        "--compile-prefill",
        "--compile_prefill",
        action="store_true",
        help="compile prefill with dynamic shapes instead of the default on CUDA with --compile (eager code captured\n"
        "as one CUDA graph per 64-token prompt bucket, prompts of up to 512 tokens); measured on SmolLM2 (H200):\n"
        "23 ms instead of 5 ms per prompt, and 60-110 s more on the first call",
    )
    p.add_argument(
        "--kernels",
        default="auto",
        choices=KERNEL_CHOICES,
        help="matmul kernels on CUDA: 'auto' (default) = kernels.py's Triton GEMV for one-token bf16/fp16 steps "
        "(with the RMSNorm, residual add and SwiGLU gating fused in for inputs of >= 2048 features; with --pdl its "
        "tl.dot kernel for 2-64 tokens too) and its int8 "
        "kernels (up to 64 tokens), tinygemm for int4; 'triton' = kernels.py also for int4 and for bf16/fp16 "
        "linears of 2-64 tokens; 'torch' = cuBLAS, "
        "Inductor (int8) and tinygemm only, and no Triton attention or PDL. Triton kernels need the triton package "
        "(CUDA torch has it)",
    )
    p.add_argument(
        "--pdl",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="programmatic dependent launch (on by default where the GPU has it: H100/H200 and newer): each Triton\n"
        "kernel's launch overlaps the end of the kernel before it, and EAGLE's few-token matmuls use kernels.py's\n"
        "Triton kernel instead of cuBLAS so that they take part. Measured on SmolLM2 (H200): plain decoding +14%%,\n"
        "an EAGLE round 10%% shorter, identical outputs. --no-pdl turns it off",
    )
    p.add_argument(
        "--num-samples",
        "--num_samples",
        type=int,
        default=1,
        help="generate this many times per prompt (later ones show warm speed)",
    )
    p.add_argument(
        "--kernel-configs",
        default=None,
        metavar="JSON",
        help="block shapes for kernels.py's matmuls, from scripts/tune_kernels.py (picked by timing whole forwards\n"
        "on this GPU) or a bench.py JSON, instead of the autotuner's picks (it times each kernel alone, and its picks\n"
        "differ from machine to machine)",
    )
    p.add_argument("--interactive", action="store_true", help="chat loop on stdin with streamed output")
    p.add_argument("--json", default=None, metavar="OUT", help="write one JSON object per generation to OUT")
    p.add_argument("--quiet", action="store_true", help="do not stream generated text")
    p.add_argument(
        "--eagle",
        nargs="?",
        const="auto",
        default=None,
        metavar="HEAD_DIR",
        help="EAGLE speculative decoding with this draft head (no value: the head shipped for the checkpoint)",
    )
    p.add_argument(
        "--eagle-timing",
        "--eagle_timing",
        action="store_true",
        help="run draft and verification as two graphs to report draft_seconds/verify_seconds (slower)",
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        metavar="N",
        help="draft only among the N most frequent answer tokens of the head's training data (draft_vocab.safetensors\n"
        "beside the head, written by scripts/draft_vocab.py): a smaller LM-head product and top-k per draft step,\n"
        "still lossless; tau drops by the share of tokens outside it. Default: 16384 where the head has such a file\n"
        "(the shipped SmolLM2 head does; measured on an H200: tau -1.9%%, tok/s +5.5%%), else the whole vocabulary;\n"
        "0 = the whole vocabulary",
    )
    p.add_argument(
        "--draft-quant",
        choices=["none", "int8"],
        default="none",
        help="int8: the draft head's linears as int8 weights (symmetric per output channel), still lossless: the\n"
        "target checks every draft. Halves the head's weight reads, which on a 7B-size head are about a fifth of a\n"
        "round's bytes. Measured: on the 7B shape (H200, random head), with a draft vocabulary of 8192 as well,\n"
        "what a round adds to its tree forward went 1.41 -> 0.98 ms (31%% -> 23%%); the shipped SmolLM2 head's tau\n"
        "2.90 -> 2.86 (CPU, fp32, 10 MT-bench questions).",
    )
    p.add_argument(
        "--tree",
        default=None,
        help="EAGLE draft tree: 'head' (the static tree shipped with the head, named in its config.json: for SmolLM2 "
        "40 tokens, depth 6; EAGLE-1's where the head names none), 'default' (EAGLE-1, 26 tokens), "
        "'chain:K', a JSON file of paths, the dynamic "
        "EAGLE-2 tree 'eagle2[:K=10,D=6,N=60]' (K children per expanded node, depth D, N tokens), or 'auto' "
        "(EAGLE-2 with N chosen from the measured forward latency on this device, cached). Default: 'head' on a "
        "GPU, 'default' on the CPU (where a bigger tree costs compute, not just launches)",
    )
    return p.parse_args(argv)  # fmt: skip


def check_args(a: argparse.Namespace) -> None:
    if a.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if a.temperature < 0 or a.top_k < 0 or not 0 < a.top_p <= 1:
        raise UserError("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    if a.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    if a.draft_vocab and a.eagle is None:
        raise UserError("--draft-vocab needs --eagle")
    if a.draft_quant != "none" and a.eagle is None:
        raise UserError("--draft-quant needs --eagle")
    if a.dtype is not None and a.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {a.dtype!r}; choose one of {', '.join(DTYPES)}")
    if a.device is not None:
        try:
            torch.device(a.device)
        except RuntimeError:
            raise UserError(f"unknown --device {a.device!r}") from None
        if a.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but no CUDA GPU is available")


def pin_kernel_configs(path: str) -> int:
    """Put the block shapes a tune_kernels.py or bench.py JSON holds ("tuned_configs") into the matmul autotuners."""
    try:
        entries = json.loads(Path(path).read_text())["tuned_configs"]
    except FileNotFoundError:
        raise UserError(f"--kernel-configs: no file {path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--kernel-configs: {path} is not a JSON with 'tuned_configs' ({e})") from None
    return kernels.pin_configs(entries)


def main(argv=None) -> None:
    a = parse_args(argv)
    try:
        run(a)
    except (UserError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def run(a: argparse.Namespace) -> None:
    check_args(a)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[a.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    use_compile = a.compile if a.compile is not None else device.type == "cuda"
    torch.manual_seed(a.seed)

    if a.kernels == "triton" and not kernels.available(torch.empty(0, dtype=dtype, device=device)):
        raise UserError("--kernels triton needs a CUDA device, --dtype bfloat16 or float16 and the triton package")
    kernels.set_pdl(a.pdl and device.type == "cuda" and a.kernels != "torch")
    kernels.FEW_ATTENTION = a.kernels != "torch"  # two Triton kernels for attention over a few tokens (CUDA only)
    kernels.TRITON_TOPK = a.kernels != "torch"  # the draft's top-k in one Triton kernel (CUDA only)
    if a.kernel_configs:
        log(f"--kernel-configs: {pin_kernel_configs(a.kernel_configs)} matmul block shapes pinned")
    t0 = time.perf_counter()
    set_kernels(a.kernels if device.type == "cuda" else "auto")
    model = load_model(a.checkpoint, device=device, dtype=dtype)
    if device.type == "cuda":
        use_kernels(a.kernels, model)
    folder = Path(a.checkpoint) if Path(a.checkpoint).is_dir() else Path(a.checkpoint).parent
    tok = load_tokenizer(folder)
    chat = a.chat if a.chat is not None else tok.chat_template is not None
    if chat and tok.chat_template is None:
        raise UserError("--chat asked for, but the checkpoint has no chat template")
    log(f"loaded {folder} ({model.args.n_layers} layers, dim {model.args.dim}) on {device} in {dtype} "
        f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip

    prompts = read_prompts(a.prompts_file) if a.prompts_file else [Prompt("0", [a.prompt or "Hello, who are you?"])]
    if a.max_turns > 0:
        prompts = [Prompt(p.id, p.turns[: a.max_turns]) for p in prompts]
    ctx = model.args.max_seq_len
    if a.interactive:
        need = min(ctx, 4096)
    else:
        first = max(len(tok.encode_prompt(p.turns[0], chat)) for p in prompts)
        need = first + a.max_new_tokens
        if any(len(p.turns) > 1 for p in prompts):  # later turns carry the conversation so far
            need = min(ctx, max(need, 2048))
        if first >= ctx:
            raise UserError(f"prompt is {first} tokens, longer than the model's context of {ctx}")
        if need > ctx:
            raise UserError(f"prompt ({first} tokens) + --max-new-tokens {a.max_new_tokens} exceed the model's "
                            f"context of {ctx}")  # fmt: skip
    sampling = Sampling(a.temperature, a.top_k, a.top_p)
    if use_compile:
        set_inductor_flags()
    gen = make_generator(a, model, sampling, need, use_compile, folder)

    stream = not a.quiet and (a.interactive or len(prompts) * a.num_samples <= 3 or a.json is None)
    on_text = (lambda s: print(s, end="", flush=True)) if stream else None
    records = []
    if a.interactive:
        interactive_loop(gen, tok, chat, a, on_text or (lambda s: print(s, end="", flush=True)))
        return
    for p in prompts:
        for sample_i in range(a.num_samples):
            history: list[dict] = []
            for turn_i, text in enumerate(p.turns):
                history.append({"role": "user", "content": text})
                ids = tok.encode_prompt(history if chat else text, chat)
                if len(ids) + a.max_new_tokens > gen.max_seq_length:
                    raise UserError(f"prompt {p.id} turn {turn_i + 1} is {len(ids)} tokens; with "
                                    f"--max-new-tokens {a.max_new_tokens} it exceeds {gen.max_seq_length}")  # fmt: skip
                if on_text:
                    print(f"\n>>> [{p.id}] {text}\n", flush=True)
                r = gen.generate(ids, a.max_new_tokens, tok.stop_ids, a.ignore_eos, on_text, tok)
                reply = tok.decode([t for t in r.output_ids if t not in tok.stop_ids])
                history.append({"role": "assistant", "content": reply})
                rec = {"id": p.id, "turn": turn_i, "sample": sample_i, "prompt_tokens": len(ids),
                       "output_ids": r.output_ids, "text": reply, "new_tokens": len(r.output_ids),
                       "seconds": r.seconds, "prefill_seconds": r.prefill_seconds,
                       "tokens_per_s": len(r.output_ids) / r.seconds, **r.stats}  # fmt: skip
                records.append(rec)
                if on_text:
                    print()
                log(summary_line(rec))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    print_summary(records, model, device)


def make_generator(a, model, sampling, need, use_compile, folder) -> Generator:
    if a.eagle is None:
        return Generator(model, sampling, round_up(need, 64), use_compile, a.compile_prefill)
    head_dir = find_head(folder) if a.eagle == "auto" else Path(a.eagle)
    # no --tree: the head's own tree on a GPU; EAGLE-1's on the CPU, where every tree token costs compute (SmolLM2,
    # 3 MT-bench questions: the 40-token tree 16.8 tok/s, the 26-token one 21.3, plain 17.3; BENCHMARKS.md)
    spec = head_tree(a.tree or ("head" if model.norm.weight.is_cuda else "default"), head_dir)
    try:
        tree = auto_tree(model) if spec == "auto" else make_tree(spec)
    except TreeError as e:
        raise UserError(str(e)) from None
    head = load_head(head_dir, model.args, model.norm.weight.device, model.norm.weight.dtype)
    size = apply_draft_vocab(head, head_dir, a.draft_vocab, model)
    if size:
        log(f"draft vocabulary: the {size} most frequent tokens of the head's training data (--draft-vocab 0: all)")
    if a.draft_quant == "int8":
        log(f"draft head: {quantize.quantize_linears_int8(head, model.norm.weight.dtype)} linears as int8")
    if model.norm.weight.device.type == "cuda":
        use_kernels(a.kernels, head)
    log(f"EAGLE head {head_dir}, tree {spec}: {tree.N} tokens, depth {tree.D}")
    return EagleGenerator(model, head, tree, sampling, need, use_compile, a.compile_prefill, a.eagle_timing)


AUTO_SIZES = (40, 48, 50, 56, 60)  # EAGLE-2's total_token=-1: candidate tree sizes ...
AUTO_PENALTY = (1.0, 1.05, 1.07, 1.10, 1.13)  # ... and the factor each must beat


def auto_tree(model: Transformer, K: int = 10, D: int = 6) -> DynamicTree:
    """`--tree auto`: an EAGLE-2 tree whose size N minimises (target forward latency at N tokens) / penalty(N), as
    EAGLE-2 does. The choice is cached per device, model shape and dtype in ~/.cache/llm-gen/tree_auto.json
    (LLM_GEN_CACHE overrides the folder)."""
    device = model.norm.weight.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = f"{name}|{json.dumps(model.args.to_dict(), sort_keys=True)}|{model.norm.weight.dtype}"
    cache = Path(os.environ.get("LLM_GEN_CACHE", Path.home() / ".cache" / "llm-gen")) / "tree_auto.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in known:
        seconds = [forward_seconds(model, n) for n in AUTO_SIZES]
        known[key] = AUTO_SIZES[min(range(len(AUTO_SIZES)), key=lambda i: seconds[i] / AUTO_PENALTY[i])]
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1) + "\n")
        measured = ", ".join(f"{n}: {t * 1e3:.2f} ms" for n, t in zip(AUTO_SIZES, seconds, strict=True))
        log(f"--tree auto: target forward {measured}")
    log(f"--tree auto: N = {known[key]} (cached in {cache})")
    return DynamicTree(K=K, D=D, N=known[key])


@torch.inference_mode()
def forward_seconds(model: Transformer, n: int, reps: int = 10) -> float:
    """Median latency of one n-token target forward (tree-shaped mask); on CUDA replayed as a CUDA graph."""
    device = model.norm.weight.device
    model.setup_caches(1, 256)
    L = torch.tensor([128], device=device)
    tokens = torch.zeros(1, n, dtype=torch.long, device=device)
    slots = L + torch.arange(n, device=device)
    mask = target_tree_mask(torch.ones(n, n, dtype=torch.bool, device=device).tril(), L, model.max_seq_length)
    run = lambda: model(tokens, slots, slots, mask)
    if device.type == "cuda":  # decoding replays CUDA graphs, so time one (eager timing would be launch-bound)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graph capture requires
            run()
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with capture(graph):
                run()
            run = graph.replay
        except RuntimeError as e:  # not expected; then eager timing is still a usable ranking
            log(f"--tree auto: CUDA graph capture failed ({str(e).splitlines()[0]}); timing eager forwards")
    times = []
    for _ in range(reps):
        t0 = timer(device)
        run()
        times.append(elapsed(t0, timer(device)))
    return sorted(times)[reps // 2]


def find_head(folder: Path) -> Path:
    """The head shipped for a checkpoint: heads/<checkpoint name>/ in this repository, or <checkpoint>/eagle/."""
    for cand in (Path(__file__).resolve().parent / "heads" / folder.resolve().name, folder / "eagle"):
        if (cand / "config.json").is_file():
            return cand
    raise UserError(f"no EAGLE head shipped for {folder.name}; pass --eagle HEAD_DIR")


def interactive_loop(gen, tok: Tokenizer, chat: bool, a, on_text) -> None:
    history: list[dict] = []
    print("Interactive mode: type a message, empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            text = input("\nyou> ")
        except EOFError:
            return
        if not text.strip():
            return
        history.append({"role": "user", "content": text})
        ids = tok.encode_prompt(history if chat else text, chat)
        if len(ids) + a.max_new_tokens > gen.max_seq_length:
            print("(conversation too long; starting over)", file=sys.stderr)
            history = [history[-1]]
            ids = tok.encode_prompt(history if chat else text, chat)
        print("bot> ", end="", flush=True)
        r = gen.generate(ids, a.max_new_tokens, tok.stop_ids, a.ignore_eos, on_text, tok)
        history.append({"role": "assistant", "content": tok.decode([t for t in r.output_ids if t not in tok.stop_ids])})
        print(f"\n[{len(r.output_ids)} tokens, {len(r.output_ids) / r.seconds:.1f} tok/s]", file=sys.stderr)


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def weight_bytes(model: Transformer) -> int:
    """Bytes read per decode step: every weight except the embedding table (one row is gathered)."""
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied LM head is read once
    total = sum(t.numel() * t.element_size() for t in unique.values())
    if not model.args.tie_embeddings:
        total -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    return total


def summary_line(rec: dict) -> str:
    s = f"[{rec['id']}] {rec['new_tokens']} tokens in {rec['seconds']:.2f} s: {rec['tokens_per_s']:.1f} tok/s"
    if "accept_len_mean" in rec:
        s += f", accept_len_mean {rec['accept_len_mean']:.2f} over {rec['rounds']} rounds"
    return s


def print_summary(records: list[dict], model: Transformer, device: torch.device) -> None:
    if not records:
        return
    warm = records[1:] if len(records) > 1 else records  # the first generation includes compilation
    toks = sum(r["new_tokens"] for r in warm)
    secs = sum(r["seconds"] for r in warm)
    tps = toks / secs
    log(f"average over {len(warm)} generation(s){' (first excluded: compile warm-up)' if len(records) > 1 else ''}: "
        f"{tps:.1f} tok/s, {weight_bytes(model) * tps / 1e9:.1f} GB/s of weights")  # fmt: skip
    if any("accept_len_mean" in r for r in warm):
        rounds = sum(r["rounds"] for r in warm)
        drafted = toks - len(warm)  # each generation's first token comes from the prompt's forward, not a round
        log(f"EAGLE: {drafted / max(rounds, 1):.2f} tokens per target forward (tau) over {rounds} rounds")
    if device.type == "cuda":
        log(f"peak memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
