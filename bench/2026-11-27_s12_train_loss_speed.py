"""Training-batch time, old train_eagle.batch_loss (teacher per step) vs new (teacher once; --draft-vocab 16384).

SmolLM2-135M shape, random weights, 8 x 2048 tokens, fused head (layers 2, 15), 5 steps (ttt 4). Needs the old
script beside this one: git show e4fe44c~1:scripts/train_eagle.py > bench/train_eagle_old.py
Run from the repository root: python bench/2026-11-27_s12_train_loss_speed.py
"""

import sys
import time

sys.path[:0] = [".", "scripts", "bench"]
import torch  # noqa: E402
import train_eagle as new  # noqa: E402
import train_eagle_old as old  # noqa: E402

import model as M  # noqa: E402
from draft import EagleHead  # noqa: E402

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, S = (8, 2048) if dev.type == "cuda" else (2, 128)
args = M.ModelArgs.from_name("smollm2-135m")
torch.manual_seed(0)
with torch.device(dev):
    target = M.Transformer(args).to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
for p in target.parameters():
    torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
target.requires_grad_(False)
head = EagleHead(M.ModelArgs(**{**args.to_dict(), "n_layers": 1}), fc_bias=True, feature_layers=(2, 15)).to(dev)
tokens = torch.randint(0, args.vocab_size, (B, S), device=dev)
mask = torch.rand(B, S, device=dev) < 0.77
rope = M.rope_table(head.args, S + 32).to(dev)
vocab = torch.randperm(args.vocab_size, device=dev)[:16384].sort().values
opt = torch.optim.AdamW(head.parameters(), lr=1e-5)
g = torch.Generator(dev).manual_seed(0)


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run(which: str, n: int) -> tuple[list[float], float, list[int]]:
    ts = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        with new.autocast(dev):
            with torch.no_grad():
                feats = new.target_features(target, tokens, rope, (2, 15))
            if which == "old":
                loss, s = old.batch_loss(target, head, tokens, mask, feats, rope, 5, 0.1, g, (0.1, 1.0))
            else:
                ids = vocab if which == "new-dv16384" else None
                loss, s = new.batch_loss(target, head, tokens, mask, feats, rope, 5, 0.1, g, (0.1, 1.0), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        ts.append(time.perf_counter() - t0)
    return ts, loss.item(), s["correct"]


for which in ["old", "new", "new-dv16384", "old", "new", "new-dv16384"]:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(which, 2)
    ts, loss, correct = run(which, 8 if dev.type == "cuda" else 2)
    ms = sorted(ts)[len(ts) // 2] * 1e3
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0
    print(f"{which:12s} median {ms:7.1f} ms/batch = {B * S / ms * 1e3:8.0f} tok/s, peak {mem:5.1f} GiB, "
          f"loss {loss:.4f}, correct {correct[:2]}", flush=True)  # fmt: skip
