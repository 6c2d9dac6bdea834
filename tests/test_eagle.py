"""EAGLE: tree attention, greedy and sampling losslessness, oracle acceptance, head format, compile, CLI errors."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_checkpoint

import draft as Dr
import generate as G
import model as M
import quantize as Q
import tree as T

PROMPT = [1, 17, 42, 99, 5, 250, 8]


def random_tree(rng: random.Random, n_nodes: int, max_rank: int = 3, max_depth: int = 4) -> list[list[int]]:
    paths: set[tuple] = set()
    while len(paths) < n_nodes:
        parent = rng.choice([()] + [p for p in paths if len(p) < max_depth])
        paths.add(parent + (rng.randrange(max_rank),))
    return [list(p) for p in paths]


def load(folder, **kw) -> M.Transformer:
    return M.load_model(folder, dtype=torch.float32, **kw)


def random_head(args: M.ModelArgs, seed: int = 0, feature_layers: tuple[int, ...] = ()) -> Dr.EagleHead:
    """A random head; feature_layers: with feature fusion (random fuse weights, tap norms not all ones)."""
    torch.manual_seed(seed)
    head = Dr.EagleHead(M.ModelArgs(**{**args.to_dict(), "n_layers": 1}), feature_layers=feature_layers).eval()
    for n in getattr(head, "tap_norms", []):
        n.weight.data.uniform_(0.5, 1.5)
    return head


FUSED = (0, 1)  # a fused head's feature_layers on the tiny checkpoint: the embeddings and layer 1's input


@torch.inference_mode()
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_logits_equal_path_logits(tiny_ckpt, seed):
    rng = random.Random(seed)
    tree = T.build_tree(random_tree(rng, 12))
    model = load(tiny_ckpt)
    model.setup_caches(1, 64)
    L = len(PROMPT)
    model(torch.tensor([PROMPT]), torch.arange(L))
    node_tokens = torch.randint(0, model.args.vocab_size, (tree.N,))
    Lt = torch.tensor([L])
    mask = T.target_tree_mask(tree.ancestors, Lt, model.max_seq_length)
    tree_logits = model(node_tokens[None], Lt + tree.depth, Lt + torch.arange(tree.N), mask)[0]  # [N, V]
    for n in range(tree.N):
        path = [int(tree.path_nodes[n, j]) for j in range(int(tree.depth[n]) + 1)]
        ref = load(tiny_ckpt)
        ref.setup_caches(1, 64)
        seq = torch.tensor([PROMPT + node_tokens[path].tolist()])
        ref_logits = ref(seq, torch.arange(seq.size(1)))[0, -1]
        torch.testing.assert_close(tree_logits[n], ref_logits, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize(
    "spec",
    ["default", [[0], [1], [1, 0], [1, 1], [1, 0, 0], [1, 0, 1], [1, 0, 0, 0]], "eagle2:K=3,D=4,N=12", "default+fused"],
)
def test_drafted_tree_equals_drafting_each_path_alone(tiny_ckpt, spec):
    """Each drafted token is what the head drafts along its node's path run alone, causally and uncached: the
    committed pairs (f_i, t_{i+1}), the root pair, then (the head's own feature at the parent, the node's token) per
    depth; a static tree's node of rank r is the parent's r-th most likely token, an EAGLE-2 node one of its K most
    likely. Losslessness cannot catch a wrong draft mask, position or slot (they only lower tau); this does. A fused
    head's committed features f_i are its fusion of the target's tapped features."""
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    fused = isinstance(spec, str) and spec.endswith("+fused")
    spec = spec.removesuffix("+fused") if fused else spec
    model, head = load(tiny_ckpt), random_head(args, 4, FUSED if fused else ())
    for w in (head.layer.attention.wqkv.weight, head.layer.attention.wo.weight):
        w.mul_(4)  # attention (masks, slots, positions) decides which tokens are drafted, not the residual path alone
    tree = T.build_tree(spec) if isinstance(spec, list) else T.parse_dynamic_spec(spec) or T.build_tree(T.EAGLE1_TREE)
    gen = G.EagleGenerator(model, head, tree, G.Sampling(), 64)
    gen._start(torch.tensor([PROMPT]))
    st = gen.state
    inputs = (st.L, st.tokens, st.feats, st.n)
    if isinstance(tree, T.DynamicTree):
        drafted, parent, depth, _, path_nodes = Dr.draft_dynamic_tree(head, model, tree, *inputs)
    else:
        drafted = Dr.draft_tree(head, model, gen.tree, *inputs)  # [N]
        parent, depth, path_nodes = tree.parent, tree.depth, tree.path_nodes
    P = len(PROMPT)
    _, tapped = model.hidden(torch.tensor([PROMPT]), torch.arange(P), taps=head.feature_layers)  # [1, P, F]
    f = head.target_feature(tapped[0])  # the features the head reads: [P, D]
    root = int(st.tokens[0])
    assert int(drafted[0]) == root

    def head_feature(tokens: list[int], own: list[torch.Tensor]) -> torch.Tensor:
        """The head's last predicted feature over the pairs (f_i, t_{i+1}) i < P, then (own[j], tokens[j])."""
        toks = torch.tensor([PROMPT[1:] + [root] + tokens])
        feats = torch.cat([f, *[o[None] for o in own]])[None]
        pos = torch.arange(toks.size(1))
        head.setup_cache(toks.size(1), 0)
        mask = (pos[None] <= pos[:, None])[None, None]
        return head(model.tok_embeddings(toks), feats, pos, pos, mask)[0, -1]

    feature = {0: head_feature([], [])}  # node -> the head's feature at it (parents come before their children)
    for n in range(1, tree.N):
        path = [int(path_nodes[n, j]) for j in range(1, int(depth[n]) + 1)]  # its nodes below the root
        children = torch.topk(head.logits(model, feature[int(parent[n])]), tree.K).indices.tolist()
        if isinstance(tree, T.DynamicTree):
            assert int(drafted[n]) in children, n
        else:
            assert int(drafted[n]) == children[tree.paths[n - 1][-1]], n
        feature[n] = head_feature([int(drafted[m]) for m in path], [feature[int(parent[m])] for m in path])


def plain_greedy(folder, prompt, max_new, stop_ids=frozenset(), ignore_eos=True) -> list[int]:
    gen = G.Generator(load(folder), G.Sampling(), 256)
    return gen.generate(prompt, max_new, set(stop_ids), ignore_eos).output_ids


def eagle(folder, head, spec, prompt, max_new, stop_ids=frozenset(), ignore_eos=True, sampling=None):
    tree = T.make_tree(spec)
    gen = G.EagleGenerator(load(folder), head, tree, sampling or G.Sampling(), 200)
    return gen.generate(prompt, max_new, set(stop_ids), ignore_eos)


@torch.inference_mode()
@pytest.mark.parametrize(
    "spec",
    ["default", "chain:1", "chain:4", "random", "eagle2:K=4,D=4,N=12", "eagle2:K=2,D=1,N=3", "default+fused",
     "eagle2:K=4,D=4,N=12+fused"],
)  # fmt: skip
def test_eagle_greedy_equals_plain_greedy(tiny_ckpt, spec, tmp_path):
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    layers = FUSED if spec.endswith("+fused") else ()
    spec = spec.removesuffix("+fused")
    if spec == "random":
        spec = str(tmp_path / "tree.json")
        Path(spec).write_text(str(random_tree(random.Random(3), 10)))
    for i, (prompt, max_new) in enumerate([(PROMPT, 30), ([7], 9), (PROMPT[:3] * 5, 17)]):
        ref = plain_greedy(tiny_ckpt, prompt, max_new)
        got = eagle(tiny_ckpt, random_head(args, i, layers), spec, prompt, max_new)
        assert got.output_ids == ref, spec
        assert got.stats["rounds"] >= 1


@torch.inference_mode()
def test_eagle_stops_like_plain_decoding(tiny_ckpt):
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    ref = plain_greedy(tiny_ckpt, PROMPT, 40)
    stop = {ref[12]}  # a token plain decoding emits: both must stop right after its first occurrence
    expect = plain_greedy(tiny_ckpt, PROMPT, 40, stop, ignore_eos=False)
    assert expect[-1] in stop and len(expect) <= 13
    got = eagle(tiny_ckpt, random_head(args), "default", PROMPT, 40, stop, ignore_eos=False)
    assert got.output_ids == expect
    assert eagle(tiny_ckpt, random_head(args), "default", PROMPT, 40, stop, ignore_eos=True).output_ids == ref


def make_oracle(folder: Path) -> tuple[Path, Dr.EagleHead]:
    """A target whose next token depends only on the current one, and a head that reproduces it exactly.

    Target: every layer's wo and w2 are zero, so the post-norm feature of token t is rmsnorm(embed(t)) (norm weight
    1). Head: fc passes the embedding through, its layer adds nothing, so the predicted feature is embed(t), a
    positive multiple of the target's: the draft's argmax is the target's argmax.
    """
    args = make_checkpoint(folder, seed=5)
    sd = torch.load(folder / "model.pth")
    for k in sd:
        if k.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            sd[k].zero_()
    sd["norm.weight"].fill_(1.0)
    M.save_checkpoint(folder, args, sd)
    head = random_head(args)
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, : args.dim] = torch.eye(args.dim)
        head.fc.bias.zero_()
        head.layer.attention.wo.weight.zero_()
        head.layer.feed_forward.w2.weight.zero_()
    return folder, head


@torch.inference_mode()
@pytest.mark.parametrize("spec", ["default", "chain:3"])
def test_oracle_head_accepts_full_depth(tmp_path, spec):
    folder, head = make_oracle(tmp_path)
    tree = T.build_tree(T.parse_tree_spec(spec))
    got = eagle(folder, head, spec, PROMPT, 40)
    assert got.output_ids == plain_greedy(folder, PROMPT, 40)
    assert got.stats["accept_len_mean"] == tree.D + 1
    assert got.stats["accept_hist"][-1] == got.stats["rounds"]


# ---------------------------------------------------------------------------------------------------------------
# Sampling: the joint distribution of the first tokens EAGLE emits after the prompt equals the target's.


def exact_joint(model: M.Transformer, prompt: list[int], s: G.Sampling, n: int) -> dict[tuple, float]:
    """P(next n tokens) under the target's processed distribution, by enumeration (tiny vocab)."""
    out: dict[tuple, float] = {}

    def walk(prefix: tuple, p: float):
        if len(prefix) == n:
            out[prefix] = p
            return
        model.setup_caches(1, 64)
        seq = torch.tensor([prompt + list(prefix)])
        probs = G.logits_to_probs(model(seq, torch.arange(seq.size(1)))[0, -1], s)
        for t in range(probs.numel()):
            if probs[t] > 0:
                walk(prefix + (t,), p * float(probs[t]))

    walk((), 1.0)
    return out


def eagle_draws(model, head, tree, context: list[int], s, n_draws, wrong=False) -> list[list[int]]:
    """Run one EAGLE round after `context` (its last token is the root) n_draws times: the tokens each emits.

    The draft tree and the target's tree logits are deterministic, so they are computed once; the draws come from
    G.sample + T.verify, the functions the generator uses. wrong=True replaces verification by a classic mistake:
    each child is accepted with the target's probability of its token, and on rejection the bonus is drawn from the
    target's distribution instead of the residual.
    """
    gen = G.EagleGenerator(model, head, tree, s, 64)
    gen._start(torch.tensor([context[:-1]]))
    st = gen.state
    st.tokens[0] = context[-1]
    G.eagle_draft(head, model, tree, st)  # the tree's tokens and (EAGLE-2) shape, in st
    mask = T.target_tree_mask(st.ancestors, st.L, model.max_seq_length)
    logits = model(st.node_tokens[None], st.L + st.depth, st.L + torch.arange(tree.N), mask)[0]  # [N, V]
    node_tokens = st.node_tokens
    if wrong:
        probs = G.logits_to_probs(logits, s)
        return [wrong_round(node_tokens, probs, st) for _ in range(n_draws)]
    choice = G.sample(logits.expand(n_draws, -1, -1), s)  # independent draws: [n_draws, N]
    best, acc = T.verify(node_tokens, choice, st)
    draws = []
    for i in range(n_draws):
        path = st.path_nodes[best[i, 0], 1 : acc[i, 0] + 1]
        draws.append(node_tokens[path].tolist() + [int(choice[i, best[i, 0]])])
    return draws


def wrong_round(node_tokens, probs, st) -> list[int]:
    out, node = [], 0
    while True:
        children = [c for c in range(1, st.parent.numel()) if st.parent[c] == node]
        for c in children:
            if random.random() < probs[node, node_tokens[c]]:
                out.append(int(node_tokens[c]))
                node = c
                break
        else:
            return out + [int(torch.multinomial(probs[node], 1))]


def sampled_joint(model, head, tree, prompt, s, n_tokens, n_draws, wrong=False) -> dict[tuple, float]:
    """Distribution of the first n_tokens EAGLE emits after prompt (root = prompt's last token), by recursion over
    rounds: a round that emits fewer tokens is continued by further rounds from the context it reached."""
    counts: dict[tuple, float] = {}

    def go(emitted: tuple, weight: float, draws: int):
        for d in eagle_draws(model, head, tree, prompt + list(emitted), s, draws, wrong):
            seq = emitted + tuple(d)
            if len(seq) >= n_tokens:
                counts[seq[:n_tokens]] = counts.get(seq[:n_tokens], 0.0) + weight / draws
            else:
                pending.setdefault(seq, 0.0)
                pending[seq] += weight / draws

    pending: dict[tuple, float] = {}
    go((), 1.0, n_draws)
    while pending:
        seq, w = pending.popitem()
        go(seq, w, max(200, int(n_draws * w)))
    return counts


@torch.inference_mode()
@pytest.mark.parametrize(
    "sampling, dynamic",
    [(G.Sampling(1.0), False), (G.Sampling(0.8, top_k=4, top_p=0.9), False), (G.Sampling(1.0), True)],
)
def test_eagle_sampling_keeps_target_distribution(tmp_path, sampling, dynamic):
    args = make_checkpoint(tmp_path, seed=2, vocab_size=6)
    model = load(tmp_path)
    head = random_head(args, 1)  # with 6 tokens a random head's drafts still match often: multi-token acceptance
    tree = T.DynamicTree(K=2, D=3, N=5) if dynamic else T.build_tree([[0], [1], [0, 0], [0, 1], [1, 0]])
    prompt = [1, 2, 3]
    exact = exact_joint(model, prompt, sampling, 3)
    torch.manual_seed(0)
    random.seed(0)
    got = sampled_joint(model, head, tree, prompt, sampling, 3, 20000)
    tv = 0.5 * sum(abs(exact.get(k, 0.0) - got.get(k, 0.0)) for k in set(exact) | set(got))
    assert tv < 0.03, tv
    wrong = sampled_joint(model, head, tree, prompt, sampling, 3, 20000, wrong=True)
    tv_wrong = 0.5 * sum(abs(exact.get(k, 0.0) - wrong.get(k, 0.0)) for k in set(exact) | set(wrong))
    assert tv_wrong > 0.06, f"the wrong verifier should be detected (tv {tv_wrong:.3f})"


# ---------------------------------------------------------------------------------------------------------------
# Format, compile, errors.


def test_head_save_load_roundtrip(tmp_path, tiny_ckpt):
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    head = random_head(args)
    Dr.save_head(head, tmp_path / "head")
    back = Dr.load_head(tmp_path / "head", args)
    for k, v in head.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    with pytest.raises(Dr.HeadError, match="does not fit"):
        Dr.load_head(tmp_path / "head", M.ModelArgs(**{**args.to_dict(), "vocab_size": 999}))
    fused = random_head(args, 1, FUSED)
    Dr.save_head(fused, tmp_path / "fused")
    back = Dr.load_head(tmp_path / "fused", args)
    assert back.feature_layers == FUSED and back.feature_dim == 3 * args.dim
    for k, v in fused.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    with pytest.raises(Dr.HeadError, match="reads the target's layers"):  # a head made for a deeper target
        Dr.load_head(tmp_path / "fused", M.ModelArgs(**{**args.to_dict(), "n_layers": 1}))


@torch.inference_mode()
@pytest.mark.parametrize("spec", ["default", "eagle2:K=3,D=3,N=10", "default+vocab", "default+fused"])
def test_eagle_compiles_without_recompiles(tiny_ckpt, spec):
    import torch._dynamo

    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    torch._dynamo.reset()
    head, model = random_head(args, 0, FUSED if spec.endswith("+fused") else ()), load(tiny_ckpt)
    spec = spec.removesuffix("+fused")
    if spec.endswith("+vocab"):  # a draft vocabulary: the draft's LM head over its rows only
        spec = spec.removesuffix("+vocab")
        head.restrict_vocab(torch.arange(0, args.vocab_size, 3), model)
    tree = T.make_tree(spec)
    gen = G.EagleGenerator(model, head, tree, G.Sampling(), 100, True, compile_prefill=True)
    ref = plain_greedy(tiny_ckpt, PROMPT, 20)
    assert gen.generate(PROMPT, 20, set(), True).output_ids == ref
    with torch._dynamo.config.patch(error_on_recompile=True):  # new prompt lengths: target + head prefill too
        for p in (PROMPT[:4], PROMPT * 2):
            assert gen.generate(p, 20, set(), True).output_ids == plain_greedy(tiny_ckpt, p, 20)


def run_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *argv], capture_output=True, text=True)


def test_cli_rejects_bad_tree_and_head(tiny_ckpt, tmp_path):
    r = run_cli("--checkpoint", str(tiny_ckpt), "--eagle", str(tmp_path / "nohead"), "--max-new-tokens", "4")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no EAGLE head" in r.stderr
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    Dr.save_head(random_head(args), tmp_path / "head")
    for spec in ["chain:x", "nonexistent.json", "chain:0"]:
        r = run_cli("--checkpoint", str(tiny_ckpt), "--eagle", str(tmp_path / "head"), "--tree", spec)
        assert r.returncode != 0 and "Traceback" not in r.stderr and "tree" in r.stderr.strip().splitlines()[-1]
    bad = tmp_path / "bad.json"
    bad.write_text("[[0], [1, 2]]")  # [1, 2] has no parent [1]
    r = run_cli("--checkpoint", str(tiny_ckpt), "--eagle", str(tmp_path / "head"), "--tree", str(bad))
    assert r.returncode != 0 and "no parent" in r.stderr
    small = make_checkpoint(tmp_path / "other", dim=32, n_heads=2, n_kv_heads=1)
    Dr.save_head(random_head(small), tmp_path / "head32")
    r = run_cli("--checkpoint", str(tiny_ckpt), "--eagle", str(tmp_path / "head32"))
    assert r.returncode != 0 and "does not fit" in r.stderr and "Traceback" not in r.stderr


@torch.inference_mode()
def test_tree_head_is_the_tree_the_heads_config_names(tiny_ckpt, tmp_path):
    """--tree head (generate.py's default on a GPU): the static tree the head folder's config.json names, EAGLE-1's
    where it names none; a named file that is missing is a one-line error."""
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    folder = tmp_path / "head"
    Dr.save_head(random_head(args), folder)
    assert Dr.head_tree("head", folder) == "default" and Dr.head_tree("chain:3", folder) == "chain:3"
    assert Dr.head_tree("head", tmp_path / "nothing") == "default"
    (folder / "mine.json").write_text("[[0], [0, 0], [0, 0, 0]]")
    Dr.save_head(random_head(args), folder, extra={"tree": "mine.json"})
    assert Dr.head_tree("head", folder) == str(folder / "mine.json")
    common = ("--checkpoint", str(tiny_ckpt), "--eagle", str(folder), "--max-new-tokens", "8", "--device", "cpu")
    r = run_cli(*common, "--prompt", "hello", "--tree", "head")
    assert r.returncode == 0, r.stderr
    assert f"tree {folder / 'mine.json'}: 4 tokens, depth 3" in r.stderr
    r = run_cli(*common, "--prompt", "hello")  # no --tree on the CPU: EAGLE-1's (on a GPU: the head's)
    assert r.returncode == 0 and "tree default: 26 tokens, depth 5" in r.stderr
    (folder / "mine.json").unlink()
    r = run_cli(*common, "--prompt", "hello", "--tree", "head")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "mine.json" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("spec", ["default", "eagle2:K=3,D=3,N=10"])
def test_bucketed_prefill_drafts_as_eager_prefill(tiny_ckpt, spec):
    """The CUDA-graph prefill pads the prompt to a 64-token bucket: the padding's junk in the target's and the head's
    cache slots past the prompt must never be seen. So every round drafts the same tree as after an unpadded prefill
    (on the CPU the same padded code runs, without the graph), and the output stays the plain greedy one."""
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    tree = T.make_tree(spec)
    head = random_head(args)
    gens, drafts = [], []
    for mode in ("eager", "graphs"):
        gen = G.EagleGenerator(load(tiny_ckpt), head, tree, G.Sampling(), 200)
        gen.prefill = G.Prefill(gen.model, gen.sampling, gen.max_seq_length, mode, head)
        log, launch = [], gen.round
        gen.round = lambda launch=launch, gen=gen, log=log: (launch(), log.append(gen.state.node_tokens.clone()))[0]
        gens.append(gen)
        drafts.append(log)
    for prompt in (PROMPT, [7], [(5 * i) % 200 + 1 for i in range(70)]):
        outs = [g.generate(prompt, 40, set(), True).output_ids for g in gens]
        assert outs[0] == outs[1] == plain_greedy(tiny_ckpt, prompt, 40), len(prompt)
        assert len(drafts[0]) == len(drafts[1]) > 5
        assert all(torch.equal(a, b) for a, b in zip(*drafts, strict=True)), len(prompt)
        drafts[0].clear(), drafts[1].clear()


@torch.inference_mode()
def test_split_timing_rounds_equal_one_graph_rounds(tiny_ckpt):
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    tree = T.build_tree(T.EAGLE1_TREE)
    one = G.EagleGenerator(load(tiny_ckpt), random_head(args), tree, G.Sampling(), 100).generate(
        PROMPT, 20, set(), True
    )
    two = G.EagleGenerator(load(tiny_ckpt), random_head(args), tree, G.Sampling(), 100, split_timing=True)
    split = two.generate(PROMPT, 20, set(), True)
    assert one.output_ids == split.output_ids
    assert one.stats["draft_seconds"] is None and split.stats["draft_seconds"] > 0


@torch.inference_mode()
def test_eagle_sampling_runs_seeded(tiny_ckpt):
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    s = G.Sampling(0.9, top_k=20, top_p=0.95)
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(eagle(tiny_ckpt, random_head(args), "default", PROMPT, 25, sampling=s).output_ids)
    assert outs[0] == outs[1] and len(outs[0]) == 25
    assert all(0 <= t < args.vocab_size for t in outs[0])


@torch.inference_mode()
@pytest.mark.parametrize("seed", [0, 1])
def test_dynamic_tree_is_closed_under_ancestors(tiny_ckpt, seed):
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    spec = T.DynamicTree(K=3, D=4, N=16)
    gen = G.EagleGenerator(load(tiny_ckpt), random_head(args, seed), spec, G.Sampling(), 100)
    gen._start(torch.tensor([PROMPT]))
    st = gen.state
    G.eagle_draft(gen.head, gen.model, spec, st)
    parent, depth, anc = st.parent, st.depth, st.ancestors
    assert parent[0] == 0 and depth[0] == 0 and int(depth.max()) <= spec.D
    for n in range(1, spec.N):
        p = int(parent[n])
        assert p < n and depth[n] == depth[p] + 1 and anc[n, p] and anc[n, n]
        assert torch.equal(anc[n], anc[p] | (torch.arange(spec.N) == n))
        siblings = [c for c in range(1, spec.N) if parent[c] == p]
        assert len({int(st.node_tokens[c]) for c in siblings}) == len(siblings)  # distinct tokens among siblings
        path = st.path_nodes[n, : int(depth[n]) + 1].tolist()
        assert path[-1] == n and all(anc[n, m] for m in path)


def test_bad_dynamic_spec(tiny_ckpt):
    with pytest.raises(T.TreeError):
        T.parse_dynamic_spec("eagle2:K=x")
    with pytest.raises(T.TreeError):
        T.parse_dynamic_spec("eagle2:K=2,D=2,N=50")  # more nodes than candidates
    assert T.parse_dynamic_spec("default") is None


def test_tree_auto_picks_a_size_and_caches_it(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_GEN_CACHE", str(tmp_path))
    model = load(tiny_ckpt)
    tree = G.auto_tree(model)
    assert isinstance(tree, T.DynamicTree) and tree.N in G.AUTO_SIZES
    monkeypatch.setattr(G, "forward_seconds", lambda *a, **k: pytest.fail("should come from the cache"))
    assert G.auto_tree(model).N == tree.N
    assert (tmp_path / "tree_auto.json").is_file()


@torch.inference_mode()
@pytest.mark.parametrize("spec", ["default", "eagle2:K=4,D=4,N=12"])
def test_graphed_step_warm_up_leaves_outputs_unchanged(tiny_ckpt, spec):
    """GraphedStep (CUDA's one-graph-per-round path) runs two real rounds before capturing, then puts the state
    back. On the CPU it does the same warm-up and restore without a graph: outputs must still equal plain greedy."""
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    cases = [(PROMPT, 30), ([7], 9)]
    refs = [plain_greedy(tiny_ckpt, p, n) for p, n in cases]
    tree = T.make_tree(spec)
    gen = G.EagleGenerator(load(tiny_ckpt), random_head(args, 1), tree, G.Sampling(), 200)
    round_args = (gen.head, gen.model, gen.tree, gen.state, gen.sampling)
    gen.round = G.GraphedStep(G.eagle_round, round_args, list(gen.state.buffers()), compile=False)
    plain = G.Generator(load(tiny_ckpt), G.Sampling(), 256)
    step_args = (plain.model, plain.state, plain.sampling)
    plain.step = G.GraphedStep(G.plain_step, step_args, [plain.state.token, plain.state.pos], compile=False)
    for (prompt, max_new), ref in zip(cases, refs, strict=True):
        assert gen.generate(prompt, max_new, set(), True).output_ids == ref
        assert plain.generate(prompt, max_new, set(), True).output_ids == ref
    assert gen.round.warm and plain.step.warm


def test_two_pass_top_k_matches_torch_topk():
    torch.manual_seed(0)
    for V in (49152, 32000, 256, 1000):  # chunked (1024, 256), and torch.topk itself (one chunk, no power of two)
        x = torch.randn(3, V)
        for (a, b), ref in (
            (Dr.top_k(x, 10), torch.topk(x, 10)),
            (Dr.top_logp(x, 4), torch.topk(x.log_softmax(-1), 4)),
        ):
            assert torch.equal(b, ref.indices)
            torch.testing.assert_close(a, ref.values)


@torch.inference_mode()
@pytest.mark.parametrize("spec", ["default", "eagle2:K=4,D=4,N=12"])
def test_draft_vocabulary_stays_lossless_and_drafts_only_its_tokens(tiny_ckpt, spec):
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    model = load(tiny_ckpt)
    head = random_head(args, 5)
    ids = torch.randperm(args.vocab_size, generator=torch.Generator().manual_seed(0))[:100]
    head.restrict_vocab(ids, model)
    assert head.vocab_rows.shape == (100, args.dim)
    tree = T.make_tree(spec)
    gen = G.EagleGenerator(model, head, tree, G.Sampling(), 200)
    for prompt, max_new in [(PROMPT, 30), ([7], 9)]:
        assert gen.generate(prompt, max_new, set(), True).output_ids == plain_greedy(tiny_ckpt, prompt, max_new)
        assert torch.isin(gen.state.node_tokens[1:], ids).all()  # the last round's drafts (the root is emitted)
    head.restrict_vocab(None, model)
    assert head.vocab is None and head.logits(model, torch.ones(1, args.dim)).shape == (1, args.vocab_size)


def test_draft_vocab_script_and_cli(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file

    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    Dr.save_head(random_head(args), tmp_path / "head")
    r = run_cli("--checkpoint", str(tiny_ckpt), "--eagle", str(tmp_path / "head"), "--draft-vocab", "20")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no draft vocabulary" in r.stderr
    tokens = torch.cat([torch.full((40 - i,), i) for i in range(40)] + [torch.full((50,), 300)])  # 300: masked out
    mask = torch.cat([torch.ones(820, dtype=torch.uint8), torch.zeros(50, dtype=torch.uint8)])
    data = {"tokens": tokens.int(), "offsets": torch.tensor([0, 870]), "loss_mask": mask, "meta": {}}
    torch.save(data, tmp_path / "data.pt")
    script = str(ROOT / "scripts" / "draft_vocab.py")
    r = subprocess.run([sys.executable, script, "--data", str(tmp_path / "data.pt"), "--head", str(tmp_path / "head")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    saved = load_file(str(tmp_path / "head" / Dr.VOCAB_FILE))
    assert saved["ids"].tolist() == list(range(40)) and saved["counts"].tolist() == list(range(40, 0, -1))
    for size, ok in (("20", True), ("8", False), ("41", False)):
        r = run_cli("--checkpoint", str(tiny_ckpt), "--eagle", str(tmp_path / "head"), "--draft-vocab", size,
                    "--prompt", "hi", "--max-new-tokens", "5")  # fmt: skip
        assert (r.returncode == 0) == ok and "Traceback" not in r.stderr, r.stderr
    assert Dr.load_draft_vocab(tmp_path / "head", 20, args.vocab_size).tolist() == list(range(20))
    # the default (None): DEFAULT_DRAFT_VOCAB ids where the file holds that many and the target has more tokens
    model = M.load_model(tiny_ckpt)
    for default, used in ((32, 32), (64, 0), (args.vocab_size, 0)):
        head = random_head(args)
        Dr.DEFAULT_DRAFT_VOCAB, real = default, Dr.DEFAULT_DRAFT_VOCAB
        try:
            assert Dr.apply_draft_vocab(head, tmp_path / "head", None, model) == used
        finally:
            Dr.DEFAULT_DRAFT_VOCAB = real
        assert (head.vocab is not None) == bool(used) and (not used or head.vocab.numel() == used)
    assert Dr.apply_draft_vocab(random_head(args), tmp_path, None, model) == 0  # no file: the whole vocabulary


def test_draft_vocabulary_rows_from_a_quantized_lm_head(tiny_ckpt):
    import quantize as Q

    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    model = load(tiny_ckpt)
    q, s = Q.quantize_int8(model.output.weight.detach())
    i8 = Q.WeightOnlyInt8Linear(args.dim, args.vocab_size)
    i8.weight, i8.scales = q, s
    i8.prepare(torch.float32, "torch")
    model.output = i8
    head = random_head(args)
    ids = torch.tensor([9, 1, 5, *range(20, 40)])
    head.restrict_vocab(ids, model)
    torch.testing.assert_close(head.vocab_rows, Q.dequantize_int8(q, s)[ids.sort().values])


@torch.inference_mode()
def test_kernel_swap_covers_the_heads_biased_fc_and_vocab_logits(tiny_ckpt):
    """use_triton_linears also takes linears with a bias (the head's fc) and hands its max_m to the head's
    draft-vocabulary logits; where Triton does not run (CPU) every output stays exactly the same."""
    import kernels as K

    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    model = load(tiny_ckpt)
    head = random_head(args, 3)
    head.restrict_vocab(torch.arange(0, args.vocab_size, 2), model)
    emb, feats = torch.randn(1, 5, args.dim), torch.randn(1, 5, args.dim)
    head.setup_cache(16, 4)
    pos = torch.arange(5)
    mask = (torch.arange(20)[None] <= pos[:, None])[None, None]
    before = head.logits(model, head(emb, feats, pos, pos, mask))
    fc = head.fc
    assert K.use_triton_linears(head, K.MAX_M) == 5  # fc (with its bias), wqkv, wo, w13, w2
    assert K.use_triton_linears(head, K.MAX_M) == 0  # nothing twice
    assert isinstance(head.fc, K.FewTokenLinear) and head.fc.bias is fc.bias and head.kernel_max_m == K.MAX_M
    after = head.logits(model, head(emb, feats, pos, pos, mask))
    assert torch.equal(before, after)
    assert set(head.state_dict()) == set(random_head(args, 3).state_dict())  # saved heads keep their key names


@torch.inference_mode()
@pytest.mark.parametrize("spec", ["default", "eagle2:K=3,D=3,N=10", "default+fused"])
def test_int8_draft_head_stays_lossless(tiny_ckpt, tmp_path, spec):
    """--draft-quant int8: the head's linears (fc with its bias, the layer's) become int8 modules; the head's features
    stay close to the float head's, and greedy EAGLE output still equals plain greedy output."""
    args = M.ModelArgs.from_json(tiny_ckpt / "config.json")
    layers = FUSED if spec.endswith("+fused") else ()
    spec = spec.removesuffix("+fused")
    head, ref_head = random_head(args, 3, layers), random_head(args, 3, layers)
    assert Q.quantize_linears_int8(head, torch.float32) == 5 + bool(layers)  # fc, wqkv, wo, w13, w2 (and fuse)
    assert not any(type(m) is torch.nn.Linear for m in head.modules())
    model = load(tiny_ckpt)
    for h in (head, ref_head):
        h.setup_cache(16, 0)
    emb, feats = torch.randn(1, 4, args.dim), torch.randn(1, 4, args.dim)
    pos, mask = torch.arange(4), torch.ones(1, 1, 4, 16, dtype=torch.bool).tril()
    got, ref = head(emb, feats, pos, pos, mask), ref_head(emb, feats, pos, pos, mask)
    assert ((got - ref).norm() / ref.norm()).item() < 0.02
    tree = T.make_tree(spec)
    gen = G.EagleGenerator(model, head, tree, G.Sampling(), 200)
    for prompt, max_new in [(PROMPT, 30), ([7], 9)]:
        assert gen.generate(prompt, max_new, set(), True).output_ids == plain_greedy(tiny_ckpt, prompt, max_new)
    Dr.save_head(random_head(args), tmp_path / "head")
    r = run_cli("--checkpoint", str(tiny_ckpt), "--eagle", str(tmp_path / "head"), "--draft-quant", "int8",
                "--prompt", "hi", "--max-new-tokens", "5", "--device", "cpu", "--quiet")  # fmt: skip
    assert r.returncode == 0 and "linears as int8" in r.stderr, r.stderr
    r = run_cli("--checkpoint", str(tiny_ckpt), "--draft-quant", "int8", "--max-new-tokens", "4")
    assert r.returncode != 0 and "--draft-quant needs --eagle" in r.stderr and "Traceback" not in r.stderr


def test_rank_desc_is_a_stable_descending_sort():
    """EAGLE-2's frontier and kept candidates (tree.rank_desc, no torch.topk/sort): high to low, ties to the lower
    index, as a stable descending sort orders them; -inf scores too."""
    g = torch.Generator().manual_seed(0)
    for C in (1, 7, 100, 510):
        for x in (torch.randn(C, generator=g), torch.randint(0, 4, (C,), generator=g).float()):  # many ties
            x[torch.randperm(C, generator=g)[: C // 10]] = float("-inf")
            rank, order = T.rank_desc(x)
            ref = torch.sort(x, descending=True, stable=True).indices
            assert torch.equal(order, ref)
            assert torch.equal(order[rank], torch.arange(C))


def test_tree_from_candidates_matches_walking_the_parents():
    """EAGLE-2's tree buffers (tree.tree_from_candidates: parent chains as D gathers of one vector) against walking
    each kept candidate's parents in Python, on random candidate sets of EAGLE-2's layout with tied scores."""
    g = torch.Generator().manual_seed(0)
    for K, D, N in ((3, 4, 16), (10, 6, 60), (2, 1, 3), (4, 3, 30)):
        for _ in range(5):
            C = K + (D - 1) * K * K
            parents = torch.full((C,), -1)
            scores = -torch.randint(0, 3, (K,), generator=g).float()  # few values: many ties
            frontier = list(range(K))
            for i in range(1, D):  # step i: K children for each of K frontier candidates (any of the previous step)
                lo = K + (i - 1) * K * K
                parents[lo : lo + K * K] = torch.tensor(frontier).repeat_interleave(K)
                drop = torch.randint(0, 3, (K * K,), generator=g).float()
                scores = torch.cat([scores, scores[parents[lo : lo + K * K]] - drop])
                frontier = (lo + torch.randperm(K * K, generator=g)[:K]).tolist()
            kept, parent, depth, anc, path = T.tree_from_candidates(scores, parents, N, D)
            node_of = {int(c): n + 1 for n, c in enumerate(kept)}
            for n in range(N):
                chain, c = [n], int(kept[n - 1]) if n else -1
                while c >= 0:  # the candidate's ancestors, which must all be kept
                    c = int(parents[c])
                    chain.append(node_of[c] if c >= 0 else 0)
                assert int(parent[n]) == (chain[1] if n else 0) and int(depth[n]) == len(chain) - 1
                assert set(torch.nonzero(anc[n]).flatten().tolist()) == set(chain)
                assert path[n].tolist() == chain[::-1] + [n] * (D + 1 - len(chain))
