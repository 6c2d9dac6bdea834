"""One small tokenizer interface over three backends, picked by the files in a checkpoint folder.

  tokenizer.json                      -> HF `tokenizers` (SmolLM2, Qwen, Llama-3 HF repos, most HF models)
  tokenizer.model, sentencepiece      -> `sentencepiece` (Llama-2)
  tokenizer.model, tiktoken BPE text  -> `tiktoken` with the Llama-3 split regex and special tokens (Meta's originals)

Next to it, when present:
  tokenizer_config.json   chat_template (str, or [{name, template}] -> "default"), bos_token / eos_token
                          (str or {"content": str}), add_bos_token (bool)
  chat_template.jinja     the chat template as its own file (newer transformers saves it there; wins over the config)
  generation_config.json  eos_token_id (int or list[int]), bos_token_id (int), used for stop ids / fallbacks

Token ids are plain `list[int]`; text is `str`. `encode` never adds bos; `encode_prompt` decides that.
"""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TokenizerError(Exception):
    """A tokenizer folder without a usable tokenizer file (one-line message)."""


# Tokens that end an assistant turn in common chat formats; whichever exist in the vocab become stop ids.
# (<|endoftext|> is deliberately absent: it only stops generation when it is the eos token, e.g. SmolLM2 base.)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<end_of_turn>")

# ---------------------------------------------------------------------------------------------------------------
# Llama-3 tiktoken setup (as in Meta's llama-models tokenizer.py, Llama-3.1 layout)
# ---------------------------------------------------------------------------------------------------------------

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# 256 special tokens with ids base_vocab .. base_vocab + 255 (128000 .. 128255 for Llama-3).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",  # +0  bos
    "<|end_of_text|>",  # +1  eos
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",  # +6
    "<|end_header_id|>",  # +7
    "<|eom_id|>",  # +8  end of message (tool call)
    "<|eot_id|>",  # +9  end of turn
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - 8)]

# Used when a tiktoken (Meta original) folder has no tokenizer_config.json: the Llama-3-Instruct template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _special_splitter(specials: list[str]) -> re.Pattern:
    """Regex whose capture group splits text around special-token strings (longest first)."""
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")


# ---------------------------------------------------------------------------------------------------------------
# Backends: each has vocab_size, bos_id, eos_id, encode(text, allow_special), decode(ids), token_id(token),
# id_to_token(id), default_add_bos(bos_id)
# ---------------------------------------------------------------------------------------------------------------


class HFBackend:
    """tokenizer.json via the `tokenizers` library. bos/eos come from tokenizer_config.json, not from here."""

    bos_id = None
    eos_id = None

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        # Added tokens are always split out by `tokenizers`; encode_special_tokens=True turns that off for the
        # special ones so e.g. "<|im_end|>" in user text becomes ordinary pieces.
        self.tok.encode_special_tokens = not allow_special
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = False

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def default_add_bos(self, bos_id: int | None) -> bool:
        # What transformers' tokenizer(text) does: the post-processor (e.g. TemplateProcessing "<s> $A") adds bos.
        if bos_id is None:
            return False
        return self.tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


class SentencePieceBackend:
    """tokenizer.model as a sentencepiece protobuf (Llama-2). Control pieces (<s>, </s>) and <unk> are the specials."""

    def __init__(self, path: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        ids = range(self.vocab_size)
        self.specials = {self.sp.id_to_piece(i): i for i in ids if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special_ids = {i: s for s, i in self.specials.items()}
        self.splitter = _special_splitter(list(self.specials)) if self.specials else None

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        # sentencepiece never parses "<s>" by itself: split around special strings and encode the pieces in between
        # (each gets sentencepiece's dummy-prefix space, as transformers' legacy Llama tokenizer and Meta's code do).
        if not allow_special or self.splitter is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for part in self.splitter.split(text):  # odd indices are the special strings
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        # sentencepiece drops control tokens; keep them visible like the other backends, decoding the runs between.
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                out += [self.sp.decode(run), self.special_ids[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def token_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None  # piece_to_id answers unk for unknown pieces

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None

    def default_add_bos(self, bos_id: int | None) -> bool:
        return bos_id is not None  # Llama-2 always starts with <s>


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken BPE file: one `<base64 token bytes> <rank>` per line -> {token bytes: rank}."""
    ranks = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def is_tiktoken_file(path: Path) -> bool:
    """True when the file starts like a tiktoken BPE file (base64 + rank lines), not a sentencepiece protobuf."""
    with open(path, "rb") as f:
        head = f.read(4096).split(b"\n")[0]
    return re.fullmatch(rb"[A-Za-z0-9+/]+=*\s+\d+\s*", head) is not None


class TiktokenBackend:
    """tokenizer.model as tiktoken BPE ranks (Meta's Llama-3 originals) + Llama-3 regex and special tokens."""

    def __init__(self, path: Path):
        import tiktoken

        ranks = read_tiktoken_ranks(path)
        n_base = len(ranks)  # Llama-3: 128000
        self.specials = {s: n_base + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name=path.parent.name or "llama3",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.specials,
        )
        self.ranks = ranks
        self.vocab_size = n_base + len(self.specials)
        self.bos_id = self.specials["<|begin_of_text|>"]
        self.eos_id = self.specials["<|end_of_text|>"]
        self.id_to_special = {i: s for s, i in self.specials.items()}

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())  # specials encode as plain text

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)  # incomplete UTF-8 becomes '\ufffd' (errors="replace")

    def token_id(self, token: str) -> int | None:
        return self.specials.get(token, self.ranks.get(token.encode("utf-8")))

    def id_to_token(self, i: int) -> str | None:
        if i in self.id_to_special:
            return self.id_to_special[i]
        return self.enc.decode_single_token_bytes(i).decode("utf-8", "replace") if 0 <= i < len(self.ranks) else None

    def default_add_bos(self, bos_id: int | None) -> bool:
        return bos_id is not None


Backend = HFBackend | SentencePieceBackend | TiktokenBackend

# ---------------------------------------------------------------------------------------------------------------
# Chat templates, rendered as transformers' apply_chat_template does
# ---------------------------------------------------------------------------------------------------------------


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' override: no HTML escaping, non-ASCII kept
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


# ---------------------------------------------------------------------------------------------------------------
# The public tokenizer
# ---------------------------------------------------------------------------------------------------------------


class Tokenizer:
    def __init__(
        self,
        backend: Backend,
        bos_id: int | None,
        eos_id: int | None,
        stop_ids: set[int],
        chat_template: str | None,
        add_bos: bool,
        template_tokens: dict[str, str],  # {"bos_token": "<s>", "eos_token": "</s>", ...} for the chat template
    ):
        self.backend = backend
        self.vocab_size: int = backend.vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids = stop_ids
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.template_tokens = template_tokens
        self._compiled: jinja2.Template | None = None

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids, never adding bos. With allow_special, special-token strings in text become their single ids."""
        return self.backend.encode(text, allow_special)

    def decode(self, ids: list[int]) -> str:
        """Ids -> text, special tokens included as their strings; incomplete UTF-8 shows as '\\ufffd'."""
        return self.backend.decode(list(ids))

    def token_id(self, token: str) -> int | None:
        """Id of one token string (e.g. "<|eot_id|>"), or None when it is not a single token of the vocab."""
        return self.backend.token_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """messages [{"role", "content"}, ...] -> prompt text via the Jinja chat template (kwargs: tools, ...)."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (no chat_template in tokenizer_config.json)")
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        variables = {**self.template_tokens, **kwargs}
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    def encode_prompt(self, prompt: str | list[dict], chat: bool) -> list[int]:
        """Prompt -> ids to feed the model.

        chat=True: a str becomes one user message; the rendered template is encoded with specials parsed and no bos
        added (the template writes bos itself when the model wants it; transformers' apply_chat_template does the
        same: add_special_tokens=False). chat=False: [bos if add_bos] + encode(prompt).
        """
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            return self.encode(self.render_chat(messages, add_generation_prompt=True))
        assert isinstance(prompt, str), "a plain (chat=False) prompt must be a str"
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + self.encode(prompt)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _token_content(value) -> str | None:
    """tokenizer_config token field: "<s>" or {"content": "<s>", ...} or null -> str | None."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _load_backend(folder: Path) -> Backend:
    if (folder / "tokenizer.json").exists():
        path, make = folder / "tokenizer.json", HFBackend
    elif (folder / "tokenizer.model").exists():
        path = folder / "tokenizer.model"
        make = TiktokenBackend if is_tiktoken_file(path) else SentencePieceBackend
    else:
        raise TokenizerError(f"no tokenizer.json or tokenizer.model in {folder}")
    try:
        return make(path)
    except Exception as e:
        raise TokenizerError(f"cannot read {path} ({make.__name__}): {_one_line(e)}") from e


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Tokenizer for a checkpoint folder; raises TokenizerError when none can be found or read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {folder} does not exist")
    backend = _load_backend(folder)
    config = _read_json(folder / "tokenizer_config.json")
    gen_config = _read_json(folder / "generation_config.json")

    # bos / eos: tokenizer_config names win (an explicit null means none, as for Qwen's bos), then the backend's own,
    # then generation_config ids.
    def resolve(name: str, default: int | None) -> int | None:
        if name in config and config[name] is None:
            return None
        token = _token_content(config.get(name))
        i = backend.token_id(token) if token is not None else None
        return i if i is not None else default

    gen_eos = gen_config.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else [i for i in gen_eos or [] if isinstance(i, int)]
    gen_bos = gen_config.get("bos_token_id")
    bos_id = resolve("bos_token", backend.bos_id if backend.bos_id is not None else gen_bos)
    eos_id = resolve("eos_token", backend.eos_id if backend.eos_id is not None else (gen_eos or [None])[0])

    stop_ids = set(gen_eos) | {i for i in map(backend.token_id, END_OF_TURN_TOKENS) if i is not None}
    if eos_id is not None:
        stop_ids.add(eos_id)

    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = backend.default_add_bos(bos_id)
    add_bos = add_bos and bos_id is not None

    chat_template = _chat_template(folder, config)
    if chat_template is None and isinstance(backend, TiktokenBackend):
        chat_template = LLAMA3_CHAT_TEMPLATE

    # Variables the chat template sees (transformers passes its special_tokens_map).
    template_tokens = {}
    for name, i in (("bos_token", bos_id), ("eos_token", eos_id)):
        token = _token_content(config.get(name)) or (backend.id_to_token(i) if i is not None else None)
        if token is not None:
            template_tokens[name] = token
    for name in ("unk_token", "pad_token"):
        if (token := _token_content(config.get(name))) is not None:
            template_tokens[name] = token

    return Tokenizer(backend, bos_id, eos_id, stop_ids, chat_template, add_bos, template_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Streaming detokenization
# ---------------------------------------------------------------------------------------------------------------


class StreamDecoder:
    """Turns ids arriving a few at a time into text pieces whose concatenation equals tok.decode(all ids).

    Decodes a small window instead of single tokens, because a token's text depends on its neighbours: byte-level
    BPE and sentencepiece byte-fallback split one character's UTF-8 bytes over several tokens (the partial decode
    ends in '\\ufffd' and is held back), and sentencepiece drops the leading space only of the first token decoded.
    `ids[prefix:read]` is the already-emitted context; text beyond its decode is new.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # ids before this are emitted

    def push(self, ids: list[int]) -> str:
        """Add ids; return the newly completed text ("" while a character is still incomplete)."""
        self.ids.extend(ids)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character, as '\\ufffd')."""
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text) :]
