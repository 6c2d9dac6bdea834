"""Convert a llama.cpp GGUF file (architecture 'llama') into our checkpoint layout, dequantizing every tensor.

    python scripts/convert_gguf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out-dir checkpoints/SmolLM2-135M-Instruct

Writes <out-dir>/{model.pth, config.json} and, for a 'gpt2' (byte-level BPE) vocabulary, an HF tokenizer.json plus
tokenizer_config.json (chat template, bos/eos) and generation_config.json (eos). llama.cpp stores Q and K with their
rows permuted for its interleaved RoPE; we undo that, since our RoPE is HF's rotate-half.
Every user error prints one line `error: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from convert_hf_checkpoint import ConversionError, check_state_dict  # noqa: E402
from gguf import GGUFReader, GGUFValueType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import ModelArgs, rope_inv_freq, save_checkpoint  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GLOBAL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
LAYER_NAMES = {  # blk.{i}.<gguf> -> layers.{i}.<ours>; q/k/v and gate/up are fused separately
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}
FUSED = {"attn_q.weight": 0, "attn_k.weight": 1, "attn_v.weight": 2, "ffn_gate.weight": 0, "ffn_up.weight": 1}
TOKEN_TYPE_CONTROL = 3
_MISSING = object()


# ---------------------------------------------------------------------------------------------------------------
# Metadata


def open_gguf(path: Path) -> GGUFReader:
    if not path.is_file():
        raise ConversionError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as e:  # a bad file raises ValueError, struct errors, ...
        raise ConversionError(f"cannot read {path} as GGUF: {e}") from None


def field(reader: GGUFReader, key: str, default=_MISSING):
    """A metadata value as a Python str / int / float / bool, or a list of them for arrays."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise ConversionError(f"GGUF metadata lacks {key!r}")
        return default

    def scalar(part: np.ndarray, vtype: GGUFValueType):
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        v = part[0]
        if vtype == GGUFValueType.BOOL:
            return bool(v)
        if isinstance(v, np.floating):
            return float(str(v))  # shortest repr of the stored float32: 1e-05, not 9.999999747378752e-06
        return int(v)

    if f.types[0] == GGUFValueType.ARRAY:
        return [scalar(f.parts[i], f.types[-1]) for i in f.data]
    return scalar(f.parts[f.data[0]], f.types[0])


def read_args(reader: GGUFReader) -> ModelArgs:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(f"unsupported GGUF architecture {arch!r} (only 'llama')")
    if field(reader, "llama.rope.scaling.type", "none") not in ("none", ""):
        raise ConversionError(f"unsupported rope scaling {field(reader, 'llama.rope.scaling.type')!r}")
    n_heads = field(reader, "llama.attention.head_count")
    dim = field(reader, "llama.embedding_length")
    vocab = field(reader, "llama.vocab_size", None) or len(field(reader, "tokenizer.ggml.tokens", []))
    if not vocab:
        raise ConversionError("GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
    try:
        return ModelArgs(
            dim=dim,
            n_layers=field(reader, "llama.block_count"),
            n_heads=n_heads,
            n_kv_heads=field(reader, "llama.attention.head_count_kv", n_heads),
            vocab_size=vocab,
            intermediate_size=field(reader, "llama.feed_forward_length"),
            head_dim=field(reader, "llama.rope.dimension_count", dim // n_heads),
            norm_eps=field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=field(reader, "llama.rope.freq_base", 10000.0),
            max_seq_len=field(reader, "llama.context_length", 4096),
        )
    except (ValueError, TypeError) as e:
        raise ConversionError(f"bad GGUF metadata: {e}") from None


def rope_scaling_from_factors(factors: Tensor, args: ModelArgs) -> dict | None:
    """llama.cpp stores Llama-3.1 RoPE scaling as a `rope_freqs` tensor of per-frequency divisors. Recognise the
    standard Llama-3.1/3.2 parameters (low 1, high 4, original context 8192; factor = the largest divisor)."""
    if torch.all(factors == 1):
        return None
    scaling = dict(factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0)
    scaling["original_max_position_embeddings"] = 8192
    ratio = rope_inv_freq(replace(args, rope_scaling=None)) / rope_inv_freq(replace(args, rope_scaling=scaling))
    if factors.shape != ratio.shape or not torch.allclose(ratio, factors.float(), rtol=1e-4):
        raise ConversionError("rope_freqs tensor does not match Llama-3.1 style scaling: not supported")
    return scaling


# ---------------------------------------------------------------------------------------------------------------
# Tensors


def unpermute(w: np.ndarray, n: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate-half halves), per head."""
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader: GGUFReader, args: ModelArgs, dtype: torch.dtype) -> tuple[dict[str, Tensor], Tensor | None]:
    """Our state dict (fused, un-permuted, in `dtype`) and the rope_freqs tensor if present."""
    sd: dict[str, Tensor] = {}
    pieces: dict[str, list[Tensor | None]] = {}  # fused name -> its parts in order, until all arrived
    rope_freqs = None
    for t in tqdm(reader.tensors, unit="tensor", desc="dequantizing"):
        try:
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # reversed GGUF shape: (out, in)
        except NotImplementedError as e:
            raise ConversionError(f"{t.name}: {e}") from None
        if t.name == "rope_freqs.weight":
            rope_freqs = torch.from_numpy(w)
            continue
        if t.name in GLOBAL_NAMES:
            sd[GLOBAL_NAMES[t.name]] = torch.from_numpy(w).to(dtype)
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        if m is None or (m[2] not in LAYER_NAMES and m[2] not in FUSED):
            raise ConversionError(f"unexpected GGUF tensor {t.name!r}")
        layer, kind = f"layers.{m[1]}.", m[2]
        if kind in LAYER_NAMES:
            sd[layer + LAYER_NAMES[kind]] = torch.from_numpy(w).to(dtype)
            continue
        if kind == "attn_q.weight":
            w = unpermute(w, args.n_heads)
        elif kind == "attn_k.weight":
            w = unpermute(w, args.n_kv_heads)
        attn = kind.startswith("attn_")
        fused = layer + ("attention.wqkv.weight" if attn else "feed_forward.w13.weight")
        parts = pieces.setdefault(fused, [None] * (3 if attn else 2))
        parts[FUSED[kind]] = torch.from_numpy(w).to(dtype)
        if all(p is not None for p in parts):
            sd[fused] = torch.cat(pieces.pop(fused))
    if pieces:
        raise ConversionError(f"GGUF has only some of the tensors for {next(iter(pieces))}")
    return sd, rope_freqs


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def check_tokenizer(reader: GGUFReader) -> str | None:
    """The tokenizer model we will write ('gpt2'), or None when the GGUF has none."""
    kind = field(reader, "tokenizer.ggml.model", None)
    if kind is None:
        print("note: no tokenizer in this GGUF: writing weights only", file=sys.stderr)
    elif kind == "llama":
        raise ConversionError("sentencepiece ('llama') GGUF tokenizers are not supported yet")
    elif kind != "gpt2":
        raise ConversionError(f"unsupported GGUF tokenizer model {kind!r} (only 'gpt2')")
    return kind


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_gpt2_tokenizer(reader: GGUFReader, out: Path) -> None:
    """Byte-level BPE tokenizer.json (same result as transformers' GGUF loading) + tokenizer/generation configs."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = field(reader, "tokenizer.ggml.merges")
    token_type = field(reader, "tokenizer.ggml.token_type", [])
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], byte_fallback=False, fuse_unk=False)
    )
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    special = [i for i, t in enumerate(token_type) if t == TOKEN_TYPE_CONTROL]
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tmp = out / "tokenizer.json.tmp"
    tk.save(str(tmp))
    tmp.replace(out / "tokenizer.json")

    config: dict = {}
    if (template := field(reader, "tokenizer.chat_template", None)) is not None:
        config["chat_template"] = template
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id", None), field(reader, "tokenizer.ggml.eos_token_id", None)
    if bos is not None:
        config["bos_token"] = tokens[bos]
    if eos is not None:
        config["eos_token"] = tokens[eos]
    config["add_bos_token"] = field(reader, "tokenizer.ggml.add_bos_token", False)
    write_json(out / "tokenizer_config.json", config)
    if eos is not None:
        write_json(out / "generation_config.json", {"eos_token_id": eos})


# ---------------------------------------------------------------------------------------------------------------
# Conversion


def convert(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert the GGUF file into the checkpoint folder `out_dir`; returns it. Raises ConversionError."""
    out = Path(out_dir)
    reader = open_gguf(Path(gguf_path))
    args = read_args(reader)
    tokenizer = check_tokenizer(reader)
    sd, rope_freqs = read_tensors(reader, args, dtype)
    if rope_freqs is not None:
        args.rope_scaling = rope_scaling_from_factors(rope_freqs, args)
    args.tie_embeddings = "output.weight" not in sd
    check_state_dict(sd, args, source="the GGUF metadata")
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "gpt2":
        write_gpt2_tokenizer(reader, out)
    save_checkpoint(out, args, sd)  # last: model.pth present means the folder is complete
    n_params = sum(t.numel() for t in sd.values())
    print(f"wrote {out}: {n_params / 1e6:.1f}M parameters in {str(dtype).removeprefix('torch.')}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True, type=Path, help="the .gguf file")
    parser.add_argument("--out-dir", required=True, type=Path, help="checkpoint folder to write")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weight dtype (default: float32)")
    a = parser.parse_args(argv)
    try:
        convert(a.gguf, a.out_dir, DTYPES[a.dtype])
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
