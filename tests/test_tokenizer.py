"""tokenizer.py against tiny tokenizers built in tmp folders (no network, no model hub), and against transformers."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer import (  # noqa: E402
    LLAMA3_SPECIAL_TOKENS,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3-Instruct's template: writes bos_token itself.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France?",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant hello there how are you today",
] * 10

ROUND_TRIP = [
    "Hello, world!",
    "héllo wörld — ünïcödé ñ ß ø",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "中文字符和日本語のテキスト 한국어",
    "def f(x):\n\treturn x ** 2  # code {}[]<>\n",
    "  leading and trailing spaces  ",
    "\n\n\t \r\n  \n",
    "a",
    "",
]

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello there 😀"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write def add(a, b):\n    return a + b"},
    ],
]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


def build_hf_tokenizer(folder: Path, specials: list[str], bos_post_processor: str | None = None) -> Path:
    """Tiny byte-level BPE tokenizer.json (every byte in the alphabet, so any text round-trips)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos_post_processor is not None:  # like Llama's tokenizer.json: TemplateProcessing "<bos> $A"
        bos = bos_post_processor
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    folder = build_hf_tokenizer(tmp_path_factory.mktemp("smol"), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": SMOLLM2_TEMPLATE,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }
    write_json(folder / "tokenizer_config.json", config)
    return folder


@pytest.fixture(scope="module")
def llama3_hf_dir(tmp_path_factory) -> Path:
    """tokenizer.json whose post-processor adds bos (as Llama-3's does), with a template that writes bos too."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    folder = build_hf_tokenizer(tmp_path_factory.mktemp("llama3hf"), specials, bos_post_processor="<|begin_of_text|>")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": LLAMA3_TEMPLATE,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
    }
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [1, 4]})
    return folder


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    """Tiny Llama-2-style sentencepiece model (byte fallback, no whitespace normalization)."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("sp")
    (folder / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=360,  # byte_fallback needs 256 byte pieces + 3 specials + the corpus' characters
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    return folder


TIKTOKEN_MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"\n\n"]


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory) -> Path:
    """Tiny tiktoken BPE file: the 256 single bytes (rank = byte value) then a few merges."""
    folder = tmp_path_factory.mktemp("tiktoken")
    tokens = [bytes([b]) for b in range(256)] + TIKTOKEN_MERGES
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def all_tokenizers(smol_dir, sp_dir, tiktoken_dir) -> dict[str, Tokenizer]:
    return {"hf": load_tokenizer(smol_dir), "sp": load_tokenizer(sp_dir), "tiktoken": load_tokenizer(tiktoken_dir)}


# ---------------------------------------------------------------------------------------------------------------
# All backends
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["hf", "sp", "tiktoken"])
@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(all_tokenizers, backend, text):
    tok = all_tokenizers[backend]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(text, allow_special=False) == ids  # no specials in these strings


@pytest.mark.parametrize("backend", ["hf", "sp", "tiktoken"])
def test_stream_decoder_matches_full_decode(all_tokenizers, backend):
    tok = all_tokenizers[backend]
    text = "Hi 😀 there, 中文 and 👨‍👩‍👧!\n  def f(x): return x  # ünï 🇫🇷"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 4  # plenty of multi-byte characters split over tokens
    stream = StreamDecoder(tok)
    pieces = [stream.push([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)  # incomplete characters are held back, never printed
    assert "" in pieces
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text
    # pushing several ids at a time gives the same text
    stream = StreamDecoder(tok)
    assert "".join(stream.push(ids[k : k + 3]) for k in range(0, len(ids), 3)) + stream.flush() == text


def test_stream_decoder_flush_emits_truncated_character(all_tokenizers):
    tok = all_tokenizers["hf"]
    ids = tok.encode("ok 😀")
    stream = StreamDecoder(tok)
    text = "".join(stream.push([i]) for i in ids[:-1])  # last byte of the emoji missing: held back
    assert text.startswith("ok") and "\ufffd" not in text
    rest = stream.flush()
    assert rest.endswith("\ufffd") and text + rest == tok.decode(ids[:-1])


# ---------------------------------------------------------------------------------------------------------------
# HF tokenizer.json (SmolLM2-like), checked against transformers
# ---------------------------------------------------------------------------------------------------------------


def test_hf_specials_and_config(smol_dir):
    tok = load_tokenizer(smol_dir)
    im_start, im_end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    assert (tok.bos_id, tok.eos_id) == (im_start, im_end)
    assert tok.stop_ids == {im_end}  # <|endoftext|> exists but is not the eos
    assert tok.add_bos is False  # no bos in the post-processor, no add_bos_token
    assert tok.chat_template == SMOLLM2_TEMPLATE

    text = "<|im_start|>user\nhi<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[0] == im_start and ids.count(im_end) == 1 and len(ids) == len(tok.encode("user\nhi")) + 3
    assert tok.decode(ids) == text
    plain = tok.encode(text, allow_special=False)
    assert im_start not in plain and im_end not in plain
    assert tok.decode(plain) == text


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_hf_chat_matches_transformers(smol_dir, messages):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smol_dir))
    tok = load_tokenizer(smol_dir)
    expected_text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.render_chat(messages) == expected_text
    expected_ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.encode_prompt(messages, chat=True) == list(expected_ids)
    no_gen = ref.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert tok.render_chat(messages, add_generation_prompt=False) == no_gen


def test_hf_prompt_str_and_plain_match_transformers(smol_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smol_dir))
    tok = load_tokenizer(smol_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.encode_prompt("What is the capital of France?", chat=True) == list(expected)
    for prompt in ["Hello world", "  two spaces 😀", "<|im_start|>user"]:
        assert tok.encode_prompt(prompt, chat=False) == ref(prompt)["input_ids"]


def test_hf_bos_from_post_processor_and_template(llama3_hf_dir):
    """Template writes bos and the post-processor would add it too: chat prompts get it exactly once."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(llama3_hf_dir))
    tok = load_tokenizer(llama3_hf_dir)
    bos, eot = tok.token_id("<|begin_of_text|>"), tok.token_id("<|eot_id|>")
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (bos, eot, True)
    assert tok.stop_ids == {eot, tok.token_id("<|end_of_text|>"), 1, 4}  # + generation_config ids
    for messages in CONVERSATIONS:
        expected_text = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.render_chat(messages) == expected_text
        expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = tok.encode_prompt(messages, chat=True)
        assert ids == list(expected)
        assert ids.count(bos) == 1 and ids[0] == bos
    for prompt in ["Hello world", "def add(a, b):"]:
        assert tok.encode_prompt(prompt, chat=False) == ref(prompt)["input_ids"]
        assert tok.encode_prompt(prompt, chat=False)[0] == bos


def test_hf_config_variants(tmp_path, smol_dir):
    """chat_template as a named list, add_bos_token override, chat_template.jinja file."""
    folder = tmp_path / "variant"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((smol_dir / "tokenizer.json").read_bytes())
    config = {
        "chat_template": [{"name": "tool_use", "template": "tools!"}, {"name": "default", "template": "{{ 'x' }}"}],
        "bos_token": "<|endoftext|>",
        "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
        "add_bos_token": True,
    }
    write_json(folder / "tokenizer_config.json", config)
    tok = load_tokenizer(folder)
    eot = tok.token_id("<|endoftext|>")
    assert tok.chat_template == "{{ 'x' }}"
    assert tok.add_bos and tok.encode_prompt("hi", chat=False) == [eot] + tok.encode("hi")
    assert tok.stop_ids == {eot, tok.token_id("<|im_end|>")}  # <|endoftext|> is the eos here
    (folder / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    tok = load_tokenizer(folder)
    assert tok.render_chat([{"role": "user", "content": "yo"}]) == "<|endoftext|>yo"
    write_json(folder / "tokenizer_config.json", {"bos_token": None, "eos_token": "<|im_end|>"})  # Qwen-style
    write_json(folder / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.add_bos, tok.eos_id) == (None, False, tok.token_id("<|im_end|>"))
    assert tok.stop_ids == {eot, tok.eos_id}


def test_render_chat_helpers(smol_dir):
    tok = load_tokenizer(smol_dir)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}{{ eos_token }}"  # trim_blocks eats \\n
    )
    out = tok.render_chat([{"role": "user", "content": "é<"}, {"role": "skip", "content": "-"}])
    assert out == '{"role": "user", "content": "é<"}<|im_end|>'
    with pytest.raises(Exception, match="bad role"):
        tok.render_chat([{"role": "bad", "content": ""}])


# ---------------------------------------------------------------------------------------------------------------
# sentencepiece (Llama-2-like)
# ---------------------------------------------------------------------------------------------------------------


def test_sentencepiece_bos_and_specials(sp_dir):
    tok = load_tokenizer(sp_dir)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (360, 1, 2)
    assert tok.add_bos and tok.stop_ids == {2}
    assert tok.chat_template is None
    ids = tok.encode("Hello world")
    assert 1 not in ids
    assert tok.encode_prompt("Hello world", chat=False) == [1] + ids
    assert tok.encode("<s>Hello world</s>") == [1] + ids + [2]
    assert tok.decode([1] + ids + [2]) == "<s>Hello world</s>"
    assert 1 not in tok.encode("<s>", allow_special=False)
    with pytest.raises(TokenizerError, match="chat template"):
        tok.encode_prompt("hi", chat=True)


def test_sentencepiece_chat_template_from_config(sp_dir, tmp_path):
    folder = tmp_path / "llama2"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    template = "{% for m in messages %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    write_json(folder / "tokenizer_config.json", {"chat_template": template, "add_bos_token": True})
    tok = load_tokenizer(folder)
    ids = tok.encode_prompt("hi there", chat=True)
    assert ids[0] == 1 and ids.count(1) == 1  # bos written by the template, not added again
    assert tok.decode(ids) == "<s>[INST] hi there [/INST]"


# ---------------------------------------------------------------------------------------------------------------
# tiktoken (Llama-3 original tokenizer.model)
# ---------------------------------------------------------------------------------------------------------------


def test_tiktoken_specials(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir)
    n_base = 256 + len(TIKTOKEN_MERGES)
    assert tok.vocab_size == n_base + 256
    assert (tok.bos_id, tok.eos_id) == (n_base, n_base + 1)
    eot = tok.token_id("<|eot_id|>")
    assert eot == n_base + 9 and tok.token_id("<|start_header_id|>") == n_base + 6
    assert tok.token_id(LLAMA3_SPECIAL_TOKENS[-1]) == n_base + 255
    assert tok.stop_ids == {n_base + 1, eot}
    assert tok.encode("hello world") == [256 + TIKTOKEN_MERGES.index(b"hello"), 256 + TIKTOKEN_MERGES.index(b" world")]

    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    ids = tok.encode(text)
    assert ids[:2] == [n_base, n_base + 6] and ids[-1] == eot
    assert tok.decode(ids) == text
    plain = tok.encode(text, allow_special=False)
    assert max(plain) < n_base and tok.decode(plain) == text
    assert tok.encode_prompt("hello", chat=False) == [n_base, 256 + TIKTOKEN_MERGES.index(b"hello")]


def test_tiktoken_default_llama3_chat(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hello world "}]
    text = tok.render_chat(messages)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhello world<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.encode_prompt(messages, chat=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and tok.decode(ids) == text


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
