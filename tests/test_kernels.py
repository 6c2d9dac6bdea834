"""kernels.py on the CPU through Triton's interpreter (skipped where triton is not installed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernels_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).parent / "kernel_check.py"
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    parts = (
        "configs",
        "fp16",
        "bf16_int4",
        "errors",
        "modules",
        "compile",
        "fused",
        "copy_rows",
        "rope_cache",
        "chunk_topk",
        "layer_inputs",
    )
    for part in (*parts, "few_attention", "pin"):
        assert f"{part} ok" in r.stdout


def test_kernel_sass_counts_instructions_without_a_gpu():
    """scripts/kernel_sass.py compiles a matmul for sm_90 on the CPU and counts its inner loop's instructions a weight
    (seventh session: how the int8/int4 conversions were made cheaper before spending device time)."""
    script = Path(__file__).parent.parent / "scripts" / "kernel_sass.py"
    r = subprocess.run([sys.executable, str(script), "--quant", "int8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and " a weight" in r.stdout and "FFMA" in r.stdout, r.stdout + r.stderr
    bad = subprocess.run([sys.executable, str(script), "--block-k", "40"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_weights_are_fetched_before_the_pdl_wait_and_nothing_else():
    """kernels.PREFETCH, compiled for sm_90 on the CPU: the matmuls ask L2 for weight lines (CCTL.E.PF2) before the
    PDL wait (ACQBULK in the SASS) and load their tiles and x only after it; the one-token kernel without its
    pipelined loop (--no-pipeline) loads its first weights into registers there instead. Reading anything a previous
    kernel writes before the wait would be a race."""
    scripts = Path(__file__).parent.parent / "scripts"
    sys.path.insert(0, str(scripts))
    import kernel_sass  # noqa: PLC0415 - its SASS parser; the compile runs in a process of its own (no interpreter)

    cases = (
        ([], "CCTL.E.PF2"),
        (["--no-pipeline"], "LDG"),
        (["--stages", "1"], "LDG"),  # a one-stage config: the plain loop even with the pipeline on
        (["--tokens", "26", "--block-n", "32", "--block-k", "256"], "CCTL.E.PF2"),
    )
    for args, early in cases:
        cmd = [sys.executable, str(scripts / "kernel_sass.py"), "--quant", "bf16", "--pdl", "--dump", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        ops = [op for _, op in kernel_sass.instructions(r.stdout)[0]]
        wait = next(i for i, op in enumerate(ops) if op.startswith("ACQBULK"))
        before = [op for op in ops[:wait] if "LDG" in op or "CCTL" in op or "LDS" in op]
        assert before and all(early in op for op in before), (args, before)  # only weight fetches come first


def test_one_token_loop_streams_its_chunks_through_shared_memory():
    """kernels.GEMV_PIPELINE: the one-token matmul's loop over K copies its next chunks into shared memory with
    cp.async (LDGSTS) and reads the current one from there; without it, each chunk is loaded into registers (LDG) and
    summed before the next is asked for (sixteenth session: int8 read its weights at 61% of the copy bandwidth)."""
    scripts = Path(__file__).parent.parent / "scripts"
    sys.path.insert(0, str(scripts))
    import kernel_sass  # noqa: PLC0415

    for quant in ("bf16", "int8", "int4"):
        ops = {}
        for pipeline in (True, False):
            c = kernel_sass.compile_matmul(quant, 1, 16, 512, 8, 3, 16, False, 64, 90, pdl=True, pipeline=pipeline)
            ops[pipeline] = " ".join(kernel_sass.inner_loop(c))
        assert "LDGSTS" in ops[True] and "LDS" in ops[True], quant
        assert "LDGSTS" not in ops[False] and "LDG.E" in ops[False], quant
        # one stage: nothing to pipeline, so the plain loop (seventeenth session: the pipelined code's L2 prefetch in
        # place of chunk 0 in registers cost bf16 5.6% where the autotuner picked one-stage configs)
        c = kernel_sass.compile_matmul(quant, 1, 8, 1024, 4, 1, 16, False, 64, 90, pdl=True, pipeline=True)
        one = " ".join(kernel_sass.inner_loop(c))
        assert "LDGSTS" not in one and "LDG.E" in one, quant


def test_gemv_fold_halves_the_one_token_registers():
    """kernels.GEMV_FOLD: summing each thread's 16 bytes of a row at every chunk leaves BLOCK_N x BLOCK_K / FOLD
    accumulators, not BLOCK_N x BLOCK_K: the eighteenth session's picks for the 7B shape, (8, 1024, 4 warps, 1 stage),
    went from ~120 registers (4 programs an SM) to ~50 (Triton 3.6 for sm_90), for the same instructions a weight."""
    scripts = Path(__file__).parent.parent / "scripts"
    sys.path.insert(0, str(scripts))
    import kernel_sass  # noqa: PLC0415

    for quant, fold in (("bf16", 8), ("int8", 16)):
        regs, count = {}, {}
        for f in (1, fold):
            c = kernel_sass.compile_matmul(quant, 1, 8, 1024, 4, 1, 16, False, 0, 90, fold=f)
            regs[f] = int(kernel_sass.registers(c, 90).split()[0])
            count[f] = len(kernel_sass.inner_loop(c))
        assert regs[fold] < 0.6 * regs[1], (quant, regs)
        assert count[fold] < 1.1 * count[1], (quant, count)


def test_autotuner_picks_persist_across_processes():
    """kernels.py asks Triton (>= 3.4) to keep the autotuner's picks on disk, which it stores as JSON of each config's
    fields and reads back as triton.Config(**fields): every config must survive that round trip."""
    import inspect
    import json

    import triton

    import kernels as K

    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        pytest.skip("Triton < 3.4 keeps no autotuning results")
    for kern in (K._gemv_kernel, K._gemm_kernel):
        assert kern.cache_results
        for c in kern.configs:
            back = triton.Config(**json.loads(json.dumps(c.__dict__)))
            assert (back.kwargs, back.num_warps, back.num_stages) == (c.kwargs, c.num_warps, c.num_stages)
            assert c.pre_hook is None  # configs with a pre_hook are never cached


def test_jit_functions_get_no_string_arguments():
    """Triton 3.6 (the GPU machine's) cannot pass a Python string into a @triton.jit function ("'str' object has no
    attribute 'type'"), though 3.7 (this machine's) can: an inline-PTX helper taking its assembly as an argument
    compiled here and broke every int8/int4 kernel there (eighth session). Strings stay at the tl.* call sites."""
    import ast

    tree = ast.parse((Path(__file__).parent.parent / "kernels.py").read_text())
    jitted = {
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in f.decorator_list)
    }
    assert len(jitted) > 10
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in jitted:
            for arg in [*call.args, *(k.value for k in call.keywords)]:
                is_str = isinstance(arg, ast.JoinedStr) or isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                assert not is_str, f"kernels.py:{call.lineno}: a string passed to the jit function {call.func.id}"
