"""EAGLE training scripts: synthetic conversations, the training forward vs the cached head, a short training run."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_checkpoint

import draft as Dr
import model as M
import tree as T
from tokenizer import load_tokenizer

sys.path.insert(0, str(ROOT / "scripts"))
import make_eagle_data as D  # noqa: E402
import train_eagle as TE  # noqa: E402
import tune_tree as TT  # noqa: E402

EOT_PROB = 0.2  # the tiny random model almost never ends a turn by itself
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only add overhead (and stall badly on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class EotBoost(torch.nn.Module):
    """Wraps an LM head so that the end-of-turn token has probability EOT_PROB (at temperature 1) everywhere."""

    def __init__(self, head: torch.nn.Module, eot: int):
        super().__init__()
        self.head, self.eot = head, eot

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        is_eot = torch.arange(logits.size(-1)) == self.eot
        rest = logits.masked_fill(is_eot, float("-inf")).logsumexp(-1, keepdim=True)
        return torch.where(is_eot, rest + math.log(EOT_PROB / (1 - EOT_PROB)), logits)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eagle_train")
    make_checkpoint(folder, seed=3)
    return folder


def chatty_model(folder) -> M.Transformer:
    model = M.load_model(folder)
    model.output = EotBoost(model.output, D.cut_template(load_tokenizer(folder), model.args.vocab_size).eot)
    return model


def data_args(out, *extra) -> argparse.Namespace:
    a = D.parse_args(["--checkpoint", "x", "--out", str(out), "--num", "40", "--batch", "16", "--max-len", "128",
                      "--max-user-len", "12", "--exclude", "", "--device", "cpu", *extra])  # fmt: skip
    D.check_args(a)
    return a


@pytest.fixture(scope="module")
def dataset(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "eagle.pt"
    data = D.make_dataset(chatty_model(ckpt), load_tokenizer(ckpt), data_args(out), CPU)
    torch.save(data, out)
    return out, data


@torch.inference_mode()
def test_decode_step_equals_model_features(ckpt):
    model = M.load_model(ckpt)
    B, S, T = 2, 70, 200  # S > BUCKET: the context bucket changes along the way
    tokens = torch.randint(0, model.args.vocab_size, (B, S))
    model.setup_caches(B, T)
    ref = model.features(tokens, torch.arange(S))
    model.setup_caches(B, T)
    got = [D.decode_features(model, tokens[:, p], torch.tensor([p]), D.bucket(p, T)) for p in range(S)]
    # 1e-4: the fixture's large weights amplify float32 rounding (standard-init weights agree to 1e-6)
    torch.testing.assert_close(torch.stack(got, 1), ref, atol=1e-4, rtol=1e-4)


def test_records_follow_the_template(ckpt, dataset):
    _, data = dataset
    tok = load_tokenizer(ckpt)
    tpl = D.cut_template(tok, 320)
    assert tok.decode(tpl.prefix).endswith("<|im_start|>user\n")
    assert tok.decode(tpl.header) == "\n<|im_start|>assistant\n"
    assert tok.decode([tpl.eot]) == "<|im_end|>"
    P, Hn, offsets = len(tpl.prefix), len(tpl.header), data["offsets"].tolist()
    assert len(offsets) == 41 and data["meta"]["counts"]["kept"] == 40
    users = set()
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        ids, mask = data["tokens"][a:b].tolist(), data["loss_mask"][a:b].tolist()
        assert ids[:P] == tpl.prefix
        u_end = ids.index(tpl.eot, P)  # the user's end-of-turn token
        assert u_end > P, "empty user turn"
        assert ids[u_end + 1 : u_end + 1 + Hn] == tpl.header, "the assistant header is forced"
        start = u_end + 1 + Hn
        assert b - a > start + 1 and ids[-1] == tpl.eot and tpl.eot not in ids[start:-1]
        assert mask == [0] * start + [1] * (len(ids) - start), "loss mask = the answer and its end-of-turn token"
        assert not set(ids[P:u_end] + ids[start:]) & set(tpl.banned)
        users.add(D.normalize(tok.decode(ids[P:u_end])))
    assert len(users) == 40, "user texts are unique"
    c = data["meta"]["counts"]
    dropped = c["user_cut"] + c["answer_cut"] + c["empty_user"] + c["empty_answer"] + c["duplicate"] + c["excluded"]
    assert c["rows"] >= c["kept"] + dropped  # rows of the last batch past --num are not counted


def test_generation_is_deterministic_and_resumable(ckpt, dataset, tmp_path):
    out, data = dataset
    shards = sorted(p.name for p in out.with_name(out.name + ".shards").iterdir())
    assert shards[-1] == "settings.json" and len(shards) >= 2
    again = D.make_dataset(chatty_model(ckpt), load_tokenizer(ckpt), data_args(out), CPU)  # resume
    fresh = D.make_dataset(chatty_model(ckpt), load_tokenizer(ckpt), data_args(tmp_path / "b.pt"), CPU)
    for d in (again, fresh):
        assert torch.equal(d["tokens"], data["tokens"]) and torch.equal(d["loss_mask"], data["loss_mask"])
    with pytest.raises(D.UserError, match="other settings"):
        D.make_dataset(chatty_model(ckpt), load_tokenizer(ckpt), data_args(out, "--seed", "1"), CPU)

    # --exclude applies when the shards are assembled: a question equal to the first user turn removes it
    tok, P = load_tokenizer(ckpt), len(D.cut_template(load_tokenizer(ckpt), 320).prefix)
    first = data["tokens"][: data["offsets"][1]].tolist()
    user = tok.decode(first[P : first.index(2, P)])
    (tmp_path / "q.jsonl").write_text(json.dumps({"turns": [user.upper() + "  "]}) + "\n")
    d = D.make_dataset(chatty_model(ckpt), tok, data_args(out, "--exclude", str(tmp_path / "q.jsonl")), CPU)
    assert d["meta"]["counts"]["excluded"] == 1 and torch.equal(d["tokens"][: len(data["tokens"]) - len(first)],
                                                                 data["tokens"][len(first) :])  # fmt: skip


def test_filter_drops_duplicates_and_mt_bench_questions():
    questions = ["Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
                 "experiences and must-see attractions.", "Prove the Pythagorean theorem."]  # fmt: skip
    f = D.Filter(questions)
    texts = {
        "How do I bake bread?": True,
        "how do  I bake BREAD?": False,  # duplicate after normalisation
        "prove the  pythagorean theorem.": False,  # equals a question
        "Please prove the Pythagorean theorem. Thanks!": False,  # contains one
        "Write an engaging travel blog post about a recent trip to Hawaii, with tips.": False,  # shares an 8-gram
        "Write a travel blog post about Hawaii.": True,  # some overlap, no 8-gram
    }
    assert [f.keep(t) for t in texts] == list(texts.values())
    assert f.counts == {"duplicate": 1, "excluded": 3}
    assert D.read_questions(str(ROOT / "data" / "mt_bench" / "question.jsonl"))[0].startswith("Compose an engaging")


@torch.no_grad()
@pytest.mark.parametrize("steps,fused", [(1, False), (3, False), (3, True)])
def test_training_forward_equals_cached_head(ckpt, steps, fused):
    """Step 0 equals EagleHead's cached causal forward; unrolled step j at index i equals drafting a chain from i.
    A fused head's step 0 reads its fusion of the target's features; later steps its own predicted features."""
    target = M.load_model(ckpt)
    torch.manual_seed(0)
    head = TE.new_head(target, "random", (0, 1) if fused else None).eval()
    if fused:
        torch.nn.init.normal_(head.fuse.weight, std=0.1)  # not just [I, 0, 0]
    S = 12
    tokens = torch.randint(0, target.args.vocab_size, (1, S + steps))
    tapped = torch.randn(1, S, head.feature_dim)
    feats = head.target_feature(tapped)  # [1, S, D]
    emb = target.tok_embeddings(tokens[:, 1:])  # t_{i+1} at index i
    rope = M.rope_table(head.args, S + steps)
    outs = TE.head_unrolled(head, emb[:, :S], tapped, rope, steps)
    head.setup_cache(S + steps, 0)
    slots = torch.arange(S + steps)
    for i in range(S - steps + 1):
        pos = torch.arange(i + 1)  # committed pairs (f_m, t_{m+1}), m <= i
        y = head(emb[:, : i + 1], feats[:, : i + 1], pos, pos, (slots[None] <= pos[:, None])[None, None])[:, -1:]
        torch.testing.assert_close(outs[0][:, i], y[:, 0], atol=1e-5, rtol=1e-5)
        for j in range(1, steps):  # the chain: (own previous output, t_{i+j+1}) at position/slot i + j
            p = torch.tensor([i + j])
            y = head(emb[:, i + j : i + j + 1], y, p, p, (slots <= i + j)[None, None, None])
            torch.testing.assert_close(outs[j][:, i], y[:, 0], atol=1e-5, rtol=1e-5)


def loss_inputs(target, data_file, rows):
    """A random head (seed 0) and the batch of conversations `rows`: (head, tokens, mask, feats, rope)."""
    torch.manual_seed(0)
    head = TE.new_head(target, "random")
    data = TE.load_generated(str(data_file), target.args.vocab_size)
    tokens, mask = TE.collate(data, rows, 128, "cpu")
    rope = M.rope_table(head.args, 160)
    return head, tokens, mask, TE.target_features(target, tokens, rope), rope


@torch.no_grad()
def test_loss_weights_scale_the_feature_and_cross_entropy_terms(ckpt, dataset):
    """--feature-weight / --ce-weight: the loss is linear in the two weights, and both terms count."""
    data_file, _ = dataset
    target = M.load_model(ckpt)
    head, tokens, mask, feats, rope = loss_inputs(target, data_file, [0, 1])

    def loss(w):
        return TE.batch_loss(target, head, tokens, mask, feats, rope, 3, 0.0, None, w)[0]

    feature, ce = loss((1.0, 0.0)), loss((0.0, 1.0))
    assert feature > 0 and ce > 0
    torch.testing.assert_close(loss((1.0, 0.1)), feature + 0.1 * ce)
    torch.testing.assert_close(
        TE.batch_loss(target, head, tokens, mask, feats, rope, 3, 0.0, None)[0], feature + 0.1 * ce
    )


def reference_loss(target, head, tokens, mask, feats, rope, steps, weights, vocab=None):
    """batch_loss written naively: every step computes its teacher from the shifted features, as EAGLE does."""
    D = head.args.dim
    emb = TE.shift(target.tok_embeddings(tokens), 1)
    preds = TE.head_unrolled(head, emb, feats, rope, steps)
    sel = TE.shift(mask, 2)
    w = target.output.weight if vocab is None else target.output.weight[vocab]
    total, correct, ok = 0.0, [], torch.ones(int(sel.sum()), dtype=torch.bool)
    for j, pred in enumerate(preds):
        valid = TE.shift(mask, j + 2)[sel]
        p, f = pred[sel], TE.shift(feats[..., :D], j + 1)[sel]
        t_logits = target.output(f)
        q = torch.log_softmax(p @ w.T, -1)
        t = t_logits.softmax(-1) if vocab is None else t_logits.softmax(-1)[:, vocab]
        ce = -(t * q).sum(-1)
        reg = torch.nn.functional.smooth_l1_loss(p, f, reduction="none").mean(-1)
        total = total + TE.STEP_DECAY**j * ((weights[0] * reg + weights[1] * ce) * valid).sum() / valid.sum()
        pick = q.argmax(-1) if vocab is None else vocab[q.argmax(-1)]
        hit = (pick == t_logits.argmax(-1)) & valid
        ok &= hit
        correct.append(int(hit.sum()))
    return total, correct, int(ok.sum())


@pytest.mark.parametrize("vocab", ["all", "sub", "sorted-all"])
def test_batch_loss_equals_the_naive_loss_with_and_without_a_draft_vocabulary(ckpt, dataset, vocab):
    """The teacher table computed once per batch (and --draft-vocab's restricted logits) give the loss, gradients and
    accuracy counts of the naive per-step computation."""
    data_file, _ = dataset
    target = M.load_model(ckpt).requires_grad_(False)
    head, tokens, mask, feats, rope = loss_inputs(target, data_file, [0, 1, 2])
    V = target.args.vocab_size
    ids = {"all": None, "sub": torch.randperm(V)[: V // 3].sort().values, "sorted-all": torch.arange(V)}[vocab]
    loss, stats = TE.batch_loss(target, head, tokens, mask, feats, rope, 3, 0.0, None, (0.3, 1.0), ids)
    grads = torch.autograd.grad(loss, list(head.parameters()))
    ref, correct, accepted = reference_loss(target, head, tokens, mask, feats, rope, 3, (0.3, 1.0), ids)
    ref_grads = torch.autograd.grad(ref, list(head.parameters()))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert stats["correct"] == correct and stats["accepted"] == accepted
    assert stats["n"][0] == int(TE.shift(mask, 2).sum())


def test_draft_vocabulary_loss_on_an_int8_target(ckpt, dataset, tmp_path, capsys):
    """--draft-vocab with a quantize.py checkpoint: the draft's logits use the dequantized LM-head rows."""
    import shutil

    import quantize as Q

    data_file, _ = dataset
    shutil.copytree(ckpt, tmp_path / "ck")
    Q.main(["--checkpoint", str(tmp_path / "ck"), "--mode", "int8", "--device", "cpu"])
    capsys.readouterr()
    target = M.load_model(tmp_path / "ck" / "model_int8.pth").requires_grad_(False)
    assert hasattr(target.output, "dequantize")
    head, tokens, mask, feats, rope = loss_inputs(target, data_file, [0, 1])
    ids = torch.randperm(target.args.vocab_size)[:100].sort().values
    loss, stats = TE.batch_loss(target, head, tokens, mask, feats, rope, 2, 0.0, None, (0.3, 1.0), ids)
    dense = torch.nn.Linear(target.args.dim, target.args.vocab_size, bias=False)
    dense.weight.data = target.output.dequantize(torch.float32)
    target.output = dense
    ref, correct, _ = reference_loss(target, head, tokens, mask, feats, rope, 2, (0.3, 1.0), ids)
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    assert stats["correct"] == correct


def test_training_over_a_draft_vocabulary_keeps_the_vocabulary_and_tree_files(ckpt, dataset, tmp_path, capsys):
    """--draft-vocab N trains over the --init head's N most frequent ids; the trained head keeps that file, and the
    static tree file the init's config names (--tree head), named in its own config too."""
    from safetensors.torch import save_file

    data_file, _ = dataset
    target = M.load_model(ckpt)
    torch.manual_seed(2)
    init = tmp_path / "init"
    Dr.save_head(TE.new_head(target, "random"), init, extra={"tree": "t.json"})
    (init / "t.json").write_text("[[0], [1], [0, 0]]")
    V = target.args.vocab_size
    save_file({"ids": torch.randperm(V), "counts": torch.arange(V, 0, -1)}, str(init / Dr.VOCAB_FILE))
    common = ["--checkpoint", str(ckpt), "--data", str(data_file), "--epochs", "1", "--lr", "1e-3", "--warmup", "2",
              "--batch-tokens", "256", "--ttt-steps", "1", "--holdout", "0.2", "--eval-steps", "2",
              "--device", "cpu"]  # fmt: skip
    record = TE.main([*common, "--init", str(init), "--draft-vocab", "64", "--out", str(tmp_path / "out")])
    assert record["draft_vocab"] == 64 and record["history"][-1]["heldout"]["loss"] > 0
    assert (tmp_path / "out" / Dr.VOCAB_FILE).read_bytes() == (init / Dr.VOCAB_FILE).read_bytes()
    assert Dr.head_tree("head", tmp_path / "out") == str(tmp_path / "out" / "t.json")
    assert (tmp_path / "out" / "t.json").read_text() == "[[0], [1], [0, 0]]"
    capsys.readouterr()
    for extra, msg in [(["--draft-vocab", "64"], "give --init HEAD_DIR"),
                       (["--init", str(init), "--draft-vocab", "8"], "pick 16 .."),
                       (["--draft-vocab", "-1"], "must be >= 0")]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            TE.main([*common, *extra, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and msg in err[0], err


@torch.no_grad()
def test_fusing_layers_into_a_trained_head_starts_unchanged(ckpt, tmp_path, capsys):
    """--feature-layers on an --init head without fusion: fuse = [I, 0, ...], so the head drafts as before; the
    training features equal the cached model's (model.hidden with the same taps)."""
    target = M.load_model(ckpt)
    torch.manual_seed(1)
    head = TE.new_head(target, "random")
    Dr.save_head(head, tmp_path / "plain")
    fused = TE.new_head(target, str(tmp_path / "plain"), (0, 1))
    assert fused.feature_layers == (0, 1) and fused.feature_dim == 3 * target.args.dim
    S = 10
    tokens = torch.randint(0, target.args.vocab_size, (1, S))
    rope = M.rope_table(head.args, S + 3)
    tapped = TE.target_features(target, tokens, rope, (0, 1))  # [1, S, 3D]
    target.setup_caches(1, 16)
    torch.testing.assert_close(tapped, target.hidden(tokens, torch.arange(S), taps=(0, 1))[1], atol=1e-3, rtol=1e-3)
    emb = TE.shift(target.tok_embeddings(tokens), 1)
    for a, b in zip(TE.head_unrolled(head, emb, tapped[..., : target.args.dim], rope, 3),
                    TE.head_unrolled(fused, emb, tapped, rope, 3), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
    with pytest.raises(TE.UserError, match="already fuses"):
        Dr.save_head(fused, tmp_path / "fused")
        TE.new_head(target, str(tmp_path / "fused"), (1,))
    with pytest.raises(TE.UserError, match="has 2 layers"):
        TE.new_head(target, str(tmp_path / "plain"), (0, 5))


def test_sharegpt_conversations_mask_assistant_turns(ckpt, tmp_path):
    tok = load_tokenizer(ckpt)
    path = tmp_path / "sharegpt.jsonl"
    rows = [{"conversations": [{"from": "human", "value": "Hello, who are you?"},
                               {"from": "gpt", "value": "I am a helpful assistant."},
                               {"from": "human", "value": "The quick brown fox?"},
                               {"from": "gpt", "value": "Jumps over the lazy dog."}]},
            {"conversations": [{"from": "robot", "value": "?"}]}]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows))
    c = TE.load_sharegpt(str(path), tok, 320, 2048)
    assert len(c) == 1
    ids, mask = c.tokens.tolist(), c.mask.tolist()
    assert tok.decode(ids) == tok.render_chat([{"role": "user" if i % 2 == 0 else "assistant", "content": t["value"]}
                                               for i, t in enumerate(rows[0]["conversations"])], False)  # fmt: skip
    masked = tok.decode([t if m else tok.token_id("<|endoftext|>") for t, m in zip(ids, mask, strict=True)])
    assert [s for s in masked.split("<|endoftext|>") if s] == ["I am a helpful assistant.<|im_end|>",
                                                                "Jumps over the lazy dog.<|im_end|>"]  # fmt: skip


def test_short_training_run_lowers_loss_and_saves_a_loadable_head(ckpt, dataset, tmp_path, capsys):
    data_file, _ = dataset
    out = tmp_path / "head"
    record = TE.main(["--checkpoint", str(ckpt), "--data", str(data_file), "--out", str(out), "--epochs", "3",
                      "--lr", "3e-3", "--warmup", "2", "--batch-tokens", "256", "--ttt-steps", "1", "--holdout", "0.2",
                      "--eval-steps", "3", "--device", "cpu"])  # fmt: skip
    hist = record["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert hist[-1]["heldout"]["loss"] < 0.9 * hist[0]["heldout"]["loss"]
    assert hist[-1]["train_loss"] < hist[1]["train_loss"]
    assert 1 <= hist[-1]["heldout"]["tau_chain3"] <= 4 and len(hist[-1]["heldout"]["acc"]) == 3
    head = Dr.load_head(out, M.load_model(ckpt).args)
    assert json.loads((out / "config.json").read_text())["training"]["epochs_done"] == 3
    assert head.args.n_layers == 1 and not head.fc.weight.requires_grad
    more = TE.main(["--checkpoint", str(ckpt), "--data", str(data_file), "--out", str(tmp_path / "more"), "--epochs",
                    "1", "--lr", "1e-3", "--warmup", "2", "--batch-tokens", "256", "--ttt-steps", "1", "--holdout",
                    "0.2", "--eval-steps", "3", "--device", "cpu", "--init", str(out)])  # fmt: skip
    assert more["history"][0]["heldout"]["loss"] == pytest.approx(hist[-1]["heldout"]["loss"], rel=1e-4)  # resumed


def test_data_parallel_training_on_two_processes(ckpt, dataset, tmp_path):
    """torchrun with 2 processes (gloo on the CPU): each takes every other batch, gradients are averaged, both stop on
    the same step of --max-minutes, and their weights stay identical (train_eagle checks it every epoch)."""
    data_file, _ = dataset
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "train_eagle.py"), "--checkpoint", str(ckpt), "--data", str(data_file), "--lr",
           "3e-3", "--warmup", "2", "--batch-tokens", "256", "--ttt-steps", "1", "--holdout", "0.2", "--eval-steps",
           "3", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*run, "--epochs", "2", "--out", str(tmp_path / "h2")], capture_output=True, text=True, env=env,
                       timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "h2" / "config.json").read_text())["training"]
    hist = record["history"]
    assert record["processes"] == 2 and record["epochs_done"] == 2 and hist[2]["batches"] == hist[1]["batches"] > 0
    assert hist[-1]["heldout"]["loss"] < hist[0]["heldout"]["loss"]
    assert r.stdout.count('"out"') == 1  # process 0 alone reports
    data = TE.load_generated(str(data_file), M.load_model(ckpt).args.vocab_size)
    train_ids = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()[
        record["heldout_conversations"] :
    ]
    one = len(TE.make_batches(data, train_ids, 256, 256, torch.Generator().manual_seed(0)))  # one process's epoch
    assert abs(hist[1]["batches"] - one // 2) <= 1  # each process takes half
    r = subprocess.run([*run, "--epochs", "3", "--max-minutes", "1e-6", "--out", str(tmp_path / "h3")],
                       capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "h3" / "config.json").read_text())["training"]
    assert record["epochs_done"] == 1 and record["history"][1]["stopped_early"] and record["history"][1]["batches"] == 0


def test_cli_errors(ckpt, tmp_path, capsys):
    def error(main, *args) -> str:
        with pytest.raises(SystemExit) as e:
            main(list(args))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
        return err[0]

    assert "give training data" in error(TE.main, "--checkpoint", str(ckpt), "--out", str(tmp_path / "h"))
    assert "data file not found" in error(TE.main, "--checkpoint", str(ckpt), "--data", "nope.pt", "--out", "h")
    assert "checkpoint not found" in error(D.main, "--checkpoint", str(tmp_path / "none"), "--out", "d.pt")
    assert "--max-len" in error(D.main, "--checkpoint", str(ckpt), "--out", "d.pt", "--max-len", "40")
    assert "not both 0" in error(TE.main, "--checkpoint", str(ckpt), "--data", "x.pt", "--out", "h", "--feature-weight",
                                 "0", "--ce-weight", "0")  # fmt: skip
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_eagle.py"), "--checkpoint", str(ckpt), "--out",
                        str(tmp_path / "h")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error: give training data")


def test_init_from_a_missing_head_is_a_one_line_error(ckpt, dataset, tmp_path, capsys):
    data_file, _ = dataset
    with pytest.raises(SystemExit) as e:
        TE.main(["--checkpoint", str(ckpt), "--data", str(data_file), "--out", str(tmp_path / "h"), "--device", "cpu",
                 "--max-len", "256", "--init", str(tmp_path / "nohead")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --init: no EAGLE head"), err


def test_tune_tree_keeps_the_most_accepted_paths(ckpt, dataset, tmp_path, capsys):
    """scripts/tune_tree.py: a tree of the requested size and depth, closed under parents, predicted to accept at
    least as much as EAGLE-1's default tree on the same data; its predicted tau is 1 + the accepted share summed over
    its paths (depth-1 ranks over the whole vocabulary cover every position: P = 1 in all)."""
    data_file, _ = dataset
    args = M.load_model(ckpt).args
    torch.manual_seed(0)
    Dr.save_head(Dr.EagleHead(M.ModelArgs(**{**args.to_dict(), "n_layers": 1})), tmp_path / "head")
    out = tmp_path / "tree.json"
    common = ["--checkpoint", str(ckpt), "--eagle", str(tmp_path / "head"), "--data", str(data_file)]
    TT.main([*common, "--out", str(out), "--nodes", "12", "--depth", "5", "--max-rank", str(args.vocab_size)])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tree = T.build_tree(json.loads(out.read_text()))  # raises unless every path's parent is in the tree
    assert tree.N == 12 and tree.D <= 5 and r["positions"] > 100
    assert r["tau_tuned_tree"] >= r["tau_default_tree"] > 1
    TT.main([*common, "--nodes", "12", "--depth", "5", "--max-rank", str(args.vocab_size), "--compare", str(out),
             "--compare", "chain:2"])  # fmt: skip
    r2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # --compare: the tuned tree predicts as tuned
    assert r2["tau_compared"][str(out)] == pytest.approx(r2["tau_tuned_tree"]) and r2["tau_compared"]["chain:2"] >= 1
    with pytest.raises(SystemExit):
        TT.main([*common, "--depth", "1", "--compare", "chain:2"])  # deeper than --depth: one-line error
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --compare chain:2")
    TT.main([*common, "--nodes", str(args.vocab_size + 1), "--depth", "1", "--max-rank", str(args.vocab_size)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tau_tuned_tree"] == pytest.approx(2.0)
    with pytest.raises(SystemExit) as e:
        TT.main([*common[:4], "--data", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: data file not found"), err
