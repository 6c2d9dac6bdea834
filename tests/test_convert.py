"""Checkpoint converters: logits parity with transformers, KV-cache consistency, GGUF round trip, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import convert_gguf  # noqa: E402
import convert_hf_checkpoint  # noqa: E402

from model import ModelArgs, Transformer, load_model  # noqa: E402

TINY_HF = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=300,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)
HF_CASES = {  # name: (model class, config overrides, first RoPE position)
    "llama-gqa": ("LlamaForCausalLM", {}, 0),
    "llama-tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True), 0),
    "llama3.1-rope": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), 0),
    # Positions 200.. (past original_max_position_embeddings) in cache slots 0..: the position/slot split.
    "llama3.1-rope-far": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), 200),
    "mistral": ("MistralForCausalLM", dict(sliding_window=None), 0),
    "qwen2-bias": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), 0),
}
PREFILL, DECODE = 70, 6  # 70 > model.SMALL_S: the prefill runs the SDPA path
TOL = 1e-4


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention is far from uniform and logits are O(1): a sharper parity test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def make_hf_model(folder: Path, cls_name: str, overrides: dict):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, cls_name):
        pytest.skip(f"transformers has no {cls_name}")
    cls = getattr(transformers, cls_name)
    config = cls.config_class(**{**TINY_HF, **overrides})
    config._attn_implementation = "eager"
    hf = cls(config).eval()
    randomize_(hf, seed=0)
    hf.save_pretrained(folder, safe_serialization=True)
    return hf


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_parity(tmp_path: Path, case: str):
    cls_name, overrides, start = HF_CASES[case]
    hf = make_hf_model(tmp_path / "hf", cls_name, overrides)
    convert_hf_checkpoint.main(["--checkpoint-dir", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "ours")])
    ours = load_model(tmp_path / "ours", dtype=torch.float32)
    args = ours.args
    assert args.tie_embeddings == bool(overrides.get("tie_word_embeddings"))
    assert args.qkv_bias == (cls_name == "Qwen2ForCausalLM")
    assert (args.rope_scaling is not None) == ("rope_scaling" in overrides)

    n = PREFILL + DECODE
    ids = torch.randint(0, TINY_HF["vocab_size"], (1, n), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(start, start + n)
    ours.setup_caches(1, 512)
    with torch.no_grad():
        # Prefill: every position. Our positions start at `start`, but the cache slots at 0.
        got = ours(ids[:, :PREFILL], pos[:PREFILL], cache_pos=torch.arange(PREFILL))
        want = hf(ids[:, :PREFILL], position_ids=pos[None, :PREFILL]).logits
        assert want.abs().max() > 1.0  # the test would be weak with tiny logits
        assert (got - want).abs().max().item() < TOL
        # Decode: one token at a time through the KV cache vs. a full HF forward over the prefix.
        for i in range(PREFILL, n):
            got = ours(ids[:, i : i + 1], pos[i : i + 1], cache_pos=torch.tensor([i]))[0, -1]
            want = hf(ids[:, : i + 1], position_ids=pos[None, : i + 1]).logits[0, -1]
            assert (got - want).abs().max().item() < TOL, f"decode step {i}"


def test_hf_config_mapping():
    """transformers-4 style keys (rope_theta, rope_scaling with 'type') and transformers-5 rope_parameters."""
    base = dict(TINY_HF, model_type="llama", num_key_value_heads=None)
    v4_rope = {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}
    v4 = convert_hf_checkpoint.config_to_args(dict(base, rope_theta=5e5, rope_scaling=v4_rope))
    v5 = convert_hf_checkpoint.config_to_args(dict(base, rope_parameters=dict(LLAMA3_ROPE, rope_theta=5e5)))
    assert v4 == v5
    assert v5.rope_base == 5e5 and v5.n_kv_heads == 4 and v5.head_dim == 16
    assert v5.rope_scaling == dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    )
    capped = convert_hf_checkpoint.config_to_args(dict(base, model_type="mistral", sliding_window=128))
    assert capped.max_seq_len == 128
    for bad, message in [
        (dict(base, model_type="gpt2"), "unsupported model_type"),
        (dict(base, rope_parameters={"rope_type": "yarn", "factor": 4.0}), "unsupported rope type"),
        (dict(base, hidden_act="gelu"), "hidden_act"),
        ({"model_type": "llama"}, "lacks"),
    ]:
        with pytest.raises(convert_hf_checkpoint.ConversionError, match=message):
            convert_hf_checkpoint.config_to_args(bad)


def test_hf_user_errors(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(dict(TINY_HF, model_type="llama")))
    with pytest.raises(convert_hf_checkpoint.ConversionError, match="no .*safetensors"):
        convert_hf_checkpoint.convert(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(convert_hf_checkpoint.ConversionError, match="must differ"):
        convert_hf_checkpoint.convert(tmp_path / "empty", tmp_path / "empty")
    with pytest.raises(SystemExit) as e:
        convert_hf_checkpoint.main(["--checkpoint-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: no ")


# ---------------------------------------------------------------------------------------------------------------
# KV cache (our model only)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny")).eval()
    randomize_(model, seed=2)
    ids = torch.randint(0, model.args.vocab_size, (1, 16))
    with torch.no_grad():
        model.setup_caches(1, 32)
        full = model(ids, torch.arange(16))
        model.setup_caches(1, 32)
        steps = torch.cat([model(ids[:, i : i + 1], torch.tensor([i])) for i in range(16)], dim=1)
        model.setup_caches(1, 32)
        halves = torch.cat([model(ids[:, :9], torch.arange(9)), model(ids[:, 9:], torch.arange(9, 16))], dim=1)
    assert full.abs().max() > 1.0
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(halves, full, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# GGUF


def byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """A toy GPT-2 style vocabulary: 3 control tokens, the 256 byte symbols, and a few merges."""
    from tokenizers import pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in merges]
    token_types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, merges, token_types


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(args: ModelArgs, scaling: dict) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for Llama-3.1 scaling (LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (args.rope_base ** (np.arange(0, args.head_dim, 2, dtype=np.float64) / args.head_dim))
    old_ctx, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(path: Path, qtype, tied: bool, scaling: dict | None) -> tuple[ModelArgs, dict, dict]:
    """A 2-layer 'llama' GGUF. Returns (args, original state dict in our layout, what the converter should read)."""
    import gguf
    from gguf.quants import dequantize, quantize

    tokens, merges, token_types = byte_level_vocab()
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=len(tokens), intermediate_size=128)
    args.rope_base, args.max_seq_len, args.norm_eps, args.tie_embeddings = 500000.0, 512, 1e-5, tied
    model = Transformer(args)
    randomize_(model, seed=3)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if tied:
        del sd["output.weight"]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_base)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    expected = {}  # ours name -> what the converter must produce (original, or its quantization round trip)

    def add(name: str, ours: str, t: torch.Tensor, permute_heads: int = 0) -> None:
        a = t.numpy().astype(np.float32)
        stored = llama_cpp_permute(a, permute_heads) if permute_heads else a
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = quantize(stored, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            expected.setdefault(ours, []).append(torch.from_numpy(dequantize(quantize(a, qtype), qtype)))
        else:  # norms stay F32, as llama.cpp keeps them
            w.add_tensor(name, stored)
            expected.setdefault(ours, []).append(t)

    add("token_embd.weight", "tok_embeddings.weight", sd["tok_embeddings.weight"])
    for i in range(args.n_layers):
        p, hd = f"layers.{i}.", args.head_dim
        q, k, v = sd[p + "attention.wqkv.weight"].split([args.n_heads * hd, args.n_kv_heads * hd, args.n_kv_heads * hd])
        gate, up = sd[p + "feed_forward.w13.weight"].chunk(2)
        add(f"blk.{i}.attn_norm.weight", p + "attention_norm.weight", sd[p + "attention_norm.weight"])
        add(f"blk.{i}.attn_q.weight", p + "attention.wqkv.weight", q, permute_heads=args.n_heads)
        add(f"blk.{i}.attn_k.weight", p + "attention.wqkv.weight", k, permute_heads=args.n_kv_heads)
        add(f"blk.{i}.attn_v.weight", p + "attention.wqkv.weight", v)
        add(f"blk.{i}.attn_output.weight", p + "attention.wo.weight", sd[p + "attention.wo.weight"])
        add(f"blk.{i}.ffn_norm.weight", p + "ffn_norm.weight", sd[p + "ffn_norm.weight"])
        add(f"blk.{i}.ffn_gate.weight", p + "feed_forward.w13.weight", gate)
        add(f"blk.{i}.ffn_up.weight", p + "feed_forward.w13.weight", up)
        add(f"blk.{i}.ffn_down.weight", p + "feed_forward.w2.weight", sd[p + "feed_forward.w2.weight"])
    add("output_norm.weight", "norm.weight", sd["norm.weight"])
    if not tied:
        add("output.weight", "output.weight", sd["output.weight"])
    if scaling:
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(args, scaling))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return args, sd, {k: torch.cat(v) for k, v in expected.items()}


GGUF_CASES = {  # name: (quantization, tied, rope scaling)
    "f32-untied": ("F32", False, None),
    "q8_0-tied-llama3.1-rope": (
        "Q8_0",
        True,
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_roundtrip(tmp_path: Path, case: str):
    import gguf

    qname, tied, scaling = GGUF_CASES[case]
    args, original, expected = write_tiny_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType[qname], tied, scaling)
    convert_gguf.main(["--gguf", str(tmp_path / "tiny.gguf"), "--out-dir", str(tmp_path / "ours")])

    cfg = ModelArgs.from_json(tmp_path / "ours" / "config.json")
    assert cfg == ModelArgs(**{**args.to_dict(), "rope_scaling": scaling})
    converted = torch.load(tmp_path / "ours" / "model.pth", weights_only=True)
    assert converted.keys() == expected.keys()
    for name, want in expected.items():
        assert torch.equal(converted[name], want), name  # exact: the same dequantization, un-permuted
        orig = original[name]
        assert (converted[name] - orig).abs().max() <= orig.abs().max() / 127, name  # Q8_0 error bound

    ours = load_model(tmp_path / "ours", dtype=torch.float32)
    assert ours.args.tie_embeddings == tied
    if qname == "F32":  # same weights: the converted model's logits equal the original model's
        reference = Transformer(args).eval()
        reference.load_state_dict(original)
        ids = torch.randint(0, args.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            ours.setup_caches(1, 16)
            reference.setup_caches(1, 16)
            torch.testing.assert_close(ours(ids, torch.arange(10)), reference(ids, torch.arange(10)), rtol=0, atol=0)


def test_gguf_tokenizer(tmp_path: Path):
    import gguf
    from tokenizers import Tokenizer

    write_tiny_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.F32, tied=True, scaling=None)
    out = convert_gguf.convert(tmp_path / "tiny.gguf", tmp_path / "ours")
    tokens, _, _ = byte_level_vocab()
    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tk.encode("<|im_start|>hello world<|im_end|>", add_special_tokens=False).ids
    assert ids == [1, tokens.index("hello"), tokens.index("Ġworld"), 2]
    assert tk.decode(ids, skip_special_tokens=False) == "<|im_start|>hello world<|im_end|>"
    assert tk.decode(tk.encode("héllo, wörld!").ids) == "héllo, wörld!"  # bytes outside the merges
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False and "<|im_start|>" in config["chat_template"]
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 2}


def test_gguf_user_errors(tmp_path: Path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(convert_gguf.ConversionError, match="unsupported GGUF architecture 'qwen2'"):
        convert_gguf.convert(tmp_path / "qwen.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(convert_gguf.ConversionError, match="cannot read"):
        convert_gguf.convert(tmp_path / "junk.gguf", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# CLI errors: one line on stderr, exit status 2, no traceback


@pytest.mark.parametrize(
    "argv",
    [
        ["scripts/convert_hf_checkpoint.py", "--checkpoint-dir", "{tmp}/no-such-dir"],
        ["scripts/convert_gguf.py", "--gguf", "{tmp}/no-such.gguf", "--out-dir", "{tmp}/out"],
    ],
)
def test_cli_missing_input(tmp_path: Path, argv: list[str]):
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
