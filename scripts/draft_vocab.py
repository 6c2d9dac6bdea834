"""Write an EAGLE head's draft vocabulary: the answer tokens of its training data, most frequent first.

    python scripts/draft_vocab.py --data checkpoints/eagle/data2.pt --head heads/SmolLM2-135M-Instruct

Counts the loss-masked (answer) tokens of make_eagle_data.py output files and writes
<head>/draft_vocab.safetensors = {"ids": int64 [n], "counts": int64 [n]}, ids by decreasing count (ties: lower id
first), every token seen at least once. `generate.py --draft-vocab N` then drafts among the first N (draft.py:
EagleHead.restrict_vocab). Prints the share of the counted tokens that the first 4k, 8k, 16k and 32k ids cover.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from draft import VOCAB_FILE  # noqa: E402


def count_answer_tokens(paths: list[str], vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for path in paths:
        data = torch.load(path, map_location="cpu", weights_only=True)
        tokens = data["tokens"].long()[data["loss_mask"].bool()]
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"{path} holds token ids outside a vocabulary of {vocab_size}")
        counts += torch.bincount(tokens, minlength=vocab_size)
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="make_eagle_data.py output file(s), comma-separated")
    p.add_argument("--head", required=True, help="the head folder (config.json gives the vocabulary size)")
    a = p.parse_args(argv)
    missing = [f for f in a.data.split(",") + [str(Path(a.head) / "config.json")] if not Path(f).is_file()]
    if missing:
        sys.exit(f"error: not found: {', '.join(missing)}")
    vocab_size = json.loads((Path(a.head) / "config.json").read_text())["args"]["vocab_size"]
    try:
        counts = count_answer_tokens(a.data.split(","), vocab_size)
    except (ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    total = int(counts.sum())
    if total == 0:
        sys.exit("error: the data holds no answer tokens")
    order = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))
    ids = torch.tensor([i for i in order if counts[i] > 0], dtype=torch.long)
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({"ids": ids, "counts": counts[ids].contiguous()}, str(Path(a.head) / VOCAB_FILE))
    cum = counts[ids].cumsum(0)
    cover = {n: round(int(cum[min(n, ids.numel()) - 1]) / total, 5) for n in (4096, 8192, 16384, 32768)}
    print(json.dumps({"out": str(Path(a.head) / VOCAB_FILE), "answer_tokens": total, "distinct": ids.numel(),
                      "coverage": cover}))  # fmt: skip


if __name__ == "__main__":
    main()
