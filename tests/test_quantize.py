"""quantize.py (int8 / int4 weight-only quantization) and scripts/perplexity.py, on CPU."""

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
import model as M  # noqa: E402
import quantize as Q  # noqa: E402

SMOL = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
HELDOUT = Path(__file__).resolve().parent / "data" / "heldout.txt"


def _load_perplexity():
    spec = importlib.util.spec_from_file_location("perplexity_script", ROOT / "scripts" / "perplexity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PPL = _load_perplexity()


# ---------------------------------------------------------------------------------------------------------------
# helpers


def tiny_checkpoint(folder: Path, seed: int = 0, **overrides) -> M.ModelArgs:
    """The 'tiny' preset with well-conditioned random weights (std 1/sqrt(fan_in)), saved like a converted model."""
    args = M.ModelArgs(**{**M.PRESETS["tiny"], **overrides})
    torch.manual_seed(seed)
    model = M.Transformer(args)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = 1 + 0.1 * torch.randn_like(p)
        elif p.dim() == 2:
            p.data = torch.randn_like(p) * (1.0 if "tok_embeddings" in name else p.shape[1] ** -0.5)
        else:
            p.data = 0.1 * torch.randn_like(p)
    sd = {k: v for k, v in model.state_dict().items() if not (args.tie_embeddings and k == "output.weight")}
    M.save_checkpoint(folder, args, sd)
    return args


def float_model(folder: Path, dtype=torch.float32) -> M.Transformer:
    """The float checkpoint as a plain Transformer (the reference)."""
    args = M.ModelArgs.from_json(folder / "config.json")
    sd = torch.load(folder / "model.pth", weights_only=True)
    if args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model = M.Transformer(args)
    model.load_state_dict(sd)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(dtype).eval().requires_grad_(False)


def dequantized_model(path: Path) -> M.Transformer:
    """A plain float32 Transformer holding the dequantized weights of a quantized file (the exact reference)."""
    ckpt = torch.load(path, weights_only=True)
    sd, quant = ckpt["state_dict"], ckpt["quantization"]
    args = M.ModelArgs.from_json(path.parent / "config.json")
    args.tie_embeddings = args.tie_embeddings and "output.weight" not in sd
    model = M.Transformer(args)
    ref = {}
    for k, v in sd.items():
        name = k.rpartition(".")[0]
        if k.endswith(".scales") or k.endswith(".scales_and_zeros"):
            continue
        if f"{name}.scales" in sd and k.endswith(".weight"):
            ref[k] = Q.dequantize_int8(v, sd[f"{name}.scales"])
        elif f"{name}.scales_and_zeros" in sd and k.endswith(".weight"):
            in_features = model.get_submodule(name).in_features
            ref[k] = Q.dequantize_int4(v, sd[f"{name}.scales_and_zeros"], quant["groupsize"])[:, :in_features]
        else:
            ref[k] = v.float()
    if args.tie_embeddings:
        ref["output.weight"] = ref["tok_embeddings.weight"]
    model.load_state_dict(ref)
    return model.eval().requires_grad_(False)


def logits(model: M.Transformer, tokens: torch.Tensor) -> torch.Tensor:
    model.setup_caches(1, 64)
    with torch.inference_mode():
        return model(tokens[None], torch.arange(tokens.numel(), device=tokens.device)).float()[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def int4_module(w: torch.Tensor, groupsize: int, bias: torch.Tensor | None = None) -> Q.WeightOnlyInt4Linear:
    n, k = w.shape
    mod = Q.WeightOnlyInt4Linear(k, n, groupsize, bias=bias is not None)
    kp = mod.padded_in_features
    q, sz = Q.quantize_int4(F.pad(w, (0, kp - k)), groupsize)
    mod.weight, mod.scales_and_zeros = Q.pack_int4(q), sz
    if bias is not None:
        mod.bias = bias
    return mod


# ---------------------------------------------------------------------------------------------------------------
# quantization math


def test_int8_error_bound():
    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]
    w[5] = 0  # an all-zero row must not divide by zero
    q, s = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (48,)
    assert q.abs().max() <= 127
    err = (w - Q.dequantize_int8(q, s)).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()
    assert err[5].max() == 0
    # the row's absmax maps to +-127 exactly
    assert (q.abs().amax(dim=1)[s > 1e-11] == 127).all()


@pytest.mark.parametrize("groupsize", [32, 64, 128, 256])
def test_int4_error_bound_and_packing(groupsize):
    torch.manual_seed(1)
    n, k = 32, 512
    w = torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None] + 0.3
    q, sz = Q.quantize_int4(w, groupsize)
    assert q.dtype == torch.uint8 and q.shape == (n, k) and int(q.max()) <= 15
    assert sz.dtype == torch.float32 and sz.shape == (k // groupsize, n, 2)
    packed = Q.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    assert torch.equal(packed[:, 0], q[:, 0] * 16 + q[:, 1])  # byte j = q[2j] << 4 | q[2j+1]
    assert torch.equal(Q.unpack_int4(packed), q)
    deq = Q.dequantize_int4(packed, sz, groupsize)
    scale = sz[..., 0].t().repeat_interleave(groupsize, dim=1)  # [n, k]
    assert ((w - deq).abs() <= scale / 2 + 1e-6 * w.abs().amax(dim=1, keepdim=True)).all()
    # tinygemm convention: dequant = (q - 8) * scale + zero, zero = min + 8 * scale
    zero = sz[..., 1].t().repeat_interleave(groupsize, dim=1)
    assert torch.allclose(deq, (q.float() - 8) * scale + zero)
    mins = w.reshape(n, k // groupsize, groupsize).amin(-1).t()
    assert torch.allclose(sz[..., 1] - 8 * sz[..., 0], mins, atol=1e-5)


@pytest.mark.parametrize("groupsize", [32, 128])
def test_int4_exact_reconstruction(groupsize):
    """Weights that lie exactly on a 4-bit grid (power-of-two scales, each group using levels 0 and 15) round-trip."""
    torch.manual_seed(2)
    n, k = 16, 256
    q = torch.randint(0, 16, (n, k // groupsize, groupsize))
    q[..., 0], q[..., 1] = 0, 15
    scale = 2.0 ** torch.randint(-8, -2, (n, k // groupsize, 1)).float()
    lo = torch.randint(-64, 0, (n, k // groupsize, 1)).float() * scale
    w = (q * scale + lo).reshape(n, k)
    qq, sz = Q.quantize_int4(w, groupsize)
    assert torch.equal(qq, q.reshape(n, k).to(torch.uint8))
    assert torch.equal(Q.dequantize_int4(Q.pack_int4(qq), sz, groupsize), w)
    assert Q.detect_4bit_grid([w]) == groupsize
    assert Q.detect_4bit_grid([torch.randn(16, 256)]) is None


# ---------------------------------------------------------------------------------------------------------------
# modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_dequantized_reference(dtype):
    torch.manual_seed(3)
    w, b = torch.randn(96, 80) / 9, torch.randn(96)
    mod = Q.WeightOnlyInt8Linear(80, 96, bias=True)
    mod.weight, mod.scales = Q.quantize_int8(w)
    mod.bias = b.to(dtype)
    mod.prepare(dtype)
    assert mod.scales.dtype == dtype
    x = torch.randn(2, 5, 80, dtype=dtype)
    y = mod(x)
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    ref = F.linear(x.float(), Q.dequantize_int8(mod.weight, mod.scales.float()), b)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(y.float(), ref) < tol


@pytest.mark.parametrize("kernel", ["tinygemm_cpu", "dequant"])
@pytest.mark.parametrize(("groupsize", "in_features"), [(32, 128), (64, 576), (128, 576), (64, 96)])
def test_int4_linear_matches_dequantized_reference(kernel, groupsize, in_features):
    """float32 activations through the CPU tinygemm kernel (or the fallback) equal x @ dequant(W).T; in_features
    that groupsize does not divide are zero-padded."""
    torch.manual_seed(4)
    w, b = torch.randn(64, in_features) / 9, torch.randn(64)
    mod = int4_module(w, groupsize, bias=b)
    deq = Q.dequantize_int4(mod.weight, mod.scales_and_zeros, groupsize)[:, :in_features]
    mod.prepare(torch.float32, kernel)
    assert mod.kernel == kernel and mod.dense_above is None
    for m in (1, 7):
        x = torch.randn(1, m, in_features)
        y = mod(x)
        assert y.shape == (1, m, 64) and y.dtype == torch.float32
        assert rel_err(y, F.linear(x, deq, b)) < 1e-5


def test_int4_linear_bf16_and_dense_switch():
    torch.manual_seed(5)
    w = torch.randn(128, 256) / 16
    x = torch.randn(40, 256)
    mod = int4_module(w, 64)
    ref = F.linear(x, Q.dequantize_int4(mod.weight, mod.scales_and_zeros, 64))
    mod.dense_above = 16
    mod.prepare(torch.bfloat16, "tinygemm_cpu")
    assert mod.scales_and_zeros.dtype == torch.bfloat16 and mod.weight_uint8 is not None  # kept for the dense path
    for m in (4, 40):  # 4 tokens: int4 kernel; 40 > dense_above: dequantize + dense matmul
        y = mod(x[:m].bfloat16())
        assert y.dtype == torch.bfloat16
        assert rel_err(y.float(), ref[:m]) < 2e-2


def test_int4_prepare_auto_on_cpu():
    mod = int4_module(torch.randn(32, 64), 32)
    mod.prepare(torch.float32)  # auto: the CPU kernel, whose float32 path is slow for many tokens
    assert mod.kernel == "tinygemm_cpu" and mod.dense_above == Q.CPU_FP32_DENSE_ABOVE
    mod = int4_module(torch.randn(32, 64), 32)
    mod.prepare(torch.bfloat16)
    assert mod.kernel == "tinygemm_cpu" and mod.dense_above is None and mod.weight_uint8 is None  # packed only
    assert mod.weight.shape == (32, 32) and "weight_uint8" not in mod.state_dict()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("groupsize", "in_features"), [(32, 128), (64, 576), (128, 576), (64, 1536)])
def test_int4_linear_cuda_tinygemm(groupsize, in_features):
    """The CUDA tinygemm path (bf16 activations and scales; float32 activations are cast) against the reference,
    for 1 to 64 tokens, plus the dense_above switch."""
    torch.manual_seed(7)
    w = torch.randn(256, in_features) / 24
    mod = int4_module(w, groupsize).cuda()
    deq = Q.dequantize_int4(mod.weight.cpu(), mod.scales_and_zeros.cpu(), groupsize)[:, :in_features]
    mod.dense_above = 32
    mod.prepare(torch.bfloat16)
    assert mod.kernel == "tinygemm_cuda" and mod.weight.dtype == torch.int32 and mod.weight_uint8 is not None
    for m in (1, 7, 26, 33, 64):
        x = torch.randn(m, in_features)
        ref = F.linear(x, deq)
        for dtype in (torch.bfloat16, torch.float32):
            y = mod(x.to("cuda", dtype))
            assert y.dtype == dtype and rel_err(y.float().cpu(), ref) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", [kernels.INT8, kernels.INT4])
def test_triton_matmuls_cuda(quant):
    """kernels.wmm compiled for the GPU (the CPU tests run Triton's interpreter, which takes other code paths: the int8
    byte permute is inline PTX) against the dequantized reference, one token and a tree's 26."""
    torch.manual_seed(8)
    w = torch.randn(384, 576) / 24
    if quant == kernels.INT8:
        q, s = Q.quantize_int8(w)
        args, ref_w = (q.cuda(), s.to("cuda", torch.bfloat16), quant, 0), Q.dequantize_int8(q, s)
    else:
        q, sz = Q.quantize_int4(w, 64)
        packed = Q.pack_int4(q)
        args, ref_w = (packed.cuda(), kernels.int4_layout(sz).cuda(), quant, 64), Q.dequantize_int4(packed, sz, 64)
    for m in (1, 26):
        x = torch.randn(m, 576)
        y = kernels.wmm(x.to("cuda", torch.bfloat16), *args)
        assert rel_err(y.float().cpu(), x @ ref_w.T) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_one_token_config_cuda():
    """Every block shape of the one-token matmul compiled for the GPU, its loop over K software-pipelined
    (kernels.GEMV_PIPELINE, cp.async: code the interpreter does not run) and not, over several chunks, the last one
    masked or not, for bf16, int8 and int4 weights (bf16 and int8 with and
    without kernels.GEMV_FOLD), against the dequantized reference."""
    torch.manual_seed(9)
    kern, configs, pipeline = kernels._gemv_kernel, kernels._gemv_kernel.configs, kernels.GEMV_PIPELINE
    fold_default = kernels.GEMV_FOLD
    try:
        for cfg in configs:
            bk = cfg.kwargs["BLOCK_K"]
            for quant, k in ((kernels.NONE, 3 * bk), (kernels.INT8, 3 * bk + 16), (kernels.INT4, 2 * bk + 64)):
                n, g = 40, 64
                w = torch.randn(n, k) / k**0.5
                if quant == kernels.NONE:
                    args, ref_w = (w.to("cuda", torch.bfloat16), None, quant, 0), w.bfloat16().float()
                elif quant == kernels.INT8:
                    q, sc = Q.quantize_int8(w)
                    args, ref_w = (q.cuda(), sc.to("cuda", torch.bfloat16), quant, 0), Q.dequantize_int8(q, sc)
                else:
                    q, sz = Q.quantize_int4(w, g)
                    packed = Q.pack_int4(q)
                    args, ref_w = (
                        (packed.cuda(), kernels.int4_layout(sz).cuda(), quant, g),
                        Q.dequantize_int4(packed, sz, g),
                    )
                pruned = kernels._prune([cfg], {"K": k, "N": n}, QUANT=quant, GROUP=g if quant == kernels.INT4 else 0)
                if not pruned:  # configs for int4 only (the GPU run of the eighteenth session: an empty config list)
                    assert quant != kernels.INT4 and kernels._int4_only(cfg), (cfg, quant)
                    continue
                x = torch.randn(1, k)
                for on, fold in itertools.product((True, False), (False, True) if quant != kernels.INT4 else (False,)):
                    kern.configs, kern.cache = pruned, {}
                    kernels.GEMV_PIPELINE, kernels.GEMV_FOLD = on, fold
                    y = kernels.wmm(x.to("cuda", torch.bfloat16), *args)
                    err = rel_err(y.float().cpu(), x.bfloat16().float() @ ref_w.T)
                    assert err < 2e-2, (cfg, quant, k, on, fold, err)
    finally:
        kern.configs, kern.cache = configs, {}
        kernels.GEMV_PIPELINE, kernels.GEMV_FOLD = pipeline, fold_default


@pytest.mark.parametrize(
    "quant",
    [
        {"mode": "int8"},
        {"mode": "int4", "groupsize": 128},  # as int4 files written before keep_tied_head (they still load)
        {"mode": "int4", "groupsize": 128, "keep_tied_head": True},
    ],
)
@pytest.mark.parametrize("tie", [False, True])
def test_swap_linears_builds_the_stored_layout(quant, tie):
    """A meta model after swap_linears has exactly the keys, shapes and dtypes that quantize_state_dict writes."""
    args = M.ModelArgs(**{**M.PRESETS["tiny"], "tie_embeddings": tie, "qkv_bias": tie})
    sd = {k: v for k, v in M.Transformer(args).state_dict().items() if not (tie and k == "output.weight")}
    qsd, report = Q.quantize_state_dict(sd, args, quant, progress=False)
    kept = tie and quant.get("keep_tied_head", False)  # the tied head stays the embedding's bf16 table
    assert len(report["quantized"]) == 4 * args.n_layers + (0 if kept else 1) and report["untied"] == (tie and not kept)
    with torch.device("meta"):
        model = M.Transformer(args)
    Q.swap_linears(model, quant)
    assert model.args.tie_embeddings is kept  # else the quantized head is its own tensor

    def layout(sd):  # float tensors: the loader casts them (stored bf16, model fp32); others must match exactly
        return {k: (tuple(v.shape), "float" if v.is_floating_point() else v.dtype) for k, v in sd.items()}

    assert layout(model.state_dict()) == layout(qsd)
    scales = "scales" if quant["mode"] == "int8" else "scales_and_zeros"
    assert all(
        v.dtype == (torch.float32 if scales in k else torch.bfloat16) for k, v in qsd.items() if v.is_floating_point()
    )
    model.load_state_dict(qsd, assign=True, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# the CLI, end to end


@pytest.mark.parametrize(
    ("mode", "groupsize", "tie", "tol"),
    [("int8", None, False, 0.03), ("int8", None, True, 0.03), ("int4", 64, False, 0.25), ("int4", 128, True, 0.25)],
)
def test_cli_end_to_end(tmp_path, capsys, mode, groupsize, tie, tol):
    args = tiny_checkpoint(tmp_path, tie_embeddings=tie, qkv_bias=tie)
    Q.main(["--checkpoint", str(tmp_path), "--mode", mode, "--device", "cpu"]
           + (["--groupsize", str(groupsize)] if groupsize else []))  # fmt: skip
    summary = capsys.readouterr().out
    name = "model_int8.pth" if mode == "int8" else f"model_int4.g{groupsize}.pth"
    path = tmp_path / name
    assert path.exists() and f"wrote {path}" in summary and "size:" in summary
    assert ("padded" in summary) == (groupsize == 128)  # tiny's dim 64 is padded to 128

    # stored format: device independent, exactly the documented dtypes and shapes
    ckpt = torch.load(path, weights_only=True)
    int4 = {"mode": "int4", "groupsize": groupsize, "keep_tied_head": True}
    assert ckpt["quantization"] == ({"mode": "int8"} if mode == "int8" else int4)
    sd = ckpt["state_dict"]
    out, dim = args.vocab_size, args.dim
    head_kept = mode == "int4" and tie  # int4 keeps a tied LM head as the embedding's bf16 table
    if head_kept:
        assert sd["output.weight"].dtype == torch.bfloat16 and torch.equal(
            sd["output.weight"], sd["tok_embeddings.weight"]
        )
        assert "own tensor" not in summary and "output (int4 keeps a tied LM head in bf16" in summary
    elif mode == "int8":
        assert sd["output.weight"].dtype == torch.int8 and sd["output.weight"].shape == (out, dim)
        assert sd["output.scales"].dtype == torch.float32 and sd["output.scales"].shape == (out,)
    else:
        kp = -(-dim // groupsize) * groupsize
        assert sd["output.weight"].dtype == torch.uint8 and sd["output.weight"].shape == (out, kp // 2)
        szs = sd["output.scales_and_zeros"]
        assert szs.dtype == torch.float32 and szs.shape == (kp // groupsize, out, 2)
        w2 = sd["layers.0.feed_forward.w2.weight"]
        assert w2.shape == (dim, args.intermediate_size // 2)
    assert sd["tok_embeddings.weight"].dtype == torch.bfloat16 and sd["norm.weight"].dtype == torch.bfloat16
    quantized_linears = {k.rpartition(".")[0] for k, v in sd.items() if v.dtype in (torch.int8, torch.uint8)}
    expected = {name for name, _ in Q.quantizable_linears(M.Transformer(args))} - ({"output"} if head_kept else set())
    assert quantized_linears == expected
    scales = "scales" if mode == "int8" else "scales_and_zeros"
    float_keys = set(float_model(tmp_path).state_dict())  # output.weight included, also when tied
    assert set(sd) == float_keys | {f"{name}.{scales}" for name in quantized_linears}  # no device-specific extras

    tokens = torch.randint(0, args.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    quantized = M.load_model(path, device="cpu", dtype=torch.float32)
    if head_kept:
        assert quantized.output.weight is quantized.tok_embeddings.weight and quantized.args.tie_embeddings
    else:
        assert isinstance(quantized.output, Q.WeightOnlyInt8Linear if mode == "int8" else Q.WeightOnlyInt4Linear)
    y, ref = logits(quantized, tokens), logits(dequantized_model(path), tokens)
    assert rel_err(y, ref) < 1e-4  # the quantized modules compute exactly this model
    with torch.inference_mode():  # one decode step: a single token, the int4 kernel path in float32
        last = quantized(tokens[None, -1:], torch.tensor([tokens.numel() - 1])).float()[0, 0]
    assert rel_err(last, ref[-1]) < 1e-4
    assert rel_err(y, logits(float_model(tmp_path), tokens)) < tol  # and it is close to the float model

    # the loader reads the "quantization" entry, not the file name; bf16 activations work too
    renamed = path.rename(tmp_path / "whatever.pth")
    y16 = logits(M.load_model(renamed, device="cpu", dtype=torch.bfloat16), tokens)
    assert rel_err(y16, y) < 5e-2


def test_int4_keeps_an_untileable_tied_head_in_bf16(tmp_path, capsys):
    """vocab 250 is not a multiple of 16: the head stays bf16 (and tied), the rest is int4."""
    args = tiny_checkpoint(tmp_path, vocab_size=250, tie_embeddings=True)
    path, summary = Q.quantize_checkpoint(tmp_path, "int4", 64, progress=False)
    assert "kept in bf16: output (out_features 250 is not a multiple of 16" in summary
    model = M.load_model(path)
    assert isinstance(model.output, torch.nn.Linear) and model.output.weight is model.tok_embeddings.weight
    assert isinstance(model.layers[0].feed_forward.w13, Q.WeightOnlyInt4Linear) and model.args.tie_embeddings
    tokens = torch.randint(0, args.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    assert rel_err(logits(model, tokens), logits(dequantized_model(path), tokens)) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("mode", "groupsize"), [("int8", None), ("int4", 64), ("int4", 128)])
def test_quantized_checkpoint_on_cuda(tmp_path, mode, groupsize):
    """A file quantized on CPU loads on CUDA (bf16) and matches the dequantized reference."""
    args = tiny_checkpoint(tmp_path, tie_embeddings=True, qkv_bias=True)
    path, _ = Q.quantize_checkpoint(tmp_path, mode, groupsize, device="cpu", progress=False)
    model = M.load_model(path, device="cuda", dtype=torch.bfloat16)
    if mode == "int4":  # (the tied LM head stays bf16: keep_tied_head)
        assert model.layers[0].attention.wqkv.kernel == "tinygemm_cuda"
    tokens = torch.randint(0, args.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    ref = logits(dequantized_model(path), tokens)
    assert rel_err(logits(model, tokens.cuda()).cpu(), ref) < 3e-2


def test_cli_errors(tmp_path, capsys):
    def error_of(argv):
        with pytest.raises(SystemExit) as e:
            Q.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return err

    tiny_checkpoint(tmp_path)
    ck = ["--checkpoint", str(tmp_path)]
    assert "not found" in error_of(["--checkpoint", str(tmp_path / "nope"), "--mode", "int8"])
    assert "--mode" in error_of([*ck, "--mode", "int3"])
    assert "--groupsize" in error_of([*ck, "--mode", "int4", "--groupsize", "48"])
    assert "int4 only" in error_of([*ck, "--mode", "int8", "--groupsize", "64"])
    Q.main([*ck, "--mode", "int8", "--device", "cpu"])
    capsys.readouterr()
    assert "already quantized" in error_of(["--checkpoint", str(tmp_path / "model_int8.pth"), "--mode", "int4"])
    (tmp_path / "config.json").write_text(json.dumps({**M.PRESETS["tiny"], "dim": 128}))
    assert "does not match" in error_of([*ck, "--mode", "int8"])


def test_cli_subprocess(tmp_path):
    tiny_checkpoint(tmp_path)
    cmd = [sys.executable, str(ROOT / "quantize.py"), "--checkpoint", str(tmp_path), "--mode", "int4"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model_int4.g64.pth").exists() and "int4 (groupsize 64)" in r.stdout
    r = subprocess.run([*cmd[:3], str(tmp_path / "missing"), *cmd[4:]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------------
# perplexity


def test_perplexity_windows_score_every_token_once(tmp_path):
    tiny_checkpoint(tmp_path)
    model = float_model(tmp_path)
    ids = torch.randint(0, 256, (41,), generator=torch.Generator().manual_seed(1)).tolist()
    whole = PPL.evaluate_nll(model, ids)  # one window: max_seq_len > 40
    assert whole["tokens"] == 40
    ref = F.cross_entropy(logits(model, torch.tensor(ids[:-1])), torch.tensor(ids[1:])).item()
    assert whole["nll"] == pytest.approx(ref, rel=1e-5)
    windowed = PPL.evaluate_nll(model, ids, window=16)  # windows 0..16, 16..32, 32..40
    manual = 0.0
    for s in range(0, 40, 16):
        chunk = torch.tensor(ids[s : s + 17])
        manual += F.cross_entropy(logits(model, chunk[:-1]), chunk[1:], reduction="sum").item()
    assert windowed["tokens"] == 40 and windowed["nll"] == pytest.approx(manual / 40, rel=1e-5)
    assert windowed["ppl"] == pytest.approx(torch.tensor(windowed["nll"]).exp().item(), rel=1e-6)


def test_perplexity_cli(tiny_ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Hello, who are you? " * 8)
    PPL.main(["--checkpoint", str(tiny_ckpt), "--file", str(text), "--device", "cpu", "--window", "32"])
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    res = json.loads(line)
    assert set(res) == {"nll", "ppl", "tokens"} and res["tokens"] > 32 and res["ppl"] > 1
    with pytest.raises(SystemExit) as e:
        PPL.main(["--checkpoint", str(tiny_ckpt), "--file", str(tmp_path / "missing.txt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_int4_refinement_lowers_the_weighted_error():
    """Least-squares rounds (quantize_int4's refine) never raise the column-weighted squared error of min-max, lower
    it on ordinary weights, keep the storage convention, and leave weights that lie on a 4-bit grid exact."""
    torch.manual_seed(3)
    n, k, g = 24, 256, 64
    w = torch.randn(n, k) * torch.logspace(-2, 0, n)[:, None] + 0.1 * torch.randn(n, 1)
    cw = torch.rand(k) * 3 + 0.05

    def err(q, sz, weight):
        return ((Q.dequantize_int4(Q.pack_int4(q), sz, g) - w).square() * weight).sum().item()

    for weight in (torch.ones(k), cw):
        col = None if weight is not cw else cw
        errs = [err(*Q.quantize_int4(w, g, r, col), weight) for r in (0, 1, 2, 5, 10)]
        assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:], strict=False)) and errs[-1] < 0.97 * errs[0]
    q, sz = Q.quantize_int4(w, g, 10, cw)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and sz.shape == (k // g, n, 2)
    grid = (torch.randint(0, 16, (n, k)).float() - 8) * 0.01 + 0.5  # already on a 4-bit grid
    grid[:, ::g], grid[:, 1::g] = 0.42, 0.57  # levels 0 and 15 in every group
    qg, szg = Q.quantize_int4(grid, g, 10, cw)
    torch.testing.assert_close(Q.dequantize_int4(Q.pack_int4(qg), szg, g), grid, rtol=0, atol=1e-6)


def test_int4_norm_weights_for_refinement():
    """input_norm_weight finds the RMSNorm in front of wqkv, w13 and the LM head, and nothing for wo and w2."""
    sd = {"layers.3.attention_norm.weight": torch.ones(4), "layers.3.ffn_norm.weight": 2 * torch.ones(4),
          "norm.weight": 3 * torch.ones(4)}  # fmt: skip
    assert Q.input_norm_weight("layers.3.attention.wqkv", sd) is sd["layers.3.attention_norm.weight"]
    assert Q.input_norm_weight("layers.3.feed_forward.w13", sd) is sd["layers.3.ffn_norm.weight"]
    assert Q.input_norm_weight("output", sd) is sd["norm.weight"]
    assert Q.input_norm_weight("layers.3.attention.wo", sd) is None
    assert Q.input_norm_weight("layers.3.feed_forward.w2", sd) is None


# ---------------------------------------------------------------------------------------------------------------
# SmolLM2-135M: NLL of the quantized models against bf16 on held-out text (needs the converted checkpoint)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """A scratch folder linking the checkpoint's files (quantized outputs go there, not into checkpoints/)."""
    folder = tmp_path_factory.mktemp("smol")
    for f in SMOL.iterdir():
        if f.is_file() and not f.name.startswith("model_"):
            (folder / f.name).symlink_to(f.resolve())
    ids = PPL.encode_file(folder, HELDOUT)
    base = PPL.evaluate_nll(float_model(folder, torch.bfloat16), ids)["nll"]
    return folder, ids, base


@pytest.mark.skipif(not (SMOL / "model.pth").exists(), reason=f"needs the converted checkpoint at {SMOL}")
@pytest.mark.parametrize(
    ("mode", "groupsize", "max_delta"), [("int8", None, 0.02), ("int4", 64, 0.25), ("int4", None, 0.25)]
)
def test_smollm2_nll(smol, mode, groupsize, max_delta):
    folder, ids, base = smol
    path, summary = Q.quantize_checkpoint(folder, mode, groupsize, device="cpu", progress=False)
    nll = PPL.evaluate_nll(M.load_model(path, device="cpu", dtype=torch.bfloat16), ids)["nll"]
    print(f"{path.name}: nll {nll:.4f} vs bf16 {base:.4f} (+{nll - base:.4f} nats)")
    assert nll - base < max_delta


def test_int8_one_token_path_equals_matmul():
    """The one-token int8 path (multiply + sum, so torch.compile fuses the int8 read) equals the plain matmul path."""
    torch.manual_seed(0)
    lin = Q.WeightOnlyInt8Linear(96, 40, bias=True)
    lin.weight = torch.randint(-127, 128, (40, 96), dtype=torch.int8)
    lin.scales = torch.rand(40)
    lin.bias = torch.randn(40)
    x = torch.randn(1, 1, 96)
    ref = torch.nn.functional.linear(x, lin.weight.float()) * lin.scales + lin.bias
    torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-4)
    x3 = torch.randn(1, 3, 96)  # several tokens take the matmul path
    ref3 = torch.nn.functional.linear(x3, lin.weight.float()) * lin.scales + lin.bias
    torch.testing.assert_close(lin(x3), ref3, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("mode", "groupsize"), [("int8", None), ("int4", 32)])
def test_eagle_greedy_equals_plain_greedy_on_quantized_target(tmp_path, capsys, mode, groupsize):
    import draft
    import generate as G
    import tree as T

    args = tiny_checkpoint(tmp_path)
    Q.main(["--checkpoint", str(tmp_path), "--mode", mode] + (["--groupsize", str(groupsize)] if groupsize else []))
    capsys.readouterr()
    path = tmp_path / ("model_int8.pth" if mode == "int8" else f"model_int4.g{groupsize}.pth")
    prompt = [1, 17, 42, 99, 5]
    with torch.inference_mode():
        plain = G.Generator(M.load_model(path), G.Sampling(), 128).generate(prompt, 24, set(), True).output_ids
        torch.manual_seed(0)
        head = draft.EagleHead(M.ModelArgs(**{**args.to_dict(), "n_layers": 1})).eval()  # drafts stay float
        tree = T.build_tree(T.EAGLE1_TREE)
        got = G.EagleGenerator(M.load_model(path), head, tree, G.Sampling(), 64).generate(prompt, 24, set(), True)
    assert got.output_ids == plain
