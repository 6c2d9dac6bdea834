"""Shape a static draft tree for one head: the N-1 paths most likely to be accepted, measured on data.

    python scripts/tune_tree.py --checkpoint checkpoints/SmolLM2-135M-Instruct --eagle heads/SmolLM2-135M-Instruct \
        --data tree_data.pt --out heads/SmolLM2-135M-Instruct/tree.json

A tree node is a path of child ranks (tree.py), and greedy verification accepts it iff, along the target's own
continuation, the target's token at every depth d has the path's rank d among the draft's candidates there. So for
every answer position of the data (make_eagle_data.py conversations, --greedy-frac 1.0: the tokens are the target's
greedy choices) the head is unrolled --depth steps along the data (train_eagle.head_unrolled, exactly the features
tree drafting feeds it) and the rank of the target's token is read at each step. P(path) = the share of positions
whose ranks begin with the path. tau of a tree = 1 + the sum of P over its nodes, and since a path is never more
likely than its parent, the N-1 most likely paths are the best tree of N tokens (closed under parents by
themselves). The script prints tau so predicted for EAGLE-1's default tree and for the tuned one, and writes the
tuned paths as JSON for `generate.py --tree FILE`. Its depth stays at most --depth, so a round drafts no more steps.
Never tune on the evaluation set: make_eagle_data.py keeps MT-bench out of its data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from train_eagle import UserError, head_unrolled, load_generated, shift, target_features  # noqa: E402

import tree as T  # noqa: E402
from draft import HeadError, apply_draft_vocab, load_head  # noqa: E402
from model import CheckpointError, load_model, rope_table  # noqa: E402


@torch.inference_mode()
def path_counts(model, head, data, depth: int, max_rank: int, limit: int) -> tuple[Counter, int]:
    """Counter {rank path: positions whose target ranks begin with it} and the number of positions counted."""
    counts: Counter = Counter()
    chains = 0
    rope = rope_table(model.args, int(data.lengths().max()) + depth)
    for i in tqdm(range(min(len(data), limit)), desc="conversations", unit="conv", file=sys.stderr):
        a, b = int(data.offsets[i]), int(data.offsets[i + 1])
        tokens, mask = data.tokens[a:b].long()[None], data.mask[a:b][None]  # [1, S]
        feats = target_features(model, tokens, rope, head.feature_layers)  # [1, S, F]
        preds = head_unrolled(head, shift(model.tok_embeddings(tokens), 1), feats, rope, depth)
        sel = shift(mask, 2)[0]  # chains that start at i: step j drafts t_{i+j+2}
        ranks = []
        for j, pred in enumerate(preds):  # rank of the target's token t_{i+j+2} among the draft's logits
            true = shift(tokens, j + 2)[0][sel]  # [M]
            valid = shift(mask, j + 2)[0][sel]
            logits = head.logits(model, pred[0][sel])  # [M, V'] (the draft vocabulary, if one is set)
            ids = true if head.vocab is None else torch.searchsorted(head.vocab, true).clamp(max=head.vocab.numel() - 1)
            inside = valid & (head.token_ids(ids) == true)
            own = logits.gather(1, ids[:, None])  # [M, 1]
            rank = (logits > own).sum(1)
            ranks.append(torch.where(inside, rank, max_rank))
        for row in torch.stack(ranks, 1).tolist():  # [M, depth]
            chains += 1
            for d in range(depth):
                if row[d] >= max_rank:
                    break
                counts[tuple(row[: d + 1])] += 1
    return counts, chains


def predicted_tau(paths: list[list[int]], counts: Counter, chains: int) -> float:
    return 1 + sum(counts[tuple(p)] for p in paths) / max(chains, 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="target checkpoint folder")
    p.add_argument("--eagle", required=True, help="head folder")
    p.add_argument("--data", required=True, help="make_eagle_data.py output (greedy answers: --greedy-frac 1.0)")
    p.add_argument("--out", default=None, help="write the tuned paths here (JSON for generate.py --tree)")
    p.add_argument("--nodes", type=int, default=26, help="tokens in the tree, root included (default 26, as EAGLE-1's)")
    p.add_argument("--depth", type=int, default=5, help="deepest path (default 5, as EAGLE-1's)")
    p.add_argument("--max-rank", type=int, default=10, help="children considered per node (default 10)")
    p.add_argument("--draft-vocab", type=int, default=None, help="as generate.py --draft-vocab (default as there)")
    p.add_argument("--conversations", type=int, default=10**9, help="use at most this many (default all)")
    p.add_argument("--compare", action="append", default=[], metavar="SPEC",
                   help="also predict tau for this static tree (a JSON file, 'chain:K'; repeatable), e.g. the tree a\n"
                        "head ships, to see what tuning again would gain")  # fmt: skip
    a = p.parse_args(argv)
    try:
        if a.nodes < 2 or a.depth < 1 or a.max_rank < 1:
            raise UserError("need --nodes >= 2, --depth >= 1 and --max-rank >= 1")
        model = load_model(a.checkpoint, dtype=torch.float32)
        head = load_head(a.eagle, model.args)
        vocab = apply_draft_vocab(head, a.eagle, a.draft_vocab, model)
        data = load_generated(a.data, model.args.vocab_size)
        compared = {spec: T.parse_tree_spec(spec) for spec in a.compare}
        for spec, paths in compared.items():
            if max(map(len, paths), default=0) > a.depth:
                raise UserError(f"--compare {spec}: deeper than --depth {a.depth}")
    except (UserError, CheckpointError, HeadError, T.TreeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    counts, chains = path_counts(model, head, data, a.depth, a.max_rank, a.conversations)
    ranked = sorted(counts, key=lambda path: (-counts[path], len(path), path))  # ties: shorter, then lower ranks
    if len(ranked) < a.nodes - 1:
        print(f"note: only {len(ranked)} paths were ever accepted in the data: the tree has {len(ranked) + 1} tokens",
              file=sys.stderr)  # fmt: skip
    tuned = sorted([list(path) for path in ranked[: a.nodes - 1]], key=lambda path: (len(path), path))
    T.build_tree(tuned)  # closed under parents (a parent counts at least as often as its children)
    default = T.parse_tree_spec("default")
    result = {"positions": chains, "draft_vocab": vocab, "depth": a.depth, "nodes": a.nodes,
              "tau_default_tree": predicted_tau(default, counts, chains),
              "tau_tuned_tree": predicted_tau(tuned, counts, chains),
              "tau_compared": {spec: predicted_tau(paths, counts, chains) for spec, paths in compared.items()},
              "tuned": tuned}  # fmt: skip
    if a.out:
        Path(a.out).write_text(json.dumps(tuned) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
