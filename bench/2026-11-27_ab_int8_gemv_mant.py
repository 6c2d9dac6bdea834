"""A/B of the one-token int8 kernel: main's (prmt + subtract) vs 757e294's (_int8_mant, sum(x) out at the end), same
process, same configs, 7B shapes, CUDA-graph replays cycling 4 weight copies. The new module is made with
    git show 757e294:kernels.py | sed 's/llmgen::/llmgennew::/g' > $KERNELS_NEW
(ninth session, calls D and E; E ran with CFG cut to the five largest tiles)."""

import importlib.util
import json
import os
import sys

sys.path.insert(0, ".")
import torch
import triton

import kernels as KO
import quantize as Q

spec = importlib.util.spec_from_file_location(
    "kernels_new", os.environ.get("KERNELS_NEW", ".diag/s9/knew/kernels_new.py")
)
KN = importlib.util.module_from_spec(spec)
spec.loader.exec_module(KN)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
CFG = [
    (4, 512, 4, 2),
    (8, 256, 4, 2),
    (8, 512, 4, 2),
    (16, 256, 4, 2),
    (8, 1024, 4, 1),
    (8, 1024, 8, 2),
    (16, 1024, 8, 2),
    (8, 2048, 8, 2),
    (32, 512, 8, 2),
]
SHAPES = (
    [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)] if CUDA else [(40, 1024), (24, 1040)]
)
for K in (KO, KN):
    K._gemv_kernel.configs = [
        triton.Config({"BLOCK_N": a, "BLOCK_K": b}, num_warps=w, num_stages=s) for a, b, w, s in CFG
    ]
    K._gemv_kernel.cache = {}


def timeit(fn, calls=20, reps=10):
    fn(0)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / calls * 1e3)
    return sorted(ts)[len(ts) // 2]


out = {}
torch.manual_seed(0)
for n, k in SHAPES:
    copies = []
    for _ in range(4 if CUDA else 1):
        q, s = Q.quantize_int8(torch.randn(n, k, device=DEV) * 0.02)
        copies.append((q, s.to(torch.bfloat16 if CUDA else torch.float32)))
    x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16 if CUDA else torch.float32)
    ref = x.float() @ (copies[0][0].float() * copies[0][1].float()[:, None]).T
    row = {}
    for name, K in (("old", KO), ("new", KN)):
        fn = lambda i, K=K, x=x, copies=copies: K.wmm(x, *copies[i % len(copies)], K.INT8, 0)
        y = fn(0)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        row[name] = {"err": err}
        if CUDA:
            row[name]["us"] = timeit(fn)
            row[name]["pick"] = [str(c) for c in K._gemv_kernel.cache.values()]
    out[f"N={n} K={k}"] = row
    print(f"N={n} K={k}", json.dumps(row), flush=True)
if CUDA:
    tot = {v: sum(r[v]["us"] for r in out.values()) for v in ("old", "new")}
    print("sum us", tot)
    os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_int8.json"), "w"), indent=1)
