"""Official EAGLE-1 head -> our format: parity with a transformers-built reference head, target checks, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT

import draft as Dr
import model as M

sys.path.insert(0, str(ROOT / "scripts"))
import convert_eagle_checkpoint as CE  # noqa: E402

SCRIPT = ROOT / "scripts" / "convert_eagle_checkpoint.py"
TOL = 1e-4
# A head for the tiny target of conftest.make_checkpoint (dim 64, vocab 320) with its own GQA shape and MLP width.
HEAD = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96, vocab_size=320)
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=16,
)  # fmt: skip
CASES = {  # name: (weights format, config.json overrides, fc bias, embed_tokens: None / "copy" / "other")
    # No "bias" key (official default: fc bias), no rope key (theta 10000), an fp16 copy of the target's embedding.
    "bin-embed": ("bin", {}, True, "copy"),
    # transformers 5 style rope_parameters with Llama-3.1 scaling; original context 16 < our 80 positions.
    "safetensors-llama3": ("safetensors", dict(bias=True, rope_parameters=LLAMA3_ROPE), True, None),
    # transformers 4 style rope_theta + rope_scaling null, sharded with an index, no fc bias, someone else's embedding.
    "sharded-nobias": ("sharded", dict(bias=False, rope_theta=50000.0, rope_scaling=None), False, "other"),
}


def official_config(overrides: dict | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "torch_dtype": "float16",
        **HEAD,
        **(overrides or {}),
    }


def official_weights(cfg: dict, fc_bias: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the official EAGLE-1 names; weights large enough that attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    H, ffn = cfg["hidden_size"], cfg["intermediate_size"]
    hd = H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {
        "fc.weight": (H, 2 * H),
        "layers.0.self_attn.q_proj.weight": (q, H),
        "layers.0.self_attn.k_proj.weight": (kv, H),
        "layers.0.self_attn.v_proj.weight": (kv, H),
        "layers.0.self_attn.o_proj.weight": (H, q),
        "layers.0.mlp.gate_proj.weight": (ffn, H),
        "layers.0.mlp.up_proj.weight": (ffn, H),
        "layers.0.mlp.down_proj.weight": (H, ffn),
    }
    w = {k: 0.15 * torch.randn(s, generator=g) for k, s in shapes.items()}
    w["layers.0.post_attention_layernorm.weight"] = 1 + 0.2 * torch.randn(H, generator=g)
    if fc_bias:
        w["fc.bias"] = 0.15 * torch.randn(H, generator=g)
    return w


def write_official(folder: Path, cfg: dict, weights: dict[str, torch.Tensor], fmt: str) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = {k: v.contiguous() for k, v in weights.items()}
    if fmt == "bin":
        torch.save(weights, folder / "pytorch_model.bin")
    elif fmt == "safetensors":
        save_file(weights, str(folder / "model.safetensors"))
    else:  # two shards + index, as save_pretrained writes them
        names = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({k: weights[k] for k in keys}, str(folder / file))
        index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def run_cli(*args, subprocess_: bool = True, capsys=None) -> subprocess.CompletedProcess:
    """The script as `python scripts/convert_eagle_checkpoint.py ...`, or (faster: no new interpreter) its main()."""
    argv = [str(a) for a in args]
    if subprocess_:
        return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, cwd=ROOT)
    capsys.readouterr()
    try:
        CE.main(argv)
        rc = 0
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, rc, captured.out, captured.err)


def reference_head(cfg: dict, weights: dict[str, torch.Tensor], fc_bias: bool, rope: dict, target: M.Transformer,
                   tokens: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The official head's forward, built from transformers' Llama modules: (features [1, S, D], logits [1, S, V])."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    hf_cfg = LlamaConfig(
        hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg["rms_norm_eps"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rope_parameters=rope,
        attn_implementation="eager",  # additive float mask [B, 1, S, S]
    )
    layer = LlamaDecoderLayer(hf_cfg, layer_idx=0)
    layer.input_layernorm = nn.Identity()  # EAGLE-1's layer 0 has no input norm
    layer.load_state_dict({k.removeprefix("layers.0."): v for k, v in weights.items() if k.startswith("layers.0.")})
    fc = nn.Linear(2 * cfg["hidden_size"], cfg["hidden_size"], bias=fc_bias)
    fc.load_state_dict({k.removeprefix("fc."): v for k, v in weights.items() if k.startswith("fc.")})
    rotary = LlamaRotaryEmbedding(hf_cfg)
    layer.eval()

    S = tokens.size(1)
    x = fc(torch.cat([F.embedding(tokens, target.tok_embeddings.weight), feats], dim=-1))
    position_ids = torch.arange(S)[None]
    cos, sin = rotary(x, position_ids)
    mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
    y = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin))
    return y, y @ target.output.weight.T


def canonical_rope(overrides: dict) -> dict:
    if "rope_parameters" in overrides:
        return overrides["rope_parameters"]
    return {"rope_type": "default", "rope_theta": overrides.get("rope_theta", 10000.0)}


@torch.inference_mode()
@pytest.mark.parametrize("case", list(CASES))
def test_converted_head_matches_transformers_reference(tiny_ckpt, tmp_path, capsys, case):
    fmt, overrides, fc_bias, embed = CASES[case]
    target = M.load_model(tiny_ckpt, dtype=torch.float32)
    cfg = official_config(overrides)
    weights = official_weights(cfg, fc_bias, seed=len(case))
    stored = dict(weights)
    if embed == "copy":  # official checkpoints keep the frozen embedding in fp16
        stored["embed_tokens.weight"] = target.tok_embeddings.weight.half()
    elif embed == "other":
        emb = target.tok_embeddings.weight
        stored["embed_tokens.weight"] = emb + 0.1 * torch.randn_like(emb)
    src = write_official(tmp_path / "official", cfg, stored, fmt)

    out = tmp_path / "converted"
    cli = case == "bin-embed"  # one case through a real `python scripts/...` run, the others through main()
    r = run_cli("--head-dir", src, "--out", out, "--target", tiny_ckpt, subprocess_=cli, capsys=capsys)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "wrote" in r.stdout
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == (1 if embed == "other" else 0), r.stderr
    if embed == "copy":
        assert "embed_tokens matches" in r.stdout

    saved = json.loads((out / "config.json").read_text())
    assert saved["fc_bias"] is fc_bias
    assert saved["args"]["n_layers"] == 1 and saved["args"]["n_kv_heads"] == 1
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not any("embed" in k for k in f.keys())

    head = Dr.load_head(out, target.args)
    torch.manual_seed(0)
    for S in (12, 80):  # small_attention and scaled_dot_product_attention paths
        tokens = torch.randint(0, target.args.vocab_size, (1, S))
        feats = torch.randn(1, S, target.args.dim)
        ref_y, ref_logits = reference_head(cfg, weights, fc_bias, canonical_rope(overrides), target, tokens, feats)

        head.setup_cache(committed_slots=S + 3, scratch_slots=1)
        pos = torch.arange(S)
        slots = torch.arange(S + 4)
        mask = (slots[None] <= pos[:, None])[None, None]  # [1, 1, S, slots]
        y = head(target.tok_embeddings(tokens), feats, pos, pos, mask)
        torch.testing.assert_close(y, ref_y, atol=TOL, rtol=TOL)
        torch.testing.assert_close(target.output(y), ref_logits, atol=TOL, rtol=TOL)
        assert ref_logits.std() > 1.0  # a meaningful comparison, not near-zero logits


def error_case(tmp_path: Path, case: str) -> list:
    """CLI arguments for one user error; the official folder (if any) is written under tmp_path."""
    src = tmp_path / "official"
    cfg = official_config()
    weights = official_weights(cfg, fc_bias=True)
    if case == "missing-dir":
        return ["--head-dir", tmp_path / "nope"]
    if case == "no-weights":
        src.mkdir()
        (src / "config.json").write_text(json.dumps(cfg))
        return ["--head-dir", src]
    if case == "dim-does-not-fit-target":
        cfg = official_config(dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1))
        write_official(src, cfg, official_weights(cfg, fc_bias=True), "safetensors")
        return ["--head-dir", src]
    if case == "unknown-key":
        weights["layers.0.input_layernorm.weight"] = torch.ones(cfg["hidden_size"])
    if case == "eagle3-head":
        weights = {k.replace("layers.0.", "midlayer."): v for k, v in weights.items()}
    if case == "rope-type":
        cfg["rope_scaling"] = dict(type="yarn", factor=4.0, original_max_position_embeddings=64)
    if case == "bias-mismatch":
        cfg["bias"] = False
    if case == "wrong-shape":
        weights["layers.0.mlp.down_proj.weight"] = weights["layers.0.mlp.down_proj.weight"][:, :64]
    write_official(src, cfg, weights, "bin")
    return ["--head-dir", src]


ERRORS = {  # case: words the message must contain
    "missing-dir": "head dir not found",
    "no-weights": "no *.safetensors or pytorch_model*.bin",
    "dim-does-not-fit-target": "does not fit the target",
    "unknown-key": "input_layernorm",
    "eagle3-head": "EAGLE-3",
    "rope-type": "unsupported rope type 'yarn'",
    "bias-mismatch": "fc.bias",
    "wrong-shape": "layer.feed_forward.w2.weight: shape (64, 64)",
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_cli_errors(tiny_ckpt, tmp_path, capsys, case):
    out = tmp_path / "converted"
    cli = case == "dim-does-not-fit-target"  # one error through a real `python scripts/...` run
    r = run_cli(*error_case(tmp_path, case), "--out", out, "--target", tiny_ckpt, subprocess_=cli, capsys=capsys)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    assert ERRORS[case] in errors[0], errors[0]
    if case == "dim-does-not-fit-target":
        assert "dim 32" in errors[0] and "dim 64" in errors[0]
    assert not (out / "model.safetensors").exists()


def test_converted_head_rejected_by_another_target(tmp_path, capsys):
    """The converted folder itself records the head's shape: load_head refuses a target of another width."""
    src = write_official(tmp_path / "official", official_config(), official_weights(official_config(), True), "bin")
    r = run_cli("--head-dir", src, "--out", tmp_path / "converted", subprocess_=False, capsys=capsys)  # no --target
    assert r.returncode == 0, r.stderr
    other = M.ModelArgs(**{**M.PRESETS["tiny"], "vocab_size": 320, "dim": 128})
    with pytest.raises(Dr.HeadError, match="does not fit the target"):
        Dr.load_head(tmp_path / "converted", other)
