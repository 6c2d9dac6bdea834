"""Llama-family transformer with a static KV cache, written for batch-1 latency.

Shapes use these names everywhere:
  B batch, S tokens in this forward, T cache slots (max_seq_length), D model dim,
  H query heads, KV key/value heads, hd head dim, V vocab.

One forward serves prefill, decode and EAGLE tree verification. The caller says, for every token,
  * `input_pos` [S]: its RoPE position,
  * `cache_pos` [S]: the KV-cache slot it is written to (defaults to input_pos),
  * `mask` [1, 1, S, T] (bool, True = may attend): defaults to causal by slot.
Tree verification writes N tokens to consecutive slots L..L+N-1, rotates them by L + depth, and passes
mask = (slot < L) | tree_mask; `copy_slots` then moves the accepted rows down (no re-rotation needed
because a node's depth equals its final position offset).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    vocab_size: int = 32000
    intermediate_size: int = 11008
    head_dim: int = 0  # 0 = dim // n_heads
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict | None = (
        None  # Llama-3.1: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    )
    max_seq_len: int = 4096  # the model's context length
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2-style bias on q/k/v

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelArgs:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict:
        return asdict(self)


_L31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, intermediate_size=13824),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                       vocab_size=128256, rope_base=500000.0, max_seq_len=8192),
    "llama-3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672,
                        vocab_size=128256, rope_base=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                         vocab_size=128256, rope_base=500000.0, max_seq_len=131072, rope_scaling=_L31_SCALING),
    "llama-3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672,
                          vocab_size=128256, rope_base=500000.0, max_seq_len=131072, rope_scaling=_L31_SCALING),
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                       rope_base=1000000.0, max_seq_len=32768),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536, vocab_size=49152,
                         rope_base=100000.0, max_seq_len=8192, tie_embeddings=True),
    "smollm2-360m": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, intermediate_size=2560, vocab_size=49152,
                         rope_base=100000.0, max_seq_len=8192, tie_embeddings=True),
    "smollm2-1.7b": dict(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, intermediate_size=8192, vocab_size=49152,
                         rope_base=130000.0, max_seq_len=8192, tie_embeddings=True),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=256, max_seq_len=512),
}  # fmt: skip


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, slots: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, n_kv_heads, slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, cache_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # cache_pos: [S]; k, v: [B, KV, S, hd]
        self.k.index_copy_(2, cache_pos, k)
        self.v.index_copy_(2, cache_pos, v)
        return self.k, self.v


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def linear(mod: nn.Module, x: Tensor, norm: nn.Module | None = None, residual: Tensor | None = None,
           gated: bool = False) -> Tensor:  # fmt: skip
    """residual + mod(norm(x)), with norm and residual optional; gated: x is [..., 2K] = [gate | up] and mod's input
    is silu(gate) * up. Linear modules that can do all of it in one kernel (kernels.FewTokenLinear and the int8
    module, on CUDA, see kernels.fused_wmm) have a `fused` method, which returns None where it does not apply; on
    that path the norm and gating run in float32 throughout, on the plain path (the reference, and the CPU's) they
    round as RMSNorm.forward and F.silu do."""
    fused = getattr(mod, "fused", None)
    if fused is not None and (norm is None or isinstance(norm, RMSNorm)):
        y = fused(x, norm, residual, gated)
        if y is not None:
            return y
    if gated:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = mod(norm(x) if norm is not None else x)
    return y if residual is None else residual + y


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies [hd/2], with Llama-3.1 scaling when configured (same as HF's 'llama3' rope)."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = args.rope_scaling
    if not s:
        return inv_freq.float()
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled).float()


def rope_table(args: ModelArgs, n_pos: int) -> Tensor:
    """[n_pos, 2, hd]: cos and sin per position, rotate-half (HF) layout."""
    t = torch.arange(n_pos, dtype=torch.float32)
    freqs = torch.outer(t, rope_inv_freq(args))  # [n_pos, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [n_pos, hd]
    return torch.stack([emb.cos(), emb.sin()], dim=1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    # x: [B, heads, S, hd]; rope: [S, 2, hd] (float32)
    cos, sin = rope[:, 0], rope[:, 1]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv_out = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, cache_pos: Tensor, mask: Tensor, norm: nn.Module | None = None,
                residual: Tensor | None = None) -> Tensor:  # fmt: skip
        """residual + attention(norm(x)) (see `linear`); x: [B, S, dim]."""
        B, S, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = linear(self.wqkv, x, norm)  # [B, S, (H + 2 KV) hd]
        # RoPE on q and k, k and v into the cache: one kernel on CUDA (kernels.rope_and_cache), else these steps
        q = kernels.rope_and_cache(qkv, rope, cache_pos, self.kv_cache.k, self.kv_cache.v, H)  # [B, H, S, hd]
        if q is None:
            q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
            q = q.view(B, S, H, hd).transpose(1, 2)  # [B, H, S, hd]
            k = k.view(B, S, KV, hd).transpose(1, 2)  # [B, KV, S, hd]
            v = v.view(B, S, KV, hd).transpose(1, 2)
            q, k = apply_rope(q, rope), apply_rope(k, rope)
            self.kv_cache.update(cache_pos, k, v)
        k, v = self.kv_cache.k, self.kv_cache.v  # [B, KV, T, hd]
        if S > SMALL_S:  # prefill: a fused kernel, but not cuDNN's (see PREFILL_SDPA)
            with sdpa_kernel(PREFILL_SDPA):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != KV)  # [B, H, S, hd]
            y = y.transpose(1, 2).reshape(B, S, H * hd)
        else:  # decode and tree verification: two Triton kernels on CUDA, else matmuls that torch.compile fuses
            y = kernels.few_token_attention(q, k, v, mask)  # [B, S, H * hd] or None
            if y is None:
                y = small_attention(q, k, v, mask).transpose(1, 2).reshape(B, S, H * hd)
        return linear(self.wo, y, residual=residual)


SMALL_S = 64  # forwards of at most this many tokens use `small_attention`
# SDPA backends allowed for prefill. Not cuDNN: on H100/H200 torch picks it for a masked bf16 prefill, and it builds
# a new execution plan for every new prompt length (50-100 ms host time each, measured: BENCHMARKS.md), which
# dominated EAGLE's time per MT-bench question.
PREFILL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def small_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention for a few query tokens. q: [B, H, S, hd]; k, v: [B, KV, T, hd]; mask: [1, 1, S, T] -> [B, H, S, hd].

    The G = H / KV query heads that share a K/V head are folded into the query length, so grouped-query attention
    needs no repeated K/V: scores [B, KV, G*S, T].
    """
    B, H, S, hd = q.shape
    KV, T = k.size(1), k.size(2)
    G = H // KV
    scores = q.reshape(B, KV, G * S, hd) @ k.transpose(-1, -2)  # [B, KV, G*S, T]
    scores = scores.float().view(B, KV, G, S, T) * hd**-0.5
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask: [1, 1, 1, S, T]
    probs = scores.softmax(-1).to(q.dtype).view(B, KV, G * S, T)
    return (probs @ v).view(B, H, S, hd)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor, norm: nn.Module | None = None, residual: Tensor | None = None) -> Tensor:
        """residual + feed_forward(norm(x)) (see `linear`)."""
        gate_up = linear(self.w13, x, norm)  # [..., 2 * intermediate]
        return linear(self.w2, gate_up, residual=residual, gated=True)  # residual + w2(silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, rope: Tensor, cache_pos: Tensor, mask: Tensor) -> Tensor:
        h = self.attention(x, rope, cache_pos, mask, norm=self.attention_norm, residual=x)  # x + attn(norm(x))
        return self.feed_forward(h, norm=self.ffn_norm, residual=h)  # h + ffn(norm(h))


# In a Block, which RMSNorm feeds which linear (quantize.py weights int4 errors by the norm's weight).
NORM_BEFORE = {"attention.wqkv": "attention_norm", "feed_forward.w13": "ffn_norm"}


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_seq_length = 0
        self.register_buffer("rope", torch.empty(0, 2, args.head_dim), persistent=False)

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the KV cache once: [max_batch_size, KV, max_seq_length, hd] per layer.

        The caller keeps positions within the model's context (args.max_seq_len); slots past it may serve as scratch.
        """
        dtype = dtype or self.norm.weight.dtype
        device = self.norm.weight.device
        for layer in self.layers:
            a = self.args
            layer.attention.kv_cache = KVCache(max_batch_size, a.n_kv_heads, max_seq_length, a.head_dim, dtype).to(
                device
            )
        self.rope = rope_table(self.args, max_seq_length).to(device)
        self.max_seq_length = max_seq_length
        if device.type == "cuda" or kernels.INTERPRET:  # copy_slots' address table, made outside any CUDA graph
            kernels.cache_table(self.kv_caches())
            kernels.counters(device)  # and the counters of the split matmuls and of chunk_topk

    def causal_mask(self, cache_pos: Tensor) -> Tensor:
        """[1, 1, S, T]: token s sees slots <= cache_pos[s]."""
        slots = torch.arange(self.max_seq_length, device=cache_pos.device)
        return (slots[None, :] <= cache_pos[:, None])[None, None]

    def features(self, tokens: Tensor, input_pos: Tensor, cache_pos: Tensor | None = None, mask: Tensor | None = None):
        """The post-norm hidden state [B, S, D]: the LM head's input, and the feature EAGLE consumes."""
        return self.hidden(tokens, input_pos, cache_pos, mask)[0]

    def hidden(self, tokens: Tensor, input_pos: Tensor, cache_pos: Tensor | None = None, mask: Tensor | None = None,
               taps: tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:  # fmt: skip
        """-> (post-norm hidden h [B, S, D], EAGLE features [B, S, D * (1 + len(taps))]): h followed by the residual
        stream entering each layer in `taps` (an EAGLE head with feature_layers fuses them); just h without taps."""
        # tokens: [B, S]; input_pos, cache_pos: [S]; mask: [1, 1, S, T]
        cache_pos = input_pos if cache_pos is None else cache_pos
        mask = self.causal_mask(cache_pos) if mask is None else mask
        rope, cache_pos, mask = kernels.layer_inputs(self.rope, input_pos, cache_pos, mask)  # rope [S, 2, hd]
        x = self.tok_embeddings(tokens)
        tapped = []
        for i, layer in enumerate(self.layers):
            if i in taps:
                tapped.append(x)
            x = layer(x, rope, cache_pos, mask)
        h = self.norm(x)
        return h, torch.cat([h, *tapped], dim=-1) if taps else h

    def forward(self, tokens: Tensor, input_pos: Tensor, cache_pos=None, mask=None, return_hidden: bool = False,
                taps: tuple[int, ...] = ()):  # fmt: skip
        """-> logits [B, S, V]; with return_hidden, (logits, the EAGLE features of `hidden`)."""
        h, feats = self.hidden(tokens, input_pos, cache_pos, mask, taps)
        logits = self.output(h)  # [B, S, V]
        return (logits, feats) if return_hidden else logits

    def copy_slots(self, src: Tensor, dst: Tensor) -> None:
        """Move KV rows src -> dst (both [n]) in every layer: compaction of an accepted tree path (one kernel for all
        layers on CUDA: kernels.copy_rows)."""
        kernels.copy_rows(self.kv_caches(), src, dst)

    def kv_caches(self) -> list[Tensor]:
        """Every layer's K and V cache, in layer order: [k0, v0, k1, v1, ...]."""
        return [t for layer in self.layers for t in (layer.attention.kv_cache.k, layer.attention.kv_cache.v)]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: <dir>/config.json (ModelArgs) + <dir>/model.pth (state dict, or {"state_dict", "quantization"}).


class CheckpointError(Exception):
    """A user-facing problem with a checkpoint (missing file, wrong shapes, ...)."""


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """Accept a checkpoint folder or a .pth inside one; return (folder, weights file)."""
    p = Path(path)
    if p.is_dir():
        folder, weights = p, p / "model.pth"
    else:
        folder, weights = p.parent, p
    if not weights.exists():
        raise CheckpointError(f"checkpoint not found: {weights}")
    if not (folder / "config.json").exists():
        raise CheckpointError(f"no config.json beside {weights}")
    return folder, weights


def read_checkpoint(path: str | Path) -> tuple[Path, ModelArgs, dict, dict | None]:
    """(weights file, args, state dict on the CPU (memory-mapped), quantization dict or None)."""
    folder, weights = resolve_checkpoint(path)
    try:
        args = ModelArgs.from_json(folder / "config.json")
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"bad config.json in {folder}: {e}") from None
    try:
        ckpt = torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file can raise many things
        raise CheckpointError(f"cannot read {weights}: {e}") from None
    quant = None
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        quant, ckpt = ckpt.get("quantization"), ckpt["state_dict"]
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{weights} holds no state dict")
    return weights, args, ckpt, quant


def load_model(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Build the model from config.json and load weights (plain or quantized) onto `device` in `dtype`."""
    weights, args, ckpt, quant = read_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(args)
    if quant:
        import quantize  # noqa: PLC0415 - only needed for quantized checkpoints

        quantize.swap_linears(model, quant)
    if args.tie_embeddings and not quant:
        ckpt["output.weight"] = ckpt["tok_embeddings.weight"]  # shared again below
    try:
        model.load_state_dict(ckpt, assign=True, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not match its config.json: {str(e).splitlines()[0]}") from None
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope = torch.empty(0, 2, args.head_dim)
    model = model.to(device=device)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and "scales" not in name and "zeros" not in name:
            t.data = t.data.to(dtype)
    if quant:
        quantize.prepare_for_device(model, quant)
    return model.eval().requires_grad_(False)


def save_checkpoint(folder: str | Path, args: ModelArgs, state_dict: dict) -> None:
    """Write config.json and model.pth atomically (temporary file, then rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.pth.tmp"
    torch.save(state_dict, tmp)
    tmp.replace(folder / "model.pth")
    cfg = folder / "config.json.tmp"
    cfg.write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    cfg.replace(folder / "config.json")
