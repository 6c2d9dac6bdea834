"""Convert a Hugging Face Llama / Mistral / Qwen2 folder into our checkpoint layout.

    python scripts/convert_hf_checkpoint.py --checkpoint-dir ~/hf/Meta-Llama-3.1-8B-Instruct --dtype bfloat16

Reads config.json and the weights (model.safetensors, sharded safetensors with model.safetensors.index.json, or
pytorch_model*.bin) and writes checkpoints/<name>/{model.pth, config.json} plus the tokenizer files it finds.
q/k/v and gate/up are fused (wqkv, w13) without any row permutation: our RoPE is HF's rotate-half.
Every user error prints one line `error: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import ModelArgs, Transformer, save_checkpoint  # noqa: E402

MODEL_TYPES = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",  # transformers >= 4.50 saves the chat template here instead of tokenizer_config.json
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConversionError(Exception):
    """A user-facing problem: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# config.json -> ModelArgs


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {folder}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot parse {path}: {e}") from None


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(rope_base, rope_scaling) from transformers 5 `rope_parameters` or transformers 4 `rope_theta`/`rope_scaling`."""
    params = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    if any(isinstance(v, dict) for v in params.values()):
        raise ConversionError("per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConversionError("partial_rotary_factor != 1 is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConversionError(f"unsupported rope type {rope_type!r} (supported: default, llama3)")
    try:
        scaling = {
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_position_embeddings": int(
                params.get("original_max_position_embeddings", cfg["max_position_embeddings"])
            ),
        }
    except KeyError as e:
        raise ConversionError(f"llama3 rope scaling lacks {e.args[0]!r}") from None
    return theta, scaling


def check_mlp(cfg: dict) -> None:
    """The MLP must be ours: SwiGLU (silu) without biases."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
    if cfg.get("mlp_bias"):
        raise ConversionError("mlp_bias is not supported")


def config_to_args(cfg: dict) -> ModelArgs:
    model_type = cfg.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"unsupported model_type {model_type!r} (supported: {', '.join(MODEL_TYPES)})")
    check_mlp(cfg)
    rope_base, rope_scaling = rope_settings(cfg)
    max_seq_len = int(cfg.get("max_position_embeddings", 4096))
    # We have no sliding-window attention: cap the context so that every sequence we allow is exact.
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
    if window and window < max_seq_len:
        print(f"note: sliding_window={window}: max_seq_len capped from {max_seq_len} to {window}", file=sys.stderr)
        max_seq_len = int(window)
    try:
        n_heads = int(cfg["num_attention_heads"])
        return ModelArgs(
            dim=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=int(cfg["vocab_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            head_dim=int(cfg.get("head_dim") or 0),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_base=rope_base,
            rope_scaling=rope_scaling,
            max_seq_len=max_seq_len,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        )
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    except ValueError as e:
        raise ConversionError(f"bad config.json: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# Weights


def shards_from_index(index: Path) -> list[Path]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ConversionError(f"bad index {index}: {e}") from None
    for name in names:
        if not (index.parent / name).is_file():
            raise ConversionError(f"{index.name} names a missing shard: {name}")
    return [index.parent / n for n in names]


def weight_files(folder: Path) -> list[Path]:
    """The shards to read: safetensors (indexed or not), else pytorch_model*.bin (indexed or not)."""
    if (folder / "model.safetensors.index.json").is_file():
        return shards_from_index(folder / "model.safetensors.index.json")
    for pattern in ("model*.safetensors", "*.safetensors"):
        if files := sorted(folder.glob(pattern)):
            return files
    if (folder / "pytorch_model.bin.index.json").is_file():
        return shards_from_index(folder / "pytorch_model.bin.index.json")
    if files := sorted(folder.glob("pytorch_model*.bin")):
        return files
    raise ConversionError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")


def count_tensors(files: list[Path]) -> int | None:
    if files[0].suffix != ".safetensors":
        return None
    total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                total += len(list(sf.keys()))
        except Exception:  # reported with context by iter_tensors
            return None
    return total


def load_shard(f: Path) -> Iterator[tuple[str, Tensor]]:
    if f.suffix == ".safetensors":
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)
        return
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(f, map_location="cpu", weights_only=True)
    yield from state.items()


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every tensor of every shard, with a progress bar."""
    with tqdm(total=count_tensors(files), unit="tensor", desc="reading") as bar:
        for f in files:
            bar.set_postfix_str(f.name)
            try:
                for name, t in load_shard(f):
                    yield name, t
                    bar.update()
            except Exception as e:  # corrupt files raise many kinds of errors
                first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConversionError(f"cannot read {f}: {first_line}") from None


def read_weights(files: list[Path], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """HF tensors by name without the leading 'model.', cast to `dtype` (None keeps the stored dtype)."""
    hf = {}
    for name, t in iter_tensors(files):
        name = name.removeprefix("model.")
        hf[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return hf


def convert_state_dict(hf: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Rename and fuse HF tensors into our layout; consumes `hf`."""

    def pop(name: str) -> Tensor:
        if name not in hf:
            raise ConversionError(f"checkpoint lacks tensor {name!r}")
        return hf.pop(name)

    sd = {"tok_embeddings.weight": pop("embed_tokens.weight"), "norm.weight": pop("norm.weight")}
    if args.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        sd["output.weight"] = pop("lm_head.weight")
    for i in range(args.n_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        sd[dst + "attention_norm.weight"] = pop(src + "input_layernorm.weight")
        sd[dst + "ffn_norm.weight"] = pop(src + "post_attention_layernorm.weight")
        sd[dst + "attention.wqkv.weight"] = torch.cat([pop(attn + f"{p}_proj.weight") for p in "qkv"])
        if args.qkv_bias:
            sd[dst + "attention.wqkv.bias"] = torch.cat([pop(attn + f"{p}_proj.bias") for p in "qkv"])
        sd[dst + "attention.wo.weight"] = pop(attn + "o_proj.weight")
        o_bias = hf.pop(attn + "o_proj.bias", None)  # Llama attention_bias=True also biases o_proj
        if o_bias is not None and o_bias.any():
            raise ConversionError("a non-zero o_proj bias is not supported")
        mlp = src + "mlp."
        sd[dst + "feed_forward.w13.weight"] = torch.cat([pop(mlp + "gate_proj.weight"), pop(mlp + "up_proj.weight")])
        sd[dst + "feed_forward.w2.weight"] = pop(mlp + "down_proj.weight")
    leftover = sorted(k for k in hf if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise ConversionError(f"{len(leftover)} unexpected tensors, e.g. {leftover[0]!r} (does config.json match?)")
    return sd


def check_state_dict(sd: dict[str, Tensor], args: ModelArgs, source: str = "config.json") -> None:
    """Names and shapes must be exactly what Transformer(args) expects."""
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    if args.tie_embeddings:
        expected.pop("output.weight")
    check_names_and_shapes(sd, expected, source)


def check_names_and_shapes(sd: dict[str, Tensor], expected: dict[str, Tensor], source: str) -> None:
    """sd must hold exactly the names of `expected`, with the same shapes (`source` names where those came from)."""
    if missing := sorted(expected.keys() - sd.keys()):
        raise ConversionError(f"converted weights lack {missing[0]!r}")
    if extra := sorted(sd.keys() - expected.keys()):
        raise ConversionError(f"unexpected converted tensor {extra[0]!r}")
    for name, t in expected.items():
        if sd[name].shape != t.shape:
            raise ConversionError(f"{name}: shape {tuple(sd[name].shape)} but {source} implies {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / (name + ".tmp"))
            (dst / (name + ".tmp")).replace(dst / name)
            copied.append(name)
    return copied


def convert(checkpoint_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert the HF folder `checkpoint_dir` into `out_dir`; returns out_dir. Raises ConversionError."""
    src, out = Path(checkpoint_dir), Path(out_dir)
    if not src.is_dir():
        raise ConversionError(f"checkpoint dir not found: {src}")
    if out.resolve() == src.resolve():
        raise ConversionError("--out-dir must differ from --checkpoint-dir (config.json would be overwritten)")
    args = config_to_args(read_hf_config(src))
    hf = read_weights(weight_files(src), dtype)
    if not args.tie_embeddings and "lm_head.weight" not in hf:
        print("note: no lm_head.weight in the checkpoint: tying it to the embeddings", file=sys.stderr)
        args.tie_embeddings = True
    sd = convert_state_dict(hf, args)
    check_state_dict(sd, args)
    copied = copy_tokenizer_files(src, out)
    save_checkpoint(out, args, sd)  # last: model.pth present means the folder is complete
    n_params = sum(t.numel() for t in sd.values())
    print(f"wrote {out}: {n_params / 1e6:.1f}M parameters, tokenizer files: {', '.join(copied) or 'none'}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", required=True, type=Path, help="HF folder with config.json and weights")
    parser.add_argument("--name", help="output name: checkpoints/<name> (default: the folder's name)")
    parser.add_argument("--out-dir", type=Path, help="output folder (overrides --name)")
    parser.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: as stored)")
    a = parser.parse_args(argv)
    out = a.out_dir or REPO / "checkpoints" / (a.name or a.checkpoint_dir.resolve().name)
    try:
        convert(a.checkpoint_dir, out, DTYPES.get(a.dtype))
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
