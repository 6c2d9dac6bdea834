"""Where the time of a generation's start goes: host time of `_start` (prefill + EAGLE head prefill) for new prompt
lengths, plain vs EAGLE, and a profile of one `_start`. Written to find why EAGLE lost time per MT-bench question.

    python scripts/diag_start.py            # GPU (bf16, compiled);  DEV=cpu for a float32 smoke run
"""

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import generate as G  # noqa: E402
import model as M  # noqa: E402
import tree as T  # noqa: E402
from draft import load_head  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

DEV = os.environ.get("DEV", "cuda")
CUDA = DEV == "cuda"
DT = torch.bfloat16 if CUDA else torch.float32
CKPT = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@torch.inference_mode()
def main() -> None:
    G.set_inductor_flags()
    G.kernels.set_pdl(CUDA)
    model, tok = M.load_model(CKPT, device=DEV, dtype=DT), load_tokenizer(CKPT)
    head = load_head(ROOT / "heads" / "SmolLM2-135M-Instruct", model.args, DEV, DT)
    if CUDA:
        G.use_kernels("auto", model, head)
    prompts = [
        tok.encode_prompt(q.turns[0], chat=True)
        for q in G.read_prompts(str(ROOT / "data" / "mt_bench" / "question.jsonl"))[:6]
    ]
    new = 256 if CUDA else 8
    plain = G.Generator(model, G.Sampling(), 512, compile=CUDA)
    eagle = G.EagleGenerator(model, head, T.build_tree(T.parse_tree_spec("default")), G.Sampling(), 400, compile=CUDA)
    for g in (plain, eagle):
        g.generate(prompts[0], 32, tok.stop_ids)  # compile
        for stage in ("start", "generate"):
            ms = []
            for p in prompts[1:]:
                sync()
                t0 = time.perf_counter()
                g._start(torch.tensor([p], device=DEV)) if stage == "start" else g.generate(p, new, tok.stop_ids)
                sync()
                ms.append(round((time.perf_counter() - t0) * 1e3, 1))
            print(type(g).__name__, stage, "ms per prompt:", ms, flush=True)
    for g in (plain, eagle):
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])) as prof:
            g._start(torch.tensor([prompts[2]], device=DEV))
            sync()
        print(type(g).__name__, "(a prompt length seen before)")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
