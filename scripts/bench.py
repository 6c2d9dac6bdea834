"""GPU benchmarks. Every run measures its own baseline (device-to-device copy bandwidth) and prints JSON.

    python scripts/bench.py --plain --model smollm2 --model 7b      # plain compiled decoding (issue targets)
    python scripts/bench.py --rounds --model smollm2 --model 7b     # EAGLE per-round costs with a random head
    python scripts/bench.py --mt-bench --eagle heads/SmolLM2-135M-Instruct   # tau and tok/s, plain vs EAGLE
    python scripts/bench.py --eagle NEW_HEAD --compare-head heads/SmolLM2-135M-Instruct   # two heads, one run

Models: `smollm2` = the real checkpoint (checkpoints/SmolLM2-135M-Instruct), `smollm2-shape` = its shape with random
weights (no checkpoint needed: same speed, for quick A/B runs), `7b` = Llama-2-7B shape, random weights.
Results go to --out (JSON); BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import re
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import generate as G  # noqa: E402
import kernels  # noqa: E402
import model as M  # noqa: E402
import quantize  # noqa: E402
import tree as T  # noqa: E402
from draft import EagleHead, apply_draft_vocab, head_tree, load_head  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

SMOLLM2 = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
MT_BENCH = ROOT / "data" / "mt_bench" / "question.jsonl"


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    n = int(gib * 2**30) // 2
    a, b = (
        torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_(),
        torch.empty(n, dtype=torch.bfloat16, device="cuda"),
    )
    times = []
    for _ in range(25):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1000)
    del a, b
    return 2 * n * 2 / statistics.median(times[5:])


QUANT: dict | None = None  # --quant: {"mode": "int8"} or {"mode": "int4", "groupsize": 64}
COMPILE_PREFILL = False  # --compile-prefill, as in generate.py (default: eager prefill in a CUDA graph per bucket)
KERNEL = "auto"  # --kernel: "triton" also sends bf16 linears through kernels.py; "torch" = cuBLAS / tinygemm / Inductor


FUSED = True  # --no-fused: keep RMSNorm and the residual add out of the one-token matmul kernels (A/B runs)
DRAFT_QUANT = "none"  # --draft-quant int8: the EAGLE head's linears as int8 weights (as generate.py --draft-quant)


def quantize_head(head: EagleHead) -> None:
    if DRAFT_QUANT == "int8":
        print(f"--draft-quant int8: {quantize.quantize_linears_int8(head, torch.bfloat16)} head linears", flush=True)


def apply_kernel_choice(*modules: torch.nn.Module):
    """--kernel for bf16 linears, as generate.py --kernels does (quantized ones follow quantize.RUNTIME)."""
    if not QUANT:
        print(f"--kernel {KERNEL}: {G.use_kernels(KERNEL, *modules)} linears on kernels.py", flush=True)
    if not FUSED:
        for mod in (m for module in modules for m in module.modules() if hasattr(m, "fused")):
            mod.fused = lambda *args: None  # model.linear then runs norm, matmul and add apart
    return modules[0]


def random_model(name: str, dtype=torch.bfloat16) -> M.Transformer:
    """Random weights of a real shape, the same in every process (seed 0): two runs that differ only in a kernel
    option must then give the same outputs_sha1 where the option does not change the arithmetic."""
    args = M.ModelArgs.from_name(name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = M.Transformer(args).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    if QUANT:  # quantize in memory, exactly as quantize.py + load_model would
        sd, _ = quantize.quantize_state_dict(model.state_dict(), args, QUANT, device="cuda", progress=False)
        with torch.device("meta"):
            model = M.Transformer(args)
        quantize.swap_linears(model, QUANT)
        model.load_state_dict(sd, assign=True, strict=True)
        model.rope = torch.empty(0, 2, args.head_dim)  # a non-persistent buffer: rebuilt by setup_caches
        model = model.cuda()
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and "scales" not in n and "zeros" not in n:
                t.data = t.data.to(dtype)  # as load_model does
        quantize.prepare_for_device(model, QUANT, dtype)
    return apply_kernel_choice(model.eval().requires_grad_(False))


def load(name: str) -> tuple[M.Transformer, object]:
    if name in ("7b", "smollm2-shape"):
        return random_model("llama-2-7b" if name == "7b" else "smollm2-135m"), None
    return apply_kernel_choice(M.load_model(SMOLLM2, device="cuda", dtype=torch.bfloat16)), load_tokenizer(SMOLLM2)


def mt_bench_prompts(tok, n: int) -> list[list[int]]:
    prompts = G.read_prompts(str(MT_BENCH))[:n]
    return [tok.encode_prompt(p.turns[0], chat=True) for p in prompts]


def warm_prefill(gen: G.Generator, prompts: list[list[int]]) -> None:
    """Prefill's one-time costs before timing: one prompt per 64-token bucket (a CUDA graph each, captured on first
    use: ~3 eager prefills) and per attention path (--compile-prefill: one dynamic-shape graph for prompts of up to
    model.SMALL_S tokens, one for longer ones)."""
    for p in {(G.round_up(len(p), G.Prefill.BUCKET), len(p) > M.SMALL_S): p for p in prompts}.values():
        gen.generate(p, 4, set(), ignore_eos=True)


def bench_plain(name: str, n_prompts: int, max_new: int) -> dict:
    """Greedy batch-1 decoding, --ignore-eos. First call includes compilation; warm calls are the figure."""
    model, tok = load(name)
    prompts = mt_bench_prompts(tok, n_prompts) if tok else [[1, 450, 4996, 17354, 1701]] * n_prompts
    gen = G.Generator(
        model,
        G.Sampling(),
        G.round_up(max(map(len, prompts)) + max_new, 64),
        compile=True,
        compile_prefill=COMPILE_PREFILL,
    )
    t0 = time.perf_counter()
    first = gen.generate(prompts[0], max_new, set(), ignore_eos=True)
    first_call = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = gen.generate(prompts[0], max_new, set(), ignore_eos=True)
    second_call = time.perf_counter() - t0
    warm_prefill(gen, prompts)
    runs = [gen.generate(p, max_new, set(), ignore_eos=True) for p in prompts]
    prefill_s = statistics.median(
        cuda_time(lambda p=p: gen._start(torch.tensor([p], device="cuda")), 3) for p in prompts[:10]
    )
    profile(gen, prompts[0], 64, f"plain_{name}")
    toks = sum(len(r.output_ids) for r in runs)
    secs = sum(r.seconds for r in runs)
    tps = toks / secs
    return {
        "model": name, "prompts": len(prompts), "max_new_tokens": max_new, "tokens_per_s": tps,
        "decode_tokens_per_s": toks / sum(r.seconds - r.prefill_seconds for r in runs),
        "weight_gb_per_s": G.weight_bytes(model) * tps / 1e9, "weight_bytes": G.weight_bytes(model),
        "first_call_s": first_call, "second_call_s": second_call, "first_call_tokens": len(first.output_ids),
        "second_call_tokens": len(second.output_ids), "prefill_s_median": prefill_s, "outputs_sha1": outputs_sha1(runs),
    }  # fmt: skip


PROFILE_DIR: Path | None = None


def profile(gen: G.Generator, prompt: list[int], max_new: int, tag: str) -> None:
    """Kernel table of one warm generation (CUDA graphs included) into PROFILE_DIR/<tag>.txt."""
    if PROFILE_DIR is not None:
        r = kernel_table(lambda: gen.generate(prompt, max_new, set(), ignore_eos=True), tag, steps_of)
        print(f"{tag}: {len(r.output_ids)} tokens, wall {r.seconds * 1e3 / steps_of(r):.3f} ms per step/round "
              f"(profiler on)", flush=True)  # fmt: skip


def steps_of(r: G.Result) -> int:
    """Decoding steps (plain) or rounds (EAGLE) of a generation."""
    return r.stats.get("rounds", max(len(r.output_ids) - 1, 1))


def profile_path(tag: str) -> Path:
    """PROFILE_DIR/<tag>.txt, with what a file name cannot hold (the '/' of a tree file's path, ':') as '_'."""
    return PROFILE_DIR / (re.sub(r"[^\w.,=+-]+", "_", tag) + ".txt")


def kernel_table(fn, tag: str, steps):
    """Run fn once under the profiler; write its GPU kernel table, per step (steps(fn's result) of them), to
    PROFILE_DIR/<tag>.txt. Returns fn's result."""
    from torch.profiler import ProfilerActivity  # noqa: PLC0415

    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    n = steps(r)
    gpu_busy = sum(e.device_time for e in kernels) / 1e6  # seconds
    head = (f"{tag}: {len(kernels)} kernels in {n} steps/rounds ({len(kernels) / n:.1f} per step/round), "
            f"GPU busy {gpu_busy * 1e3 / n:.3f} ms per step/round (profiler on)")  # fmt: skip
    runs = [(e.name, e.time_range.start, e.time_range.end) for e in kernels]
    table = timeline_table(runs)
    table += prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    table += prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=90)
    path = profile_path(tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + "\n" + table)
    with gzip.open(path.with_suffix(".kernels.json.gz"), "wt") as f:  # every kernel run, for other tables later
        json.dump(runs, f)
    print(head, flush=True)
    return r


def timeline_table(kernels: list[tuple[str, float, float]]) -> str:
    """Where a step's GPU time goes, kernel by kernel, from (name, start µs, end µs) of every kernel run.

    A step (or round) is the shortest block of kernels that the later half of the run repeats (98% of names equal one
    block apart), cut where the gap before a kernel is longest (the host's sync or the graph launch); the GPU need
    not idle between steps (the host launches ahead). Steps are lined up by position; each position gets its median
    duration and the median gap since the previous kernel ended (negative: it started before, as programmatic
    dependent launch allows; its duration then includes the wait for its predecessor). Where the step repeats a block
    of kernels (the layers), that block is folded: each slot's median over the blocks, then the positions outside."""
    ks = sorted(kernels, key=lambda k: k[1])
    n = len(ks)
    names_all = [k[0] for k in ks]

    def repeats(p: int) -> bool:  # the last max(n / 2, 2 p) kernels: 98% equal to the one p later
        lo = n - max(n // 2, 2 * p)
        return sum(names_all[i] == names_all[i + p] for i in range(lo, n - p)) >= 0.98 * (n - p - lo)

    length = next((p for p in range(3, n // 2 + 1) if repeats(p)), 0)  # kernels a step
    if not length:
        return "timeline: no repeating step found\n"
    lo = n - max(n // 2, 2 * length)
    gaps = [statistics.median(ks[i][1] - ks[i - 1][2] for i in range(lo + o, n, length)) for o in range(length)]
    start = lo + max(range(length), key=lambda o: gaps[o])
    starts = list(range(start, n - length + 1, length))
    names = names_all[start : start + length]
    same = [i for i in starts if names_all[i : i + length] == names]
    dur = [statistics.median(ks[i + j][2] - ks[i + j][1] for i in same) for j in range(length)]
    gap = [statistics.median(ks[i + j][1] - ks[i + j - 1][2] for i in same) for j in range(length)]
    span = statistics.median(ks[i + length - 1][2] - ks[i][1] for i in same)
    # the layer block: the shortest period p that most positions repeat at, searched over blocks of 3-40 kernels
    period, count = 0, 0
    for p in range(3, min(41, length // 3 + 1)):
        runs = [i for i in range(length - p) if names[i] == names[i + p]]
        if len(runs) >= length - 3 * p and len(runs) > count * 1.05:
            period, count = p, len(runs)
    lines = [f"timeline: {len(same)} of {len(starts)} steps/rounds (of the run's later half) with {length} kernels; "
             f"median span {span:.1f} us, kernels {sum(dur):.1f} us, gaps {sum(gap):.1f} us"]  # fmt: skip
    short = [re.sub(r"^(triton_\w{3}_fused_)", "", name)[:70] for name in names]
    if period:
        first = next(i for i in range(length - period) if names[i : i + period] == names[i + period : i + 2 * period])
        blocks = 1
        while names[first + blocks * period : first + (blocks + 1) * period] == names[first : first + period]:
            blocks += 1
        lines.append(f"block of {period} kernels x {blocks}, from position {first}: per slot, median over blocks")
        lines.append(f"{'slot':>4}  {'us':>7}  {'gap us':>7}  {'x blocks us':>11}  kernel")
        for j in range(period):
            d = statistics.median(dur[first + b * period + j] for b in range(blocks))
            g = statistics.median(gap[first + b * period + j] for b in range(blocks))
            lines.append(f"{j:>4}  {d:>7.2f}  {g:>7.2f}  {(d + g) * blocks:>11.1f}  {short[first + j]}")
        outside = [i for i in range(length) if not first <= i < first + blocks * period]
    else:
        outside = list(range(length))
    lines.append(f"{'pos':>4}  {'us':>7}  {'gap us':>7}  kernel" + ("  (outside the blocks)" if period else ""))
    lines += [f"{i:>4}  {dur[i]:>7.2f}  {gap[i]:>7.2f}  {short[i]}" for i in outside]
    return "\n".join(lines) + "\n"


def cuda_time(fn, iters: int = 50) -> float:
    """Median seconds per call of fn (already warm), by CUDA events around each call."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1000)
    return statistics.median(times)


def graph_time(fn, calls: int = 20, replays: int = 10) -> float:
    """Median seconds per call of fn, from CUDA-graph replays of `calls` back-to-back calls (no launch gaps)."""
    fn()  # autotuning and compilation happen here, outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with G.capture(g):
        for _ in range(calls):
            fn()
    return cuda_time(g.replay, replays) / calls


LINEAR_SHAPES = {  # (out N, in K) of wqkv, wo, w13, w2, LM head
    "7b": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)],
    "smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)],
}
LINEAR_SHAPES["smollm2-shape"] = LINEAR_SHAPES["smollm2"]


def linear_variants(n: int, k: int) -> dict:
    """name -> (fn(x) -> y, weight bytes read) for one random [n, k] weight in every format and kernel."""
    import torch.nn.functional as F  # noqa: PLC0415

    import kernels  # noqa: PLC0415

    w = torch.randn(n, k, device="cuda") * 0.02
    wb = w.to(torch.bfloat16)
    q8, s8 = quantize.quantize_int8(w)
    s8 = s8.to(torch.bfloat16)
    q4, sz = quantize.quantize_int4(w, 64)
    p4 = quantize.pack_int4(q4)
    sz4 = kernels.int4_layout(sz)
    tg = torch.ops.aten._convert_weight_to_int4pack(p4, quantize.pick_inner_k_tiles(k))
    tsz = sz.to(torch.bfloat16).contiguous()
    b16, b8, b4 = 2 * n * k, n * k + 2 * n, n * k // 2 + n * k // 16
    return {
        "bf16_cublas": (lambda x: F.linear(x, wb), b16),
        "bf16_triton": (lambda x: kernels.wmm(x, wb, None, kernels.NONE, 0), b16),
        "int8_triton": (lambda x: kernels.wmm(x, q8, s8, kernels.INT8, 0), b8),
        "int4_tinygemm": (lambda x: torch.ops.aten._weight_int4pack_mm(x, tg, 64, tsz), b4),
        "int4_triton": (lambda x: kernels.wmm(x, p4, sz4, kernels.INT4, 64), b4),
        "int8_ref": (lambda x: F.linear(x.float(), q8.float() * s8.float()[:, None]), 0),
        "int4_ref": (lambda x: F.linear(x.float(), quantize.dequantize_int4(p4, sz, 64)), 0),
    }


def bench_linears(models: list[str], tokens=(1, 8, 26, 64)) -> dict:
    """Each linear shape of the model, per kernel and token count: microseconds per call and weight GB/s."""
    import kernels  # noqa: PLC0415

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    out: dict = {}
    for name in models:
        for n, k in LINEAR_SHAPES[name]:
            variants = linear_variants(n, k)
            for m in tokens:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {}
                for v, (fn, nbytes) in variants.items():
                    if nbytes:
                        t = graph_time(lambda fn=fn, x=x: fn(x))
                        row[v] = {"us": t * 1e6, "gb_per_s": nbytes / t / 1e9}
                row["int8_rel_err"] = rel(variants["int8_triton"][0](x), variants["int8_ref"][0](x))
                row["int4_rel_err"] = rel(variants["int4_triton"][0](x), variants["int4_ref"][0](x))
                key = f"{name} N={n} K={k} M={m}"
                out[key] = row
                times = " ".join(f"{v}={r['us']:.1f}us/{r['gb_per_s']:.0f}" for v, r in row.items() if "err" not in v)
                print(key, times, f"err8={row['int8_rel_err']:.1e} err4={row['int4_rel_err']:.1e}", flush=True)
    for kern in (kernels._gemv_kernel, kernels._gemm_kernel):
        out[f"best_configs_{kern.fn.__name__}"] = {str(k): str(c) for k, c in kern.cache.items()}
    return out


def bench_rounds(name: str, tree_spec: str, draft_vocab: int | None = None, sizes=(1, 8, 26, 64),
                 feature_layers: tuple[int, ...] = ()) -> dict:  # fmt: skip
    """EAGLE per-round costs with a random head: target forward vs tokens, draft, verification overhead.

    The target forward is GPU time alone: 20 calls of the compiled forward (Inductor's kernels and ours, no CUDA graph
    of torch.compile's own) captured in one CUDA graph and replayed. Until the seventh session it was timed around
    single calls of the reduce-overhead forward, which added the host's launch time: on the SmolLM2 shape that made a
    one-token forward look longer than a whole plain decoding step. Draft and verification are timed the second way
    (each a compiled CUDA graph of the generator's, host time included); the whole round also as GPU time
    (round_gpu_s: the generator's one-graph round, replays launched back to back), against which issue #3's overhead
    target is read (overhead_gpu_vs_target_forward). feature_layers: a head with feature fusion (draft.py)."""
    model, _ = load(name)
    T_ = 1024
    out: dict = {"model": name, "tree": tree_spec, "target_forward_s": {}}
    tree = T.build_tree(T.parse_tree_spec(tree_spec))
    model.setup_caches(1, T_)
    for n in sorted({1, *sizes, tree.N}):  # each size compiles a forward of its own (~30 s)
        out["target_forward_s"][n] = graph_time(tree_forward(model, n, T_, 500))
    gen, reset = random_head_generator(model, tree, draft_vocab, feature_layers)
    out["draft_vocab"], out["feature_layers"] = draft_vocab or 0, list(feature_layers)
    st, head = gen.state, gen.head

    def draft():
        reset()
        gen.draft(head, model, gen.tree, st)

    def verify():
        reset()
        gen.verify(model, gen.tree, st, gen.sampling, head.feature_layers)

    def both():
        draft()
        gen.verify(model, gen.tree, st, gen.sampling, head.feature_layers)

    out["draft_s"] = cuda_time(draft)
    out["verify_s"] = cuda_time(verify)
    out["round_s"] = cuda_time(both)

    def rounds20():
        """The round as decoding runs it: one CUDA graph (gen.round), 20 replays launched back to back, so the GPU
        never waits for the host and the time is the GPU's (issue #3's overhead = this minus the tree forward; the
        reset's two fills are timed too, a fraction of a microsecond a round)."""
        reset()
        for _ in range(20):
            gen.round()

    out["round_gpu_s"] = cuda_time(rounds20, iters=5) / 20
    if PROFILE_DIR is not None:
        dv = f"_dv{draft_vocab}" if draft_vocab else ""
        kernel_table(rounds20, f"rounds_{name}_{tree_spec}_{DRAFT_QUANT}{dv}", lambda _: 20)
    t1, tn = out["target_forward_s"][1], out["target_forward_s"][tree.N]
    out["tree_tokens"] = tree.N
    out["overhead_vs_target_forward"] = (out["round_s"] - tn) / tn
    out["overhead_gpu_vs_target_forward"] = (out["round_gpu_s"] - tn) / tn
    out["forward_ratio_tree_vs_1"] = tn / t1
    out["implied_speedup_for_tau"] = {tau: tau * t1 / out["round_gpu_s"] for tau in (2.0, 3.0, 3.5, 4.0)}
    return out


def tree_forward(model: M.Transformer, n: int, T_: int, L: int):
    """The compiled target forward over n tokens at positions L.. of a T_-slot cache, under a chain's tree mask (the
    cost is the same for any tree of n tokens), as a no-argument function (random tokens)."""
    anc = T.build_tree(T.parse_tree_spec(f"chain:{n - 1}")).ancestors if n > 1 else torch.ones(1, 1, dtype=torch.bool)
    tok = torch.randint(0, model.args.vocab_size, (1, n), device="cuda")
    slots = L + torch.arange(n, device="cuda")
    mask = T.target_tree_mask(anc.cuda(), torch.tensor([L], device="cuda"), T_)
    fwd = torch.compile(lambda m, t, p, s, k: m(t, p, s, k), fullgraph=True, dynamic=False)
    return lambda: fwd(model, tok, slots, slots, mask)


def random_head_generator(model: M.Transformer, tree, draft_vocab: int | None, feature_layers: tuple[int, ...] = ()):
    """A random EAGLE head for `model` (bf16, --draft-quant and --kernel as set; a draft vocabulary of draft_vocab
    random ids: the cost is the same for any ids) in a compiled generator, started on a random 400-token prompt.
    Returns (generator, reset): reset() puts the committed length back to 400 before timed rounds."""
    torch.manual_seed(0)
    head_args = M.ModelArgs(**{**model.args.to_dict(), "n_layers": 1})
    head = EagleHead(head_args, feature_layers=feature_layers).cuda().to(torch.bfloat16).eval()
    quantize_head(head)
    apply_kernel_choice(head)  # as --mt-bench and generate.py do
    if draft_vocab:
        head.restrict_vocab(torch.randperm(model.args.vocab_size, device="cuda")[:draft_vocab], model)
    gen = G.EagleGenerator(
        model, head, tree, G.Sampling(), 1024, compile=True, compile_prefill=COMPILE_PREFILL, split_timing=True
    )
    gen._start(torch.randint(0, model.args.vocab_size, (1, 400), device="cuda"))
    st = gen.state

    def reset():
        st.L.fill_(400)
        st.n.fill_(1)

    return gen, reset


def outputs_sha1(runs) -> str:
    """A fingerprint of every output token of a list of runs: equal across A/B runs of kernels that must not change
    the result (e.g. --pdl, whose launches could race if a kernel read before waiting)."""
    return hashlib.sha1(json.dumps([r.output_ids for r in runs]).encode()).hexdigest()


def bench_mt_bench(head_dirs: list[str], tree_specs: list[str], n_prompts: int, max_new: int,
                   draft_vocab: int | None) -> dict:  # fmt: skip
    """Real SmolLM2 on MT-bench first turns, greedy: plain compiled vs EAGLE with each head and tree, same run (one
    plain baseline, one set of autotuned kernels); tau per category."""
    model, tok = load("smollm2")
    questions = G.read_prompts(str(MT_BENCH))[:n_prompts]
    cats = [json.loads(line).get("category", "?") for line in MT_BENCH.read_text().splitlines() if line.strip()]
    prompts = [tok.encode_prompt(q.turns[0], chat=True) for q in questions]
    T_ = G.round_up(max(map(len, prompts)) + max_new, 64)
    res: dict = {"prompts": len(prompts), "max_new_tokens": max_new}
    plain = G.Generator(model, G.Sampling(), T_, compile=True, compile_prefill=COMPILE_PREFILL)
    plain.generate(prompts[0], max_new, tok.stop_ids)  # warm-up / compile
    warm_prefill(plain, prompts)
    runs = [plain.generate(p, max_new, tok.stop_ids) for p in prompts]
    res["plain"] = {
        "tokens_per_s": sum(len(r.output_ids) for r in runs) / sum(r.seconds for r in runs),
        "host_launch_s": sum(r.stats["host_launch_seconds"] for r in runs),
        "host_wait_s": sum(r.stats["host_wait_seconds"] for r in runs),
        "seconds": sum(r.seconds for r in runs), "tokens": sum(len(r.output_ids) for r in runs),
        "outputs_sha1": outputs_sha1(runs),
    }  # fmt: skip
    for h, head_dir in enumerate(head_dirs):  # keys: the tree spec for the first head, "HEAD SPEC" for the others
        prefix = "" if h == 0 else f"{head_dir} "
        head = load_head(head_dir, model.args, "cuda", torch.bfloat16)
        quantize_head(head)
        size = apply_draft_vocab(head, head_dir, draft_vocab, model) or None
        if h == 0:
            res["draft_vocab"] = size
        apply_kernel_choice(head)
        for spec in tree_specs:
            split = spec.endswith("+split")  # variant: draft and verification as two CUDA graphs, timed apart
            name = head_tree(spec.removesuffix("+split"), head_dir)  # 'head': the tree the head's config names
            tree = T.make_tree(name)
            gen = G.EagleGenerator(
                model, head, tree, G.Sampling(), T_, compile=True, compile_prefill=COMPILE_PREFILL, split_timing=split
            )
            gen.generate(prompts[0], max_new, tok.stop_ids)  # warm-up / compile
            warm_prefill(gen, prompts)
            eruns = [gen.generate(p, max_new, tok.stop_ids) for p in prompts]
            profile(gen, prompts[0], max_new, f"eagle_{prefix}{spec}")  # (profile_path makes it a file name)
            toks = sum(len(r.output_ids) for r in eruns)
            rounds = sum(r.stats["rounds"] for r in eruns)
            taus = [r.stats["accept_len_mean"] for r in eruns]
            by_cat: dict[str, list[float]] = {}
            for q, t in zip(questions, taus, strict=True):
                by_cat.setdefault(cats[int(q.id) - 81] if q.id.isdigit() else "?", []).append(t)
            same = sum(r.output_ids == e.output_ids for r, e in zip(runs, eruns, strict=True))
            res[prefix + spec] = {
                "tokens_per_s": toks / sum(r.seconds for r in eruns), "tau": sum(taus) / len(taus),
                "tau_tokens_per_round": (toks - len(prompts)) / rounds,
                "tau_by_category": {k: sum(v) / len(v) for k, v in by_cat.items()},
                "speedup_vs_plain": toks / sum(r.seconds for r in eruns) / res["plain"]["tokens_per_s"],
                "head": head_dir, "draft_vocab": size, "tree": name, "tree_tokens": tree.N,
                "identical_outputs_bf16": same,
                "round_s": sum(r.stats["round_seconds"] for r in eruns),
                "draft_s": sum(r.stats["draft_seconds"] for r in eruns) if split else None,
                "verify_s": sum(r.stats["verify_seconds"] for r in eruns) if split else None,
                "seconds": sum(r.seconds for r in eruns), "rounds": rounds, "tokens": toks,
                "host_launch_s": sum(r.stats["host_launch_seconds"] for r in eruns),
                "host_wait_s": sum(r.stats["host_wait_seconds"] for r in eruns),
                "prefill_s": sum(r.prefill_seconds for r in eruns),
                "outputs_sha1": outputs_sha1(eruns),
            }  # fmt: skip
            print(json.dumps({prefix + spec: res[prefix + spec]}), flush=True)
    return res


def switch(p: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """An on/off option: --name / --no-name."""
    p.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help)


HEAD = str(ROOT / "heads" / "SmolLM2-135M-Instruct")


@torch.inference_mode()
def main() -> None:
    run(parse_args())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=["smollm2", "smollm2-shape", "7b"],
                   help="repeatable (default: smollm2 and 7b)")  # fmt: skip
    p.add_argument("--plain", action="store_true", help="plain compiled decoding")
    p.add_argument("--rounds", action="store_true", help="EAGLE per-round costs with a random head (= --eagle)")
    p.add_argument("--mt-bench", action="store_true", help="tau and tok/s on MT-bench with --eagle HEAD")
    p.add_argument(
        "--eagle",
        nargs="?",
        const="",
        default=None,
        metavar="HEAD",
        help="alone: EAGLE per-round costs with a random head (as --rounds); with a head: tau and tok/s on MT-bench "
        "with that head (as --mt-bench --eagle HEAD; --mt-bench alone takes the shipped SmolLM2 head)",
    )
    p.add_argument("--tree", action="append", help="tree specs for --rounds / --mt-bench (default: default)")
    p.add_argument(
        "--compare-head",
        action="append",
        default=[],
        metavar="HEAD",
        help="--mt-bench: another head to run with the same trees in the same process, after --eagle's: one plain "
        "baseline and one set of autotuned kernels for all (results keyed 'HEAD SPEC'); repeatable",
    )
    p.add_argument("--prompts", type=int, default=80, help="MT-bench questions to use")
    p.add_argument(
        "--forward-tokens",
        type=lambda v: tuple(int(t) for t in v.split(",")),
        default=(1, 8, 26, 64),
        metavar="N,N,...",
        help="--eagle/--rounds: token counts to time the target forward at (default 1,8,26,64; the tree's own size and "
        "1 are always timed; each costs a compile, ~30 s)",
    )
    p.add_argument("--max-new-tokens", type=int, default=0, help="default: 256 for SmolLM2, 200 for 7b")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--profile", default=None, metavar="DIR", help="write kernel tables of warm runs here")
    p.add_argument("--tuned", action="store_true", help="coordinate-descent tuning of Inductor kernels")
    p.add_argument("--quant", default=None, help="7b only: int8 or int4[:G] weight-only quantization in memory")
    p.add_argument(
        "--kernel",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="as generate.py --kernels: auto = Triton GEMV for one-token bf16 steps, Triton int8, tinygemm int4; "
        "triton = kernels.py for every linear of 1-64 tokens; torch = cuBLAS, Inductor (int8) and tinygemm (int4)",
    )
    p.add_argument("--linears", action="store_true", help="micro-benchmark every linear shape per kernel")
    switch(
        p,
        "--fused",
        True,
        "RMSNorm and residual add inside the one-token Triton matmuls (model.linear); --no-fused for A/B runs",
    )
    p.add_argument(
        "--fuse-min-k",
        type=int,
        default=None,
        help=f"one-token steps fuse norm / residual / gating into the matmul for inputs of >= this many features "
        f"(default kernels.FUSE_MIN_K = {kernels.FUSE_MIN_K}; 0 = always)",
    )
    p.add_argument(
        "--gemm-min-block-m",
        type=int,
        choices=[16, 32, 64],
        default=None,
        help=f"few-token matmuls pad their rows to at least this many (default kernels.GEMM_MIN_BLOCK_M = "
        f"{kernels.GEMM_MIN_BLOCK_M}: 16, 32 or 64 by the token count), for A/B runs of the tile height",
    )
    switch(
        p,
        "--prefetch",
        True,
        "matmuls fetch their first weights before the PDL wait (kernels.PREFETCH);\n--no-prefetch for A/B runs",
    )
    switch(
        p,
        "--gemv-pipeline",
        True,
        "the one-token matmul loads its next chunk of weights before summing the current one\n"
        "(kernels.GEMV_PIPELINE); --no-gemv-pipeline for A/B runs",
    )
    switch(
        p,
        "--gemv-fold",
        kernels.GEMV_FOLD,
        "the one-token bf16/int8 matmul sums each thread's 16 bytes of a row at every chunk (kernels.GEMV_FOLD:\n"
        "about half the registers, so more programs an SM; not yet timed, so off by default)",
    )
    p.add_argument(
        "--attn-block-t",
        type=int,
        choices=[32, 64, 128, 256],
        default=None,
        help=f"cache slots per program of the few-token attention's first kernel (default kernels.ATTN_BLOCK_T = "
        f"{kernels.ATTN_BLOCK_T}); fewer, longer chunks leave its merge kernel less to read. For A/B runs",
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        metavar="N",
        help="--mt-bench: draft among the head's N most frequent tokens (as generate.py --draft-vocab: default 16384 "
        "where the head has a vocabulary file, 0 = all); bare --eagle: among N random tokens (default all)",
    )
    switch(
        p,
        "--triton-topk",
        kernels.TRITON_TOPK,
        "the draft's top-k (and EAGLE-2's logsumexp) as one Triton kernel (kernels.chunk_topk; on by default as in "
        "generate.py)",
    )
    switch(
        p,
        "--triton-attention",
        True,
        "few-token attention as two Triton kernels (kernels.few_token_attention; on by default as in generate.py)",
    )
    switch(
        p,
        "--pdl",
        True,
        "programmatic dependent launch for kernels.py's and Inductor's Triton kernels (kernels.set_pdl; on by "
        "default, as in generate.py, where the GPU has it; with it, --kernel auto takes kernels.py for 2-64 tokens)",
    )
    p.add_argument(
        "--configs-in",
        "--kernel-configs",
        dest="configs_in",
        default=None,
        metavar="JSON",
        help="pin the matmul block shapes recorded in an earlier bench.py JSON or by scripts/tune_kernels.py "
        "('tuned_configs'), so A/B runs use the same ones instead of the autotuner's pick of the day "
        "(kernels.pin_configs; generate.py --kernel-configs)",
    )
    p.add_argument(
        "--feature-layers",
        type=lambda v: tuple(sorted({int(t) for t in v.split(",") if t.strip()})),
        default=(),
        metavar="L,L,...",
        help="bare --eagle / --rounds: the random head fuses the target's residual streams entering these layers (as "
        "the shipped SmolLM2 head does with 2,15; draft.py), to time what feature fusion costs a round",
    )
    p.add_argument(
        "--draft-quant",
        choices=["none", "int8"],
        default="none",
        help="--eagle / --mt-bench: the draft head's linears as int8 weights (as generate.py --draft-quant)",
    )
    p.add_argument(
        "--compile-prefill",
        action="store_true",
        help="as generate.py --compile-prefill (dynamic-shape compile instead of a CUDA graph per prompt bucket)",
    )
    a = p.parse_args(argv)
    if a.quant:
        try:
            a.quant_spec, a.quant = a.quant, quantize.parse_spec(a.quant)  # the spec names the result keys
        except quantize.CheckpointError as e:
            p.error(f"--quant: {e}")
    if a.eagle == "":  # bare --eagle: round costs with a random head
        a.rounds, a.eagle = True, None
    elif a.eagle is not None:
        a.mt_bench = True
    a.eagle = a.eagle or HEAD
    if a.compare_head and not a.mt_bench:
        p.error("--compare-head needs --mt-bench (or --eagle HEAD)")
    for head in a.compare_head:
        if not (Path(head) / "config.json").is_file():
            p.error(f"--compare-head {head}: no EAGLE head there (config.json missing)")
    return a


def run(a: argparse.Namespace) -> None:  # (under main's inference mode)
    global PROFILE_DIR, QUANT, KERNEL, COMPILE_PREFILL, FUSED, DRAFT_QUANT
    PROFILE_DIR = Path(a.profile) if a.profile else None
    DRAFT_QUANT = a.draft_quant
    KERNEL, COMPILE_PREFILL, FUSED = a.kernel, a.compile_prefill, a.fused
    G.set_kernels(a.kernel)
    kernels.TRITON_TOPK = a.triton_topk
    kernels.FEW_ATTENTION = a.triton_attention
    try:
        pinned = G.pin_kernel_configs(a.configs_in) if a.configs_in else 0
    except G.UserError as e:
        sys.exit(f"error: {e}")
    pdl = kernels.set_pdl(a.pdl and a.kernel != "torch")
    if a.fuse_min_k is not None:
        kernels.FUSE_MIN_K = a.fuse_min_k
    if a.gemm_min_block_m is not None:
        kernels.GEMM_MIN_BLOCK_M = a.gemm_min_block_m
    if a.attn_block_t is not None:
        kernels.ATTN_BLOCK_T = a.attn_block_t
    kernels.PREFETCH = a.prefetch
    kernels.GEMV_PIPELINE = a.gemv_pipeline
    kernels.GEMV_FOLD = a.gemv_fold
    QUANT = a.quant
    if not torch.cuda.is_available():
        sys.exit("error: bench.py needs a CUDA GPU")
    G.set_inductor_flags(a.tuned)
    models = a.model or ["smollm2", "7b"]
    res = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": str(date.today()),
        "python": platform.python_version(), "command": " ".join(sys.argv), "tuned": a.tuned,
        "copy_gb_per_s": copy_bandwidth() / 1e9, "fuse_min_k": kernels.FUSE_MIN_K,
        "gemm_min_block_m": kernels.GEMM_MIN_BLOCK_M, "attn_block_t": kernels.ATTN_BLOCK_T,
        "prefetch": kernels.PREFETCH and pdl, "gemv_pipeline": kernels.GEMV_PIPELINE,
        "gemv_fold": kernels.GEMV_FOLD,
        "triton_topk": kernels.TRITON_TOPK,
        "pdl": pdl, "kernel": a.kernel, "triton_attention": kernels.FEW_ATTENTION, "pinned_configs": pinned,
        "draft_quant": a.draft_quant,
    }  # fmt: skip
    print(json.dumps(res), flush=True)
    if a.linears:
        res["linears"] = bench_linears(models)
    for name in models:
        max_new = a.max_new_tokens or (256 if name.startswith("smollm2") else 200)
        if a.plain:
            r = bench_plain(name, a.prompts if name.startswith("smollm2") else 5, max_new)
            r["fraction_of_copy_bw"] = r["weight_gb_per_s"] / res["copy_gb_per_s"]
            pre = ("_compiledprefill" if a.compile_prefill else "") + ("" if a.fused else "_unfused")
            res[f"plain_{name}{'_' + a.quant_spec if a.quant and name == '7b' else ''}_{a.kernel}{pre}"] = r
            print(json.dumps(r), flush=True)
        if a.rounds:
            for spec in a.tree or ["default"]:
                r = bench_rounds(name, spec, a.draft_vocab, a.forward_tokens, a.feature_layers)
                res[f"rounds_{name}_{spec}"] = r
                print(json.dumps(r), flush=True)
    if a.mt_bench:
        res["mt_bench"] = bench_mt_bench(
            [a.eagle, *a.compare_head],
            a.tree or ["default", "chain:5"],
            a.prompts,
            a.max_new_tokens or 256,
            a.draft_vocab,
        )
    res["tuned_configs"] = kernels.tuned_configs()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
