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
        "errors",
        "modules",
        "compile",
        "fused",
        "copy_rows",
        "rope_cache",
        "chunk_topk",
    )
    for part in (*parts, "few_attention", "pin"):
        assert f"{part} ok" in r.stdout
