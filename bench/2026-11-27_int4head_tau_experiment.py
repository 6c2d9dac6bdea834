"""Throwaway: tau on CPU fp32 (first 10 MT-bench questions) with the head's linears rounded to int4 (group G),
simulated by quantize -> dequantize, via eval_eagle.py --draft-quant int8 with the int8 step swapped out."""

import os
import sys

sys.path.insert(0, "scripts")
sys.path.insert(0, ".")
import torch
import torch.nn as nn

import quantize

G = int(os.environ.get("G", "64"))


def fake_int4(module, dtype):
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            q, sz = quantize.quantize_int4(m.weight.detach().float(), G)
            m.weight.data.copy_(quantize.dequantize_int4(quantize.pack_int4(q), sz, G).to(m.weight.dtype))
            n += 1
    print(f"int4 g{G}: {n} head linears rounded", flush=True)
    return n


quantize.quantize_linears_int8 = fake_int4
import eval_eagle  # noqa: E402  (after the swap above)

sys.argv = ["eval_eagle.py", "--questions", "10", "--draft-quant", "int8", "--out", f".diag/s9/int4head_g{G}.jsonl"]
with torch.inference_mode():
    eval_eagle.main()
