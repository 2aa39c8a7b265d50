"""Tokenizer: byte-level BPE via `tokenizers`, the chat template in a jinja2 sandbox, streaming decode.

Loads tokenizer.json, or rebuilds the same BPE from vocab.json + merges.txt + tokenizer_config.json.
Chat templates come from downloaded folders, so they are untrusted: they render in jinja2's
ImmutableSandboxedEnvironment with the options and helpers transformers gives them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from qwenlocal.errors import UserError

# Qwen2's split regex (transformers' Qwen2Tokenizer); byte-level mapping comes after it.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
IM_END, END_OF_TEXT = "<|im_end|>", "<|endoftext|>"
THINK_START, THINK_END = "<think>", "</think>"
# Used when the folder has no template: plain ChatML, which every Qwen chat model understands.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Names a message's reasoning may come under; templates read `reasoning_content` (as transformers does).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read {path}: {e}.") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}).") from e


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _eos_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _build_bpe(folder: Path, tokenizer_config: dict) -> HFTokenizer:
    """The tokenizer.json that transformers' Qwen2Tokenizer would build from the slow files."""
    vocab = _read_json(folder / "vocab.json")
    try:
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"Cannot read {folder / 'merges.txt'}: {e}.") from e
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if not isinstance(vocab, dict) or any(len(m) != 2 for m in merges):
        raise UserError(f"vocab.json or merges.txt in {folder} is not a byte-level BPE vocabulary.")
    try:
        added = sorted((int(i), t) for i, t in tokenizer_config.get("added_tokens_decoder", {}).items())
        contents = [t["content"] for _, t in added]
    except (AttributeError, TypeError, ValueError, KeyError) as e:
        raise UserError(
            f"added_tokens_decoder in {folder / 'tokenizer_config.json'} is malformed ({e})."
        ) from e
    # Added tokens go into the model vocab too, so each keeps its id even where ids have gaps.
    vocab.update({c: i for (i, _), c in zip(added, contents, strict=True) if c not in vocab})
    tok = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    for _, t in added:
        special = bool(t.get("special", False))
        token = AddedToken(
            t["content"],
            single_word=t.get("single_word", False),
            lstrip=t.get("lstrip", False),
            rstrip=t.get("rstrip", False),
            normalized=t.get("normalized", not special),
            special=special,
        )
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    return tok


def _load_chat_template(folder: Path, tokenizer_config: dict) -> str | dict[str, str] | None:
    # Like transformers, a chat_template.jinja file wins over the entry in tokenizer_config.json.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"Cannot read {jinja_file}: {e}.") from e
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        return {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    return template if isinstance(template, str) else None


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature trick: `self` may be a key
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _TemplateDict:
    """`dict()` for templates without handing them the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile an untrusted template in the sandbox, with transformers' options and helpers."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"The chat template does not compile: {str(e).rstrip('.')}.") from e


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, so a template never sees a rich object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _template_message(message: Mapping) -> dict:
    # As transformers: drop None values, and copy reasoning under every name templates read it by.
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return _plain(message)


class StreamDecoder:
    """Turns generated ids into text pieces, never splitting a UTF-8 character.

    Byte-level BPE decodes by joining bytes, so once the pending ids decode to text that does not end in
    U+FFFD (an incomplete character), that text is final and the window starts afresh.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._pending: list[int] = []

    def add(self, token_id: int) -> str:
        self._pending.append(token_id)
        text = self._tokenizer.decode(self._pending, skip_special_tokens=self._skip)
        if text.endswith("\ufffd"):
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        text = self._tokenizer.decode(self._pending, skip_special_tokens=self._skip)
        self._pending.clear()
        return text


class Tokenizer:
    """Qwen's tokenizer: encode/decode, eos and think ids, chat template."""

    def __init__(
        self,
        tok: HFTokenizer,
        chat_template: str | dict[str, str] | None = None,
        special_tokens: dict[str, str] | None = None,
        config_eos_ids: tuple[int, ...] = (),
    ) -> None:
        self._tok = tok
        self.chat_template = chat_template if chat_template is not None else CHATML_TEMPLATE
        self.special_tokens = special_tokens or {}
        self._compiled: dict[str, jinja2.Template] = {}
        named = tuple(i for i in (self.token_to_id(IM_END), self.token_to_id(END_OF_TEXT)) if i is not None)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(config_eos_ids + named))
        self.think_start_id = self.token_to_id(THINK_START)
        self.think_end_id = self.token_to_id(THINK_END)

    @classmethod
    def from_source(cls, source) -> Tokenizer:
        """The tokenizer of a sources.ModelSource, its config files not read again."""
        return cls.from_dir(source.folder, source.metadata)

    @classmethod
    def from_dir(cls, path: str | Path, metadata: dict[str, dict] | None = None) -> Tokenizer:
        """`metadata`: config.json and generation_config.json as read already (by file name);
        without it they are read here, for their stop ids."""
        folder = Path(path)
        if not folder.is_dir():
            raise UserError(f"Tokenizer folder {folder} does not exist.")
        config_file = folder / "tokenizer_config.json"
        tokenizer_config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(tokenizer_config, dict):
            raise UserError(f"{config_file} should hold a JSON object.")
        if (folder / "tokenizer.json").is_file():
            try:
                tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception for bad files
                raise UserError(f"{folder / 'tokenizer.json'} is not a valid tokenizer file ({e}).") from e
        elif (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file() and config_file.is_file()
        ):
            tok = _build_bpe(folder, tokenizer_config)
        else:
            raise UserError(
                f"{folder} has no tokenizer: it needs tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json."
            )
        special = {k: v for k in SPECIAL_TOKEN_KEYS if (v := _token_content(tokenizer_config.get(k)))}
        eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            if metadata is not None:
                cfg = metadata.get(name)
            else:
                cfg = _read_json(folder / name) if (folder / name).is_file() else None
            if isinstance(cfg, dict):
                eos += _eos_ids(cfg.get("eos_token_id"))
        return cls(tok, _load_chat_template(folder, tokenizer_config), special, tuple(eos))

    # -- ids and text ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (the model's embedding may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def backend(self) -> HFTokenizer:
        """The `tokenizers` object (shared by copies that differ only in their chat template)."""
        return self._tok

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (for libraries that build their own view of it)."""
        return self._tok.to_str()

    def opens_reasoning(self, prompt: list[int]) -> bool:
        """The prompt ends with the `<think>` opener (whitespace after it aside): the chat template
        opened the reasoning, so the reply starts inside it."""
        end = len(prompt)
        while end and self.decode(prompt[end - 1 : end]).isspace():
            end -= 1
        return end > 0 and prompt[end - 1] == self.think_start_id

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    # -- chat --------------------------------------------------------------------------
    def _template_source(self, tools: list | None) -> str:
        if isinstance(self.chat_template, str):
            return self.chat_template
        if tools is not None and "tool_use" in self.chat_template:
            return self.chat_template["tool_use"]
        if "default" not in self.chat_template:
            raise UserError(
                f"The model has chat templates {sorted(self.chat_template)} but none named 'default'."
            )
        return self.chat_template["default"]

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: list | None = None,
        **kwargs: Any,
    ) -> str:
        """Render messages to the prompt string, as transformers' apply_chat_template(tokenize=False)."""
        source = self._template_source(tools)
        if source not in self._compiled:
            self._compiled[source] = compile_chat_template(source)
        context = {**self.special_tokens, "enable_thinking": enable_thinking, **kwargs}
        try:
            return self._compiled[source].render(
                messages=[_template_message(m) for m in messages],
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_plain(context),
            )
        except Exception as e:  # a broken or hostile template is the model folder's fault, not ours
            raise UserError(f"The chat template failed to render: {str(e).rstrip('.')}.") from e

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: list | None = None,
        **kwargs: Any,
    ) -> list[int]:
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, enable_thinking, tools, **kwargs)
        )
