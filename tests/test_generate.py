"""generate.py: the plain decode loop, sampling, compile without recompiles, and one-line CLI errors."""

import contextlib
import gc
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import generate as G
import model as M

PROMPT = [1, 17, 42, 99, 5]


def run_cli(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *argv], capture_output=True, text=True, **kw)


def assert_one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr


@torch.inference_mode()
def test_generator_matches_full_forward_greedy(tiny_ckpt):
    model = M.load_model(tiny_ckpt)
    out = G.Generator(model, G.Sampling(), 64).generate(PROMPT, 12, set(), ignore_eos=True).output_ids
    ref = M.load_model(tiny_ckpt)
    seq = list(PROMPT)
    for _ in range(12):  # greedy by full forwards, no cache reuse
        ref.setup_caches(1, 64)
        seq.append(int(ref(torch.tensor([seq]), torch.arange(len(seq)))[0, -1].argmax()))
    assert out == seq[len(PROMPT) :]


@torch.inference_mode()
def test_stops_at_eos_and_max_new_tokens(tiny_ckpt):
    gen = G.Generator(M.load_model(tiny_ckpt), G.Sampling(), 64)
    ref = gen.generate(PROMPT, 20, set(), ignore_eos=True).output_ids
    assert len(ref) == 20
    stop = ref[5]
    got = gen.generate(PROMPT, 20, {stop}, ignore_eos=False).output_ids
    assert got == ref[: ref.index(stop) + 1]
    assert gen.generate(PROMPT, 3, {stop}, ignore_eos=True).output_ids == ref[:3]


def test_sampling_processing():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    p = G.logits_to_probs(logits, G.Sampling(1.0, top_k=2))
    assert p[0, 2] == 0 and p[0, 3] == 0 and torch.isclose(p.sum(), torch.tensor(1.0))
    p = G.logits_to_probs(logits, G.Sampling(1.0, top_p=0.5))
    assert (p[0] > 0).tolist() == [True, False, False, False]
    torch.manual_seed(0)
    draws = G.sample(logits.expand(40000, -1), G.Sampling(1.0))
    freq = torch.bincount(draws, minlength=4).float() / 40000
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.01)


@torch.inference_mode()
def test_decode_step_compiles_without_recompiles(tiny_ckpt):
    import torch._dynamo

    torch._dynamo.reset()
    model = M.load_model(tiny_ckpt)
    gen = G.Generator(model, G.Sampling(), 64, compile=True)
    ref = G.Generator(M.load_model(tiny_ckpt), G.Sampling(), 64).generate(PROMPT, 10, set(), True).output_ids
    assert gen.generate(PROMPT, 10, set(), True).output_ids == ref
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new prompt length, same graph
        gen.generate(PROMPT[:2], 10, set(), True)


@torch.inference_mode()
def test_bucketed_and_compiled_prefill_match_eager(tiny_ckpt):
    """Prefill modes: "graphs" (prompt padded to a 64-token bucket; on the CPU the same code without the graph) and
    "compiled" (one dynamic-shape graph per attention path, <= 64 tokens: small attention, more: SDPA, no recompile
    for new prompt lengths) give the eager prefill's tokens."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = G.Generator(M.load_model(tiny_ckpt), G.Sampling(), 192)
    compiled = G.Generator(M.load_model(tiny_ckpt), G.Sampling(), 192, compile_prefill=True)
    graphs = G.Generator(M.load_model(tiny_ckpt), G.Sampling(), 192)
    graphs.prefill = G.Prefill(graphs.model, graphs.sampling, 192, "graphs")
    graphs.prefill.MAX_GRAPHED = 150  # the 180-token prompt runs eagerly
    prompts = [[(7 * i + 3) % 250 + 1 for i in range(n)] for n in (5, 70, 9, 40, 101, 1, 140, 180)]
    for i, p in enumerate(prompts):
        ref = eager.generate(p, 6, set(), ignore_eos=True).output_ids
        ctx = torch._dynamo.config.patch(error_on_recompile=True) if 2 <= i < 5 else contextlib.nullcontext()
        with ctx:
            assert compiled.generate(p, 6, set(), ignore_eos=True).output_ids == ref, len(p)
        assert graphs.generate(p, 6, set(), ignore_eos=True).output_ids == ref, len(p)
    assert sorted(graphs.prefill.graphs) == [64, 128, 150]  # buckets, the last one cut to MAX_GRAPHED


def test_cli_generates_and_writes_json(tiny_ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question_id": 7, "turns": ["Hello", "And then?"]}) + "\n")
    out = tmp_path / "out.jsonl"
    r = run_cli("--checkpoint", str(tiny_ckpt), "--prompts-file", str(prompts), "--max-new-tokens", "5",
                "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["turn"] for r in recs] == [0, 1] and recs[0]["id"] == "7"
    for rec in recs:
        for key in ("id", "prompt_tokens", "output_ids", "text", "new_tokens", "seconds", "tokens_per_s"):
            assert key in rec
        assert 1 <= rec["new_tokens"] == len(rec["output_ids"]) <= 5
    assert recs[1]["prompt_tokens"] > recs[0]["prompt_tokens"]  # the second turn carries the first


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--checkpoint", "/nonexistent/ckpt"], "checkpoint not found"),
        (["--dtype", "float8"], "unknown --dtype"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--prompts-file", "/nonexistent.jsonl"], "prompts file not found"),
        (["--temperature", "-1"], "--temperature"),
        (["--kernels", "triton", "--device", "cpu"], "--kernels triton needs"),
        (["--kernel-configs", "/nonexistent.json"], "--kernel-configs: no file"),
    ],
)
def test_cli_errors(tiny_ckpt, argv, needle):
    args = ["--checkpoint", str(tiny_ckpt)] if argv[0] != "--checkpoint" else []
    assert_one_line_error(run_cli(*args, *argv), needle)


def test_cli_error_files(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": "not a list"}\n')
    assert_one_line_error(run_cli("--checkpoint", str(tiny_ckpt), "--prompts-file", str(bad)), "malformed")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    (broken / "model.pth").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli("--checkpoint", str(broken)), "cannot read")
    (tmp_path / "configs.json").write_text('{"picks": []}')
    assert_one_line_error(run_cli("--checkpoint", str(tiny_ckpt), "--kernel-configs", str(tmp_path / "configs.json")),
                          "not a JSON with 'tuned_configs'")  # fmt: skip
    long_prompt = "Hello " * 600  # the tiny model's context is 512
    assert_one_line_error(run_cli("--checkpoint", str(tiny_ckpt), "--prompt", long_prompt), "context")


def test_cli_interactive_chat(tiny_ckpt):
    r = run_cli("--checkpoint", str(tiny_ckpt), "--interactive", "--max-new-tokens", "4", input="Hello\nMore\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("bot> ") == 2 and "tok/s" in r.stderr


@pytest.mark.parametrize(
    "script", ["generate.py", "quantize.py", "scripts/bench.py", "scripts/eval_eagle.py", "scripts/train_eagle.py",
               "scripts/make_eagle_data.py", "scripts/draft_vocab.py", "scripts/perplexity.py"],
)  # fmt: skip
def test_help(script):
    """--help of every command-line tool prints and exits 0 (a stray % in a help string once made it crash)."""
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_two_pass_argmax_equals_argmax():
    """generate.argmax (chunk maxima, then the best chunk) is torch.argmax, ties included (first index)."""
    torch.manual_seed(0)
    for V in (49152, 32000, 1000, 100):
        x = torch.randn(6, V)
        x[0, 7] = x[0, V - 3] = 9.0  # equal maxima in different chunks
        x[1] = 0.0  # all equal
        x[2, V - 1] = 9.0
        assert torch.equal(G.argmax(x), x.argmax(-1)), V
        xb = torch.randint(-2, 2, (3, 5, V)).to(torch.bfloat16)  # many ties, leading dims
        assert torch.equal(G.argmax(xb), xb.argmax(-1)), V
        assert torch.equal(G.argmax(x[3]), x[3].argmax(-1))


def test_layer_inputs_op():
    """kernels.layer_inputs' custom op (CUDA only at run time) is the gather and copies, with a fake that fits."""
    import kernels

    table, pos, slots = torch.randn(40, 2, 8), torch.tensor([3, 4, 4, 5]), torch.tensor([10, 11, 12, 13])
    mask = torch.rand(1, 1, 4, 40) < 0.5
    rope, slots2, mask2 = kernels._layer_inputs(table, pos, slots, mask)
    assert torch.equal(rope, table[pos]) and torch.equal(slots2, slots) and slots2.data_ptr() != slots.data_ptr()
    assert torch.equal(mask2, mask)
    torch.library.opcheck(kernels._layer_inputs, (table, pos, slots, mask))


def test_bench_main_runs_under_inference_mode(monkeypatch):
    """bench.py builds models and caches inside main: outside inference mode, its in-place cache writes failed on the
    GPU ("Inplace update to inference tensor outside InferenceMode"), after a refactor moved main's decorator onto the
    helper above it (sixth session)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench  # noqa: PLC0415

    seen = []

    def parse_args(self, *a, **k):
        seen.append(torch.is_inference_mode_enabled())
        raise SystemExit(0)

    monkeypatch.setattr(bench.argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(SystemExit):
        bench.main()
    assert seen == [True]


def test_bench_timeline_folds_the_layers(monkeypatch):
    """bench.py --profile's timeline: the step found as the block of kernels the run repeats (no idle gap needed:
    the eighteenth session's first GPU runs split steps at idle gaps of over 20 us, found none and printed nothing
    useful), cut at its longest gap; the repeated block within it (a layer) folded slot by slot, the kernels before
    and after it listed alone."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench  # noqa: PLC0415

    layer = [("gemv", 5.0), ("rope", 1.0), ("attn", 2.0), ("gemv", 3.0)]
    kernels_run, t = [("prefill", 0.0, 30.0), ("copy", 31.0, 32.0)], 40.0
    for _ in range(6):  # steps, the next one queued 2 us after the last kernel
        for name, d in [("embed", 1.0)] + layer * 4 + [("argmax", 4.0)]:
            kernels_run.append((name, t, t + d))
            t += d + 0.5
        t += 1.5
    text = bench.timeline_table(kernels_run[::-1])  # (any order)
    assert "3 of 3 steps/rounds (of the run's later half) with 18 kernels" in text
    assert "block of 4 kernels x 4, from position 1" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["0", "5.00", "0.50", "22.0", "gemv"] in rows and ["2", "2.00", "0.50", "10.0", "attn"] in rows
    assert ["17", "4.00", "0.50", "argmax"] in rows and ["0", "1.00", "2.00", "embed"] in rows


def test_bench_mt_bench_keys_every_head_and_tree(monkeypatch):
    """bench.py --mt-bench --eagle A --compare-head B: one plain baseline, then each head with each tree, keyed by
    spec for A and by "B spec" for B (the GPU-only loop, run here with stand-in generators)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import types  # noqa: PLC0415

    import bench  # noqa: PLC0415

    class Tok:
        stop_ids = (0,)

        def encode_prompt(self, text, chat):
            return [1, 2, 3]

    def result(tokens, rounds=None):
        stats = {"host_launch_seconds": 0.1, "host_wait_seconds": 0.2, "rounds": rounds or 1, "accept_len_mean": 2.0,
                 "round_seconds": 0.5, "draft_seconds": 0.0, "verify_seconds": 0.0}  # fmt: skip
        return types.SimpleNamespace(output_ids=tokens, seconds=1.0, stats=stats, prefill_seconds=0.1)

    class Plain:
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompt, max_new, stop):
            return result([5] * 8)

    class Eagle(Plain):
        def __init__(self, model, head, tree, *args, **kwargs):
            self.head = head

        def generate(self, prompt, max_new, stop):
            return result([5] * (8 if self.head == "A" else 12), rounds=4)

    model = types.SimpleNamespace(args=None)
    monkeypatch.setattr(bench, "load", lambda name: (model, Tok()))
    monkeypatch.setattr(bench, "load_head", lambda d, *args: d)
    monkeypatch.setattr(bench, "apply_draft_vocab", lambda head, d, size, target: 16384)
    for name in ("quantize_head", "apply_kernel_choice", "warm_prefill", "profile"):
        monkeypatch.setattr(bench, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(bench.G, "Generator", Plain)
    monkeypatch.setattr(bench.G, "EagleGenerator", Eagle)
    res = bench.bench_mt_bench(["A", "B"], ["default", "chain:5"], 3, 16, None)
    assert [k for k in res if k not in ("prompts", "max_new_tokens", "plain", "draft_vocab")] == [
        "default", "chain:5", "B default", "B chain:5"]  # fmt: skip
    assert res["plain"]["tokens_per_s"] == 8.0 and res["draft_vocab"] == 16384
    assert res["default"]["head"] == "A" and res["B chain:5"]["head"] == "B"
    assert res["default"]["speedup_vs_plain"] == 1.0 and res["B default"]["speedup_vs_plain"] == 1.5
    assert res["default"]["identical_outputs_bf16"] == 3 and res["B default"]["identical_outputs_bf16"] == 0


def test_bench_eagle_flag(monkeypatch):
    """Issue #3 names `scripts/bench.py --eagle` for per-round costs with a random head; with a head it benchmarks that
    head on MT-bench (`--rounds` and `--mt-bench` stay as the explicit forms)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench  # noqa: PLC0415

    a = bench.parse_args(["--eagle", "--model", "7b"])
    assert a.rounds and not a.mt_bench and a.model == ["7b"]
    a = bench.parse_args(["--eagle", "some/head"])
    assert a.mt_bench and not a.rounds and a.eagle == "some/head"
    a = bench.parse_args(["--mt-bench"])
    assert a.mt_bench and not a.rounds and a.eagle == bench.HEAD
    a = bench.parse_args(["--eagle", "--forward-tokens", "26", "--draft-vocab", "8192", "--draft-quant", "int8"])
    assert a.rounds and a.forward_tokens == (26,) and a.draft_vocab == 8192 and a.draft_quant == "int8"
    assert bench.parse_args(["--eagle"]).forward_tokens == (1, 8, 26, 64)  # issue #3's sizes by default
    assert bench.parse_args(["--eagle"]).feature_layers == ()
    assert bench.parse_args(["--eagle", "--feature-layers", "15,2"]).feature_layers == (2, 15)
    a = bench.parse_args(["--eagle", "some/head", "--compare-head", bench.HEAD, "--compare-head", bench.HEAD])
    assert a.mt_bench and a.eagle == "some/head" and a.compare_head == [bench.HEAD, bench.HEAD]
    assert bench.parse_args(["--mt-bench"]).compare_head == []
    assert bench.parse_args(["--eagle", "--kernel-configs", "k.json"]).configs_in == "k.json"  # generate.py's name
    a = bench.parse_args(["--plain", "--quant", "int4:128"])  # quantize.parse_spec, shared with tune_kernels.py
    assert a.quant == {"mode": "int4", "groupsize": 128} and a.quant_spec == "int4:128"
    assert bench.parse_args(["--plain", "--quant", "int4"]).quant == {"mode": "int4", "groupsize": 64}
    bad = (["--compare-head", bench.HEAD], ["--mt-bench", "--compare-head", "no/head"], ["--quant", "int4:70"],
           ["--quant", "int8:64"], ["--quant", "fp8"])  # fmt: skip
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv)
        assert e.value.code == 2


def test_capture_turns_garbage_collection_off_inside(monkeypatch):
    """Bug (fourteenth session): bench.py --mt-bench with a third generator in one process failed in CUDA-graph capture
    (cudaErrorStreamCaptureInvalidated): Python's collector freed an earlier generator's graph mid-capture. capture()
    keeps the collector off inside and restores it after, also on an error."""
    seen = []

    @contextlib.contextmanager
    def fake_graph(graph):
        seen.append(gc.isenabled())
        yield

    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    assert gc.isenabled()
    with G.capture(None):
        seen.append(gc.isenabled())
    assert seen == [False, False] and gc.isenabled()
    with pytest.raises(ValueError), G.capture(None):
        raise ValueError
    assert gc.isenabled()


def test_bench_profile_path_of_a_tree_file(monkeypatch, tmp_path):
    """Bug (fourteenth session): `bench.py --eagle --tree heads/.../tree40.json --profile DIR` wrote its kernel table to
    DIR/rounds_..._heads/SmolLM2-135M-Instruct/tree40.json_...txt, a folder that does not exist, and stopped."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench  # noqa: PLC0415

    monkeypatch.setattr(bench, "PROFILE_DIR", tmp_path)
    path = bench.profile_path("rounds_smollm2-shape_heads/SmolLM2-135M-Instruct/tree40.json_none_dv16384")
    assert (
        path.parent == tmp_path
        and path.name == "rounds_smollm2-shape_heads_SmolLM2-135M-Instruct_tree40.json_none_dv16384.txt"
    )
    assert bench.profile_path("eagle_eagle2K=8,D=6,N=40").name == "eagle_eagle2K=8,D=6,N=40.txt"


def test_tune_kernels_descent_keeps_the_fastest_pick():
    """scripts/tune_kernels.py: one pass of coordinate descent over the matmul shapes, each timed in a whole forward
    (here a fake: the sum of each shape's cost under its pick), keeps the fastest pick per shape, holds a pick unless a
    candidate beats it by min_gain, and skips candidates that fail."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import tune_kernels  # noqa: PLC0415

    a, b, c = (("_gemm_kernel", (n, 576, 0, 0, 32, False)) for n in (576, 960, 3072))  # (kernel, autotuner key)
    cost = {a: {1: 5.0, 2: 3.0, 3: 4.0}, b: {1: 2.0, 2: 2.001, 3: 9.0}, c: {1: 7.0, 2: 1.0}}
    picks = {a: 1, b: 1, c: 1}
    broken = {(c, 2)}

    def seconds():
        if any((k, v) in broken for k, v in picks.items()):
            raise RuntimeError("out of resources")
        return sum(cost[k][v] for k, v in picks.items())

    out = tune_kernels.descend(list(picks), lambda k: list(cost[k]), picks.__getitem__, picks.__setitem__, seconds,
                               min_gain=0.01, log=lambda s: None)  # fmt: skip
    assert picks == {a: 2, b: 1, c: 1}  # b: 2 is not faster; c: 2 would be, but fails to run
    assert out[a] == (14.0, 12.0) and out[c] == (12.0, 12.0)  # c timed with a at its new pick
    picks = {a: 1, b: 1, c: 1}  # --max-seconds: past the deadline, the shapes left keep their picks
    out = tune_kernels.descend(list(picks), lambda k: list(cost[k]), picks.__getitem__, picks.__setitem__, seconds,
                               min_gain=0.01, log=lambda s: None, deadline=0.0)  # fmt: skip
    assert out == {} and picks == {a: 1, b: 1, c: 1}
    if tune_kernels.kernels.triton is not None:  # the candidates: the autotuner's list, fitted to the shape
        cands = tune_kernels.candidates_of(a)
        assert cands and all(c.kwargs["BLOCK_K"] <= 1024 and not c.kwargs["SPLIT"] > 1 for c in cands)
    a = tune_kernels.parse_args(["--out", "k.json", "--eagle-tree", "eagle2:K=8,D=6,N=40", "--feature-layers", ""])
    assert a.tokens == [1, 26, 40] and a.feature_layers == () and a.tree.N == 40 and a.draft_vocab == 16384
    assert (
        a.max_seconds is None and tune_kernels.parse_args(["--out", "k.json", "--max-seconds", "60"]).max_seconds == 60
    )
    quant = lambda q: tune_kernels.parse_args(["--out", "k.json", "--model", "7b", "--quant", q]).quant  # noqa: E731
    assert quant("int4:128") == {"mode": "int4", "groupsize": 128} and quant("int8") == {"mode": "int8"}
    bad = (["--tokens", "0"], ["--tokens", "65"], ["--eagle-tree", "no/such/tree.json"], ["--quant", "int8"],
           ["--model", "7b", "--quant", "int3"], ["--model", "7b", "--quant", "int8:64"])  # fmt: skip
    for argv in bad:
        with pytest.raises(SystemExit):
            tune_kernels.parse_args(["--out", "k.json", *argv])
