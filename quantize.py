"""Weight-only int8 / int4 quantization of a checkpoint, and the modules that run it.

    python quantize.py --checkpoint checkpoints/SmolLM2-135M-Instruct --mode int8
    python quantize.py --checkpoint checkpoints/SmolLM2-135M-Instruct --mode int4 --groupsize 64

writes model_int8.pth / model_int4.g64.pth beside the input as {"state_dict": sd, "quantization": quant}, quant being
{"mode": "int8"} or {"mode": "int4", "groupsize": G}. model.load_model reads any of them (it never looks at the
file name): it calls swap_linears(model, quant) on the meta-device model, load_state_dict(assign=True, strict=True),
moves the model to the device, casts the float tensors, then prepare_for_device(model, quant).

What gets quantized: every nn.Linear under layers.* (wqkv, wo, w13, w2) and the LM head `output`. The embedding
table stays in bf16 (a lookup reads one row per token; quantizing it saves memory, not time). A tied LM head
(tie_embeddings, e.g. SmolLM2, where the head is ~20% of the weights): int8 unties it, writing `output` as its own
quantized tensors (swap_linears sets model.args.tie_embeddings = False so that load_model neither drops output.* from
the state dict nor re-ties it; +0.003 nats on SmolLM2 for the whole model); int4 keeps it tied, in bf16
("keep_tied_head" in the quantization dict; int4 files written before it untied and quantized the head, and still
load so), because an int4 head cost SmolLM2 0.06-0.08 nats and a separate quantized copy adds memory where the tied
table adds none. All other float tensors (norms, biases, embedding) are stored in bf16.

On-disk format (device independent, no kernel-specific packing):
  int8  X.weight int8 [out, in]; X.scales float32 [out]         w ~= weight * scales[:, None]   (symmetric, absmax/127)
  int4  X.weight uint8 [out, in_p/2], two nibbles per byte: byte j = q[2j] << 4 | q[2j+1], q in 0..15;
        X.scales_and_zeros float32 [in_p/G, out, 2] = (scale, zero) per group of G inputs;
        w ~= (q - 8) * scale + zero   (tinygemm convention); min-max (scale = (max - min) / 15, zero = min +
        8 * scale), then INT4_REFINE rounds of least squares per group, weighted by the preceding RMSNorm's weight.
        in_p = in_features rounded up to a multiple of G: the padded columns are zero and activations are
        zero-padded at run time. A layer whose out_features is not a multiple of 16 (the CPU kernel's N tile; CUDA
        needs 8) stays in bf16. The CLI summary lists padded and skipped layers. Without --groupsize: 64, unless the
        source weights already lie on a 4-bit groupwise grid (a checkpoint converted from a GGUF Q4_0/Q4_1 file):
        then that grid's width (32), since requantizing onto a wider grid adds the two errors (SmolLM2-135M from
        Q4_1 on tests/data/heldout.txt: +0.004 nats at g32, +0.22 at g64; min-max with a quantized head: +0.04 and
        +0.38).

Run time (prepare_for_device). int8 on CUDA with bf16/fp16 activations and triton installed (kernel "triton", the
default there): inputs of up to kernels.MAX_M = 64 tokens (decode steps, EAGLE drafts and tree verification) go
through the Triton kernels of kernels.py, which read the int8 weight directly (1.8x Inductor's fused reduction on the
7B shape); larger inputs (prefill) convert the weight and run a dense matmul. int4 "triton" (the on-disk layout with
bf16 (scale, zero) pairs, same kernels) is available but not the default: tinygemm was faster when measured.
Otherwise:
  int8  (kernel "torch") scales are cast to the activation dtype; one token = multiply + sum (Inductor fuses it into
        one reduction reading the int8 weight), more tokens = F.linear(x, weight.to(x.dtype)) * scales.
  int4  CUDA ("tinygemm_cuda"): aten._convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles) and
        aten._weight_int4pack_mm, which takes only bf16 activations and bf16 scales (x is cast to bf16 and back).
        CPU ("tinygemm_cpu"): aten._convert_weight_to_int4pack_for_cpu(int32 [N, K], inner_k_tiles) and
        _weight_int4pack_mm_for_cpu, which takes float32, bfloat16 or float16 activations with scales of the same
        dtype (checked on torch 2.13); its float32 path is 30-70x slower than bf16, so with float32 activations
        inputs of more than one token are dequantized + dense matmul (CPU_FP32_DENSE_ABOVE) and single-token decode
        steps use the kernel.
        Any other device (or kernel "dequant"): dequantize then F.linear (also the reference in the tests).
  Options (RUNTIME below, or the same keys in the quant dict): int8_kernel / int4_kernel pick the kernel:
  "auto", "triton", "torch" (the best one that is not ours), for int4 also "tinygemm_cuda", "tinygemm_cpu",
  "dequant"; int4_dense_above=M sends inputs of more than M tokens through dequantize + dense matmul (tinygemm).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import kernels
from model import NORM_BEFORE, CheckpointError, ModelArgs, Transformer, read_checkpoint

MODES = ("int8", "int4")
GROUPSIZES = (32, 64, 128, 256)  # what both tinygemm kernels (CUDA and CPU) accept
DEFAULT_GROUPSIZE = 64  # divides the hidden sizes of the Llama / SmolLM2 / Qwen2 families: no padding needed
INT4_N_MULTIPLE = 16  # out_features must be a multiple of this for the int4 kernels (CPU 16, CUDA 8)
RUNTIME = {"int8_kernel": "auto", "int4_kernel": "auto", "int4_dense_above": None}  # run-time options (docstring)
# The CPU kernel's float32 path is 30-70x slower than its bf16 path (measured on an AVX2 Xeon, torch 2.13): with
# float32 activations, "auto" on CPU sends inputs of more than this many tokens through dequantize + dense matmul.
CPU_FP32_DENSE_ABOVE = 1


class QuantizeError(Exception):
    """A user-facing problem (one line)."""


def check_quant(quant: dict) -> tuple[str, int | None]:
    """Validate a quantization dict; return (mode, groupsize or None)."""
    mode = quant.get("mode") if isinstance(quant, dict) else None
    if mode not in MODES:
        raise CheckpointError(f"unknown quantization {quant!r}: mode must be one of {', '.join(MODES)}")
    if mode == "int8":
        return mode, None
    g = quant.get("groupsize")
    if g not in GROUPSIZES:
        raise CheckpointError(f"bad int4 groupsize {g!r} in {quant!r}: must be one of {GROUPSIZES}")
    return mode, g


def parse_spec(spec: str) -> dict:
    """A quantization dict from a command-line spec: "int8", or "int4" / "int4:G" (group size G, default
    DEFAULT_GROUPSIZE). CheckpointError where it names no supported mode or group size."""
    mode, colon, g = spec.partition(":")
    if mode == "int4":
        if colon and not g.isdigit():
            raise CheckpointError(f"bad quantization {spec!r}: int8, or int4[:G] with G one of {GROUPSIZES}")
        quant = {"mode": mode, "groupsize": int(g) if colon else DEFAULT_GROUPSIZE}
    else:
        quant = {"mode": mode}
        if colon:
            raise CheckpointError(f"bad quantization {spec!r}: only int4 takes a group size")
    check_quant(quant)
    return quant


# ---------------------------------------------------------------------------------------------------------------
# Quantization math (float32 in, plain tensors out). Device independent.


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per output channel: w [out, in] -> (int8 [out, in], float32 scales [out]); |w - q*s| <= s/2."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = (w / scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.to(torch.float32) * scales.float()[:, None]).to(dtype)


def quantize_int4(w: Tensor, groupsize: int, refine: int = 0, col_weight: Tensor | None = None) -> tuple[Tensor, ...]:
    """Asymmetric groupwise along in_features: w [out, in] (in % groupsize == 0) ->
    (q uint8 [out, in] with values 0..15, scales_and_zeros float32 [in/G, out, 2]), dequantized as
    (q - 8) * scale + zero.

    refine = 0: min-max (scale = (max - min) / 15, zero = min + 8 * scale; |w - deq| <= scale / 2).
    refine = r > 0: then r rounds of alternating least squares, each group on its own: the nearest level for every
    weight, then the (scale, zero) that fit those levels best, minimizing sum_j col_weight[j] * (w[:, j] - deq)^2
    (col_weight [in] >= 0, default 1). Neither step can raise that error, so it ends at most at min-max's; the
    extremes of a group may then be clipped for a closer fit of the rest."""
    n, k = w.shape
    if k % groupsize:
        raise ValueError(f"in_features {k} is not a multiple of groupsize {groupsize}: pad first")
    wg = w.float().reshape(n, k // groupsize, groupsize)
    lo, hi = torch.aminmax(wg, dim=-1, keepdim=True)  # [out, in/G, 1]
    scale = ((hi - lo) / 15).clamp_(min=1e-12)
    base = lo  # dequantized level i is base + i * scale, i = 0..15
    c = torch.ones(1, 1, groupsize) if col_weight is None else col_weight.float().reshape(1, k // groupsize, groupsize)
    c = c.to(wg.device)
    c_sum = c.sum(-1, keepdim=True).clamp_(min=1e-20)
    for _ in range(refine):
        q = (wg - base).div_(scale).round_().clamp_(0, 15)
        q_mean, w_mean = (q * c).sum(-1, keepdim=True) / c_sum, (wg * c).sum(-1, keepdim=True) / c_sum
        dq = q - q_mean
        var, cov = (dq * dq * c).sum(-1, keepdim=True), (dq * (wg - w_mean) * c).sum(-1, keepdim=True)
        fit = cov / var.clamp(min=1e-30)
        scale = torch.where((var > 0) & (fit > 1e-12), fit, scale)  # keep the old scale where the fit degenerates
        base = w_mean - scale * q_mean  # the best offset for these levels and this scale
    q = (wg - base).div_(scale).round_().clamp_(0, 15).to(torch.uint8).reshape(n, k)
    zero = base + 8 * scale
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [in/G, out, 2]
    return q, scales_and_zeros


def pack_int4(q: Tensor) -> Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K/2], byte j = q[2j] << 4 | q[2j+1] (aten int4pack input, torch>=2.5)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of pack_int4: uint8 [N, K/2] -> uint8 [N, K]."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: Tensor, scales_and_zeros: Tensor, groupsize: int, dtype=torch.float32) -> Tensor:
    """uint8 [N, K/2] + [K/G, N, 2] -> [N, K] in `dtype` (computed in float32 unless dtype is a 16-bit float)."""
    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    q = unpack_int4(packed).to(compute)
    n, k = q.shape
    scale = scales_and_zeros[..., 0].to(compute).t()[..., None]  # [N, K/G, 1]
    zero = scales_and_zeros[..., 1].to(compute).t()[..., None]
    return ((q.reshape(n, k // groupsize, groupsize) - 8) * scale + zero).reshape(n, k).to(dtype)


def detect_4bit_grid(weights: list[Tensor], rows: int = 256) -> int | None:
    """The widest groupsize G (of GROUPSIZES) such that every G-wide group of these weights (first `rows` rows) holds
    at most 16 distinct values: the weights were already 4-bit quantized groupwise (a GGUF Q4_0 / Q4_1 conversion).
    Requantizing such weights with wider groups misaligns the two grids and costs much more than usual."""
    found = None
    for g in GROUPSIZES:  # ascending: stop at the first width that breaks
        for w in weights:
            if w.shape[-1] % g:
                return found
            s = w[:rows].float().reshape(-1, g).sort(dim=-1).values
            if (1 + (s[:, 1:] != s[:, :-1]).sum(dim=-1) > 16).any():
                return found
        found = g
    return found


def padded_in_features(in_features: int, groupsize: int) -> int:
    return -(-in_features // groupsize) * groupsize


def plan_linear(in_features: int, out_features: int, quant: dict, tied_head: bool = False) -> str | None:
    """None if the layer is quantized under `quant`, else why it stays in bf16. quantize and swap_linears share this
    rule, so the loader rebuilds exactly the modules the file was written for. tied_head: the layer is an LM head tied
    to the embedding."""
    mode, _ = check_quant(quant)
    if mode == "int4" and out_features % INT4_N_MULTIPLE:
        return f"out_features {out_features} is not a multiple of {INT4_N_MULTIPLE} (int4 kernel tile)"
    if mode == "int4" and tied_head and quant.get("keep_tied_head"):
        return "int4 keeps a tied LM head in bf16 (keep_tied_head)"
    return None


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linears we quantize: everything under layers.* and the LM head `output`."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (name == "output" or name.startswith("layers."))
    ]


# ---------------------------------------------------------------------------------------------------------------
# Modules


class WeightOnlyInt8Linear(nn.Module):
    """y = (x @ weight.T) * scales (+ bias). Buffers: weight int8 [out, in], scales [out] (activation dtype after
    prepare_for_device), bias [out] or None. kernel: "triton" (kernels.wmm for up to kernels.MAX_M tokens, CUDA with
    16-bit activations) or "torch"."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self.kernel = "torch"

    def prepare(self, dtype: torch.dtype, kernel: str = "auto") -> None:
        self.scales = self.scales.to(dtype)
        if kernel == "auto":
            kernel = "triton" if kernels.available(torch.empty(0, dtype=dtype, device=self.weight.device)) else "torch"
        if kernel not in ("triton", "torch"):
            raise ValueError(f"unknown int8 kernel {kernel!r}")
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        if self.kernel == "triton" and x.numel() // k <= kernels.MAX_M:
            y = kernels.wmm(x.reshape(-1, k).contiguous(), self.weight, self.scales, kernels.INT8, 0)
            y = y.reshape(*lead, self.out_features)
        elif x.dim() == 3 and x.size(0) * x.size(1) == 1:
            # One token: written as multiply + sum so that torch.compile makes one reduction kernel that reads the
            # int8 weight directly (F.linear would first write a converted copy of the whole weight).
            y = (x[..., None, :] * self.weight.to(x.dtype)).sum(-1) * self.scales  # [1, 1, N]
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The weight as a dense [out, in] tensor."""
        return dequantize_int8(self.weight, self.scales, dtype)

    def fused(self, x: Tensor, norm, residual: Tensor | None, gated: bool = False) -> Tensor | None:
        """residual + self(norm(x)) (or of silu(gate) * up) in one kernel (kernel "triton"), else None (see
        model.linear)."""
        if self.kernel != "triton" or self.bias is not None:
            return None
        return kernels.fused_wmm(x, self.weight, self.scales, kernels.INT8, 0, norm, residual, self.out_features, gated)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kernel={self.kernel}"
        )


def pick_inner_k_tiles(k: int) -> int:
    """Largest of 8, 4, 2 with k % (inner_k_tiles * 16) == 0 (k is a multiple of the groupsize >= 32)."""
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


class WeightOnlyInt4Linear(nn.Module):
    """Groupwise asymmetric int4 weights. Buffers as stored on disk: weight uint8 [out, in_p/2], scales_and_zeros
    float32 [in_p/G, out, 2], bias. prepare() picks `kernel`: "tinygemm_cuda" / "tinygemm_cpu" (then `weight` holds
    the kernel's packed layout, as in gpt-fast, so state_dict() byte counts stay right), "triton" or "dequant"
    (dequantize + F.linear, any device; also what an unprepared module does).
    dense_above: inputs of more than this many tokens use dequantize + dense matmul instead of the int4 kernel (the
    on-disk uint8 layout is then kept as the non-persistent buffer weight_uint8)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groupsize: int,
        bias: bool = False,
        device=None,
        dense_above: int | None = None,
    ):
        super().__init__()
        if groupsize not in GROUPSIZES:
            raise ValueError(f"groupsize {groupsize} not in {GROUPSIZES}")
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.padded_in_features = padded_in_features(in_features, groupsize)
        kp = self.padded_in_features
        self.register_buffer("weight", torch.empty(out_features, kp // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(kp // groupsize, out_features, 2, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)
        self.register_buffer("weight_uint8", None, persistent=False)
        self.kernel = "dequant"
        self.prepared = False
        self.inner_k_tiles: int | None = None
        self.dense_above = dense_above

    def prepare(self, dtype: torch.dtype, kernel: str = "auto") -> None:
        """Pack for the device the buffers are on and cast the scales (once, after the move to the device)."""
        if self.prepared:
            raise RuntimeError("WeightOnlyInt4Linear.prepare() called twice")
        dev, n, kp = self.weight.device, self.out_features, self.padded_in_features
        if kernel in ("auto", "torch"):  # tinygemm: faster than kernels.py's int4 path when measured (BENCHMARKS.md)
            if dev.type == "cuda" and n % 8 == 0:
                kernel = "tinygemm_cuda"
            elif dev.type == "cpu" and n % 16 == 0:
                kernel = "tinygemm_cpu"
                if dtype == torch.float32 and self.dense_above is None:
                    self.dense_above = CPU_FP32_DENSE_ABOVE
            else:
                kernel = "dequant"
        sz, w8 = self.scales_and_zeros, self.weight
        if kernel == "tinygemm_cuda":
            self.inner_k_tiles = pick_inner_k_tiles(kp)
            self.weight = torch.ops.aten._convert_weight_to_int4pack(w8.contiguous(), self.inner_k_tiles)
            sz = sz.to(torch.bfloat16)  # the CUDA kernel reads bf16 scales and bf16 activations only
        elif kernel == "tinygemm_cpu":
            self.inner_k_tiles = pick_inner_k_tiles(kp)
            q = unpack_int4(w8).to(torch.int32).contiguous()
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, self.inner_k_tiles)
            # the CPU kernel wants scales in the activation dtype: float32, bfloat16 or float16
            sz = sz.to(dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32)
        elif kernel == "triton":
            if kernels.triton is None:
                raise RuntimeError("int4_kernel='triton' needs the triton package")
            sz = kernels.int4_layout(sz, dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32)
        elif kernel == "dequant":
            sz = sz.to(dtype)
        else:
            raise ValueError(f"unknown int4 kernel {kernel!r}")
        self.scales_and_zeros = sz.contiguous()
        self.kernel, self.prepared = kernel, True
        if kernel.startswith("tinygemm") and self.dense_above is not None:
            self.weight_uint8 = w8  # the dense path dequantizes from it

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The weight as a dense [out, in] tensor."""
        w8 = self.weight_uint8 if self.kernel.startswith("tinygemm") else self.weight
        sz = self.scales_and_zeros
        if self.kernel == "triton":  # [N, K/G, 2] instead of [K/G, N, 2]
            sz = sz.transpose(0, 1)
        w = dequantize_int4(w8, sz, self.groupsize, dtype)
        return w[:, : self.in_features]

    def forward(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        dense_above = kernels.MAX_M if self.kernel == "triton" else self.dense_above
        if self.kernel == "dequant" or (dense_above is not None and x2.shape[0] > dense_above):
            y = F.linear(x2, self.dequantize(x.dtype))
        else:
            if self.padded_in_features != k:
                x2 = F.pad(x2, (0, self.padded_in_features - k))
            if self.kernel == "tinygemm_cuda":
                xb = x2.to(torch.bfloat16).contiguous()
                y = torch.ops.aten._weight_int4pack_mm(xb, self.weight, self.groupsize, self.scales_and_zeros)
            elif self.kernel == "tinygemm_cpu":
                xc = x2.to(self.scales_and_zeros.dtype).contiguous()
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.weight, self.groupsize, self.scales_and_zeros)
            else:
                y = kernels.wmm(x2.contiguous(), self.weight, self.scales_and_zeros, kernels.INT4, self.groupsize)
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def fused(self, x: Tensor, norm, residual: Tensor | None, gated: bool = False) -> Tensor | None:
        """residual + self(norm(x)) (or of silu(gate) * up) in one kernel (kernel "triton", rows not padded), else None
        (see model.linear). Without it, int4 decode steps ran the RMSNorms and the gating as Inductor kernels of
        their own, four more launches a layer (eighteenth session's kernel timeline: 7 us a layer on the 7B shape)."""
        if self.kernel != "triton" or self.bias is not None or self.padded_in_features != self.in_features:
            return None
        return kernels.fused_wmm(x, self.weight, self.scales_and_zeros, kernels.INT4, self.groupsize, norm, residual,
                                 self.out_features, gated)  # fmt: skip

    def extra_repr(self) -> str:
        pad = f" (padded to {self.padded_in_features})" if self.padded_in_features != self.in_features else ""
        return (
            f"in_features={self.in_features}{pad}, out_features={self.out_features}, groupsize={self.groupsize}, "
            f"kernel={self.kernel}, dense_above={self.dense_above}"
        )


def swap_linears(model: Transformer, quant: dict) -> Transformer:
    """Replace the quantizable nn.Linear modules by empty quantized ones (same device, meta included) whose buffers
    match the state dict that quantize() writes. Unties a tied LM head that gets quantized (see the docstring)."""
    mode, g = check_quant(quant)
    for name, lin in quantizable_linears(model):
        tied_head = name == "output" and getattr(model.args, "tie_embeddings", False)
        if plan_linear(lin.in_features, lin.out_features, quant, tied_head) is not None:
            continue
        dev, bias = lin.weight.device, lin.bias is not None
        if mode == "int8":
            new = WeightOnlyInt8Linear(lin.in_features, lin.out_features, bias=bias, device=dev)
        else:
            new = WeightOnlyInt4Linear(lin.in_features, lin.out_features, g, bias=bias, device=dev)
        model.set_submodule(name, new)
        if name == "output" and getattr(model.args, "tie_embeddings", False):
            model.args.tie_embeddings = False  # load_model then keeps output.* and does not re-tie
    return model


def quantize_linears_int8(module: nn.Module, dtype: torch.dtype) -> int:
    """Every nn.Linear of `module` (the EAGLE head's, for generate.py --draft-quant int8) becomes a
    WeightOnlyInt8Linear, symmetric per output channel, prepared for the device it is on. Returns how many."""
    linears = [(name, m) for name, m in module.named_modules() if type(m) is nn.Linear]
    for name, lin in linears:
        q, scales = quantize_int8(lin.weight.detach())
        new = WeightOnlyInt8Linear(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.device)
        new.weight.copy_(q)
        new.scales.copy_(scales)
        if lin.bias is not None:
            new.bias = lin.bias.detach().to(dtype).clone()
        new.prepare(dtype)
        module.set_submodule(name, new)
    return len(linears)


def prepare_for_device(model: nn.Module, quant: dict, dtype: torch.dtype | None = None) -> nn.Module:
    """After the model is on its device: cast int8 scales to the activation dtype, pack int4 weights for the device.
    dtype defaults to the dtype of the model's first floating parameter (the embedding)."""
    check_quant(quant)
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    kernel = quant.get("int4_kernel", RUNTIME["int4_kernel"])
    dense_above = quant.get("int4_dense_above", RUNTIME["int4_dense_above"])
    for m in model.modules():
        if isinstance(m, WeightOnlyInt8Linear):
            m.prepare(dtype, quant.get("int8_kernel", RUNTIME["int8_kernel"]))
        elif isinstance(m, WeightOnlyInt4Linear):
            if dense_above is not None:
                m.dense_above = dense_above
            m.prepare(dtype, kernel)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Quantizing a checkpoint


def output_name(mode: str, groupsize: int | None) -> str:
    return "model_int8.pth" if mode == "int8" else f"model_int4.g{groupsize}.pth"


def _layer_of(key: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def _pattern(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "layers.*.", name)


# int4: rounds of least-squares refinement per group (quantize_int4), the error of input column j weighted by the
# square of the RMSNorm weight in front of the layer (input_norm_weight). Measured on SmolLM2-135M at g64
# (tests/data/heldout.txt, bf16 NLL 3.177): min-max +0.376 nats, 10 unweighted rounds +0.313, 10 norm-weighted
# rounds +0.280; with the tied LM head kept in bf16 (keep_tied_head) +0.306 -> +0.223. About 1 s per 100M weights on
# a CPU core per round.
INT4_REFINE = 10


def input_norm_weight(name: str, sd: dict) -> Tensor | None:
    """The RMSNorm weight g applied to the input of linear `name` (wqkv, w13, the LM head), or None. Input j is scaled
    by g[j], so an error in weight column j costs about g[j]^2 as much: a data-free stand-in for activation
    statistics when fitting int4 groups."""
    if name == "output":
        return sd.get("norm.weight")
    for lin, norm in NORM_BEFORE.items():  # "layers.3.attention.wqkv" -> "layers.3.attention_norm.weight"
        if name.endswith("." + lin):
            return sd.get(f"{name[: -len(lin)]}{norm}.weight")
    return None


def quantize_state_dict(sd: dict, args: ModelArgs, quant: dict, device="cpu", progress: bool = True):
    """Float state dict -> (quantized state dict, report). Raises QuantizeError when sd does not match args."""
    from tqdm import tqdm  # noqa: PLC0415 - only the CLI path needs it

    mode, g = check_quant(quant)
    with torch.device("meta"):
        ref = Transformer(args)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    tied = args.tie_embeddings
    if tied:
        expected.pop("output.weight")
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not (tied and k == "output.weight")]
    if missing or unexpected:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        raise QuantizeError(f"checkpoint does not match its config.json: {what}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise QuantizeError(f"checkpoint does not match its config.json: {k} is {tuple(sd[k].shape)}, not {shape}")

    linears = dict(quantizable_linears(ref))
    report = {"quantized": [], "skipped": {}, "padded": {}, "bf16": [], "untied": False}
    out: dict[str, Tensor] = {}

    def quantize_linear(name: str, w: Tensor) -> None:
        lin = linears[name]
        why = plan_linear(lin.in_features, lin.out_features, quant, tied and name == "output")
        if why is not None:  # stays float; a tied head stays tied (load_model re-ties the copy written here)
            report["skipped"][name] = why + ("; still tied to the embedding" if tied and name == "output" else "")
            out[f"{name}.weight"] = w.to(torch.bfloat16)
            return
        w = w.to(device=device, dtype=torch.float32)
        if mode == "int8":
            q, s = quantize_int8(w)
            out[f"{name}.weight"], out[f"{name}.scales"] = q.cpu(), s.cpu()
        else:
            kp = padded_in_features(lin.in_features, g)
            if kp != lin.in_features:
                w = F.pad(w, (0, kp - lin.in_features))
                report["padded"][name] = (lin.in_features, kp)
            norm = input_norm_weight(name, sd)
            cw = None if norm is None else F.pad(norm.to(w).square(), (0, w.shape[1] - lin.in_features), value=1.0)
            q, sz = quantize_int4(w, g, INT4_REFINE, cw)
            out[f"{name}.weight"], out[f"{name}.scales_and_zeros"] = pack_int4(q).cpu(), sz.cpu()
        report["quantized"].append(name)

    by_layer = defaultdict(list)
    for k in expected:
        by_layer[_layer_of(k)].append(k)
    if tied:
        by_layer[None].append("output.weight")
    steps = [*range(args.n_layers), None]
    desc = f"quantizing {mode}" + (f" g{g}" if g else "")
    for layer in tqdm(steps, desc=desc, unit="layer", disable=not progress, file=sys.stderr):
        for k in by_layer[layer]:
            name, _, leaf = k.rpartition(".")
            if leaf == "weight" and name in linears:
                src = sd["tok_embeddings.weight"] if (tied and name == "output") else sd[k]
                quantize_linear(name, src)
            elif sd[k].is_floating_point():
                out[k] = sd[k].to(torch.bfloat16)
                report["bf16"].append(k)
            else:
                out[k] = sd[k]
    report["untied"] = tied and "output" in report["quantized"]
    return out, report


def _summarize(names) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[_pattern(n)] = counts.get(_pattern(n), 0) + 1
    return ", ".join(f"{p} x{c}" if c > 1 else p for p, c in counts.items())


def _group_padded(padded: dict) -> dict:
    groups: dict[str, list] = {}
    for name, shapes in padded.items():
        entry = groups.setdefault(_pattern(name), [shapes, 0])
        entry[1] += 1
    return groups


def format_report(report: dict, quant: dict, size_in: int, size_out: int, path: Path) -> str:
    mode, g = check_quant(quant)
    kind = "int8 (per output channel)" if mode == "int8" else f"int4 (groupsize {g})"
    lines = [f"quantized {len(report['quantized'])} linears to {kind}: {_summarize(report['quantized'])}"]
    if report["untied"]:
        lines.append("LM head: `output` quantized as its own tensor (untied from the embedding; the loader unties it)")
    for name, why in report["skipped"].items():
        lines.append(f"kept in bf16: {name} ({why})")
    emb = [k for k in report["bf16"] if k.startswith("tok_embeddings")]
    norms = [k for k in report["bf16"] if k.endswith("norm.weight")]
    rest = [k for k in report["bf16"] if k not in emb and k not in norms]
    if emb:
        lines.append("kept in bf16: tok_embeddings.weight (a lookup reads one row per token: nothing to gain)")
    if norms:
        lines.append(f"kept in bf16: {len(norms)} RMSNorm weights (tiny)")
    if rest:
        lines.append(f"kept in bf16: {_summarize(rest)} (biases / small tensors)")
    for pat, names in _group_padded(report["padded"]).items():
        (k, kp), n = names
        lines.append(
            f"padded: {pat} x{n} in_features {k} -> {kp} (groupsize {g} must divide it; activations are "
            f"zero-padded at run time, +{100 * (kp - k) / k:.0f}% int4 bytes for these layers)"
        )
    mib = 1024 * 1024
    lines.append(f"size: {size_in / mib:.1f} MiB -> {size_out / mib:.1f} MiB ({size_in / max(size_out, 1):.2f}x)")
    lines.append(f"wrote {path}")
    return "\n".join(lines)


def quantize_checkpoint(path, mode: str, groupsize: int | None = None, device="cpu", progress=True):
    """Quantize the checkpoint at `path` (folder or .pth); return (output path, summary text).
    int4 without a groupsize: the source's own 4-bit grid if it has one (see detect_4bit_grid), else 64."""
    if mode not in MODES:
        raise QuantizeError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "int8" and groupsize is not None:
        raise QuantizeError("--groupsize applies to int4 only")
    if groupsize is not None and groupsize not in GROUPSIZES:
        raise QuantizeError(f"--groupsize must be one of {', '.join(map(str, GROUPSIZES))}, not {groupsize}")

    weights, args, ckpt, quantized = read_checkpoint(path)  # raises CheckpointError
    folder = weights.parent
    if quantized:
        raise QuantizeError(f"{weights} is already quantized ({quantized}): start from the float one")

    notes = []
    if mode == "int4":
        first = [v for k, v in ckpt.items() if k.startswith("layers.0.") and k.endswith(".weight") and v.dim() == 2]
        grid = detect_4bit_grid(first) if first else None
        if grid and groupsize is None:
            groupsize = grid
            notes.append(f"groupsize {grid}: the source weights already lie on a 4-bit grid of {grid}-wide groups "
                         "(a GGUF Q4 conversion?), which this groupsize keeps nearly exact")  # fmt: skip
        elif grid and groupsize > grid:
            notes.append(f"warning: the source weights already lie on a 4-bit grid of {grid}-wide groups (a GGUF Q4 "
                         f"conversion?); groupsize {groupsize} requantizes them onto a coarser grid and loses much "
                         f"more than usual: --groupsize {grid} keeps them nearly exact")  # fmt: skip
        groupsize = groupsize or DEFAULT_GROUPSIZE
    quant = {"mode": mode} if mode == "int8" else {"mode": mode, "groupsize": groupsize, "keep_tied_head": True}

    sd, report = quantize_state_dict(ckpt, args, quant, device=device, progress=progress)
    out = folder / output_name(mode, groupsize)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"state_dict": sd, "quantization": quant}, tmp)
    tmp.replace(out)
    summary = format_report(report, quant, weights.stat().st_size, out.stat().st_size, out)
    return out, "\n".join([*notes, summary])


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other error here
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (model.pth + config.json) or a .pth")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument(
        "--groupsize",
        type=int,
        help=f"int4 group size along in_features: {', '.join(map(str, GROUPSIZES))} (default: the source's own 4-bit "
        f"grid when its weights already lie on one, else {DEFAULT_GROUPSIZE})",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), help="where to compute (default: cuda if available)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise QuantizeError("--device cuda: CUDA is not available")
        _, summary = quantize_checkpoint(a.checkpoint, a.mode, a.groupsize, device=device)
    except (QuantizeError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary)


if __name__ == "__main__":
    main()
