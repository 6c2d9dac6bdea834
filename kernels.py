"""Triton matmuls for few tokens: y[M, N] = x[M, K] @ W[N, K].T for M <= MAX_M, with W stored as

    quant 0  bf16 / fp16 (same dtype as x)            W = w
    quant 1  int8 [N, K], scales [N]                   W = w * scales[:, None]          (symmetric, per channel)
    quant 2  uint8 [N, K/2] nibble pairs,              W[n, k] = (q[n, k] - 8) * sz[n, k // G, 0] + sz[n, k // G, 1]
             sz [N, K/G, 2] (scale, zero)              (byte j of a row = q[2j] << 4 | q[2j + 1], q in 0..15)

Batch-1 decoding (M = 1) and EAGLE tree verification (M = 8..64) read every weight once per forward, so both are
bound by memory bandwidth, and what matters is reading the weight at full speed and converting it cheaply:

- M = 1 (`_gemv_kernel`): each program owns BLOCK_N output rows and walks K in BLOCK_K chunks, accumulating
  w * x elementwise in float32 registers and reducing once at the end (no tensor cores: nothing to multiply). The
  chunks are dependent steps, so for small K few and wide ones win: a last, partial chunk is masked (K = 576 in one
  chunk of 1024 rather than nine of 64; int4 masks whole groups, so the 7B shape's K = 11008 = 43 x 256 may take
  chunks of 512, not 256: 20.1 -> 15.9 us on an H200).
  Here the int4 kernel is bound by instructions issued, not bytes (`scripts/kernel_sass.py` counts them: bf16 3.4 a
  weight, int8 4.2, int4 6.8). int8 is not: with 4.2 -> 3.1 instructions a weight (no subtract a weight; ninth
  session, commit 757e294) the 7B shapes took the same time on an H200 (116.0 vs 116.6 us for the five matmuls), at
  2.6-3.3 TB/s against bf16's ~3.5. int4 is read as 32-bit words of 8 weights, each nibble becomes 1 + q/16 by
  a shift and one and-or into a float's mantissa (`_mant`), the group's scale and zero are applied once per word, and
  bf16 x is read four at a time as int64 (`_bf16_of`): 8.8 -> 6.8 instructions a weight, 1.0-1.7x faster on the 7B
  shapes, on par with tinygemm except where N = 4096. Since the eighteenth session the nibbles become floats by byte
  permutes (`_nibbles`): 6.7-6.8 -> 6.2-6.3 a weight, +2.6% on the 7B int4 decode. (Block shapes that
  give a thread several rows, so that each x converted serves them all, count 3.9-4.1: the int4-only configs,
  _GEMV_INT4_ONLY; tune_kernels.py picked one of them, for wo only.) The eighteenth session's kernel timeline of the
  7B forward (no PDL) shows what binds both quantized formats: each int8 and int4 matmul takes about the same time
  (wqkv 18.1 vs 18.3 us, w13 27.2 vs 30.2), 2.3-3.8 G weights a ms whatever the bytes, while bf16 reads at 3.4-4.4
  TB/s. The SASS of the int8 loop: loads at the top, then ~260 instructions that wait on them, 122 registers (4
  programs an SM), the same registers as bf16's for half its bytes in flight (see GEMV_FOLD).
- M > 1 (`_gemm_kernel`): the same walk, but the converted chunk goes through tl.dot against a BLOCK_M-row tile of x
  (M padded up to 16, 32 or 64), so 26 or 64 tokens cost about what one token costs. Some block shapes swap the
  operands (`_dot`): the weight tile is tl.dot's first operand and the tokens its N. Some split K over several
  programs per output block (`_split_sum`, for long rows of few outputs: see SPLIT_MAX_N). For int4, `WORDS`
  configs read 32-bit words and convert them as the one-token kernel does, with one dot per nibble position against
  x's matching columns (about 6 instructions a weight against 7-9 by bytes, yet on an H200 at 26 tokens no faster
  than bytes except slightly on the 7B w2 with a split: the autotuner picks them only where they are faster). Both
  int4 paths load the weight and x as plain 2-D tiles and regroup them in registers (reshape, `tl.split`,
  `_every_8th`), so that Triton's pipeliner streams them in ahead with cp.async as it does for bf16 and int8; their
  earlier 3-D and strided loads were plain loads, never pipelined (found in the SASS after the eighth session's
  last GPU call: not yet timed).
- Elsewhere integers become floats by the exponent trick: (i + 0x4B000000) read as float32 is 2^23 + i for
  0 <= i < 2^23, so an integer add (for int8 a byte permute, `_int8_float`) and a float subtract replace a conversion
  instruction (1/8 rate on Hopper). `scripts/kernel_sass.py` counts what each costs a weight.

Both kernels are autotuned per (N, K, quant[, BLOCK_M]) over a few block shapes on first use, and wrapped as the
custom op `llmgen::wmm`, so torch.compile treats a call as one opaque kernel and CUDA graphs capture it. Both add a
bias if there is one. They can also apply the RMSNorm that precedes the matmul and add the residual that follows it
(`fused_wmm`, used through model.linear), two fewer launches per layer, and the SwiGLU gating before the down
projection, for one token where K >= FUSE_MIN_K.

More custom ops cut launches elsewhere: `rope_and_cache` (RoPE on q and k, k and v into their cache slots: one
kernel per layer instead of three), `few_token_attention` (attention of 1-64 query tokens in two kernels instead of
four or five), `layer_inputs` (positions, RoPE rows and mask made once per forward or
EAGLE draft round, in one launch, not per layer or draft step), `chunk_topk` (the draft's top-k and logsumexp over the
vocabulary in one launch instead of three to five) and `copy_rows` (an accepted EAGLE path's KV rows moved down in
every layer with one launch instead of one per cache tensor). With `PDL` every kernel here is launched so that its
launch overlaps the end of the kernel before it (`set_pdl`).
The tests run the kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: nothing here is used
    triton = None

MAX_M = 64  # larger inputs (prefill) go to the dense path of the caller
# Rows the few-token matmul pads M to at least (16, 32 or 64; bench.py --gemm-min-block-m for A/B runs). On an H200
# (thirteenth session) a 40-token EAGLE round (64-row tiles) took 1.06 ms against 1.11 for a 26-token one (32-row
# tiles) that drafts one step fewer: whether the 32-row tiles are the cause is not yet measured. (In the SASS, a 64-row
# tile as tl.dot's first operand runs Hopper's HGMMA; a 32-row one runs HMMA, unless the config swaps the operands.)
GEMM_MIN_BLOCK_M = 16
NONE, INT8, INT4 = 0, 1, 2
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Programmatic dependent launch (Hopper and newer; `set_pdl`): every kernel here is launched with launch_pdl and starts
# with griddepcontrol.wait (it waits until the kernel before it has finished and its writes are visible) followed by
# griddepcontrol.launch_dependents (the kernel after it may be launched now). So launching the next kernel overlaps
# the end of this one instead of following it. Off until set_pdl turns it on (generate.py and bench.py do, by default).
PDL = False
# With PDL, each matmul fetches its first weights before that wait (weights are never written while decoding): the
# one-token kernel its first chunk into registers, the few-token one its first lines into L2. bench.py --no-prefetch
# turns it off for A/B runs.
PREFETCH = True
# The one-token matmul's loop over K, software-pipelined (`tl.range(num_stages=...)`: Triton pipelines loads that feed
# tl.dot by itself, but others only in a loop that asks for it). Without it each program waits out a trip to memory
# per chunk (sixteenth session, in the SASS: loads, barriers, arithmetic, then the next loads), and int8, whose
# converted weights take twice bf16's registers a byte, fits fewer programs on an SM to cover that wait. bench.py
# --no-gemv-pipeline turns it off for A/B runs. Configs of one stage keep the plain loop either way, so the autotuner
# chooses per shape.
GEMV_PIPELINE = True
# The one-token bf16 / int8 matmul sums each thread's 16 bytes of a row (8 or 16 products) at every chunk, into
# BLOCK_N x BLOCK_K / FOLD accumulators, where it otherwise keeps BLOCK_N x BLOCK_K of them to the end: those took
# about half of its ~120 registers, so 4 programs an SM, with nothing in flight while a program sums (eighteenth
# session, SASS). Off until timed on a GPU: bench.py --gemv-fold.
GEMV_FOLD = False


def available(x: Tensor) -> bool:
    """Whether the Triton path can run for activations like x (CUDA, 16-bit floats, triton installed)."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


if triton is not None:

    def _fast_bench(kernel_call, quantiles):  # autotuning: short runs, these kernels take microseconds
        if INTERPRET:  # Triton's CPU interpreter cannot time anything: take the first config that fits
            return [1.0] * len(quantiles)
        return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)

    def _prune(configs, named_args, **kwargs):
        """Fit the block shapes to the matrix. BLOCK_K: the last chunk is masked where BLOCK_K does not divide K, so
        BLOCK_K is cut to K rounded up to a power of two (SmolLM2's K = 576 then takes one 1024-wide chunk, or two of
        512, instead of nine of 64), and for int4 is at least a group (chunks of whole groups, the masked ones too).
        BLOCK_N: at most N rounded up to 16."""
        k, n, group = named_args["K"], named_args["N"], kwargs.get("GROUP", 0)
        kmax = triton.next_power_of_2(k)
        split_ok = split_allowed(n, k)
        fitted = {}
        for c in configs:
            bn, bk, split = c.kwargs["BLOCK_N"], min(max(c.kwargs["BLOCK_K"], group), kmax), c.kwargs.get("SPLIT", 1)
            if bn > max(16, triton.next_power_of_2(n)) or split > 1 and not split_ok:
                continue
            if c.kwargs.get("WORDS") and (kwargs.get("QUANT") != INT4 or bk < 128):  # int4, dots of >= 16 words
                continue
            if _int4_only(c) and kwargs.get("QUANT") != INT4:
                continue
            cfg = triton.Config({**c.kwargs, "BLOCK_K": bk}, num_warps=c.num_warps, num_stages=c.num_stages)
            fitted.setdefault((bn, bk, c.kwargs.get("SWAP"), split, c.num_warps, c.num_stages), cfg)
        return list(fitted.values())

    def _int4_only(c) -> bool:
        """Whether c is one of the one-token kernel's configs for int4 weights only (_GEMV_INT4_ONLY)."""
        kw = c.kwargs
        return "W_STAGES" in kw and (kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages) in _GEMV_INT4_ONLY

    _EVEN_K = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0}  # no mask on K where BLOCK_K divides it

    # int4 only: a thread gets several rows (each x converted serves them all) and 64 bytes of weights a chunk
    _GEMV_INT4_ONLY = ((16, 1024, 4, 1), (8, 2048, 4, 1), (4, 4096, 4, 1), (8, 2048, 4, 2), (16, 2048, 8, 1))
    _GEMV_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "W_STAGES": s}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (4, 512, 4, 2), (8, 256, 4, 2), (8, 512, 4, 2), (16, 256, 4, 2), (16, 512, 8, 2),
            (32, 128, 4, 2), (8, 1024, 8, 2), (16, 128, 4, 3),
            (16, 1024, 8, 2), (32, 512, 8, 2), (8, 2048, 8, 2),  # int8: as many bytes per step as bf16's best
            (4, 1024, 4, 1), (8, 1024, 4, 1), (16, 1024, 8, 1),  # small K (SmolLM2's 576) in one chunk
            (16, 512, 8, 1), (8, 512, 4, 1),  # one stage: the plain loop (see _gemv_kernel)
            (16, 512, 8, 3), (16, 512, 4, 4), (8, 1024, 8, 3), (16, 1024, 8, 3), (32, 256, 4, 4),  # deeper pipelines
            *_GEMV_INT4_ONLY,
        ]
    ]  # fmt: skip
    _GEMM_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SWAP": sw, "SPLIT": sp, "WORDS": wd}, num_warps=w, num_stages=s)
        for wd, shapes in [
            (0, [
                (16, 128, 4, 3, 0, 1), (16, 256, 4, 3, 0, 1), (32, 128, 4, 3, 0, 1), (32, 256, 4, 3, 0, 1),
                (64, 128, 4, 3, 0, 1), (16, 512, 8, 2, 0, 1), (16, 256, 4, 5, 0, 1), (16, 512, 4, 4, 0, 1),
                (32, 256, 8, 4, 0, 1), (32, 512, 8, 3, 0, 1), (16, 512, 4, 2, 0, 1),
                (16, 1024, 4, 1, 0, 1), (16, 1024, 8, 1, 0, 1), (32, 1024, 8, 1, 0, 1),  # small K: few chunks
                (32, 256, 4, 3, 1, 1), (64, 128, 4, 3, 1, 1), (64, 256, 4, 3, 1, 1), (64, 256, 8, 3, 1, 1),
                (128, 128, 4, 3, 1, 1), (128, 256, 8, 2, 1, 1), (64, 512, 8, 1, 1, 1),  # swapped operands (see _dot)
                # split over K (see _split_sum; for K >= SPLIT_MIN_K and N <= SPLIT_MAX_N only)
                (32, 128, 4, 3, 0, 2), (32, 256, 4, 3, 0, 4), (64, 128, 4, 3, 1, 4), (64, 256, 8, 3, 1, 4),
                (32, 256, 4, 3, 1, 8), (64, 256, 4, 3, 1, 2),
            ]),
            # int4 only, read as 32-bit words (about 6 instructions a weight against 7-9 by bytes, kernel_sass.py)
            (1, [(128, 256, 8, 2, 1, 1), (128, 128, 4, 3, 1, 1), (64, 256, 4, 3, 1, 1), (64, 256, 4, 3, 1, 4)]),
        ]
        for bn, bk, w, s, sw, sp in shapes
    ]  # fmt: skip

    @triton.jit
    def _as_float(i, OFFSET: tl.constexpr, SUB: tl.constexpr):
        """int32 i (with i + OFFSET in 0..2^23) -> float32 i - SUB, by the exponent trick."""
        return (i + (0x4B000000 + OFFSET)).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET + SUB)

    @triton.jit
    def _mant(w, SHIFT: tl.constexpr, MASK: tl.constexpr):
        """int32 w shifted by SHIFT (left where > 0) and masked into the top bits of a float32 mantissa, with 1.0's
        exponent: 1 + field / 2^width, exact, in two integer instructions (shift, and-or), where extracting,
        offsetting and subtracting takes three or four."""
        if SHIFT > 0:
            w = w << SHIFT
        elif SHIFT < 0:
            w = w >> -SHIFT
        if _NO_PTX:
            f = ((w & MASK) | 0x3F800000).to(tl.float32, bitcast=True)
        else:  # one lop3 (a & b | c) with the constant kept in a register; Triton's code takes two, one per immediate
            # (written out like _int8_float's: Triton 3.6 cannot pass the assembly string to a shared jit helper)
            f = tl.inline_asm_elementwise(
                asm=f"lop3.b32 $0, $1, {MASK}, 0x3F800000, 0xEA;",
                constraints="=r,r",
                args=[w],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        return f

    @triton.jit
    def _nibbles(w):
        """The 8 nibbles of int32 words w as 8 float32 tensors 1 + q / 16 (as _mant's), in weight order (nibble j is
        weight 8 w + j: byte j // 2, high nibble first). Two shifts and two and-ors put each byte's high and low
        nibble into bits 3-6 of a byte with its top bit set, in two words; one byte permute (`prmt`) per nibble then
        makes the float (1.0's exponent byte, that byte under it): 12 instructions for 8 weights, where a shift and an
        and-or each (`_mant`) take 16. (One permute per nibble from the two words in separate assembly blocks, to keep
        fewer floats live, took more: moves of the constant.)"""
        if _NO_PTX:
            fs = tuple(((w >> (8 * (j // 2) + 4 * (1 - j % 2))) & 15).to(tl.float32) / 16.0 + 1.0 for j in range(8))
        else:
            fs = tl.inline_asm_elementwise(
                asm="{ .reg .b32 h, l; shr.b32 h, $8, 1; lop3.b32 h, h, 0x78787878, 0x80808080, 0xEA; "
                "shl.b32 l, $8, 3; lop3.b32 l, l, 0x78787878, 0x80808080, 0xEA; "
                "prmt.b32 $0, h, 0x3F000000, 0x7044; prmt.b32 $1, l, 0x3F000000, 0x7044; "
                "prmt.b32 $2, h, 0x3F000000, 0x7144; prmt.b32 $3, l, 0x3F000000, 0x7144; "
                "prmt.b32 $4, h, 0x3F000000, 0x7244; prmt.b32 $5, l, 0x3F000000, 0x7244; "
                "prmt.b32 $6, h, 0x3F000000, 0x7344; prmt.b32 $7, l, 0x3F000000, 0x7344; }",
                constraints="=r,=r,=r,=r,=r,=r,=r,=r,r",
                args=[w],
                dtype=(tl.float32,) * 8,
                is_pure=True,
                pack=1,
            )
        return fs

    @triton.jit
    def _int8_float(w):
        """int8 w as float32 q + 2^23 + 128 (subtract 8388736.0 for q): four weights per 32-bit register, one xor for
        the four (q + 128, 0..255) and one byte permute each into the low byte of 2^23 (`prmt`), where Triton's own
        code takes a permute, an add and more. The interpreter has no PTX: there the same by integer arithmetic."""
        if _NO_PTX:
            f = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True)
        else:
            f = tl.inline_asm_elementwise(
                asm="{ .reg .b32 t; xor.b32 t, $4, 0x80808080; prmt.b32 $0, t, 0x4B000000, 0x7650; "
                "prmt.b32 $1, t, 0x4B000000, 0x7651; prmt.b32 $2, t, 0x4B000000, 0x7652; "
                "prmt.b32 $3, t, 0x4B000000, 0x7653; }",
                constraints="=r,=r,=r,=r,r",
                args=[w],
                dtype=tl.float32,
                is_pure=True,
                pack=4,
            )
        return f

    @triton.jit
    def _load_ok(p, ok, EVEN_K: tl.constexpr):
        """tl.load(p), 0 where not ok, unless EVEN_K (every chunk whole: no mask)."""
        if EVEN_K:
            v = tl.load(p)
        else:
            v = tl.load(p, mask=ok, other=0)
        return v

    @triton.jit
    def _int4_scales(s_ptr, rn, n_ok, k0, K, GROUP: tl.constexpr, NG: tl.constexpr, EVEN_K: tl.constexpr):
        """The (scale, zero) of rows rn for the NG groups from column k0 on, as float32 [rows, NG, 1] each; 0 for
        groups past K."""
        rg = k0 // GROUP + tl.arange(0, NG)
        sp = s_ptr + 2 * (rn[:, None] * (K // GROUP) + rg[None, :])
        ok = n_ok[:, None] if EVEN_K else n_ok[:, None] & (rg < K // GROUP)[None, :]
        s = tl.load(sp, mask=ok, other=0.0).to(tl.float32)[:, :, None]
        z = tl.load(sp + 1, mask=ok, other=0.0).to(tl.float32)[:, :, None]
        return s, z

    @triton.jit
    def _int4_chunk(w_ptr, s_ptr, rn, n_ok, k0, K, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """The int4 weights of rows rn, columns k0 .. k0+BLOCK_K, as float32 (even, odd) [rows, NG groups, HG bytes]:
        each byte holds an even (high nibble) and an odd (low nibble) element, and each (row, group) one
        (scale, zero) pair, broadcast over the group's bytes; 0 past K."""
        NG: tl.constexpr = BLOCK_K // GROUP
        HG: tl.constexpr = GROUP // 2
        b = _rows_load(w_ptr, rn, n_ok, k0 // 2 + tl.arange(0, BLOCK_K // 2), K // 2, EVEN_K)  # bytes [rows, BK / 2]
        b = tl.reshape(b, (rn.shape[0], NG, HG)).to(tl.int32)
        s, z = _int4_scales(s_ptr, rn, n_ok, k0, K, GROUP, NG, EVEN_K)
        return _as_float(b >> 4, 0, 8) * s + z, _as_float(b & 15, 0, 8) * s + z

    @triton.jit
    def _k_range(K, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
        """The columns k0 .. k1 this program walks: all of K, or with a split its share (whole BLOCK_K chunks)."""
        if SPLIT == 1:
            k0, k1 = 0, K
        else:
            per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K
            k0 = tl.program_id(1) * per
            k1 = tl.minimum(K, k0 + per)
        return k0, k1

    @triton.jit
    def _last_to_arrive(cnt_ptr, n):
        """Count this program done on the counter shared by n programs; True for the last of them, which alone goes on
        to read what the others wrote (and resets the counter to 0 for the next call). The barrier first: every
        thread's writes land before the count (release) makes them visible to the last one (acquire)."""
        tl.debug_barrier()
        return tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n - 1

    @triton.jit
    def _split_sum(v, ws_ptr, cnt_ptr, offs, ok, stride):
        """Split over K: programs (i, 0..S-1) each hold partial sums v of one output block. Each writes its part to
        the workspace and counts itself done on the block's counter; the last one to finish reads all S parts back,
        adds them in the order 0..S-1 (the same result on every run, whoever finishes last), resets the counter for
        the next call and alone goes on to the epilogue. Returns (sum, whether this program is that last one)."""
        i, s, S = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        tl.store(ws_ptr + s * stride + offs, v, mask=ok)
        last = _last_to_arrive(cnt_ptr + i, S)
        if last:
            v = tl.zeros_like(v)
            for t in range(0, S):  # past L1 (.cg): the parts come from other SMs
                v += tl.load(ws_ptr + t * stride + offs, mask=ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + i, 0, sem="relaxed", scope="gpu")
        return v, last

    @triton.jit
    def _pdl_start(PDL: tl.constexpr):
        """First statement of every kernel: with PDL, wait for the previous kernel, then let the next one launch."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _prefetch_l2(w_ptr, rn, N, k_lo, k_hi, K, ELEM_BITS: tl.constexpr):
        """Ask L2 for the first 2 KB (at most) of the columns k_lo .. k_hi of weight rows rn (one `prefetch` per
        128-byte line, no registers held): issued before the PDL wait, these lines come in while the kernel before
        is still running. Addresses are clamped to the rows and columns that exist."""
        if not _NO_PTX:
            LINES: tl.constexpr = 16
            row = tl.minimum(rn, N - 1).to(tl.int64) * (K * ELEM_BITS // 8)  # byte offset of each row
            col = tl.minimum(k_lo * ELEM_BITS // 8 + tl.arange(0, LINES) * 128, (k_hi * ELEM_BITS // 8) - 1)
            p = w_ptr.to(tl.pointer_type(tl.int8)) + row[:, None] + col[None, :]
            tl.inline_asm_elementwise(asm="prefetch.global.L2 [$1]; // dummy $0", constraints="=r,l", args=[p],
                                      dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip

    _NO_PTX = tl.constexpr(INTERPRET)  # Triton's CPU interpreter runs no inline PTX

    _TUNE = {"prune_configs_by": {"early_config_prune": _prune}, "do_bench": _fast_bench}
    if not INTERPRET and "cache_results" in inspect.signature(triton.autotune).parameters:  # Triton >= 3.4
        # The autotuner's picks are kept in Triton's cache directory (TRITON_CACHE_DIR, else ~/.triton/cache), keyed
        # by kernel source, GPU architecture, shape and config list: a later process on this machine skips the tuning
        # (tens of seconds for a 7B model). Delete that directory to tune afresh.
        _TUNE["cache_results"] = True

    @triton.jit
    def _load_x(x_ptr, off, K, GATED: tl.constexpr, EVEN_K: tl.constexpr):
        """x[off] as float32, 0 past K (where not EVEN_K); GATED: x holds [gate | up] (2K entries) and the input is
        silu(gate) * up."""
        if EVEN_K:
            x = tl.load(x_ptr + off).to(tl.float32)
            if GATED:
                x = x * tl.sigmoid(x) * tl.load(x_ptr + K + off).to(tl.float32)
        else:
            x = tl.load(x_ptr + off, mask=off < K, other=0.0).to(tl.float32)
            if GATED:
                x = x * tl.sigmoid(x) * tl.load(x_ptr + K + off, mask=off < K, other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _bf16_of(v, H: tl.constexpr):
        """Element H (0..3) of the four bf16 packed in int64 v, as float32: the low or high 32 bits (free), then one
        shift or one and puts the element in a float32's top half, where one conversion each would cost two."""
        if H < 2:
            half = v.to(tl.int32)
        else:
            half = (v >> 32).to(tl.int32)
        if H % 2 == 0:
            half = half << 16
        else:
            half = half & -65536
        return half.to(tl.float32, bitcast=True)

    @triton.jit
    def _rows_load(ptr, rows, row_ok, kk, K, EVEN_K: tl.constexpr):
        """Rows `rows`, columns kk of a row-major [*, K] matrix as stored: 0 in rows not row_ok and, unless EVEN_K,
        past K."""
        p = ptr + rows[:, None] * K + kk[None, :]
        if EVEN_K:
            v = tl.load(p, mask=row_ok[:, None], other=0)
        else:
            v = tl.load(p, mask=row_ok[:, None] & (kk < K)[None, :], other=0)
        return v

    @triton.jit
    def _dot(x, w, acc, SWAP: tl.constexpr):
        """acc + x @ w.T ([BLOCK_M, BLOCK_N]), or with SWAP acc + w @ x.T ([BLOCK_N, BLOCK_M]): the converted weight
        tile as tl.dot's first operand, which the tensor cores can take from registers, and the few tokens as its N
        (the "swap AB" of small-batch GEMMs); the kernel transposes the result once at the end."""
        if SWAP:
            out = tl.dot(w, tl.trans(x), acc)
        else:
            out = tl.dot(x, tl.trans(w), acc)
        return out

    @triton.jit
    def _every_8th(x, J: tl.constexpr):
        """Columns J, J + 8, J + 16, ... of x [M, 8 W]: [M, W], by three splits along J's bits (register moves only
        where a thread holds 8 neighbouring columns, as after a 16-byte load of bf16)."""
        M: tl.constexpr = x.shape[0]
        W: tl.constexpr = x.shape[1] // 8
        a, a1 = tl.split(tl.reshape(x, (M, W, 2, 2, 2)))  # column 8 w + 4 b2 + 2 b1 + b0: split on b0
        if J % 2 == 1:
            a = a1
        b, b1 = tl.split(a)
        if J // 2 % 2 == 1:
            b = b1
        c, c1 = tl.split(b)
        if J // 4 == 1:
            c = c1
        return c

    @triton.jit
    def _int4_words(w_ptr, rows, row_ok, kw, KW, EVEN_K: tl.constexpr):
        """Words kw [NG groups, WG words] of rows `rows` of an int4 weight read as int32 [N, KW]: [rows, NG, WG];
        0 past K. (The one-token kernel's own 3-D load: _rows_load and a reshape count 7.0 instructions a weight
        there against 6.8.)"""
        ok = row_ok[:, None, None] if EVEN_K else row_ok[:, None, None] & (kw < KW)[None, :, :]
        return tl.load(w_ptr + rows[:, None, None] * KW + kw[None, :, :], mask=ok, other=0)

    @triton.jit
    def _gemv_chunk(acc, ss, w, x_ptr, g_ptr, kk, K, QUANT: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr,
                    EVEN_K: tl.constexpr, FOLD: tl.constexpr):  # fmt: skip
        """_gemv_kernel (bf16 / int8), one chunk: columns kk, weights w [BLOCK_N, BLOCK_K] as stored. Returns the
        updated (acc, ss): products summed elementwise, and x's squares for the norm."""
        xk = _load_x(x_ptr, kk, K, GATED, EVEN_K)
        if NORM:
            ss += xk * xk
            xk = xk * _load_x(g_ptr, kk, K, False, EVEN_K)
        if QUANT == 1:
            wf = _int8_float(w) - 8388736.0  # (masked entries: 0 -> 0 here)
        else:
            wf = w.to(tl.float32)
        if FOLD > 1:  # each run of FOLD columns (one thread's 16-byte load) summed now: acc [BLOCK_N, BLOCK_K / FOLD]
            acc += tl.sum(tl.reshape(wf * xk[None, :], (w.shape[0], w.shape[1] // FOLD, FOLD)), axis=2)
        else:
            acc += wf * xk[None, :]
        return acc, ss

    @triton.jit
    def _gemv_int4_chunk(acc, ss, wt, x_ptr, s_ptr, g_ptr, rn, n_ok, k0, K, KW, rw, GROUP: tl.constexpr,
                         NORM: tl.constexpr, GATED: tl.constexpr, X_ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr):  # fmt: skip
        """_gemv_kernel (int4), one chunk from column k0: words wt [BLOCK_N, NG, WG]. Returns the updated (acc, ss)."""
        NG: tl.constexpr = BLOCK_K // GROUP
        WG: tl.constexpr = GROUP // 8
        X64: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16 and X_ALIGNED
        x64 = x_ptr.to(tl.pointer_type(tl.int64))
        kw = k0 // 8 + rw
        kok = kw < KW  # (the last chunk may hold groups past K: weights, scales and x read as 0 there)
        a = tl.zeros((wt.shape[0], NG, WG), dtype=tl.float32)  # sum of (1 + q / 16) x over each word
        xs = tl.zeros((NG, WG), dtype=tl.float32)  # sum of x over each word
        fs = _nibbles(wt)  # 1 + q / 16, as _mant's (the eighteenth session: same outputs, +2.6% on the 7B shape)
        if X64:  # bf16 x read 4 at a time as int64 (8 x a word: 2 loads), unpacked by _bf16_of
            for p in tl.static_range(2):
                xq = _load_ok(x64 + 2 * kw + p, kok, EVEN_K)
                if GATED:
                    uq = _load_ok(x64 + K // 4 + 2 * kw + p, kok, EVEN_K)
                if NORM:
                    gq = _load_ok(g_ptr.to(tl.pointer_type(tl.int64)) + 2 * kw + p, kok, EVEN_K)
                for h in tl.static_range(4):
                    xj = _bf16_of(xq, h)
                    if GATED:
                        xj = xj * tl.sigmoid(xj) * _bf16_of(uq, h)
                    if NORM:
                        ss += xj * xj
                        xj = xj * _bf16_of(gq, h)
                    xs += xj
                    # nibble 4 p + h of a word is weight 8 w + 4 p + h (byte 2 p + h // 2, high nibble first)
                    a += fs[4 * p + h] * xj[None, :, :]
        else:
            for j in tl.static_range(8):  # nibble j of a word is weight 8 w + j (byte j // 2, high first)
                xj = _load_x(x_ptr, 8 * kw + j, K, GATED, EVEN_K)
                if NORM:
                    ss += xj * xj
                    xj = xj * _load_ok(g_ptr + 8 * kw + j, kok, EVEN_K).to(tl.float32)
                xs += xj
                a += fs[j] * xj[None, :, :]
        # W = (q - 8) s + z, so a group adds s * sum(q x) + (z - 8 s) * sum(x) = 16 s a + (z - 24 s) xs
        s, z = _int4_scales(s_ptr, rn, n_ok, k0, K, GROUP, NG, EVEN_K)
        return acc + a * (16.0 * s) + (z - 24.0 * s) * xs[None, :, :], ss

    @triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "QUANT", "GROUP", "NORM", "RESIDUAL", "GATED"], **_TUNE)
    @triton.heuristics(_EVEN_K)
    @triton.jit
    def _gemv_kernel(
        x_ptr,  # [K], or [2K] (GATED)
        w_ptr,  # [N, K] (quant 0, 1) or its int32 view [N, K/8] (quant 2: 8 nibbles a word)
        s_ptr,  # [N] int8 scales, or [N, K/G, 2] int4 (scale, zero); unused for quant 0
        y_ptr,  # [N]
        g_ptr,  # [K] RMSNorm weight (NORM)
        r_ptr,  # [N] residual (RESIDUAL)
        b_ptr,  # [N] bias (BIAS)
        N,
        K,
        eps,
        QUANT: tl.constexpr,
        GROUP: tl.constexpr,
        NORM: tl.constexpr,  # y = W (g * x * rsqrt(mean(x^2) + eps)): the RMSNorm before the matmul, fused
        RESIDUAL: tl.constexpr,  # y += r: the residual add after it
        GATED: tl.constexpr,  # x = [gate | up], the input is silu(gate) * up: the SwiGLU before the down projection
        BIAS: tl.constexpr,  # y += b
        PDL: tl.constexpr,
        PREFETCH: tl.constexpr,  # load the first chunk of weights before the PDL wait
        PIPELINE: tl.constexpr,  # the loop over K software-pipelined by Triton (cp.async), W_STAGES deep
        FOLD: tl.constexpr,  # bf16 / int8: sum each run of FOLD columns per chunk (GEMV_FOLD), 1 = at the end
        X_ALIGNED: tl.constexpr,  # x (and g) start at a multiple of 8 bytes: int4 may read bf16 x as int64
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        W_STAGES: tl.constexpr,  # the config's num_stages
        EVEN_K: tl.constexpr,
    ):
        """Every program reads all of x anyway, so the norm costs it a sum of squares and a multiply by g per
        chunk, and one scale at the end (the rsqrt is the same for every output row). With PIPELINE (the default)
        and a config of 2+ stages, Triton software-pipelines the loop over K: each chunk of weights (and of x) is
        copied into shared memory W_STAGES - 1 chunks ahead (cp.async), so that a program keeps its next chunks in
        flight while it sums the current one, without holding them in registers; with PREFETCH the first weight lines
        are asked into L2 before the PDL wait. Otherwise (one-stage configs, or PIPELINE off) each chunk is loaded
        into registers, then summed (the fifteenth session's code), and PREFETCH loads chunk 0 before the wait. So the
        autotuner picks between the two for each shape (7B shape, same picks: int8 +1.8% pipelined; bf16 lost 5.6%
        where its one-stage picks got the L2 prefetch in place of chunk 0 in registers, hence the plain loop there).
        x, g and the residual are read after the wait: no kernel writes weights, but the kernel before writes x."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        PIPE: tl.constexpr = PIPELINE and W_STAGES > 1  # a one-stage config runs the plain loop
        if PIPE:  # weights and x stream in through shared memory, W_STAGES - 1 chunks ahead (cp.async)
            if PREFETCH:  # bits a weight: bf16 / fp16, int8, int4
                _prefetch_l2(w_ptr, rn, N, 0, K, K, 16 // (1 << QUANT))
            _pdl_start(PDL)
        elif not PREFETCH:
            _pdl_start(PDL)
        if QUANT == 2:  # 32-bit words of 8 weights, [BLOCK_N rows, NG groups, WG words]; K a multiple of GROUP
            NG: tl.constexpr = BLOCK_K // GROUP
            WG: tl.constexpr = GROUP // 8
            KW = tl.multiple_of(K // 8, 4)  # words per row (K is a multiple of the group, >= 32)
            rw = tl.arange(0, NG)[:, None] * WG + tl.arange(0, WG)[None, :]
            acc = tl.zeros((BLOCK_N, NG, WG), dtype=tl.float32)
            ss = tl.zeros((NG, WG), dtype=tl.float32)
            if PIPE:
                for k0 in tl.range(0, K, BLOCK_K, num_stages=W_STAGES):
                    wt = _int4_words(w_ptr, rn, n_ok, k0 // 8 + rw, KW, EVEN_K)
                    acc, ss = _gemv_int4_chunk(acc, ss, wt, x_ptr, s_ptr, g_ptr, rn, n_ok, k0, K, KW, rw, GROUP,
                                               NORM, GATED, X_ALIGNED, BLOCK_K, EVEN_K)  # fmt: skip
            else:  # each chunk loaded into registers, then summed; with PREFETCH chunk 0 before the wait
                wt = _int4_words(w_ptr, rn, n_ok, rw, KW, EVEN_K)
                if PREFETCH:
                    _pdl_start(PDL)
                acc, ss = _gemv_int4_chunk(acc, ss, wt, x_ptr, s_ptr, g_ptr, rn, n_ok, 0, K, KW, rw, GROUP, NORM,
                                           GATED, X_ALIGNED, BLOCK_K, EVEN_K)  # fmt: skip
                for k0 in range(BLOCK_K, K, BLOCK_K):
                    wt = _int4_words(w_ptr, rn, n_ok, k0 // 8 + rw, KW, EVEN_K)
                    acc, ss = _gemv_int4_chunk(acc, ss, wt, x_ptr, s_ptr, g_ptr, rn, n_ok, k0, K, KW, rw, GROUP,
                                               NORM, GATED, X_ALIGNED, BLOCK_K, EVEN_K)  # fmt: skip
            y = tl.sum(tl.sum(acc, axis=2), axis=1)
            sum_sq = tl.sum(tl.sum(ss, axis=1), axis=0)
        else:
            rk = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_N, BLOCK_K // FOLD), dtype=tl.float32)
            ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
            if PIPE:
                for k0 in tl.range(0, K, BLOCK_K, num_stages=W_STAGES):
                    w = _rows_load(w_ptr, rn, n_ok, k0 + rk, K, EVEN_K)
                    acc, ss = _gemv_chunk(acc, ss, w, x_ptr, g_ptr, k0 + rk, K, QUANT, NORM, GATED, EVEN_K, FOLD)
            else:  # as for int4
                w = _rows_load(w_ptr, rn, n_ok, rk, K, EVEN_K)
                if PREFETCH:
                    _pdl_start(PDL)
                acc, ss = _gemv_chunk(acc, ss, w, x_ptr, g_ptr, rk, K, QUANT, NORM, GATED, EVEN_K, FOLD)
                for k0 in range(BLOCK_K, K, BLOCK_K):
                    w = _rows_load(w_ptr, rn, n_ok, k0 + rk, K, EVEN_K)
                    acc, ss = _gemv_chunk(acc, ss, w, x_ptr, g_ptr, k0 + rk, K, QUANT, NORM, GATED, EVEN_K, FOLD)
            y = tl.sum(acc, axis=1)
            sum_sq = tl.sum(ss, axis=0)
        if QUANT == 1:
            y = y * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if NORM:
            y = y * tl.rsqrt(sum_sq / K + eps)
        if BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if RESIDUAL:
            y += tl.load(r_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.autotune(configs=_GEMM_CONFIGS, key=["N", "K", "QUANT", "GROUP", "BLOCK_M", "RESIDUAL"], **_TUNE)
    @triton.heuristics(_EVEN_K)
    @triton.jit
    def _gemm_kernel(
        ws_ptr,  # [SPLIT, M, N] float32 workspace (SPLIT > 1)
        cnt_ptr,  # [>= N / BLOCK_N] int32 counters, zero between calls (SPLIT > 1)
        x_ptr,  # [M, K] row-major
        w_ptr,
        s_ptr,
        y_ptr,  # [M, N]
        r_ptr,  # [M, N] residual (RESIDUAL)
        b_ptr,  # [N] bias (BIAS)
        M,
        N,
        K,
        QUANT: tl.constexpr,
        GROUP: tl.constexpr,
        RESIDUAL: tl.constexpr,
        BIAS: tl.constexpr,
        PDL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SWAP: tl.constexpr,  # see _dot
        SPLIT: tl.constexpr,  # programs per output block, each over 1 / SPLIT of K (_split_sum)
        WORDS: tl.constexpr,  # int4: read 32-bit words, 8 dots a chunk (else bytes, 2 dots)
        PREFETCH: tl.constexpr,  # the first weight lines into L2 before the PDL wait (_prefetch_l2)
        EVEN_K: tl.constexpr,
    ):
        """_gemv_kernel's epilogue (residual, bias) for a few tokens. Nothing runs between a tile's load and tl.dot: the
        norm or the gating there (tried in the third and sixth sessions) made an EAGLE round up to 59% slower, and the
        norm's weight folded into W with its row scale and the gating in the gate/up epilogue (seventh) gained
        nothing measurable."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        n_ok, m_ok = rn < N, rm < M
        k_lo, k_hi = _k_range(K, BLOCK_K, SPLIT)
        if PREFETCH:  # bits a weight: bf16 / fp16, int8, int4
            _prefetch_l2(w_ptr, rn, N, k_lo, k_hi, K, 16 // (1 << QUANT))
        _pdl_start(PDL)
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dt = x_ptr.dtype.element_ty
        if QUANT == 2 and WORDS:  # 32-bit words as in _gemv_kernel; one dot per nibble position
            NG: tl.constexpr = BLOCK_K // GROUP
            WG: tl.constexpr = GROUP // 8
            KW = tl.multiple_of(K // 8, 4)
            w32 = w_ptr.to(tl.pointer_type(tl.int32))
            rf = tl.arange(0, BLOCK_K // 8)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                # plain 2-D tiles, which the pipeliner streams in ahead (cp.async), reshaped in registers afterwards
                wt = tl.reshape(_rows_load(w32, rn, n_ok, k0 // 8 + rf, KW, EVEN_K), (BLOCK_N, NG, WG))
                s, z = _int4_scales(s_ptr, rn, n_ok, k0, K, GROUP, NG, EVEN_K)
                s16, z24 = 16.0 * s, z - 24.0 * s  # W = (q - 8) s + z = 16 s (1 + q / 16) + z - 24 s
                xx = _rows_load(x_ptr, rm, m_ok, k0 + tl.arange(0, BLOCK_K), K, EVEN_K)  # [BLOCK_M, BLOCK_K]
                for j in tl.static_range(8):  # nibble j of word w is column 8 w + j
                    wj = _mant(wt, 15 + 4 * (j % 2) - 8 * (j // 2), 0x780000) * s16 + z24
                    acc = _dot(_every_8th(xx, j), tl.reshape(wj.to(dt), (BLOCK_N, BLOCK_K // 8)), acc, SWAP)
        elif QUANT == 2:  # dequantize a chunk (_int4_chunk), then two dots (even, odd); K a multiple of GROUP
            for k0 in range(k_lo, k_hi, BLOCK_K):
                xx = _rows_load(x_ptr, rm, m_ok, k0 + tl.arange(0, BLOCK_K), K, EVEN_K)  # [BLOCK_M, BLOCK_K]
                xe, xo = tl.split(tl.reshape(xx, (BLOCK_M, BLOCK_K // 2, 2)))
                we, wo = _int4_chunk(w_ptr, s_ptr, rn, n_ok, k0, K, GROUP, BLOCK_K, EVEN_K)
                acc = _dot(xe, tl.reshape(we.to(dt), (BLOCK_N, BLOCK_K // 2)), acc, SWAP)
                acc = _dot(xo, tl.reshape(wo.to(dt), (BLOCK_N, BLOCK_K // 2)), acc, SWAP)
        else:
            rk = tl.arange(0, BLOCK_K)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + rk
                w = _rows_load(w_ptr, rn, n_ok, kk, K, EVEN_K)  # as stored: tl.dot takes bf16 / fp16 directly
                x = _rows_load(x_ptr, rm, m_ok, kk, K, EVEN_K)
                if QUANT == 1:
                    w = _int8_float(w) - 8388736.0
                acc = _dot(x, w.to(dt), acc, SWAP)
        if SWAP:
            acc = tl.trans(acc)
        y_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT > 1:
            acc, last = _split_sum(acc, ws_ptr, cnt_ptr, rm[:, None] * N + rn[None, :], y_mask, M * N)
        else:
            last = True
        if last:
            if QUANT == 1:
                acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if BIAS:
                acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if RESIDUAL:
                acc += tl.load(r_ptr + rm[:, None] * N + rn[None, :], mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# Few-token matmuls of few rows and long rows (the 7B shape's wo and w2, N = 4096) have too few programs to keep the
# GPU busy: split configs give each output block SPLIT programs over parts of K (`_split_sum`). Measured on an H200
# (eighth session, 26 tokens, N = K = 4096): bf16 13.6 -> 8.3 us (cuBLAS 7.9), int4 87.5 -> 47.3 us. One token
# gained nothing from a split there, so the GEMV has none.
MAX_SPLIT = 8  # the most programs a split config puts on one output block (the configs' SPLIT)
SPLIT_MAX_N, SPLIT_MIN_K = 8192, 2048  # where split configs are tried; SmolLM2's matmuls (K <= 1536) never are
TOPK_COUNTER, TOPK_MAX_ROWS = SPLIT_MAX_N, 1024  # chunk_topk's counters (one a row), after the split ones
_COUNTERS: dict[torch.device, Tensor] = {}


def split_allowed(n: int, k: int) -> bool:
    """Whether the few-token matmul's split-over-K configs may run for an [n, k] weight."""
    return n <= SPLIT_MAX_N and k >= SPLIT_MIN_K


def counters(device: torch.device) -> Tensor:
    """The split configs' per-block counters and chunk_topk's on this device: zeroed once, then left at zero by every
    call. Made where no CUDA graph is being recorded or warmed up (model.Transformer.setup_caches calls this): made
    inside the warm-up of torch's CUDA graph trees, they would live in its memory pool, which it refuses."""
    if device not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("kernels.counters: make them outside CUDA-graph capture first (setup_caches does)")
        _COUNTERS[device] = torch.zeros(TOPK_COUNTER + TOPK_MAX_ROWS, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def _check(x: Tensor, w: Tensor, s: Tensor | None, quant: int, group: int, gated: bool) -> tuple[int, int, int]:
    if x.dim() != 2 or not x.is_contiguous() or x.shape[0] > MAX_M:
        raise ValueError(f"x must be a contiguous [M <= {MAX_M}, K] matrix, got {tuple(x.shape)}")
    m, k = x.shape
    n = w.shape[0]
    if gated:
        if k % 2:
            raise ValueError(f"gated: x must be [M, 2K], got {tuple(x.shape)}")
        k //= 2
    if quant == INT4:
        if group < 32 or group & (group - 1):  # the kernels read whole groups of 4+ words (32+ weights)
            raise ValueError(f"int4: group {group} must be a power of two >= 32")
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
        residual: Tensor | None = None, gated: bool = False, bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """x [M, K] @ W.T -> [M, N] in x.dtype, W given by (w, s, quant, group) as in the module docstring.

    Fusions, all inside the one kernel (residual + W @ rmsnorm(x) + bias): g [K] applies RMSNorm (weight g, epsilon
    eps) to x first, and gated: x is [1, 2K] = [gate | up] and the input is silu(gate) * up (both for one token);
    residual [M, N] and bias [N] are added to the result."""
    m, n, k = _check(x, w, s, quant, group, gated)
    if (g is not None or gated) and m != 1:
        raise ValueError(f"the fused norm / gating take one token here, got {m}")
    if g is not None and g.shape != (k,) or residual is not None and residual.shape != (m, n):
        shapes = [None if t is None else tuple(t.shape) for t in (g, residual)]
        raise ValueError(f"norm weight / residual of shapes {shapes} for M={m}, N={n}, K={k}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} for N={n}")
    if g is not None and gated:
        raise ValueError("a norm and gating together are not supported")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    s = s if s is not None else w  # placeholder pointers the kernel never reads
    flags = dict(
        QUANT=quant,
        GROUP=group,
        RESIDUAL=residual is not None,
        BIAS=bias is not None,
        PDL=PDL,
        PREFETCH=PREFETCH and PDL,
    )
    norm = g is not None
    g, r, b = (t if t is not None else x for t in (g, residual, bias))
    if m == 1:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        wv = w.view(torch.int32) if quant == INT4 else w  # int4: read as words of 8 (see _gemv_kernel)
        aligned = x.data_ptr() % 8 == 0 and g.data_ptr() % 8 == 0
        _gemv_kernel[grid](x, wv, s, y, g, r, b, n, k, eps, **flags, NORM=norm, GATED=gated, X_ALIGNED=aligned,
                           PIPELINE=GEMV_PIPELINE,
                           FOLD=16 // w.element_size() if GEMV_FOLD and quant != INT4 else 1,
                           launch_pdl=PDL)  # fmt: skip
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
        if split_allowed(n, k):  # the autotuner may pick a split config: room for its parts, and the counters
            ws, cnt = torch.empty(MAX_SPLIT, m, n, dtype=torch.float32, device=x.device), counters(x.device)
        else:
            ws = cnt = y  # never read
        block_m = max(GEMM_MIN_BLOCK_M, 16 if m <= 16 else 32 if m <= 32 else 64)
        _gemm_kernel[grid](ws, cnt, x, w, s, y, r, b, m, n, k, **flags, BLOCK_M=block_m, launch_pdl=PDL)
    return y


@wmm.register_fake
def _(x, w, s, quant, group, g=None, eps=0.0, residual=None, gated=False, bias=None):
    return x.new_empty(x.shape[0], w.shape[0])


# Where the RMSNorm before a matmul, the residual add after it and the SwiGLU gating go into our matmul kernel
# instead of kernels of their own (Inductor's): one token only, and inputs of K >= FUSE_MIN_K only. Measured on an H200
# (BENCHMARKS.md): +2.7% tok/s on the Llama-2-7B shape (K = 4096, 11008); on SmolLM2 (K = 576, 1536) -1.3% once and
# +1.0% another time (within the noise), back when K = 576 ran as nine chunks of 64. For 2-64 tokens (EAGLE's tree
# steps and verification) every way tried was no faster: the norm and gating between a tile's load and tl.dot
# (third and sixth sessions: an EAGLE round 1.857 ms against 1.171), the norm's weight folded into W with only its row
# scale in the epilogue, and the gating in the gate/up matmul's epilogue (seventh session: 0.989 against 0.995 ms).
FUSE_MIN_K = 2048


def fused_wmm(x: Tensor, w: Tensor, s: Tensor | None, quant: int, group: int, norm, residual: Tensor | None, n: int,
              gated: bool = False, bias: Tensor | None = None) -> Tensor | None:  # fmt: skip
    """residual + W @ norm(x) + bias (or W @ (silu(gate) * up) for a gated x [..., 2K]) as one `wmm` for one token on
    CUDA, or None where that does not apply (no fusion asked, more tokens, CPU, dtypes that differ, the rule above) and
    the caller runs the steps apart. norm: a model.RMSNorm or None."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape[0], x2.shape[1] // (2 if gated else 1)
    if norm is None and residual is None and not gated or m != 1 or k < FUSE_MIN_K:
        return None
    if not available(x2) or (w.dtype != x2.dtype and quant == NONE):
        return None
    g = None if norm is None else norm.weight
    if any(t is not None and t.dtype != x2.dtype for t in (g, residual, bias)):
        return None
    r = None if residual is None else residual.reshape(m, n).contiguous()
    y = wmm(x2.contiguous(), w, s, quant, group, g, norm.eps if norm is not None else 0.0, r, gated, bias)
    return y.reshape(*x.shape[:-1], n)


if triton is not None:

    @triton.jit
    def _copy_rows_kernel(table, src_ptr, dst_ptr, R, T, HD: tl.constexpr, R_PAD: tl.constexpr, DT: tl.constexpr,
                          PDL: tl.constexpr):  # fmt: skip
        """Program (c, h): rows src -> dst of head h of cache c, all rows read before any is written."""
        _pdl_start(PDL)
        base = tl.load(table + tl.program_id(0)).to(tl.pointer_type(DT))  # cache c's address
        base += tl.program_id(1).to(tl.int64) * T * HD
        rj, rd = tl.arange(0, R_PAD), tl.arange(0, HD)
        ok = rj < R
        src = tl.load(src_ptr + rj, mask=ok, other=0)
        dst = tl.load(dst_ptr + rj, mask=ok, other=0)
        rows = tl.load(base + src[:, None] * HD + rd[None, :], mask=ok[:, None])
        tl.debug_barrier()  # the ranges may overlap: every thread's reads land before any write
        tl.store(base + dst[:, None] * HD + rd[None, :], rows, mask=ok[:, None])


if triton is not None:

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, rope_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, S, T, H: tl.constexpr, KV: tl.constexpr,
                           HD: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        """Program (s, h): head h of token s. h < H: q, rotated, to q [H, S, HD]; else k head h - H, rotated, and v
        head h - H to their cache slot pos[s]. Rotate-half RoPE in float32: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
        _pdl_start(PDL)
        s, h = tl.program_id(0), tl.program_id(1)
        rd = tl.arange(0, HD // 2)
        row = qkv_ptr + s * (H + 2 * KV) * HD  # token s: [q heads | k heads | v heads]
        cs = rope_ptr + s * 2 * HD  # [cos (HD) | sin (HD)]
        x1 = tl.load(row + h * HD + rd).to(tl.float32)
        x2 = tl.load(row + h * HD + HD // 2 + rd).to(tl.float32)
        o1 = x1 * tl.load(cs + rd) - x2 * tl.load(cs + HD + rd)
        o2 = x2 * tl.load(cs + HD // 2 + rd) + x1 * tl.load(cs + HD + HD // 2 + rd)
        if h < H:
            dst = q_ptr + (h * S + s) * HD
        else:
            slot = tl.load(pos_ptr + s).to(tl.int64)
            dst = k_ptr + ((h - H) * T + slot) * HD
            vdst = v_ptr + ((h - H) * T + slot) * HD
            tl.store(vdst + rd, tl.load(row + (h + KV) * HD + rd))
            tl.store(vdst + HD // 2 + rd, tl.load(row + (h + KV) * HD + HD // 2 + rd))
        tl.store(dst + rd, o1.to(q_ptr.dtype.element_ty))
        tl.store(dst + HD // 2 + rd, o2.to(q_ptr.dtype.element_ty))


@torch.library.custom_op("llmgen::rope_cache", mutates_args=("k_cache", "v_cache"))
def _rope_cache(qkv: Tensor, rope: Tensor, cache_pos: Tensor, k_cache: Tensor, v_cache: Tensor, n_heads: int) -> Tensor:
    S, KV, T, hd = qkv.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3)
    q = torch.empty(n_heads, S, hd, dtype=qkv.dtype, device=qkv.device)
    grid = (S, n_heads + KV)
    _rope_cache_kernel[grid](qkv, rope, cache_pos, q, k_cache, v_cache, S, T, n_heads, KV, hd, PDL, launch_pdl=PDL)
    return q


@_rope_cache.register_fake
def _(qkv, rope, cache_pos, k_cache, v_cache, n_heads):
    return qkv.new_empty(n_heads, qkv.size(0), k_cache.size(3))


def rope_and_cache(qkv: Tensor, rope: Tensor, cache_pos: Tensor, k_cache: Tensor, v_cache: Tensor,
                   n_heads: int) -> Tensor | None:  # fmt: skip
    """Attention's step between the QKV matmul and the scores, as one kernel: q, k rotated by RoPE (rope [S, 2, hd]
    float32, rotate-half), k and v written to cache slots cache_pos [S]. qkv: [1, S, (H + 2 KV) hd]; caches
    [1, KV, T, hd]. Returns q [1, H, S, hd], or None where the kernel does not apply (CPU, batch > 1, other
    layouts) and the caller runs the steps apart (model.Attention: three kernels under torch.compile)."""
    B, S, _ = qkv.shape
    hd = k_cache.size(-1)
    if not available(qkv) or B != 1 or hd < 2 or hd & (hd - 1) or rope.dtype != torch.float32 or qkv.requires_grad:
        return None  # (no backward: training takes the other path)
    if (
        k_cache.dtype != qkv.dtype
        or v_cache.dtype != qkv.dtype
        or not (k_cache.is_contiguous() and v_cache.is_contiguous())
    ):
        return None
    return _rope_cache(qkv.reshape(S, -1).contiguous(), rope.contiguous(), cache_pos, k_cache, v_cache, n_heads)[None]


if triton is not None:

    @triton.jit
    def _layer_inputs_kernel(table_ptr, ipos_ptr, cpos_ptr, mask_ptr, rope_ptr, pos_ptr, out_mask_ptr, T,
                             ROW: tl.constexpr, ROW_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                             PDL: tl.constexpr):  # fmt: skip
        """Program s: table row input_pos[s] (ROW values) to rope[s], cache_pos[s] to pos[s], mask row s (T bytes)."""
        _pdl_start(PDL)
        s = tl.program_id(0)
        r = tl.arange(0, ROW_PAD)
        row = tl.load(ipos_ptr + s).to(tl.int64)
        tl.store(rope_ptr + s * ROW + r, tl.load(table_ptr + row * ROW + r, mask=r < ROW), mask=r < ROW)
        tl.store(pos_ptr + s, tl.load(cpos_ptr + s))
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tl.store(out_mask_ptr + s * T + t, tl.load(mask_ptr + s * T + t, mask=t < T), mask=t < T)


@torch.library.custom_op("llmgen::layer_inputs", mutates_args=())
def _layer_inputs(table: Tensor, input_pos: Tensor, cache_pos: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not (table.is_cuda or INTERPRET) or triton is None:
        return table[input_pos], cache_pos.clone(), mask.clone()
    S, T = input_pos.size(0), mask.size(-1)  # mask [..., S, T]
    rope = table.new_empty(S, *table.shape[1:])
    pos, out_mask = torch.empty_like(cache_pos), torch.empty_like(mask)
    row = table[0].numel()
    bytes_in, bytes_out = mask.contiguous().view(torch.uint8), out_mask.view(torch.uint8)
    _layer_inputs_kernel[(S,)](table, input_pos.contiguous(), cache_pos.contiguous(), bytes_in, rope, pos, bytes_out, T,
                               ROW=row, ROW_PAD=triton.next_power_of_2(row), BLOCK_T=1024, PDL=PDL,
                               launch_pdl=PDL)  # fmt: skip
    return rope, pos, out_mask


@_layer_inputs.register_fake
def _(table, input_pos, cache_pos, mask):
    return table.new_empty(input_pos.size(0), *table.shape[1:]), torch.empty_like(cache_pos), torch.empty_like(mask)


def layer_inputs(table: Tensor, input_pos: Tensor, cache_pos: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(table[input_pos], cache_pos, mask) as buffers of their own, made once per forward (or per EAGLE draft round,
    draft.round_inputs), in one launch, for every layer's `rope_and_cache` and `few_token_attention`. Under
    torch.compile an opaque op's inputs are materialized for each call, so without this the positions (computed in the
    compiled EAGLE round, e.g. L + arange(N)), the RoPE rows and the mask were made again in every layer: one extra
    kernel per layer. Writing them into buffers does not help: functionalization turns the copy back into the
    expression, which Inductor computes again for each reader (tenth session). On CPU (neither op runs) the plain
    gather."""
    if not table.is_cuda or triton is None:
        return table[input_pos], cache_pos, mask
    return _layer_inputs(table, input_pos, cache_pos, mask)


if triton is not None:

    @triton.jit
    def _attn_chunk(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, o_ptr, kv, c, r, S, T, NC, scale, G: tl.constexpr,
                    HD: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        """Query rows r (row r = g*S + s: head kv*G + g, token s) of KV head kv against cache slots c*BLOCK_T..: the
        chunk's row maxima m, sums l = sum(exp(score - m)) and unnormalized outputs o = exp(score - m) @ v, into the
        scratch [KV, NC, R (, HD)]. A chunk no row may see reads no K or V."""
        R = G * S
        t = c * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, HD)
        r_ok, t_ok = r < R, t < T
        vis = tl.load(mask_ptr + (r % S)[:, None] * T + t[None, :], mask=r_ok[:, None] & t_ok[None, :], other=0) != 0
        kv_ok = t_ok & (tl.max(tl.max(vis.to(tl.int32), 1), 0) > 0)
        q = tl.load(q_ptr + (kv * R + r)[:, None] * HD + d[None, :], mask=r_ok[:, None], other=0.0)
        k = tl.load(k_ptr + (kv * T + t)[:, None] * HD + d[None, :], mask=kv_ok[:, None], other=0.0)
        score = tl.where(vis, tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # [BLOCK_R, BLOCK_T], float32
        m = tl.max(score, 1)
        p = tl.exp(score - tl.where(m == float("-inf"), 0.0, m)[:, None])  # rows that see nothing: all 0
        v = tl.load(v_ptr + (kv * T + t)[:, None] * HD + d[None, :], mask=kv_ok[:, None], other=0.0)
        o = tl.dot(p.to(v.dtype), v)  # [BLOCK_R, HD]
        row = (kv * NC + c) * R + r
        tl.store(m_ptr + row, m, mask=r_ok)
        tl.store(l_ptr + row, tl.sum(p, 1), mask=r_ok)
        tl.store(o_ptr + row[:, None] * HD + d[None, :], o, mask=r_ok[:, None])

    @triton.jit
    def _attn_merge(m_ptr, l_ptr, o_ptr, y_ptr, kv, r, S, NC, NKV, G: tl.constexpr, HD: tl.constexpr,
                    CB: tl.constexpr):  # fmt: skip
        """Merge the NC chunks' (m, l, o) of query rows r of KV head kv into softmax(scores) @ v, written to
        y [S, H*HD] (the layout the output projection reads: no transpose). CB chunks at a time with a running
        maximum; CB >= NC (the usual case) is one pass, all loads issued together, past L1 (.cg: other SMs wrote
        them)."""
        R = G * S
        r_ok = r < R
        cb, d = tl.arange(0, CB), tl.arange(0, HD)
        big = tl.full(r.shape, float("-inf"), tl.float32)
        total = tl.zeros(r.shape, tl.float32)
        acc = tl.zeros((r.shape[0], HD), tl.float32)
        for c0 in range(0, NC, CB):
            ok = ((c0 + cb) < NC)[:, None] & r_ok[None, :]
            row = (kv * NC + c0 + cb)[:, None] * R + r[None, :]  # [CB, BLOCK_R]
            mc = tl.load(m_ptr + row, mask=ok, other=float("-inf"), cache_modifier=".cg")
            lc = tl.load(l_ptr + row, mask=ok, other=0.0, cache_modifier=".cg")
            oc = tl.load(o_ptr + row[:, :, None] * HD + d[None, None, :], mask=ok[:, :, None], other=0.0,
                         cache_modifier=".cg")  # fmt: skip
            new = tl.maximum(big, tl.max(mc, 0))
            ref = tl.where(new == float("-inf"), 0.0, new)  # rows that have seen nothing yet: weights 0
            scale = tl.exp(big - ref)  # rescales what was summed so far (0 while big is -inf)
            w = tl.exp(mc - ref[None, :])  # empty chunks: 0
            total = total * scale + tl.sum(w * lc, 0)
            acc = acc * scale[:, None] + tl.sum(w[:, :, None] * oc, 0)
            big = new
        y = acc / tl.where(total > 0, total, 1.0)[:, None]
        h, s = kv * G + r // S, r % S
        dst = y_ptr + s[:, None] * (NKV * G * HD) + h[:, None] * HD + d[None, :]
        tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=r_ok[:, None])

    @triton.jit
    def _attn_chunk_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, o_ptr, S, T, scale, G: tl.constexpr,
                           HD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                           PDL: tl.constexpr):  # fmt: skip
        """Program (kv, c, rb): `_attn_chunk` for query rows rb*BLOCK_R.. of KV head kv and chunk c."""
        _pdl_start(PDL)
        kv, c, rb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        _attn_chunk(q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, o_ptr, kv, c, r, S, T, tl.num_programs(1), scale, G,
                    HD, BLOCK_T)  # fmt: skip

    @triton.jit
    def _attn_merge_kernel(m_ptr, l_ptr, o_ptr, y_ptr, S, NC, G: tl.constexpr, HD: tl.constexpr,
                           BLOCK_R: tl.constexpr, CB: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        """Program (kv, rb): `_attn_merge` of rows rb*BLOCK_R.. of KV head kv."""
        _pdl_start(PDL)
        kv, rb = tl.program_id(0), tl.program_id(1)
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        _attn_merge(m_ptr, l_ptr, o_ptr, y_ptr, kv, r, S, NC, tl.num_programs(0), G, HD, CB)


ATTN_BLOCK_T = 64  # cache slots per program of _attn_chunk_kernel
ATTN_MERGE_CHUNKS = 16  # chunks per pass of _attn_merge_kernel (16: caches of up to 1024 slots in one pass)
# (One launch instead of two, the last chunk program of each row block merging, was slower: SmolLM2 plain decoding
# 1370 against 1603 tok/s on an H200, fifteenth session; removed.)


@torch.library.custom_op("llmgen::few_attention", mutates_args=())
def _few_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    H, S, hd = q.shape
    KV, T = k.size(0), k.size(1)
    G, R, nc = H // KV, H // KV * S, triton.cdiv(T, ATTN_BLOCK_T)
    block_r = 16 if R <= 16 else 32 if R <= 32 else 64
    m = torch.empty(KV, nc, R, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    o = torch.empty(KV, nc, R, hd, dtype=torch.float32, device=q.device)
    y = torch.empty(S, H * hd, dtype=q.dtype, device=q.device)
    cb = min(triton.next_power_of_2(nc), ATTN_MERGE_CHUNKS)
    nr = triton.cdiv(R, block_r)
    _attn_chunk_kernel[(KV, nc, nr)](q, k, v, mask, m, lsum, o, S, T, hd**-0.5, G=G, HD=hd, BLOCK_R=block_r,
                                     BLOCK_T=ATTN_BLOCK_T, PDL=PDL, launch_pdl=PDL)  # fmt: skip
    merge_r = 4
    _attn_merge_kernel[(KV, triton.cdiv(R, merge_r))](m, lsum, o, y, S, nc, G=G, HD=hd, BLOCK_R=merge_r, CB=cb,
                                                      PDL=PDL, launch_pdl=PDL)  # fmt: skip
    return y


@_few_attention.register_fake
def _(q, k, v, mask):
    return q.new_empty(q.size(1), q.size(0) * q.size(2))


# Few-token attention through few_token_attention on CUDA (else model.small_attention). Measured on SmolLM2 (H200,
# MT-bench, same machine, BENCHMARKS.md): plain decoding +8%, an EAGLE round 8% shorter. bench.py --no-triton-attention
# and generate.py --kernels torch turn it off.
FEW_ATTENTION = True


def few_token_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor | None:
    """Attention of a few query tokens against the KV cache in two launches (flash-decoding: per chunk of 64 slots
    the softmax max, sum and partial output, then a merge that writes y in [B, S, H*hd], the output projection's
    input layout). q [1, H, S, hd]; k, v [1, KV, T, hd]; mask [1, 1, S, T] bool (True = may attend). Replaces
    model.small_attention's scores matmul, softmax, weighted sum and transpose (four or five kernels, two of them
    cuBLAS, which breaks PDL's overlap). None where it does not apply (CPU, batch > 1, other dtypes or head sizes);
    a row that may see nothing gets zeros (small_attention: NaN)."""
    B, H, S, hd = q.shape
    if not FEW_ATTENTION or not available(q) or B != 1 or hd < 16 or hd & (hd - 1) or H * S > 1024 or q.requires_grad:
        return None  # (no backward: training takes the other path)
    if k.dtype != q.dtype or v.dtype != q.dtype or mask.dtype != torch.bool or mask.shape[-2:] != (S, k.size(2)):
        return None
    y = _few_attention(q[0].contiguous(), k[0].contiguous(), v[0].contiguous(), mask.reshape(S, -1).contiguous())
    return y[None]


if triton is not None:

    @triton.jit
    def _topk_merge(pv_ptr, pi_ptr, pl_ptr, v_ptr, i_ptr, lse_ptr, r, NC, K: tl.constexpr, K_PAD: tl.constexpr,
                    C_PAD: tl.constexpr, LSE: tl.constexpr):  # fmt: skip
        """_chunk_topk_kernel's second pass for row r: its NC * K candidates, K rounds of max / mask-out, then one load
        of the winners' indices, and the row's logsumexp from its chunks' (max, sum of exp). Reads past L1 (.cg): the
        parts come from other SMs."""
        t, rk = tl.arange(0, C_PAD), tl.arange(0, K_PAD)
        base = r * NC * K
        v = tl.load(pv_ptr + base + t, mask=t < NC * K, other=float("-inf"), cache_modifier=".cg")
        vals = tl.full((K_PAD,), float("-inf"), tl.float32)
        cols = tl.zeros((K_PAD,), tl.int32)
        for j in tl.static_range(K):
            top, col = tl.max(v, 0, return_indices=True, return_indices_tie_break_left=True)  # lower index first
            vals = tl.where(rk == j, top, vals)
            cols = tl.where(rk == j, col, cols)
            v = tl.where(t == col, float("-inf"), v)
        tl.store(v_ptr + r * K + rk, vals, mask=rk < K)
        idx = tl.load(pi_ptr + base + cols, mask=rk < K, other=0, cache_modifier=".cg")
        tl.store(i_ptr + r * K + rk, idx.to(tl.int64), mask=rk < K)
        if LSE:
            m = tl.load(pl_ptr + (r * NC + t) * 2, mask=t < NC, other=float("-inf"), cache_modifier=".cg")
            s = tl.load(pl_ptr + (r * NC + t) * 2 + 1, mask=t < NC, other=0.0, cache_modifier=".cg")
            mx = tl.max(m, 0)
            tl.store(lse_ptr + r, mx + tl.log(tl.sum(s * tl.exp(m - mx), 0)))

    @triton.jit
    def _chunk_topk_kernel(x_ptr, pv_ptr, pi_ptr, pl_ptr, cnt_ptr, v_ptr, i_ptr, lse_ptr, V, K: tl.constexpr,
                           K_PAD: tl.constexpr, CHUNK: tl.constexpr, C_PAD: tl.constexpr, LSE: tl.constexpr,
                           PDL: tl.constexpr):  # fmt: skip
        """Top k of every row of x [R, V] in one launch, in two passes. Program (r, c) takes the K largest entries of
        chunk c of row r (K rounds of max / mask-out in registers) and, with LSE, the chunk's max and sum of exp, into
        the workspace. The last of row r's programs to finish (a counter per row, as in _split_sum) merges the row's
        NC * K candidates the same way (_topk_merge), so rows merge in parallel, and resets the counter. Among equal
        values the lower index wins, in both passes."""
        _pdl_start(PDL)
        r, c, NC = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        rc, rk = tl.arange(0, CHUNK), tl.arange(0, K_PAD)
        x = tl.load(x_ptr + r.to(tl.int64) * V + c * CHUNK + rc).to(tl.float32)
        if LSE:
            mx = tl.max(x, 0)
            tl.store(pl_ptr + (r * NC + c) * 2, mx)
            tl.store(pl_ptr + (r * NC + c) * 2 + 1, tl.sum(tl.exp(x - mx), 0))
        vals = tl.full((K_PAD,), float("-inf"), tl.float32)
        idxs = tl.zeros((K_PAD,), tl.int32)
        for j in tl.static_range(K):
            top, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)  # the first of equal maxima
            vals = tl.where(rk == j, top, vals)
            idxs = tl.where(rk == j, c * CHUNK + at, idxs)
            x = tl.where(rc == at, float("-inf"), x)
        part = (r * NC + c) * K + rk  # row r's candidates are entries r * NC * K .. of the workspace, chunk by chunk
        tl.store(pv_ptr + part, vals, mask=rk < K)
        tl.store(pi_ptr + part, idxs, mask=rk < K)
        if _last_to_arrive(cnt_ptr + r, NC):
            _topk_merge(pv_ptr, pi_ptr, pl_ptr, v_ptr, i_ptr, lse_ptr, r, NC, K, K_PAD, C_PAD, LSE)
            tl.atomic_xchg(cnt_ptr + r, 0, sem="relaxed", scope="gpu")


@torch.library.custom_op("llmgen::chunk_topk", mutates_args=())
def chunk_topk(x: Tensor, k: int, chunk: int, lse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """x [R <= TOPK_MAX_ROWS, V] (V a multiple of chunk, a power of two) -> the top k of every row, largest first:
    float32 values [R, k], int64 indices [R, k], and with lse the rows' logsumexp in float32 [R] (else an empty
    tensor). One launch (`_chunk_topk_kernel`): draft.top_k and top_logp on CUDA (TRITON_TOPK)."""
    R, V = x.shape
    if R > TOPK_MAX_ROWS:
        raise ValueError(f"chunk_topk takes at most {TOPK_MAX_ROWS} rows, got {R}")
    NC, dev = V // chunk, x.device
    pv = torch.empty(R * NC * k, dtype=torch.float32, device=dev)  # the first pass's candidates
    pi = torch.empty(R * NC * k, dtype=torch.int32, device=dev)
    pl = torch.empty(R * NC * 2 if lse else 1, dtype=torch.float32, device=dev)
    v = torch.empty(R, k, dtype=torch.float32, device=dev)
    i = torch.empty(R, k, dtype=torch.int64, device=dev)
    out_lse = torch.empty(R if lse else 0, dtype=torch.float32, device=dev)
    cnt = counters(dev)[TOPK_COUNTER:]
    _chunk_topk_kernel[(R, NC)](x, pv, pi, pl, cnt, v, i, out_lse if lse else v, V, K=k,
                                K_PAD=max(2, triton.next_power_of_2(k)), CHUNK=chunk,
                                C_PAD=triton.next_power_of_2(NC * k), LSE=lse, PDL=PDL, launch_pdl=PDL)  # fmt: skip
    return v, i, out_lse


@chunk_topk.register_fake
def _(x, k, chunk, lse=False):
    R = x.size(0)
    return (x.new_empty(R, k, dtype=torch.float32), x.new_empty(R, k, dtype=torch.int64),
            x.new_empty(R if lse else 0, dtype=torch.float32))  # fmt: skip


# draft.top_k and top_logp through chunk_topk instead of torch.topk (CUDA). Measured on SmolLM2 (H200, MT-bench, same
# machine, BENCHMARKS.md, sixth session), with the first pass alone in Triton: an EAGLE round with the default tree
# 1.171 -> 1.039 ms (40 questions); torch's one-block top-k had taken 11-18 us per call. Both passes in one launch,
# with the draft's inputs made once a round (tenth session, 80 questions, one machine): a round 1.033 -> 0.937 ms
# (default tree), 1.321 -> 1.189 ms (EAGLE-2). bench.py --no-triton-topk and generate.py --kernels torch turn it off.
TRITON_TOPK = True


_TABLES: dict[tuple, Tensor] = {}  # the device-side address table of each list of caches (see cache_table)


def cache_table(caches: list[Tensor]) -> Tensor:
    """The device-side address table of a list of caches, for copy_rows: made on first use and kept. Call it once
    where no CUDA graph is being recorded or warmed up (model.Transformer.setup_caches does): a table first made inside
    torch.compile's CUDA-graph warm-up (`--eagle-timing` compiles the verification with mode="reduce-overhead") would
    come from the graphs' private memory pool and outlive the run that made it, which CUDA graph trees refuse
    ("Detected 1 tensor(s) in the cudagraph pool not tracked as outputs": `bench.py --rounds`, sixth session)."""
    key = tuple(c.data_ptr() for c in caches)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = torch.tensor(key, dtype=torch.int64, device=caches[0].device)
    return table


_TL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@torch.library.custom_op("llmgen::copy_rows", mutates_args=("caches",))
def copy_rows(caches: list[Tensor], src: Tensor, dst: Tensor) -> None:
    """cache[:, :, dst] = cache[:, :, src] for every cache [B, H, T, hd] in the list (src, dst: [R] slots; all rows
    are read before any is written, so the ranges may overlap). The KV compaction of an accepted EAGLE path: on CUDA
    one Triton launch for all layers' K and V instead of one kernel per tensor (60 on SmolLM2)."""
    c0 = caches[0]
    R, hd = src.numel(), c0.size(-1)
    same = all(c.shape == c0.shape and c.dtype == c0.dtype and c.is_contiguous() for c in caches)
    on_triton = triton is not None and (c0.is_cuda or INTERPRET)
    if not (on_triton and same and c0.dtype in _TL_DTYPES and R <= 64 and hd & (hd - 1) == 0):
        for c in caches:
            c.index_copy_(2, dst, c.index_select(2, src))
        return
    table = cache_table(caches)
    dt = getattr(tl, _TL_DTYPES[c0.dtype])
    grid = (len(caches), c0.size(0) * c0.size(1))
    r_pad = max(2, triton.next_power_of_2(R))
    _copy_rows_kernel[grid](table, src, dst, R, c0.size(2), HD=hd, R_PAD=r_pad, DT=dt, PDL=PDL, launch_pdl=PDL)


def int4_layout(scales_and_zeros: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The on-disk int4 scales and zeros [K/G, N, 2] as the kernel reads them: [N, K/G, 2] in dtype (bf16, as
    tinygemm keeps them: 4 bytes per group of G weights)."""
    return scales_and_zeros.transpose(0, 1).to(dtype).contiguous()


def few_token_linear(x: Tensor, w: Tensor, bias: Tensor | None = None, max_m: int = 1) -> Tensor:
    """F.linear(x, w, bias), through `wmm` where x has at most max_m rows of 16-bit floats on CUDA (w of x's dtype)."""
    x2 = x.reshape(-1, x.shape[-1])
    if 0 < x2.shape[0] <= max_m and available(x2) and w.dtype == x2.dtype and (bias is None or bias.dtype == w.dtype):
        return wmm(x2.contiguous(), w, None, NONE, 0, bias=bias).reshape(*x.shape[:-1], w.shape[0])
    return torch.nn.functional.linear(x, w, bias)


class FewTokenLinear(torch.nn.Module):
    """A dense nn.Linear whose forward uses the Triton GEMV for one token (bf16/fp16 on CUDA), the Triton
    few-token kernel for 2..max_m tokens, and F.linear otherwise. Shares the original weight and bias Parameters (tied
    embeddings stay tied). max_m = 1 by default: in `bench.py --linears` the GEMV beat cuBLAS on most decode shapes
    (SmolLM2: 2.1-2.5 vs 3.3-4.7 us), while for 8-64 tokens cuBLAS was as fast or faster (BENCHMARKS.md); with PDL
    generate.py takes max_m = MAX_M (see use_kernels there)."""

    def __init__(self, linear: torch.nn.Linear, max_m: int = 1):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features, self.max_m = linear.in_features, linear.out_features, max_m

    def forward(self, x: Tensor) -> Tensor:
        return few_token_linear(x, self.weight, self.bias, self.max_m)

    def fused(self, x: Tensor, norm, residual: Tensor | None, gated: bool = False) -> Tensor | None:
        """residual + self(norm(x)) (or of silu(gate) * up) in one kernel on CUDA, else None (see model.linear)."""
        return fused_wmm(x, self.weight, None, NONE, 0, norm, residual, self.out_features, gated, self.bias)


def use_triton_linears(model: torch.nn.Module, max_m: int = 1) -> int:
    """Swap every nn.Linear of the model for FewTokenLinear(max_m), and let modules with a `kernel_max_m` attribute
    (the EAGLE head's draft-vocabulary logits) send up to max_m rows to `wmm` too; returns how many were swapped."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "kernel_max_m"):
            mod.kernel_max_m = max_m
        if type(mod) is torch.nn.Linear:
            model.set_submodule(name, FewTokenLinear(mod, max_m))
            swapped += 1
    return swapped


def tuned_configs() -> list[dict]:
    """The block shapes the autotuner picked so far for the matmul kernels, one entry per kernel and key (the key's
    shape values, then the tensors' dtypes, as triton's Autotuner keys its cache): JSON-ready, for `pin_configs`."""
    out = []
    for name in ("_gemv_kernel", "_gemm_kernel"):
        for key, cfg in getattr(globals().get(name), "cache", {}).items():
            out.append({"kernel": name, "key": list(key), "kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps,
                        "num_stages": cfg.num_stages})  # fmt: skip
    return out


def pin_configs(entries: list[dict]) -> int:
    """Put picks saved by `tuned_configs` into the autotuners' caches: those keys are not tuned again in this process,
    so the same shapes run with the same block shapes in every run (the autotuner times each config alone, and its
    pick can change from run to run, and speed and bf16 rounding with it: BENCHMARKS.md, fifth session). Entries saved
    by code with other autotuning keys or block-shape parameters are skipped with a warning. Returns how many were
    pinned."""
    if triton is None:
        return 0
    pinned = 0
    for e in entries:
        kern = globals()[e["kernel"]]
        key_len = len(kern.keys) + sum(a.endswith("_ptr") for a in kern.fn.fn.arg_names)  # key args, then dtypes
        if len(e["key"]) != key_len or set(e["kwargs"]) != set(kern.configs[0].kwargs):
            continue
        cfg = triton.Config(dict(e["kwargs"]), num_warps=e["num_warps"], num_stages=e["num_stages"])
        kern.cache[tuple(e["key"])] = cfg
        pinned += 1
    if pinned < len(entries):
        skipped = f"{len(entries) - pinned} of {len(entries)}"
        warnings.warn(f"pin_configs: {skipped} entries come from other kernel versions", stacklevel=2)
    return pinned


def set_pdl(on: bool) -> bool:
    """Programmatic dependent launch for this file's kernels (PDL) and for Inductor's generated ones
    (torch._inductor.config.triton.enable_pdl), where the GPU has it (compute capability >= 9). Call before anything
    is compiled or captured. Returns whether it is on."""
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    global PDL
    PDL = bool(on and triton is not None and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)
    if hasattr(inductor_config.triton, "enable_pdl"):
        inductor_config.triton.enable_pdl = PDL
    return PDL
