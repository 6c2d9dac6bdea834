"""Pick kernels.py's matmul block shapes by timing whole target forwards, one matmul shape at a time (GPU).

Triton's autotuner times each block shape of a matmul alone, a few microseconds a call, and keeps the fastest. Its picks
differ from machine to machine: in the fourteenth session 21 of SmolLM2's 26 picks differed between two H200s, whose
plain decoding took 0.71 and 0.60 ms a token (BENCHMARKS.md). Here each candidate runs where it will run: inside a
whole forward (a CUDA graph of back-to-back forwards), after and before the kernels whose launches overlap its own
(PDL). One pass of coordinate descent: for each shape in turn, every block shape that fits it, the others held at
their current picks.

    python scripts/tune_kernels.py --tokens 1,26,40 --out kernel_configs.json         # SmolLM2 (prepare_smollm2.sh)
    python scripts/tune_kernels.py --model smollm2-shape --tokens 1,26 --out k.json   # random weights, same shapes
    python scripts/tune_kernels.py --eagle-tree heads/SmolLM2-135M-Instruct/tree40.json --out k.json  # + EAGLE rounds
    python generate.py --checkpoint ... --kernel-configs kernel_configs.json          # use the picks
    python scripts/bench.py --mt-bench --configs-in kernel_configs.json               # measure with them

Token counts: 1 is plain decoding, 26 and 40 EAGLE's tree forwards (1-16, 17-32 and 33-64 tokens each have block
shapes of their own; a shape that several token counts share is tuned at the first that uses it). With --eagle-tree
the shapes of a whole EAGLE round (its tree forward and the draft head's matmuls) are tuned again, timed as rounds.
The JSON holds every pick of the process (`kernels.tuned_configs`, the format of bench.py's JSON), the picks each
descent started from (`start_configs`) and the times before and after.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import kernels  # noqa: E402
import quantize  # noqa: E402
import tree as T  # noqa: E402

Key = tuple[str, tuple]  # (kernel name, the autotuner's key)


def descend(keys: list[Key], candidates: Callable[[Key], list], get: Callable[[Key], object],
            put: Callable[[Key, object], None], seconds: Callable[[], float], min_gain: float = 0.003,
            log: Callable[[str], None] = print,
            deadline: float = float("inf")) -> dict[Key, tuple[float, float]]:  # fmt: skip
    """One pass of coordinate descent: for each key, time every candidate with the other keys at their picks and keep
    the fastest, unless it beats the current pick by less than min_gain (relative: timing noise). A candidate that
    fails to run is skipped. Keys not reached by `deadline` (time.perf_counter()) keep their picks. Returns key ->
    (seconds with the pick it had, seconds with the pick it keeps)."""
    out = {}
    for key in keys:
        if time.perf_counter() > deadline:
            log(f"  time is up: {len(keys) - len(out)} shapes keep the autotuner's picks")
            break
        start = get(key)
        best_t = base = seconds()
        best = start
        for cfg in candidates(key):
            if cfg == start:
                continue
            put(key, cfg)
            try:
                t = seconds()
            except Exception as e:  # noqa: BLE001 - a block shape the GPU cannot run (resources): skip it
                log(f"  {key[0]} {key[1][:5]} {cfg}: failed ({str(e).splitlines()[0][:80]})")
                continue
            if t < best_t * (1 - min_gain):
                best, best_t = cfg, t
        put(key, best)
        out[key] = (base, best_t)
        log(f"  {key[0]} {key[1][:5]}: {base * 1e6:.1f} -> {best_t * 1e6:.1f} us a forward"
            f"{'' if best == start else f' ({best})'}")  # fmt: skip
    return out


def configs_of(keys) -> list[dict]:
    """The current picks (kernels.tuned_configs entries) of these keys."""
    keys = set(keys)
    return [e for e in kernels.tuned_configs() if (e["kernel"], tuple(e["key"])) in keys]


def kernel_of(key: Key):
    return getattr(kernels, key[0])


def candidates_of(key: Key) -> list:
    """The block shapes the autotuner would try for this key: its config list, fitted to the shape (kernels._prune)."""
    n, k, quant, group = key[1][:4]
    return kernels._prune(kernel_of(key).configs, {"N": n, "K": k}, QUANT=quant, GROUP=group)


def tune_rounds(bench, model, a: argparse.Namespace) -> dict:
    """Coordinate descent again, each candidate timed as `calls` EAGLE rounds replayed back to back (the generator's
    one-graph round, captured again for every candidate), over the shapes the round uses: its tree forward's and the
    draft head's. The picks of the forward phase are where it starts."""
    tuners = [getattr(kernels, name) for name in ("_gemv_kernel", "_gemm_kernel")]
    picked = [dict(t.cache) for t in tuners]
    for t in tuners:  # so that the round's first call shows which shapes it uses
        t.cache.clear()
    gen, reset = bench.random_head_generator(model, a.tree, a.draft_vocab, a.feature_layers)
    step = gen.round  # a generate.GraphedStep

    def rounds():
        reset()
        for _ in range(a.calls):
            step()

    rounds()  # compiles and captures; the autotuner (or Triton's cache on disk) picks for shapes new to this process
    keys = [(e["kernel"], tuple(e["key"])) for e in kernels.tuned_configs()]
    for t, p in zip(tuners, picked, strict=True):
        t.cache.update(p)  # the forward phase's picks where it made them

    def seconds() -> float:
        reset()
        step.fn(*step.args)  # once outside any capture: compiles a block shape not run before
        step.graph = None  # captured again, with the current picks, on the next call
        rounds()
        torch.cuda.synchronize()
        return bench.cuda_time(rounds, iters=5) / a.calls

    print(f"EAGLE rounds ({a.eagle_tree}): {len(keys)} matmul shapes to tune", flush=True)
    start = configs_of(keys)
    before = seconds()
    descend(keys, candidates_of, lambda k: kernel_of(k).cache[k[1]],
            lambda k, c: kernel_of(k).cache.__setitem__(k[1], c), seconds, a.min_gain,
            deadline=a.deadline)  # fmt: skip
    after = seconds()
    print(f"EAGLE round: {before * 1e3:.4f} -> {after * 1e3:.4f} ms", flush=True)
    return {"tree": a.eagle_tree, "draft_vocab": a.draft_vocab, "feature_layers": list(a.feature_layers),
            "before": before, "tuned": after, "start_configs": start}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "smollm2-shape", "7b"],
                   help="smollm2: checkpoints/SmolLM2-135M-Instruct (scripts/prepare_smollm2.sh); smollm2-shape and\n"
                   "7b: random weights of those shapes")  # fmt: skip
    p.add_argument("--quant", default=None, help="7b only: int8 or int4[:G] weights, quantized in memory (as bench.py\n"
                   "--quant): the picks of the quantized matmuls; int4 on kernels.py, as bench.py --kernel triton\n"
                   "(tinygemm, the default int4 kernel, has no picks)")  # fmt: skip
    p.add_argument("--tokens", default="1,26,40", help="forward sizes to tune at (default 1,26,40)")
    p.add_argument("--calls", type=int, default=10, help="forwards in each timed CUDA graph (default 10)")
    p.add_argument("--min-gain", type=float, default=0.003, help="a new pick must be this much faster (default 0.3%%)")
    p.add_argument("--eagle-tree", default=None, metavar="SPEC",
                   help="then tune again in whole EAGLE rounds with this tree (a static spec, a tree file or\n"
                   "eagle2[:K=..,D=..,N=..]; a random head, as bench.py --eagle times rounds): the tree's forward and\n"
                   "the draft head's matmuls")  # fmt: skip
    p.add_argument("--draft-vocab", type=int, default=16384, help="--eagle-tree: draft among this many ids (default\n"
                   "16384, as the shipped SmolLM2 head; 0 = all)")  # fmt: skip
    p.add_argument("--feature-layers", default="2,15", help="--eagle-tree: the random head fuses the target's\n"
                   "residual streams entering these layers (default 2,15, as the shipped head; '' = none)")  # fmt: skip
    p.add_argument("--max-seconds", type=float, default=None, help="stop tuning after this long (shapes not reached\n"
                   "keep the autotuner's picks); the JSON is written after each phase in any case")  # fmt: skip
    p.add_argument("--configs-in", default=None, metavar="JSON", help="start from these picks (a JSON of this script\n"
                   "or of bench.py) instead of the autotuner's")  # fmt: skip
    p.add_argument("--gemv-fold", action="store_true", help="tune with kernels.GEMV_FOLD on (as bench.py --gemv-fold;\n"
                   "the picks then suit runs with it on)")  # fmt: skip
    p.add_argument(
        "--out", required=True, help="JSON to write (for generate.py --kernel-configs, bench.py --configs-in)"
    )
    a = p.parse_args(argv)
    try:
        a.tokens = sorted({int(t) for t in a.tokens.split(",")})
    except ValueError:
        p.error(f"--tokens: comma-separated integers, got {a.tokens!r}")
    if not a.tokens or min(a.tokens) < 1 or max(a.tokens) > kernels.MAX_M:
        p.error(f"--tokens: each between 1 and {kernels.MAX_M}")
    if a.quant:
        if a.model != "7b":
            p.error(f"--quant: with --model 7b only, got {a.model}")
        try:
            a.quant = quantize.parse_spec(a.quant)
        except quantize.CheckpointError as e:
            p.error(f"--quant: {e}")
    try:
        a.feature_layers = tuple(sorted({int(t) for t in a.feature_layers.split(",") if t.strip()}))
        a.tree = T.make_tree(a.eagle_tree) if a.eagle_tree else None
    except ValueError as e:  # also tree.TreeError
        p.error(f"--feature-layers / --eagle-tree: {e}")
    return a


@torch.inference_mode()
def main(argv=None) -> None:
    a = parse_args(argv)
    if not torch.cuda.is_available() or kernels.triton is None:
        sys.exit("error: tune_kernels.py needs a CUDA GPU and the triton package")
    import bench  # noqa: PLC0415 - its loaders and timers (and generate.py), as bench.py runs them by default

    bench.KERNEL = "triton" if a.quant and a.quant["mode"] == "int4" else "auto"  # int4: tinygemm has no picks
    bench.G.set_kernels(bench.KERNEL)
    kernels.set_pdl(True)
    kernels.GEMV_FOLD = a.gemv_fold
    bench.G.set_inductor_flags()
    if a.configs_in:
        try:
            bench.G.pin_kernel_configs(a.configs_in)
        except bench.G.UserError as e:
            sys.exit(f"error: {e}")
    bench.QUANT = a.quant
    model, _ = bench.load(a.model)
    model.setup_caches(1, 1024)
    res: dict = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": kernels.triton.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "model": a.model, "quant": a.quant,
        "kernel": bench.KERNEL, "gemv_fold": a.gemv_fold, "command": " ".join(sys.argv), "forward_seconds": {},
        "start_configs": [],
    }  # fmt: skip
    t0 = time.perf_counter()
    a.deadline = t0 + a.max_seconds if a.max_seconds else float("inf")

    def write() -> None:  # after each phase, so that a run cut short keeps what it tuned
        res["tuned_configs"] = kernels.tuned_configs()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")

    for n in a.tokens:
        fn = bench.tree_forward(model, n, 1024, 500)
        seen = {(e["kernel"], tuple(e["key"])) for e in kernels.tuned_configs()}
        fn()  # compiles, and autotunes the shapes not seen yet
        keys = [k for k in ((e["kernel"], tuple(e["key"])) for e in kernels.tuned_configs()) if k not in seen]
        print(f"{n} tokens: {len(keys)} matmul shapes to tune", flush=True)
        res["start_configs"] += configs_of(keys)  # the picks it starts from (the autotuner's, or --configs-in)
        seconds = lambda fn=fn: bench.graph_time(fn, calls=a.calls, replays=7)  # noqa: E731
        before = seconds()
        descend(keys, candidates_of, lambda k: kernel_of(k).cache[k[1]],
                lambda k, c: kernel_of(k).cache.__setitem__(k[1], c), seconds, a.min_gain,
            deadline=a.deadline)  # fmt: skip
        after = seconds()
        res["forward_seconds"][n] = {"autotuner": before, "tuned": after}
        print(f"{n} tokens: forward {before * 1e3:.4f} -> {after * 1e3:.4f} ms "
              f"({time.perf_counter() - t0:.0f} s so far)", flush=True)  # fmt: skip
        write()
    if a.tree is not None:
        res["round_seconds"] = tune_rounds(bench, model, a)
        write()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
