"""Check an EAGLE head on MT-bench without a GPU: greedy EAGLE output must equal plain greedy output, and tau.

    python scripts/eval_eagle.py --questions 10          # CPU, fp32: the check anyone can run
    python scripts/eval_eagle.py --device cuda --dtype bfloat16 --questions 80

Prints one JSON line per question and a summary line: tau (tokens per target forward, bonus included), identical
outputs, tokens/s of both. On the GPU, scripts/bench.py --mt-bench is the speed benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import generate as G  # noqa: E402
import model as M  # noqa: E402
import quantize  # noqa: E402
import tree as T  # noqa: E402
from draft import apply_draft_vocab, head_tree, load_head  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "SmolLM2-135M-Instruct"))
    p.add_argument("--eagle", default=str(ROOT / "heads" / "SmolLM2-135M-Instruct"), help="head folder")
    p.add_argument("--tree", default="default", help="tree spec (see generate.py --tree; default: EAGLE-1's)")
    p.add_argument("--questions", type=int, default=10, help="first N MT-bench questions (first turn)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(G.DTYPES))
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        metavar="N",
        help="as generate.py --draft-vocab (default: 16384 where the head has a vocabulary file; 0 = all)",
    )
    p.add_argument("--draft-quant", choices=["none", "int8"], default="none", help="as generate.py --draft-quant")
    p.add_argument("--out", default=None, help="also write the JSON lines here")
    a = p.parse_args()
    try:
        model = M.load_model(a.checkpoint, device=a.device, dtype=G.DTYPES[a.dtype])
        head = load_head(a.eagle, model.args, a.device, G.DTYPES[a.dtype])
        a.draft_vocab = apply_draft_vocab(head, a.eagle, a.draft_vocab, model)
        if a.draft_quant == "int8":
            quantize.quantize_linears_int8(head, G.DTYPES[a.dtype])
        spec = head_tree(a.tree, a.eagle)  # 'head': the tree the head's config names
        tree = T.make_tree(spec)
    except (M.CheckpointError, T.TreeError) as e:
        sys.exit(f"error: {e}")
    tok = load_tokenizer(Path(a.checkpoint))
    questions = G.read_prompts(str(ROOT / "data" / "mt_bench" / "question.jsonl"))[: a.questions]
    prompts = [tok.encode_prompt(q.turns[0], chat=True) for q in questions]
    need = max(map(len, prompts)) + a.max_new_tokens
    plain = G.Generator(model, G.Sampling(), G.round_up(need, 64))
    lines, same, toks, rounds, t_plain, t_eagle = [], 0, 0, 0, 0.0, 0.0
    for q, ids in zip(questions, prompts, strict=True):
        ref = plain.generate(ids, a.max_new_tokens, tok.stop_ids)
        eagle = G.EagleGenerator(model, head, tree, G.Sampling(), need)
        got = eagle.generate(ids, a.max_new_tokens, tok.stop_ids)
        model.setup_caches(1, plain.max_seq_length)  # give the plain generator its cache back
        same += got.output_ids == ref.output_ids
        toks, rounds = toks + len(got.output_ids), rounds + got.stats["rounds"]
        t_plain, t_eagle = t_plain + ref.seconds, t_eagle + got.seconds
        line = {"id": q.id, "identical": got.output_ids == ref.output_ids, "new_tokens": len(got.output_ids),
                "tau": got.stats["accept_len_mean"], "rounds": got.stats["rounds"]}  # fmt: skip
        print(json.dumps(line), flush=True)
        lines.append(line)
    summary = {"questions": len(questions), "identical": same, "tau": sum(x["tau"] for x in lines) / len(lines),
               "tokens_per_round": (toks - len(prompts)) / max(rounds, 1), "device": a.device, "dtype": a.dtype,
               "tree": a.tree, "draft_vocab": a.draft_vocab or None, "draft_quant": a.draft_quant,
               "plain_tokens_per_s": toks / t_plain, "eagle_tokens_per_s": toks / t_eagle}  # fmt: skip
    print(json.dumps(summary), flush=True)
    if a.out:
        Path(a.out).write_text("".join(json.dumps(x) + "\n" for x in [*lines, summary]))


if __name__ == "__main__":
    with torch.inference_mode():
        main()
