"""Count the GPU instructions per weight in the inner loop of kernels.py's matmuls, with no GPU: Triton compiles the
kernel for a given architecture (sm_90 by default) on the CPU, and its bundled nvdisasm lists the machine code (SASS).

    python scripts/kernel_sass.py --quant int8 --block-n 16 --block-k 512 --warps 4 --stages 2
    python scripts/kernel_sass.py --quant int4 --tokens 26 --block-n 64 --block-k 256 --swap
    PYTHONPATH=/path/to/triton-3.6 python scripts/kernel_sass.py --all   # does every config compile there?

Batch-1 matmuls should be bound by memory bandwidth; when the int8/int4 conversion costs too many instructions a
weight, they are bound by instructions issued instead (seventh session: int4 at ~9 instructions a weight ran at a third
of the copy bandwidth, bf16 at 3.5 near all of it). This shows that count before any device time is spent. It reads
Triton internals (ASTSource, GPUTarget), so a Triton upgrade may need it adjusted.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels as K  # noqa: E402

QUANTS = {"bf16": K.NONE, "int8": K.INT8, "int4": K.INT4}


def compile_matmul(quant: str, tokens: int, block_n: int, block_k: int, warps: int, stages: int, block_m: int,
                   swap: bool, group: int, arch: int, split: int = 1, masked: bool = False,
                   words: bool = False, pdl: bool = False, pipeline: bool = True,
                   fold: int = 1):  # fmt: skip
    """The one-token (_gemv_kernel) or few-token (_gemm_kernel) kernel compiled for sm_<arch>, bf16 activations, no
    fusions; pdl: with the PDL wait and the weight prefetch before it (kernels.PREFETCH), as generate.py runs it;
    pipeline: the one-token kernel loads its next chunk before summing the current one (kernels.GEMV_PIPELINE)."""
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    q = QUANTS[quant]
    kern = K._gemv_kernel if tokens == 1 else K._gemm_kernel
    fn = kern.fn.fn  # Autotuner -> Heuristics -> JITFunction
    w_type = {K.NONE: "*bf16", K.INT8: "*i8", K.INT4: "*i32" if tokens == 1 else "*u8"}[q]  # (words: cast inside)
    values = dict(QUANT=q, GROUP=group if q == K.INT4 else 0, NORM=False, RESIDUAL=False, GATED=False, BIAS=False,
                  PDL=pdl, PREFETCH=pdl, PIPELINE=pipeline, FOLD=fold, W_STAGES=stages, X_ALIGNED=True,
                  SPLIT=split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                  SWAP=int(swap), EVEN_K=not masked, WORDS=int(words))  # fmt: skip
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", values[p.name]
        elif p.name.endswith("_ptr"):
            signature[p.name] = {"w_ptr": w_type, "ws_ptr": "*fp32", "cnt_ptr": "*i32"}.get(p.name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = "fp32" if p.name == "eps" else "i32"
            if p.name in ("N", "K"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def sass_of(compiled) -> str:
    """The machine code, as Triton's bundled nvdisasm lists it."""
    import triton  # noqa: PLC0415

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout


def instructions(sass: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """nvdisasm's listing as (address, instruction) in order, and each label's address."""
    code, labels, pending = [], {}, None
    for line in sass.splitlines():
        if m := re.match(r"\s*\.L_x_(\d+):", line):
            pending = m.group(1)
        elif m := re.search(r"/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;", line):
            addr = int(m.group(1), 16)
            code.append((addr, m.group(2)))
            if pending is not None:
                labels[pending], pending = addr, None
    return code, labels


def registers(compiled, arch: int) -> str:
    """ptxas's report of registers and spills for the kernel (Triton's bundled ptxas, --verbose)."""
    import triton  # noqa: PLC0415

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile(suffix=".ptx", mode="w") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        out = subprocess.run([str(ptxas), "--verbose", f"-arch=sm_{arch}a", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} bytes spilled"


def inner_loop(compiled) -> list[str]:
    """The instructions of the longest backward branch's body (the walk over K)."""
    code, labels = instructions(sass_of(compiled))
    best: list[str] = []
    for addr, ins in code:
        m = re.search(r"BRA.*\.L_x_(\d+)", ins)
        if m and labels.get(m.group(1), addr + 1) < addr:
            body = [i for a, i in code if labels[m.group(1)] <= a <= addr]
            best = body if len(body) > len(best) else best
    return best


def compile_all(arch: int) -> int:
    """Compile every config of both matmul kernels for every weight format it runs with, K whole and masked, and
    report those that fail; returns how many failed. With another Triton first on PYTHONPATH (the GPU machine's
    version: a wheel from PyPI), this catches code that one version compiles and another does not (eighth session:
    Triton 3.7 took a string passed into a jit helper, 3.6 did not)."""
    import triton  # noqa: PLC0415

    failed = done = 0
    for kern, tokens in ((K._gemv_kernel, 1), (K._gemm_kernel, 26)):
        for c, quant, masked in itertools.product(kern.configs, QUANTS, (False, True)):
            kw = c.kwargs
            if kw.get("WORDS") and quant != "int4":
                continue
            try:
                shape = (kw["BLOCK_N"], max(kw["BLOCK_K"], 64), c.num_warps, c.num_stages, 32, bool(kw.get("SWAP")))
                compile_matmul(quant, tokens, *shape, 64, arch, kw.get("SPLIT", 1), masked, bool(kw.get("WORDS")),
                               pdl=True)  # fmt: skip
                done += 1
            except Exception as e:  # noqa: BLE001
                failed += 1
                while e.__cause__ is not None:  # the innermost cause, whose last line says what failed
                    e = e.__cause__
                why = [ln.strip() for ln in str(e).splitlines() if any(ch.isalpha() for ch in ln)] or [repr(e)]
                print(f"FAILS: {kern.fn.fn.__name__} {kw} {quant} masked={masked}: {why[-1][:200]}")
    print(f"triton {triton.__version__}, sm_{arch}: {done} compiled, {failed} failed")
    return failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quant", choices=list(QUANTS), default="int8")
    p.add_argument("--tokens", type=int, default=1, help="1: the one-token kernel; more: the few-token one")
    p.add_argument("--block-n", type=int, default=16)
    p.add_argument("--block-k", type=int, default=512)
    p.add_argument("--block-m", type=int, default=0, help="few-token kernel: rows of x a program (default: fitted)")
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--swap", action="store_true", help="few-token kernel: the weight tile as tl.dot's first operand")
    p.add_argument("--group", type=int, default=64, help="int4 group size")
    p.add_argument("--split", type=int, default=1, help="programs an output block's K is split over")
    p.add_argument("--masked", action="store_true", help="K not a multiple of BLOCK_K: the loads masked on K")
    p.add_argument("--words", action="store_true", help="few-token int4: read 32-bit words (8 dots a chunk)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--pdl", action="store_true", help="with the PDL wait and the weight prefetch before it")
    p.add_argument("--no-pipeline", action="store_true", help="one-token kernel: no software pipelining of its loop")
    p.add_argument(
        "--fold", action="store_true", help="one-token bf16 / int8: sum each 16-byte run per chunk (GEMV_FOLD)"
    )
    p.add_argument("--dump", action="store_true", help="print the whole SASS (where do the loads sit?)")
    p.add_argument("--all", action="store_true", help="only compile every config of both kernels (minutes)")
    a = p.parse_args()
    if K.triton is None:
        sys.exit("error: kernel_sass.py needs triton")
    if a.all:
        sys.exit(1 if compile_all(a.arch) else 0)
    block_m = a.block_m or (16 if a.tokens <= 16 else 32 if a.tokens <= 32 else 64)
    fold = {"bf16": 8, "int8": 16}.get(a.quant, 1) if a.fold else 1
    try:
        compiled = compile_matmul(a.quant, a.tokens, a.block_n, a.block_k, a.warps, a.stages, block_m, a.swap,
                                  a.group, a.arch, a.split, a.masked, a.words, a.pdl, not a.no_pipeline,
                                  fold)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a config that does not compile is an answer, not a crash
        sys.exit(f"error: does not compile: {str(e).splitlines()[-1] if str(e) else type(e).__name__}")
    if a.dump:
        print(sass_of(compiled))
        return
    body = inner_loop(compiled)
    if not body:
        sys.exit("error: no loop found (one chunk covers K?): try a smaller --block-k")
    per_thread = a.block_n * a.block_k / (32 * a.warps)  # weights a thread handles per pass of the loop
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split(" ")[0].split(".")[0] for i in body)
    print(f"{a.quant}, {a.tokens} token(s), BLOCK_N {a.block_n}, BLOCK_K {a.block_k}, {a.warps} warps, {a.stages} "
          f"stages{', swapped' if a.swap else ''}: {len(body)} instructions a pass for {per_thread:g} weights a thread "
          f"= {len(body) / per_thread:.2f} a weight; {registers(compiled, a.arch)}")  # fmt: skip
    print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(12)))


if __name__ == "__main__":
    main()
