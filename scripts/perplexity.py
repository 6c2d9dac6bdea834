"""Mean next-token NLL / perplexity of a checkpoint (float or quantized) on a text file.

    python scripts/perplexity.py --checkpoint checkpoints/SmolLM2-135M-Instruct --file tests/data/heldout.txt
    python scripts/perplexity.py --checkpoint checkpoints/SmolLM2-135M-Instruct/model_int4.g64.pth --file ...

The text is tokenized with the checkpoint folder's tokenizer (bos prepended when the tokenizer adds one) and cut
into non-overlapping windows of `--window` tokens (default: the model's context, args.max_seq_len); each window is
one forward from an empty cache at positions 0..n-1, scoring every token after the first of the text exactly once
(window i's last target is window i+1's first input). Prints one JSON line: {"nll": ..., "ppl": ..., "tokens": ...},
nll in nats per token. Every user error prints one line `error: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import CheckpointError, Transformer, load_model, resolve_checkpoint  # noqa: E402
from tokenizer import TokenizerError, load_tokenizer  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOGIT_CHUNK = 1024  # rows of logits materialized at once (vocab-sized rows add up quickly)


class UserError(Exception):
    """Bad input: one line on stderr, exit 2."""


@torch.inference_mode()
def evaluate_nll(model: Transformer, ids: list[int], window: int | None = None) -> dict:
    """Sum of -log p(ids[t] | window context) over t >= 1 -> {"nll": mean nats/token, "ppl": exp(nll), "tokens": n}."""
    if len(ids) < 2:
        raise UserError(f"need at least 2 tokens to score, got {len(ids)}")
    window = window or model.args.max_seq_len
    if window < 1 or window > model.args.max_seq_len:
        raise UserError(f"--window must be in 1..{model.args.max_seq_len} (the model's context), not {window}")
    window = min(window, len(ids) - 1)  # a shorter cache gives the same result for short texts
    device = model.norm.weight.device
    model.setup_caches(1, window)
    data = torch.tensor(ids, dtype=torch.long, device=device)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, len(ids) - 1, window):
        chunk = data[start : start + window + 1]
        inp, tgt = chunk[:-1], chunk[1:]
        n = inp.numel()
        h = model.features(inp[None], torch.arange(n, device=device))[0]  # [n, D]
        for i in range(0, n, LOGIT_CHUNK):
            logits = model.output(h[i : i + LOGIT_CHUNK]).float()
            total += F.cross_entropy(logits, tgt[i : i + LOGIT_CHUNK], reduction="sum").double()
        count += n
    nll = total.item() / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}


def encode_file(folder: Path, path: Path) -> list[int]:
    """The file's text as token ids (special-token text is read literally), bos first if the tokenizer adds one."""
    tok = load_tokenizer(folder)
    ids = tok.encode(path.read_text(encoding="utf-8"), allow_special=False)
    return ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + ids


def run(a: argparse.Namespace) -> dict:
    text_file = Path(a.file)
    if not text_file.is_file():
        raise UserError(f"text file not found: {text_file}")
    folder, _ = resolve_checkpoint(a.checkpoint)
    ids = encode_file(folder, text_file)
    try:
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"unknown --device {a.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available")
    dtype = DTYPES[a.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    model = load_model(a.checkpoint, device=device, dtype=dtype)
    return evaluate_nll(model, ids, a.window)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or a .pth in it (quantized ones too)")
    p.add_argument("--file", required=True, help="UTF-8 text file to score")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="activation dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--window", type=int, help="tokens per window (default: the model's context, max_seq_len)")
    a = p.parse_args(argv)
    try:
        result = run(a)
    except (UserError, CheckpointError, TokenizerError, OSError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
