"""Tenth session: kernels.chunk_topk (both top-k passes and the logsumexp in one launch) on the GPU.

Checks it against torch.topk / torch.logsumexp on fresh random rows (ties planted), twice and inside a CUDA graph
replayed many times (a race would move the result), then times one call against draft.top_k's torch path (the
two torch.topk passes) as CUDA-graph replays. From the repository root:
python bench/2026-11-27_s10_topk_gpu_check.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import draft as Dr  # noqa: E402
import kernels as K  # noqa: E402


def check(R: int, V: int, k: int, lse: bool, dtype: torch.dtype) -> None:
    x = torch.randn(R, V, device="cuda").to(dtype)
    x[0, 5:9] = 7.0  # equal maxima inside one chunk
    if R > 1:
        x[1, [3, V // 2, V - 1]] = 8.0  # equal maxima in three chunks
    for _ in range(2):
        v, i, s = K.chunk_topk(x, k, 1024, lse)
        ref = torch.topk(x.float(), k)
        assert torch.equal(v, ref.values), (R, V, k)
        assert torch.equal(x.float().gather(1, i), v), (R, V, k)
        assert i[0, : min(k, 4)].tolist() == list(range(5, 5 + min(k, 4)))
        if lse:
            torch.testing.assert_close(s, torch.logsumexp(x.float(), -1), rtol=1e-5, atol=1e-5)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gv, gi, gs = K.chunk_topk(x, k, 1024, lse)
    for _ in range(200):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(gv, v) and torch.equal(gi, i) and (not lse or torch.equal(gs, s))
    assert not K.counters(x.device)[K.TOPK_COUNTER :].any()


def graph_us(fn, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return sorted(times)[len(times) // 2]


def main() -> None:
    K.set_pdl(True)
    torch.manual_seed(0)
    cases = [(1, 16384, 4, False), (4, 16384, 4, False), (6, 49152, 4, False), (10, 16384, 10, True),
             (10, 49152, 10, True), (26, 49152, 1, False), (70, 8192, 8, True), (3, 32768, 16, True)]  # fmt: skip
    for R, V, k, lse in cases:
        for dtype in (torch.bfloat16, torch.float32):
            check(R, V, k, lse, dtype)
    print(f"chunk_topk GPU check ok ({len(cases) * 2} cases)")
    print("rows  V      k  lse | fused us | torch two-pass us")
    for R, V, k, lse in [(1, 16384, 4, False), (4, 16384, 4, False), (4, 49152, 4, False), (10, 16384, 10, True)]:
        x = torch.randn(R, V, device="cuda", dtype=torch.bfloat16)
        K.TRITON_TOPK = True
        fused = graph_us(lambda x=x, k=k, lse=lse: Dr._top_k(x, k, lse))
        K.TRITON_TOPK = False
        plain = graph_us(lambda x=x, k=k, lse=lse: Dr._top_k(x, k, lse))
        K.TRITON_TOPK = True
        print(f"{R:4d}  {V:5d} {k:2d}  {int(lse)}   | {fused:8.2f} | {plain:8.2f}")


if __name__ == "__main__":
    main()
