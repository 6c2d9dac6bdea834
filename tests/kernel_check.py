"""Checks of kernels.py, run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1 (Triton's CPU
interpreter must be chosen before triton is imported). Every block-shape config of both kernels, every weight
format, token counts 1..64, and the quantized modules' "triton" path against their dequantized reference."""

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels as K  # noqa: E402
import model as M  # noqa: E402
import quantize as Q  # noqa: E402


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def weights(quant, n, k, g):
    """(w, s) in the kernel's format and the dense float32 reference W."""
    w = torch.randn(n, k) * 0.05
    if quant == K.NONE:
        return w, None, w
    if quant == K.INT8:
        q, s = Q.quantize_int8(w)
        q[0, :7], q[-1, :7] = -128, 127  # the ends of the int8 range go through the exponent trick too
        return q, s, Q.dequantize_int8(q, s)
    q, sz = Q.quantize_int4(w, g)
    packed = Q.pack_int4(q)
    return packed, K.int4_layout(sz, torch.float32), Q.dequantize_int4(packed, sz, g)


def assert_rejected(calls, what: str) -> None:
    """Every call raises ValueError."""
    for bad in calls:
        try:
            bad()
        except ValueError:
            continue
        raise AssertionError(f"bad {what} accepted")


def tiny_model(seed: int) -> M.Transformer:
    """The tiny preset with random weights and RMSNorm weights away from 1 (so that fusing them shows)."""
    torch.manual_seed(seed)
    model = M.Transformer(M.ModelArgs.from_name("tiny")).eval()
    for mod in model.modules():
        if isinstance(mod, M.RMSNorm):
            mod.weight.data = torch.rand_like(mod.weight) + 0.5
    return model


def three_forwards(model, tokens, slots: int = 64, dtype=torch.float32) -> list:
    """Logits of a prefill (9 tokens), one token, and 26 tokens written to shuffled cache slots, from fresh caches."""
    calls = [(tokens[:, :9], torch.arange(9), None), (tokens[:, 9:10], torch.tensor([9]), None)]
    calls.append(
        (tokens[:, 10:36], torch.arange(10, 36), torch.randperm(26, generator=torch.Generator().manual_seed(0)) + 10)
    )
    model.setup_caches(1, slots, dtype)
    with torch.no_grad():
        return [model(t, pos, cache_pos).float() for t, pos, cache_pos in calls]


def assert_all_close(outs_a: list, outs_b: list, tol: float = 1e-5) -> None:
    for a, b in zip(outs_a, outs_b, strict=True):
        assert rel_err(b, a) < tol, rel_err(b, a)


def check_all_configs():
    """Every block-shape config, as the autotuner would run it for the shape: pruned first (`_prune`; triton's
    autotuner skips pruning where it holds a single config, so the test prunes itself)."""
    torch.manual_seed(0)
    for kern, ms in ((K._gemv_kernel, [1]), (K._gemm_kernel, [2, 17, 26, 64])):
        configs = kern.configs
        try:
            for cfg in configs:
                bk = cfg.kwargs["BLOCK_K"]
                cases = ((K.NONE, 2 * bk), (K.INT8, 2 * bk), (K.INT4, 2 * bk), (K.NONE, bk + 48), (K.INT8, 3 * bk + 16),
                         (K.INT4, bk + 64))  # fmt: skip
                if cfg.kwargs.get("SPLIT", 1) > 1:  # long rows only (kernels.split_allowed); parts of several chunks
                    cases = ((K.NONE, K.SPLIT_MIN_K), (K.INT8, K.SPLIT_MIN_K + 16), (K.INT4, K.SPLIT_MIN_K + 64))
                if cfg.kwargs.get("WORDS") or K._int4_only(cfg):  # int4 only
                    cases = tuple(c for c in cases if c[0] == K.INT4)
                for quant, k in cases:
                    # n = 40 or 100: not a multiple of BLOCK_N. K not a multiple of BLOCK_K: the last chunk is masked
                    # (int4: whole groups past K)
                    n, g = 40 if cfg.kwargs["BLOCK_N"] <= 64 else 100, 64 if bk >= 64 else 32
                    pruned = K._prune([cfg], {"K": k, "N": n}, QUANT=quant, GROUP=g if quant == K.INT4 else 0)
                    assert len(pruned) == 1 and (quant != K.INT4 or pruned[0].kwargs["BLOCK_K"] % g == 0)
                    kern.configs, kern.cache = pruned, {}
                    w, s, ref_w = weights(quant, n, k, g)
                    variants = (
                        ((True, False), (False, False), (True, True)) if kern is K._gemv_kernel else ((True, False),)
                    )
                    for m, (pipeline, fold) in itertools.product(ms, variants):
                        K.GEMV_PIPELINE, K.GEMV_FOLD = pipeline, fold
                        x = torch.randn(m, k)
                        y = K.wmm(x, w, s, quant, g)
                        err = rel_err(y, x @ ref_w.T)
                        assert y.shape == (m, n) and err < 1e-5, (cfg, quant, k, m, pipeline, fold, err)
        finally:
            kern.configs, kern.cache, K.GEMV_PIPELINE, K.GEMV_FOLD = configs, {}, True, False
    assert not K._COUNTERS[torch.device("cpu")].any()  # every split config left its counters at zero
    print("configs ok")


def check_pinned_configs():
    """tuned_configs -> JSON -> pin_configs puts a chosen config back into the autotuner's cache; the kernel then
    runs with it (no tuning) and gives the same result."""
    import json  # noqa: PLC0415

    torch.manual_seed(11)
    w, s, ref_w = weights(K.NONE, 48, 256, 64)
    x = torch.randn(1, 256)
    K._gemv_kernel.cache, K._gemm_kernel.cache = {}, {}
    K.wmm(x, w, s, K.NONE, 64)
    saved = json.loads(json.dumps(K.tuned_configs()))
    assert len(saved) == 1 and saved[0]["kernel"] == "_gemv_kernel"
    other = next(c for c in K._gemv_kernel.configs if c.kwargs["BLOCK_N"] != saved[0]["kwargs"]["BLOCK_N"])
    saved[0].update(kwargs={**other.kwargs, "BLOCK_K": 256}, num_warps=other.num_warps, num_stages=other.num_stages)
    K._gemv_kernel.cache = {}
    old_version = {**saved[0], "key": saved[0]["key"] + [False]}  # one key argument more, as before the seventh session
    old_gemm = {**saved[0], "kernel": "_gemm_kernel", "kwargs": {"BLOCK_N": 16, "BLOCK_K": 256}}  # no SWAP
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert K.pin_configs([saved[0], old_version, old_gemm]) == 1 and "2 of 3" in str(caught[0].message)
    y = K.wmm(x, w, s, K.NONE, 64)
    (cfg,) = K._gemv_kernel.cache.values()
    assert cfg.kwargs == saved[0]["kwargs"] and rel_err(y, x @ ref_w.T) < 1e-5 and not K._gemm_kernel.cache
    K._gemv_kernel.cache = {}
    print("pin ok")


def check_fp16():
    torch.manual_seed(1)
    for quant in (K.NONE, K.INT8, K.INT4):
        w, s, ref_w = weights(quant, 48, 256, 64)
        if quant == K.NONE:
            w = w.half()
        for m, min_block_m in ((1, 16), (5, 16), (26, 16), (5, 64), (26, 64)):  # 64: rows padded to 64 (bench.py A/B)
            K.GEMM_MIN_BLOCK_M = min_block_m
            x = torch.randn(m, 256).half()
            y = K.wmm(x, w, s.half() if quant == K.INT8 else s, quant, 64)
            assert y.dtype == torch.float16 and rel_err(y, x.float() @ ref_w.T) < 2e-3, (quant, m, min_block_m)
    K.GEMM_MIN_BLOCK_M = 16
    print("fp16 ok")


def check_bf16_int4():
    """The one-token int4 kernel reads bf16 x four at a time as int64 (kernels._bf16_of), with the norm weight and the
    gating's up half read so too; x that does not start at a multiple of 8 bytes takes the one-at-a-time path."""
    torch.manual_seed(7)
    n, g = 48, 64
    for k, aligned in ((256, True), (256, False), (320, True)):  # 320: a last chunk of 512 holds 3 groups past K
        w, s, ref_w = weights(K.INT4, n, k, g)
        buf = torch.randn(2 * k + 8).bfloat16()
        norm_w, r = (torch.rand(k) + 0.5).bfloat16(), torch.randn(1, n).bfloat16()
        x = buf[None, :k] if aligned else buf[None, 1 : k + 1]
        assert (x.data_ptr() % 8 == 0) == aligned
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.float()
        gu = buf[None, 1 : 2 * k + 1] if not aligned else buf[None, : 2 * k]
        gated = F.silu(gu[:, :k].float()) * gu[:, k:].float()
        for args, ref in (
            ((x, w, s, K.INT4, g), xf @ ref_w.T),
            ((x, w, s, K.INT4, g, norm_w, 1e-5, r), normed @ ref_w.T + r.float()),
            ((gu, w, s, K.INT4, g, None, 0.0, None, True), gated @ ref_w.T),
        ):
            y = K.wmm(*args)
            assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 5e-3, (k, aligned, rel_err(y, ref))
    print("bf16_int4 ok")


def check_errors():
    x = torch.randn(65, 64)
    assert_rejected(
        [
            lambda: K.wmm(x, torch.randn(8, 64), None, K.NONE, 0),  # too many tokens
            lambda: K.wmm(x[:2], torch.randn(8, 32), None, K.NONE, 0),  # K mismatch
            lambda: K.wmm(x[:2], torch.zeros(8, 64, dtype=torch.int8), torch.ones(7), K.INT8, 0),
            lambda: K.wmm(x[:2], torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2, 2), K.INT4, 64),
            lambda: K.wmm(x[:1, :48], torch.zeros(8, 24, dtype=torch.uint8), torch.ones(8, 3, 2), K.INT4, 16),
        ],
        "shapes",
    )
    print("errors ok")


def check_modules():
    """The quantized modules and FewTokenLinear forced onto the Triton path (on the CPU interpreter) equal their
    dequantized references, for decode-sized and prefill-sized inputs."""
    torch.manual_seed(2)
    n, k = 96, 192
    w = torch.randn(n, k) * 0.05
    i8 = Q.WeightOnlyInt8Linear(k, n)
    i8.weight, i8.scales = Q.quantize_int8(w)
    ref8 = Q.dequantize_int8(i8.weight, i8.scales)
    i8.prepare(torch.float32, "triton")
    i4 = Q.WeightOnlyInt4Linear(k, n, 64)
    q, sz = Q.quantize_int4(w, 64)
    i4.weight, i4.scales_and_zeros = Q.pack_int4(q), sz
    ref4 = Q.dequantize_int4(i4.weight, sz, 64)
    i4.prepare(torch.float32, "triton")
    assert torch.equal(i4.dequantize(torch.float32), ref4)
    for mod, ref in ((i8, ref8), (i4, ref4)):
        for shape in ((1, 1, k), (1, 26, k), (1, 100, k)):
            x = torch.randn(shape)
            assert rel_err(mod(x), F.linear(x, ref)) < 1e-5, (mod, shape)
    lin = torch.nn.Linear(k, n, bias=False)
    few = K.FewTokenLinear(lin)
    assert few.weight is lin.weight
    x = torch.randn(1, 3, k)
    assert torch.equal(few(x), lin(x))  # on CPU (not CUDA) it is F.linear
    few64 = K.FewTokenLinear(lin, max_m=K.MAX_M)  # 2-64 tokens on the tl.dot kernel (--kernels triton, --pdl)
    real, K.available = K.available, lambda t: True
    try:
        for s in (1, 3, 26, 64, 65):
            x = torch.randn(1, s, k)
            assert rel_err(few64(x), lin(x)) < 1e-5, s
    finally:
        K.available = real
    print("modules ok")


def check_compile():
    """torch.compile(fullgraph=True) keeps llmgen::wmm as one opaque call (fake shapes right, no graph break)."""
    torch.manual_seed(3)
    i8 = Q.WeightOnlyInt8Linear(128, 64)
    i8.weight, i8.scales = Q.quantize_int8(torch.randn(64, 128))
    i8.prepare(torch.float32, "triton")
    f = torch.compile(lambda x: torch.relu(i8(x)) * 2, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 4, 128)
    assert torch.allclose(f(x), torch.relu(i8(x)) * 2)
    print("compile ok")


def check_fused():
    """The one-token GEMV with the RMSNorm fused before it, or the SwiGLU gating (silu(gate) * up), and the residual
    add after it, every block shape and weight format, against residual + rmsnorm(x) @ W.T; then model.linear on
    modules that fuse (the interpreter counts as a device here) against the plain path, under torch.compile, and a
    whole model."""
    torch.manual_seed(6)
    for kern, ms in ((K._gemv_kernel, [1]), (K._gemm_kernel, [2, 26])):
        configs = kern.configs
        try:
            for cfg in configs:
                if cfg.kwargs.get("SPLIT", 1) > 1:
                    continue  # split configs run for long rows only (kernels.split_allowed): check_all_configs
                kern.configs, kern.cache = [cfg], {}
                bk = cfg.kwargs["BLOCK_K"]
                for quant, k in ((K.NONE, 2 * bk), (K.INT8, 2 * bk), (K.INT4, 2 * bk), (K.NONE, bk + 48)):
                    n, gs = 40, 64 if bk >= 64 else 32
                    w, s, ref_w = weights(quant, n, k, gs)
                    for m in ms:
                        x, g, r = torch.randn(m, k) * 3, torch.rand(k) + 0.5, torch.randn(m, n)
                        b = torch.randn(n)
                        gate_up = torch.randn(m, 2 * k)
                        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
                        gated = F.silu(gate_up[:, :k]) * gate_up[:, k:]
                        for xx, gg, rr, gt, bb, ref in (
                            (x, g, None, False, None, normed @ ref_w.T),
                            (x, None, r, False, None, x @ ref_w.T + r),
                            (x, g, r, False, b, normed @ ref_w.T + r + b),
                            (gate_up, None, None, True, None, gated @ ref_w.T),
                            (gate_up, None, r, True, None, gated @ ref_w.T + r),
                            (x, None, None, False, b, x @ ref_w.T + b),
                        ):
                            if m > 1 and (gg is not None or gt):
                                continue  # the norm and the gating: one token only
                            for fold in (False, True) if kern is K._gemv_kernel else (False,):  # (GEMV_FOLD)
                                K.GEMV_FOLD = fold
                                y = K.wmm(xx, w, s, quant, gs, gg, 1e-5, rr, gt, bb)
                                err = rel_err(y, ref)
                                assert err < 1e-5, (cfg, quant, k, m, gg is None, rr is None, gt, bb is None, fold, err)
        finally:
            kern.configs, kern.cache, K.GEMV_FOLD = configs, {}, False
    w4, s4, _ = weights(K.INT4, 8, 64, 32)
    assert_rejected(
        [
            lambda: K.wmm(torch.randn(2, 64), w4, s4, K.INT4, 32, torch.ones(64), 1e-5, None),  # one token only
            lambda: K.wmm(torch.randn(2, 64), torch.randn(8, 64), None, K.NONE, 0, torch.ones(64), 1e-5),
            lambda: K.wmm(torch.randn(2, 128), torch.randn(8, 64), None, K.NONE, 0, gated=True),
            lambda: K.wmm(torch.randn(2, 64), torch.randn(8, 64), None, K.NONE, 0, bias=torch.ones(7)),
            lambda: K.wmm(torch.randn(1, 128), torch.randn(8, 64), None, K.NONE, 0, torch.ones(64), 1e-5, None, True),
            lambda: K.wmm(torch.randn(1, 63), torch.randn(8, 32), None, K.NONE, 0, None, 0.0, None, True),
            lambda: K.wmm(torch.randn(1, 64), torch.randn(8, 64), None, K.NONE, 0, torch.ones(32), 1e-5, None),
            lambda: K.wmm(torch.randn(1, 64), torch.randn(8, 64), None, K.NONE, 0, None, 0.0, torch.ones(1, 7)),
        ],
        "fused arguments",
    )

    dim, n = 128, 96
    norm = M.RMSNorm(dim, 1e-5)
    norm.weight.data = torch.rand(dim) + 0.5
    few = K.FewTokenLinear(torch.nn.Linear(dim, n, bias=False))
    i8 = Q.WeightOnlyInt8Linear(dim, n)
    i8.weight, i8.scales = Q.quantize_int8(torch.randn(n, dim) * 0.05)
    i8.prepare(torch.float32, "triton")
    i4 = Q.WeightOnlyInt4Linear(dim, n, 32)
    q4, sz4 = Q.quantize_int4(torch.randn(n, dim) * 0.05, 32)
    i4.weight, i4.scales_and_zeros = Q.pack_int4(q4), sz4
    i4.prepare(torch.float32, "triton")
    x, r = torch.randn(1, 1, dim), torch.randn(1, 1, n)
    gu = torch.randn(1, 1, 2 * dim)
    mods = (few, i8, i4)
    refs = {id(m): (M.linear(m, x, norm, r), M.linear(m, gu, None, r, gated=True)) for m in mods}  # plain path
    assert few.fused(x, norm, r) is None
    real, K.available = K.available, lambda x: True
    assert few.fused(x, norm, r) is None and few.fused(x, None, None) is None  # K = 128 < FUSE_MIN_K; no fusion
    min_k, K.FUSE_MIN_K = K.FUSE_MIN_K, 0
    try:
        for m in mods:
            assert m.fused(x, norm, r) is not None and m.fused(gu, None, r, True) is not None
            assert rel_err(M.linear(m, x, norm, r), refs[id(m)][0]) < 1e-5
            assert rel_err(M.linear(m, gu, None, r, gated=True), refs[id(m)][1]) < 1e-5
        assert few.fused(torch.randn(1, 2, dim), norm, None) is None  # two tokens, max_m = 1: not fused
        few26 = K.FewTokenLinear(torch.nn.Linear(dim, n), max_m=K.MAX_M)  # with a bias
        x26, r26 = torch.randn(1, 26, dim), torch.randn(1, 26, n)
        ref26 = r26 + F.linear(norm(x26), few26.weight, few26.bias)
        # 2-64 tokens: a norm with its own weight is not fused (see kernels.FUSE_MIN_K); the plain path gives the same
        assert i8.fused(torch.randn(1, 2, dim), norm, None) is None and few26.fused(x26, norm, r26) is None
        assert rel_err(M.linear(few26, x26, norm, r26), ref26) < 1e-5
        assert rel_err(few26(x26), F.linear(x26, few26.weight, few26.bias)) < 1e-5
        f = torch.compile(lambda x: M.linear(few, x, norm, r) * 2, fullgraph=True, backend="aot_eager")
        with torch.no_grad():  # inference only: the op has no autograd formula
            assert rel_err(f(x), refs[id(few)][0] * 2) < 1e-5
        # A whole model: decode steps go through the fused kernels, logits as in the reference.
        K.available = real
        model = tiny_model(7)
        args = model.args
        tokens = torch.randint(0, args.vocab_size, (1, 10))
        outs = []
        for fuse in (False, True):
            model.setup_caches(1, 64)
            if fuse:
                assert K.use_triton_linears(model) > 0
                K.available = lambda x: True
            with torch.no_grad():
                steps = [model(tokens[:, :6], torch.arange(6))[:, -1]]
                steps += [model(tokens[:, i : i + 1], torch.tensor([i]))[:, -1] for i in range(6, 10)]
            outs.append(torch.stack(steps))
        assert rel_err(outs[1], outs[0]) < 1e-5, rel_err(outs[1], outs[0])
    finally:
        K.available, K.FUSE_MIN_K = real, min_k
    print("fused ok")


def check_copy_rows():
    """One launch moves rows src -> dst in every cache, reading all of them first (the ranges overlap)."""
    torch.manual_seed(4)
    for dtype, shape, n in ((torch.float32, (1, 3, 40, 64), 8), (torch.bfloat16, (1, 4, 33, 16), 3)):
        for src, dst in (
            ([5], [3]),
            ([10, 12, 15, 15, 15], [10, 11, 12, 13, 14]),
            ([2, 3, 9, 20, 21, 22, 30], [1, 2, 3, 4, 5, 6, 7]),
        ):
            caches = [torch.randn(shape).to(dtype) for _ in range(n)]
            ref = [c.clone() for c in caches]
            src_t, dst_t = torch.tensor(src), torch.tensor(dst)
            K.copy_rows(caches, src_t, dst_t)
            for r in ref:
                r.index_copy_(2, dst_t, r.index_select(2, src_t))
            assert all(torch.equal(a, b) for a, b in zip(caches, ref, strict=True)), (dtype, src, dst)
    # setup_caches makes the model's address table, so copy_slots (inside CUDA graphs on a GPU) never allocates one
    model = M.Transformer(M.ModelArgs.from_name("tiny"))
    model.setup_caches(1, 32)
    tables = dict(K._TABLES)
    assert tuple(c.data_ptr() for c in model.kv_caches()) in tables
    model.copy_slots(torch.tensor([5, 6]), torch.tensor([2, 3]))
    assert K._TABLES == tables
    # and the counters of chunk_topk and the split matmuls: made inside the warm-up of torch's CUDA graph trees they
    # lived in its memory pool, which it refused (tenth session, `bench.py --eagle`'s draft timing)
    assert model.norm.weight.device in K._COUNTERS
    print("copy_rows ok")


def check_rope_cache():
    """RoPE on q and k and the cache writes in one kernel: the same q, caches and logits as the separate steps, for a
    prefill, one-token steps and a tree-shaped forward (slots in any order), fp32 and bf16 caches."""
    torch.manual_seed(8)
    args = M.ModelArgs.from_name("tiny")
    real = K.available
    for dtype in (torch.float32, torch.bfloat16):
        model = M.Transformer(args).eval().to(dtype)
        tokens = torch.randint(0, args.vocab_size, (1, 40))
        calls = [(tokens[:, :9], torch.arange(9), None), (tokens[:, 9:10], torch.tensor([9]), None)]
        calls.append((tokens[:, 10:36], torch.arange(10, 36), torch.randperm(26) + 10))  # 26 tokens, shuffled slots
        outs, caches = [], []
        for fused in (False, True):
            model.setup_caches(1, 64, dtype)
            K.available = (lambda x: True) if fused else real
            flag, K.FEW_ATTENTION = K.FEW_ATTENTION, False  # RoPE alone (the interpreter's bf16 tl.dot is wrong)
            try:
                with torch.no_grad():
                    outs.append([model(t, pos, slots).float() for t, pos, slots in calls])
            finally:
                K.available, K.FEW_ATTENTION = real, flag
            caches.append(
                [t.clone() for layer in model.layers for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]
            )
        for a, b in zip(caches[0], caches[1], strict=True):
            assert rel_err(b, a) < (1e-6 if dtype == torch.float32 else 1e-2), rel_err(b, a)
        for a, b in zip(outs[0], outs[1], strict=True):
            assert rel_err(b, a) < (1e-5 if dtype == torch.float32 else 2e-2), rel_err(b, a)
    print("rope_cache ok")


def check_few_attention():
    """Two-launch few-token attention equals model.small_attention (then transposed to [1, S, H*hd]): grouped heads,
    1 to 60 query tokens, cache lengths that are not a multiple of the 64-slot chunk, chunks no row sees, fp32 and
    fp16 (the interpreter's tl.dot gives garbage for bf16, here as in check_fp16); and a tiny model's logits with it
    on equal those with it off (prefill, one token, a tree)."""
    torch.manual_seed(10)
    real, flag = K.available, K.FEW_ATTENTION
    K.available, K.FEW_ATTENTION = (lambda t: True), True
    try:
        for dtype in (torch.float32, torch.float16):
            for H, KV, S, T, hd in (
                (6, 2, 26, 200, 16),
                (4, 4, 1, 64, 32),
                (9, 3, 60, 130, 16),
                (2, 1, 5, 300, 64),
                (3, 1, 2, 1100, 16),
            ):  # fmt: skip  (1100: 18 chunks, merged in two passes)
                q = torch.randn(1, H, S, hd).to(dtype)
                k, v = torch.randn(1, KV, T, hd).to(dtype), torch.randn(1, KV, T, hd).to(dtype)
                seen = min(T, 70) if T < 1000 else 1050  # slots >= seen are seen by no row: their chunks read no K/V
                mask = torch.rand(1, 1, S, T) < 0.4
                mask[..., seen:] = False
                if T > 1000:  # the largest scores in a late chunk: the running maximum rescales what came before
                    k[0, :, 1000:1040] *= 4
                mask[..., torch.arange(S), torch.arange(S) % seen] = True  # every row sees something
                y = K.few_token_attention(q, k, v, mask)
                ref = M.small_attention(q.float(), k.float(), v.float(), mask).transpose(1, 2).reshape(1, S, H * hd)
                tol = 1e-5 if dtype == torch.float32 else 2e-3
                assert y.shape == (1, S, H * hd) and y.dtype == dtype and rel_err(y.float(), ref) < tol, (H, S, T)
                if dtype == torch.float32 and T > 100:  # longer chunks (bench.py --attn-block-t), same result
                    block_t, K.ATTN_BLOCK_T = K.ATTN_BLOCK_T, 128
                    try:
                        assert rel_err(K.few_token_attention(q, k, v, mask).float(), ref) < tol, (H, S, T, 128)
                    finally:
                        K.ATTN_BLOCK_T = block_t
        args = M.ModelArgs.from_name("tiny")
        model = M.Transformer(args).eval()
        tokens = torch.randint(0, args.vocab_size, (1, 40))
        outs = []
        for K.FEW_ATTENTION in (False, True):
            outs.append(three_forwards(model, tokens, slots=100))
        assert_all_close(*outs)
    finally:
        K.available, K.FEW_ATTENTION = real, flag
    print("few_attention ok")


def check_chunk_topk():
    """draft.top_k and top_logp in one launch (both passes, each row's last program merging it): the same values as
    torch.topk, largest first, indices pointing at them, the lower index first among equal values, the logsumexp of
    each row; many rows; and the counters back at zero for the next call."""
    import draft as Dr  # noqa: PLC0415

    torch.manual_seed(9)
    for dtype, R, V, k in ((torch.float32, 3, 4096, 10), (torch.bfloat16, 3, 4096, 10), (torch.float32, 70, 8192, 8)):
        x = torch.randn(R, V).to(dtype)
        x[1, 100:110] = 5.0  # ten equal maxima in one chunk
        x[2, [7, 1500, 3000 % V]] = 6.0  # equal maxima in three chunks
        for lse in (False, True)[R // 50 :]:  # (the 70 rows: slow in the interpreter, once)
            v, i, s = K.chunk_topk(x, k, 1024, lse)
            ref = torch.topk(x.float(), k)
            assert torch.equal(v, ref.values) and v.shape == (R, k) and i.dtype == torch.int64
            assert torch.equal(x.float().gather(1, i), v)  # indices point at the values
            assert i[1, :k].tolist() == list(range(100, 100 + k)) and i[2, :3].tolist() == sorted({7, 1500, 3000 % V})
            if lse:
                torch.testing.assert_close(s, torch.logsumexp(x.float(), -1))
            else:
                assert s.numel() == 0
            assert not K.counters(x.device)[K.TOPK_COUNTER :].any()
        if R > 50:
            continue
        real, flag = K.available, K.TRITON_TOPK
        K.available, K.TRITON_TOPK = (lambda t: True), True
        try:
            tv, ti = Dr.top_k(x.view(R, 1, V), k)
            lv, li = Dr.top_logp(x, k)
        finally:
            K.available, K.TRITON_TOPK = real, flag
        ref = torch.topk(x, k)
        assert tv.dtype == x.dtype and torch.equal(tv[:, 0], ref.values)
        assert torch.equal(x.gather(1, ti[:, 0]), ref.values)
        torch.testing.assert_close(lv, torch.topk(x.float().log_softmax(-1), k).values)
        assert torch.equal(li, ti[:, 0])
    print("chunk_topk ok")


def check_layer_inputs():
    """kernels.layer_inputs' one launch: the RoPE rows gathered, positions and mask copied (a 4-D mask, T > BLOCK_T)."""
    table = torch.randn(1500, 2, 8)
    pos, slots = torch.tensor([3, 1400, 4, 5, 0]), torch.tensor([10, 11, 12, 13, 1499])
    mask = torch.rand(1, 1, 5, 1500) < 0.5
    rope, slots2, mask2 = K._layer_inputs(table, pos, slots, mask)
    assert torch.equal(rope, table[pos]) and torch.equal(slots2, slots) and torch.equal(mask2, mask)
    assert slots2.data_ptr() != slots.data_ptr() and mask2.data_ptr() != mask.data_ptr()
    print("layer_inputs ok")


if __name__ == "__main__":
    assert K.INTERPRET and K.triton is not None
    check_all_configs()
    check_fp16()
    check_bf16_int4()
    check_pinned_configs()
    check_errors()
    check_modules()
    check_compile()
    check_fused()
    check_copy_rows()
    check_rope_cache()
    check_chunk_topk()
    check_layer_inputs()
    check_few_attention()
