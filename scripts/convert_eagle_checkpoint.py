"""Convert an official EAGLE-1 draft head (also the heads EAGLE-2 uses) into our draft-head layout.

    python scripts/convert_eagle_checkpoint.py --head-dir ~/hf/EAGLE-llama2-chat-7B --out checkpoints/eagle-l2-7b \
        --target checkpoints/Llama-2-7b-chat-hf

The official folder holds config.json (a LlamaConfig-like dict; "bias" = fc bias, absent => true) and the weights
(pytorch_model.bin, model.safetensors, or shards of either) with keys fc.{weight,bias}, layers.0.self_attn.*_proj,
layers.0.mlp.{gate,up,down}_proj, layers.0.post_attention_layernorm and usually embed_tokens (a frozen copy of the
target's embedding: dropped, the target's own is used). The output is draft.save_head's format: model.safetensors
(fc.*, layer.attention.wqkv = cat[q, k, v], layer.attention.wo, layer.feed_forward.w13 = cat[gate, up],
layer.feed_forward.w2, layer.ffn_norm) + config.json. No row permutation: our RoPE is HF's rotate-half.

With --target, the head must fit the target (dim, vocab) and, when the folder has embed_tokens, a warning is printed if
it differs from the target's embedding (a head trained for another model). Every user error prints one line
`error: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402
from convert_hf_checkpoint import (  # noqa: E402
    ConversionError,
    check_mlp,
    check_names_and_shapes,
    read_weights,
    rope_settings,
    weight_files,
)
from torch import Tensor  # noqa: E402

from draft import EagleHead, save_head  # noqa: E402
from model import CheckpointError, ModelArgs, resolve_checkpoint  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMBED_RTOL = 1e-2  # |head embed - target embed| <= EMBED_RTOL * max|target embed|: fp16/bf16 copies of one tensor pass
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old transformers saved this buffer


def stderr(line: str) -> None:
    print(line, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# config.json -> ModelArgs


def read_head_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {folder}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot parse {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return cfg


def head_config_to_args(cfg: dict) -> ModelArgs:
    """ModelArgs (n_layers=1) of the draft layer described by an official EAGLE-1 config.json."""
    if cfg.get("num_hidden_layers", 1) not in (1, None):
        raise ConversionError(f"num_hidden_layers={cfg['num_hidden_layers']}: only one-layer heads are supported")
    check_mlp(cfg)
    rope_base, rope_scaling = rope_settings(cfg)
    try:
        n_heads = int(cfg["num_attention_heads"])
        return ModelArgs(
            dim=int(cfg["hidden_size"]),
            n_layers=1,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or 0),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_base=rope_base,
            rope_scaling=rope_scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=False,
        )
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    except (ValueError, TypeError) as e:
        raise ConversionError(f"bad config.json: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Weights


def convert_head_state_dict(hf: dict[str, Tensor], args: ModelArgs, fc_bias: bool) -> dict[str, Tensor]:
    """Rename and fuse the official tensors into EagleHead's state dict; consumes `hf` (embed_tokens already popped)."""

    def pop(name: str) -> Tensor:
        if name not in hf:
            raise ConversionError(f"head weights lack tensor {name!r}")
        return hf.pop(name)

    def cat(names: list[str]) -> Tensor:
        parts = [pop(n) for n in names]
        try:
            return torch.cat(parts)
        except RuntimeError:
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, parts, strict=True))
            raise ConversionError(f"cannot fuse tensors of mismatched shapes: {shapes}") from None

    attn, mlp = "layers.0.self_attn.", "layers.0.mlp."
    sd = {"fc.weight": pop("fc.weight")}
    if fc_bias:
        sd["fc.bias"] = pop("fc.bias")
    sd["layer.attention.wqkv.weight"] = cat([f"{attn}{p}_proj.weight" for p in "qkv"])
    if args.qkv_bias:
        sd["layer.attention.wqkv.bias"] = cat([f"{attn}{p}_proj.bias" for p in "qkv"])
    sd["layer.attention.wo.weight"] = pop(attn + "o_proj.weight")
    o_bias = hf.pop(attn + "o_proj.bias", None)
    if o_bias is not None and o_bias.any():
        raise ConversionError("a non-zero o_proj bias is not supported")
    sd["layer.feed_forward.w13.weight"] = cat([mlp + "gate_proj.weight", mlp + "up_proj.weight"])
    sd["layer.feed_forward.w2.weight"] = pop(mlp + "down_proj.weight")
    sd["layer.ffn_norm.weight"] = pop("layers.0.post_attention_layernorm.weight")
    leftover = sorted(k for k in hf if not k.endswith(IGNORED_SUFFIXES))
    if leftover:
        hint = ""
        if any(k.startswith("layers.0.input_layernorm") for k in leftover):
            hint = " (an EAGLE-1 head's layer 0 has no input_layernorm)"
        raise ConversionError(f"{len(leftover)} unknown tensors, e.g. {leftover[0]!r}{hint}")
    return sd


def check_head_state_dict(sd: dict[str, Tensor], args: ModelArgs, fc_bias: bool) -> None:
    """Names and shapes must be exactly what EagleHead(args, fc_bias) expects."""
    with torch.device("meta"):
        expected = EagleHead(args, fc_bias).state_dict()
    check_names_and_shapes(sd, expected, "config.json")


def resolve_fc_bias(cfg: dict, hf: dict[str, Tensor]) -> bool:
    has_bias = "fc.bias" in hf
    if "bias" in cfg:
        if bool(cfg["bias"]) != has_bias:
            state = "has" if has_bias else "lacks"
            raise ConversionError(f"config.json says bias={cfg['bias']} but the weights {state} fc.bias")
    elif not has_bias:  # the official loader would fail here (strict load, bias defaults to true); follow the weights
        stderr("note: config.json has no 'bias' (default true) but the weights lack fc.bias: no fc bias")
    return has_bias


# ---------------------------------------------------------------------------------------------------------------
# Target checks


def read_target(target: Path) -> tuple[Path, ModelArgs]:
    try:
        folder, weights = resolve_checkpoint(target)
        return weights, ModelArgs.from_json(folder / "config.json")
    except CheckpointError as e:
        raise ConversionError(f"--target: {e}") from None
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ConversionError(f"--target: bad config.json in {target}: {e}") from None


def check_fits_target(args: ModelArgs, target_args: ModelArgs, target: Path) -> None:
    if args.dim != target_args.dim or args.vocab_size != target_args.vocab_size:
        raise ConversionError(f"the head (dim {args.dim}, vocab {args.vocab_size}) does not fit the target {target} "
                              f"(dim {target_args.dim}, vocab {target_args.vocab_size})")  # fmt: skip
    rope, target_rope = (args.rope_base, args.rope_scaling), (target_args.rope_base, target_args.rope_scaling)
    if rope != target_rope:
        stderr(f"note: the head's RoPE (base {rope[0]:g}, scaling {rope[1]}) differs from the target's "
               f"(base {target_rope[0]:g}, scaling {target_rope[1]}); converting the head's as is")  # fmt: skip


def embedding_difference(head_embed: Tensor, target_embed: Tensor, rows: int = 4096) -> tuple[float, float]:
    """(max |head - target|, max |target|) in float32, a block of rows at a time (full-size embeddings are large)."""
    diff = scale = 0.0
    for i in range(0, target_embed.size(0), rows):
        a, b = head_embed[i : i + rows].float(), target_embed[i : i + rows].float()
        diff = max(diff, (a - b).abs().max().item())
        scale = max(scale, b.abs().max().item())
    return diff, scale


def compare_embedding(head_embed: Tensor, target_weights: Path) -> None:
    """One warning line on stderr when the head's embed_tokens is not (a rounded copy of) the target's embedding."""
    try:
        ckpt = torch.load(target_weights, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file can raise many things
        raise ConversionError(f"--target: cannot read {target_weights}: {e}") from None
    if isinstance(ckpt, dict) and "state_dict" in ckpt:  # quantized: the embedding stays a plain float tensor
        ckpt = ckpt["state_dict"]
    target_embed = ckpt.get("tok_embeddings.weight") if isinstance(ckpt, dict) else None
    if target_embed is None or not target_embed.is_floating_point():
        stderr(f"note: no float tok_embeddings.weight in {target_weights}: embed_tokens not compared")
        return
    if head_embed.shape != target_embed.shape:
        stderr(f"warning: the head's embed_tokens {tuple(head_embed.shape)} and the target's embedding "
               f"{tuple(target_embed.shape)} differ in shape: was the head trained for this target?")  # fmt: skip
        return
    diff, scale = embedding_difference(head_embed, target_embed)
    if diff > EMBED_RTOL * max(scale, 1e-12):
        stderr(f"warning: the head's embed_tokens differs from the target's embedding (max abs diff {diff:.3g}, "
               f"tolerance {EMBED_RTOL * scale:.3g}): was the head trained for this target?")  # fmt: skip
    else:
        print(f"embed_tokens matches the target's embedding (max abs diff {diff:.3g})")


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def convert(head_dir: str | Path, out_dir: str | Path, target: str | Path | None = None,
            dtype: torch.dtype | None = None) -> Path:  # fmt: skip
    """Convert the official EAGLE-1 folder `head_dir` into `out_dir`; returns out_dir. Raises ConversionError."""
    src, out = Path(head_dir), Path(out_dir)
    if not src.is_dir():
        raise ConversionError(f"head dir not found: {src}")
    if out.resolve() == src.resolve():
        raise ConversionError("--out must differ from --head-dir (config.json would be overwritten)")
    cfg = read_head_config(src)
    args = head_config_to_args(cfg)
    target_weights = None
    if target is not None:
        target_weights, target_args = read_target(Path(target))
        check_fits_target(args, target_args, Path(target))
    files = weight_files(src)
    print(f"reading {src}: {', '.join(f.name for f in files)}")
    hf = read_weights(files, dtype)
    if any(k.startswith("midlayer.") for k in hf):
        raise ConversionError("midlayer.* tensors: an EAGLE-3 head (only EAGLE-1/2 heads are supported)")
    embed = hf.pop("embed_tokens.weight", None)
    args.qkv_bias = all(f"layers.0.self_attn.{p}_proj.bias" in hf for p in "qkv")
    fc_bias = resolve_fc_bias(cfg, hf)
    sd = convert_head_state_dict(hf, args, fc_bias)
    check_head_state_dict(sd, args, fc_bias)
    if embed is not None and target_weights is not None:
        compare_embedding(embed, target_weights)
    with torch.device("meta"):
        head = EagleHead(args, fc_bias)
    head.load_state_dict(sd, strict=True, assign=True)
    save_head(head, out, extra={"converted_from": str(src.resolve())})
    n_params = sum(t.numel() for t in sd.values())
    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()}))
    print(f"wrote {out}: {n_params / 1e6:.2f}M parameters ({dtypes}); dim {args.dim}, heads {args.n_heads}/"
          f"{args.n_kv_heads} kv, head_dim {args.head_dim}, ffn {args.intermediate_size}, fc bias {fc_bias}, "
          f"rope base {args.rope_base:g}{' (llama3 scaling)' if args.rope_scaling else ''}; "
          f"embed_tokens {'dropped' if embed is not None else 'absent'} (the target's embedding is used)")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dir", required=True, type=Path, help="official EAGLE-1 folder: config.json + weights")
    parser.add_argument("--out", required=True, type=Path, help="output folder (model.safetensors + config.json)")
    parser.add_argument("--target", type=Path, help="our target checkpoint folder: check that the head fits it")
    parser.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: as stored)")
    a = parser.parse_args(argv)
    try:
        convert(a.head_dir, a.out, a.target, DTYPES.get(a.dtype))
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
