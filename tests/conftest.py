"""Shared fixtures: tiny random checkpoints with a real (tiny) byte-level BPE tokenizer and chat template."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE with `vocab_size` tokens: 3 specials, 256 bytes, merges learned on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["The quick brown fox jumps over the lazy dog.", "Hello, who are you? I am a helpful assistant."] * 20
    tk.train_from_iterator(text, trainer)
    tk.save(str(folder / "tokenizer.json"))
    cfg = {
        "chat_template": CHAT_TEMPLATE,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def make_checkpoint(folder: Path, seed: int = 0, **overrides) -> M.ModelArgs:
    args = M.ModelArgs(**{**M.PRESETS["tiny"], "vocab_size": 320, **overrides})
    torch.manual_seed(seed)
    model = M.Transformer(args)
    for p in model.parameters():  # larger weights than nn.Linear's default: peaked, varied next-token distributions
        torch.nn.init.normal_(p, std=0.5 if p.dim() > 1 else 0.1)
        if p.dim() == 1:
            p.data += 1.0
    sd = {k: v for k, v in model.state_dict().items() if not (args.tie_embeddings and k == "output.weight")}
    M.save_checkpoint(folder, args, sd)
    write_tokenizer(folder, args.vocab_size)
    return args


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    make_checkpoint(folder)
    return folder
