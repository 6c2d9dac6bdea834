"""Triton matmuls for few tokens: y[M, N] = x[M, K] @ W[N, K].T for M <= MAX_M, with W stored as

    quant 0  bf16 / fp16 (same dtype as x)            W = w
    quant 1  int8 [N, K], scales [N]                   W = w * scales[:, None]          (symmetric, per channel)
    quant 2  uint8 [N, K/2] nibble pairs,              W[n, k] = (q[n, k] - 8) * sz[n, k // G, 0] + sz[n, k // G, 1]
             sz [N, K/G, 2] (scale, zero)              (byte j of a row = q[2j] << 4 | q[2j + 1], q in 0..15)

Batch-1 decoding (M = 1) and EAGLE tree verification (M = 8..64) read every weight once per forward, so both are
bound by memory bandwidth, and what matters is reading the weight at full speed and converting it cheaply:

- M = 1 (`_gemv_kernel`): each program owns BLOCK_N output rows and walks K in BLOCK_K chunks, accumulating
  w * x elementwise in float32 registers and reducing once at the end (no tensor cores: nothing to multiply).
- M > 1 (`_gemm_kernel`): the same walk, but the converted chunk goes through tl.dot against a BLOCK_M-row tile of x
  (M padded up to 16, 32 or 64), so 26 or 64 tokens cost about what one token costs.
- Integers become floats by the exponent trick: (i + 0x4B000000) read as float32 is 2^23 + i for 0 <= i < 2^23, so
  one integer add and one float subtract replace a conversion instruction (which runs at 1/8 rate on Hopper).

Both kernels are autotuned per (N, K, quant[, BLOCK_M]) over a few block shapes on first use, and wrapped as the
custom op `llmgen::wmm`, so torch.compile treats a call as one opaque kernel and CUDA graphs capture it. For one
token the GEMV can also apply the RMSNorm that precedes the matmul and add the residual that follows it
(`fused_wmm`, used through model.linear), two fewer launches per layer.
The tests run the kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: nothing here is used
    triton = None

MAX_M = 64  # larger inputs (prefill) go to the dense path of the caller
NONE, INT8, INT4 = 0, 1, 2
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(x: Tensor) -> bool:
    """Whether the Triton path can run for activations like x (CUDA, 16-bit floats, triton installed)."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


if triton is not None:

    def _fast_bench(kernel_call, quantiles):  # autotuning: short runs, these kernels take microseconds
        if INTERPRET:  # Triton's CPU interpreter cannot time anything: take the first config that fits
            return [1.0] * len(quantiles)
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    def _prune(configs, named_args, **kwargs):
        """Fit the block shapes to the matrix: BLOCK_K is cut to the largest power of two dividing K (so K needs no
        masks; K is a multiple of 16, and of the group size >= 32 for int4), BLOCK_N to at most N rounded up to 16."""
        k, n, group = named_args["K"], named_args["N"], kwargs.get("GROUP", 0)
        kmax = k & -k  # >= GROUP for int4, since K is a multiple of the (power-of-two) group size
        fitted = {}
        for c in configs:
            bn, bk = c.kwargs["BLOCK_N"], min(max(c.kwargs["BLOCK_K"], group), kmax)
            if bn <= max(16, triton.next_power_of_2(n)):
                cfg = triton.Config({**c.kwargs, "BLOCK_K": bk}, num_warps=c.num_warps, num_stages=c.num_stages)
                fitted.setdefault((bn, bk, c.num_warps, c.num_stages), cfg)
        return list(fitted.values())

    _GEMV_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (4, 512, 4, 2), (8, 256, 4, 2), (8, 512, 4, 2), (16, 256, 4, 2), (16, 512, 8, 2),
            (32, 128, 4, 2), (8, 1024, 8, 2), (16, 128, 4, 3),
        ]
    ]  # fmt: skip
    _GEMM_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (16, 512, 8, 2),
            (16, 256, 4, 5), (16, 512, 4, 4), (32, 256, 8, 4), (32, 512, 8, 3),
        ]
    ]  # fmt: skip

    @triton.jit
    def _as_float(i, OFFSET: tl.constexpr, SUB: tl.constexpr):
        """int32 i (with i + OFFSET in 0..2^23) -> float32 i - SUB, by the exponent trick."""
        return (i + (0x4B000000 + OFFSET)).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET + SUB)

    @triton.jit
    def _int4_chunk(w_ptr, s_ptr, rn, n_ok, k0, K, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
        """The int4 weights of rows rn, columns k0 .. k0+BLOCK_K, as float32 (even, odd) [rows, NG groups, HG bytes]:
        each byte holds an even (high nibble) and an odd (low nibble) element, and each (row, group) one
        (scale, zero) pair, broadcast over the group's bytes."""
        NG: tl.constexpr = BLOCK_K // GROUP
        HG: tl.constexpr = GROUP // 2
        rg, rj = tl.arange(0, NG), tl.arange(0, HG)
        bp = w_ptr + rn[:, None, None] * (K // 2) + (k0 // 2 + rg[:, None] * HG + rj[None, :])[None, :, :]
        b = tl.load(bp, mask=n_ok[:, None, None], other=0).to(tl.int32)
        sp = s_ptr + 2 * (rn[:, None] * (K // GROUP) + (k0 // GROUP + rg)[None, :])
        s = tl.load(sp, mask=n_ok[:, None], other=0.0).to(tl.float32)[:, :, None]
        z = tl.load(sp + 1, mask=n_ok[:, None], other=0.0).to(tl.float32)[:, :, None]
        return _as_float(b >> 4, 0, 8) * s + z, _as_float(b & 15, 0, 8) * s + z

    _TUNE = {"prune_configs_by": {"early_config_prune": _prune}, "do_bench": _fast_bench}

    @triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "QUANT", "GROUP", "NORM", "RESIDUAL"], **_TUNE)
    @triton.jit
    def _gemv_kernel(
        x_ptr,  # [K]
        w_ptr,  # [N, K] (quant 0, 1) or [N, K/2] uint8 (quant 2)
        s_ptr,  # [N] int8 scales, or [N, K/G, 2] int4 (scale, zero); unused for quant 0
        y_ptr,  # [N]
        g_ptr,  # [K] RMSNorm weight (NORM)
        r_ptr,  # [N] residual (RESIDUAL)
        N,
        K,
        eps,
        QUANT: tl.constexpr,
        GROUP: tl.constexpr,
        NORM: tl.constexpr,  # y = W (g * x * rsqrt(mean(x^2) + eps)): the RMSNorm before the matmul, fused
        RESIDUAL: tl.constexpr,  # y += r: the residual add after it
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Every program reads all of x anyway, so the norm costs it a sum of squares and a multiply by g per
        chunk, and one scale at the end (the rsqrt is the same for every output row)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        if QUANT == 2:  # chunks of [BLOCK_N rows, NG groups, HG bytes] (see _int4_chunk)
            NG: tl.constexpr = BLOCK_K // GROUP
            HG: tl.constexpr = GROUP // 2
            rg, rj = tl.arange(0, NG), tl.arange(0, HG)
            acc = tl.zeros((BLOCK_N, NG, HG), dtype=tl.float32)
            ss = tl.zeros((NG, HG), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                we, wo = _int4_chunk(w_ptr, s_ptr, rn, n_ok, k0, K, GROUP, BLOCK_K)
                off = k0 + 2 * (rg[:, None] * HG + rj[None, :])
                xe = tl.load(x_ptr + off).to(tl.float32)
                xo = tl.load(x_ptr + off + 1).to(tl.float32)
                if NORM:
                    ss += xe * xe + xo * xo
                    xe = xe * tl.load(g_ptr + off).to(tl.float32)
                    xo = xo * tl.load(g_ptr + off + 1).to(tl.float32)
                acc += we * xe[None, :, :] + wo * xo[None, :, :]
            acc = tl.sum(acc, axis=2)
            sum_sq = tl.sum(tl.sum(ss, axis=1), axis=0)
        else:
            rk = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=n_ok[:, None], other=0)
                if QUANT == 1:
                    w = _as_float(w.to(tl.int32), 128, 0)
                else:
                    w = w.to(tl.float32)
                xk = tl.load(x_ptr + k0 + rk).to(tl.float32)
                if NORM:
                    ss += xk * xk
                    xk = xk * tl.load(g_ptr + k0 + rk).to(tl.float32)
                acc += w * xk[None, :]
            sum_sq = tl.sum(ss, axis=0)
        y = tl.sum(acc, axis=1)
        if QUANT == 1:
            y = y * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if NORM:
            y = y * tl.rsqrt(sum_sq / K + eps)
        if RESIDUAL:
            y += tl.load(r_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.autotune(configs=_GEMM_CONFIGS, key=["N", "K", "QUANT", "GROUP", "BLOCK_M"], **_TUNE)
    @triton.jit
    def _gemm_kernel(
        x_ptr,  # [M, K] row-major
        w_ptr,
        s_ptr,
        y_ptr,  # [M, N]
        M,
        N,
        K,
        QUANT: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        n_ok, m_ok = rn < N, rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dt = x_ptr.dtype.element_ty
        if QUANT == 2:  # dequantize a chunk (_int4_chunk), then two dots (even, odd)
            rb = tl.arange(0, BLOCK_K // 2)
            for k0 in range(0, K, BLOCK_K):
                we, wo = _int4_chunk(w_ptr, s_ptr, rn, n_ok, k0, K, GROUP, BLOCK_K)
                we = tl.reshape(we.to(dt), (BLOCK_N, BLOCK_K // 2))
                wo = tl.reshape(wo.to(dt), (BLOCK_N, BLOCK_K // 2))
                xp = x_ptr + rm[:, None] * K + (k0 + 2 * rb)[None, :]
                xe = tl.load(xp, mask=m_ok[:, None], other=0.0)
                xo = tl.load(xp + 1, mask=m_ok[:, None], other=0.0)
                acc += tl.dot(xe, tl.trans(we))
                acc += tl.dot(xo, tl.trans(wo))
        else:
            rk = tl.arange(0, BLOCK_K)
            for k0 in range(0, K, BLOCK_K):
                w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=n_ok[:, None], other=0)
                if QUANT == 1:
                    w = _as_float(w.to(tl.int32), 128, 0).to(dt)
                x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=m_ok[:, None], other=0.0)
                acc += tl.dot(x, tl.trans(w.to(dt)))
        if QUANT == 1:
            acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + rm[:, None] * N + rn[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _check(x: Tensor, w: Tensor, s: Tensor | None, quant: int, group: int) -> tuple[int, int, int]:
    if x.dim() != 2 or not x.is_contiguous() or x.shape[0] > MAX_M:
        raise ValueError(f"x must be a contiguous [M <= {MAX_M}, K] matrix, got {tuple(x.shape)}")
    m, k = x.shape
    n = w.shape[0]
    if quant == INT4:
        if w.dtype != torch.uint8 or w.shape != (n, k // 2) or k % group or s.shape != (n, k // group, 2):
            raise ValueError(f"int4: x {tuple(x.shape)}, w {tuple(w.shape)} {w.dtype}, group {group}")
    elif quant == INT8:
        if w.dtype != torch.int8 or w.shape != (n, k) or s.shape != (n,):
            raise ValueError(f"int8: x {tuple(x.shape)}, w {tuple(w.shape)} {w.dtype}")
    elif w.shape != (n, k) or w.dtype != x.dtype:
        raise ValueError(f"dense: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
    if k % 16:
        raise ValueError(f"K = {k} must be a multiple of 16")
    return m, n, k


@torch.library.custom_op("llmgen::wmm", mutates_args=())
def wmm(x: Tensor, w: Tensor, s: Tensor | None, quant: int, group: int, g: Tensor | None = None, eps: float = 0.0,
        residual: Tensor | None = None) -> Tensor:  # fmt: skip
    """x [M, K] @ W.T -> [M, N] in x.dtype, W given by (w, s, quant, group) as in the module docstring.

    One token (M = 1) only: g [K] applies RMSNorm (weight g, epsilon eps) to x first, and residual [1, N] is added to
    the result, both inside the kernel: residual + W @ rmsnorm(x)."""
    m, n, k = _check(x, w, s, quant, group)
    if (g is not None or residual is not None) and m != 1:
        raise ValueError(f"the fused norm / residual add takes one token, got {m}")
    if g is not None and g.shape != (k,) or residual is not None and residual.shape != (1, n):
        shapes = [None if t is None else tuple(t.shape) for t in (g, residual)]
        raise ValueError(f"norm weight / residual of shapes {shapes} for N={n}, K={k}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    s = s if s is not None else w  # placeholder pointers the kernel never reads
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    if m == 1:
        norm, res = g is not None, residual is not None
        g, r = g if norm else x, residual if res else x
        _gemv_kernel[grid](x, w, s, y, g, r, n, k, eps, QUANT=quant, GROUP=group, NORM=norm, RESIDUAL=res)
    else:
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        _gemm_kernel[grid](x, w, s, y, m, n, k, QUANT=quant, GROUP=group, BLOCK_M=block_m)
    return y


@wmm.register_fake
def _(x, w, s, quant, group, g=None, eps=0.0, residual=None):
    return x.new_empty(x.shape[0], w.shape[0])


# The fused norm / residual add is used for K >= FUSE_MIN_K only. Measured on an H200 (BENCHMARKS.md): +2.7% tok/s on
# the Llama-2-7B shape (K = 4096, 11008), -1.3% on SmolLM2 (K = 576, 1536), where each program's extra sum of squares
# and norm-weight loads cost more than the separate norm kernel they replace.
FUSE_MIN_K = 2048


def fused_wmm(x: Tensor, w: Tensor, s: Tensor | None, quant: int, group: int, norm, residual: Tensor | None,
              n: int) -> Tensor | None:  # fmt: skip
    """residual + W @ norm(x) as one `wmm` for a one-token x [..., K] on CUDA, or None where that does not apply
    (several tokens, CPU, dtypes that differ, K < FUSE_MIN_K with a norm or residual) and the caller runs the steps
    apart. norm: a model.RMSNorm or None."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] != 1 or not available(x2) or (w.dtype != x2.dtype and quant == NONE):
        return None
    if (norm is not None or residual is not None) and x2.shape[1] < FUSE_MIN_K:
        return None
    g = None if norm is None else norm.weight
    if g is not None and g.dtype != x2.dtype or residual is not None and residual.dtype != x2.dtype:
        return None
    r = None if residual is None else residual.reshape(1, n)
    y = wmm(x2.contiguous(), w, s, quant, group, g, norm.eps if norm is not None else 0.0, r)
    return y.reshape(*x.shape[:-1], n)


def int4_layout(scales_and_zeros: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The on-disk int4 scales and zeros [K/G, N, 2] as the kernel reads them: [N, K/G, 2] in dtype (bf16, as
    tinygemm keeps them: 4 bytes per group of G weights)."""
    return scales_and_zeros.transpose(0, 1).to(dtype).contiguous()


class FewTokenLinear(torch.nn.Module):
    """A bias-free dense nn.Linear whose forward uses the Triton GEMV for one token (bf16/fp16 on CUDA) and F.linear
    otherwise. Shares the original weight Parameter (tied embeddings stay tied). One token only: in `bench.py
    --linears` the GEMV beat cuBLAS on most decode shapes (SmolLM2: 2.1-2.5 vs 3.3-4.7 us), while for 8-64 tokens
    cuBLAS was as fast or faster (BENCHMARKS.md)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        y = fused_wmm(x, self.weight, None, NONE, 0, None, None, self.out_features)
        return y if y is not None else torch.nn.functional.linear(x, self.weight)

    def fused(self, x: Tensor, norm, residual: Tensor | None) -> Tensor | None:
        """residual + self(norm(x)) in one kernel for one token on CUDA, else None (see model.linear)."""
        return fused_wmm(x, self.weight, None, NONE, 0, norm, residual, self.out_features)


def use_triton_linears(model: torch.nn.Module) -> int:
    """Swap every bias-free nn.Linear of the model for FewTokenLinear; returns how many were swapped."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear and mod.bias is None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, FewTokenLinear(mod))
            swapped += 1
    return swapped
