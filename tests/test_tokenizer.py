"""Tokenizer: ids, chat template strings and decoding against transformers on the real Qwen3 files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from qwenlocal.errors import UserError
from qwenlocal.generation.tokenizer import CHATML_TEMPLATE, Tokenizer
from qwenlocal.model.config import BUILTIN_DIR

QWEN3_DIR = BUILTIN_DIR  # the real Qwen3 tokenizer files, shipped with the package

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's, we'll, they're, I'd've.",
    "Größenänderung über Straße, Äpfel und Öl.",
    "机器学习是人工智能的一个分支。你好，世界！",
    "日本語のテキスト：ひらがな、カタカナ、漢字。",
    "Emoji 😀🎉👍🏽🫠 龘𝔘 family 👨‍👩‍👧‍👦 flags 🇩🇪🇯🇵",
    "مرحبا بالعالم، هذا نص عربي.",
    'def f(x: int) -> int:\n    """Doc."""\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\n',
    "numbers 1234567890 3.14159 -42 1e-9 0x1F 1,000,000",
    "   leading spaces, trailing spaces   ",
    "whitespace runs:\n\n\n   \t\t  \r\n  x    y\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nyes<|endoftext|>",
    "inline <tool_call>{}</tool_call> and <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "almost special <|im_start and <think >, <|nope|>",
    "NFC: e\u0301 vs \u00e9, Å vs A\u030a",
    "",
    " ",
    "\n",
    "a" * 300,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(QWEN3_DIR)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(QWEN3_DIR))


@pytest.fixture(scope="module")
def slow_dir(tmp_path_factory) -> Path:
    """The Qwen3 folder without tokenizer.json: vocab.json + merges.txt + tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("no_tokenizer_json")
    for f in QWEN3_DIR.iterdir():
        if f.name != "tokenizer.json":
            (folder / f.name).symlink_to(f)
    return folder


def _folder_with(folder: Path, files: dict[str, str] | None = None) -> Path:
    """A model folder holding the real tokenizer.json plus the given files."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(QWEN3_DIR / "tokenizer.json", folder / "tokenizer.json")
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


# -- ids and text ------------------------------------------------------------------------


def test_encode_decode_match_transformers(tok: Tokenizer, hf) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == hf.decode(ids) == text.replace("e\u0301", "\u00e9").replace("A\u030a", "Å")
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_special_ids_and_vocab(tok: Tokenizer, hf) -> None:
    assert tok.encode("<|im_start|><|im_end|><think></think>") == [151644, 151645, 151667, 151668]
    assert tok.eos_token_ids == (151645, 151643)
    assert (tok.think_start_id, tok.think_end_id) == (151667, 151668)
    assert tok.vocab_size == len(hf) == 151669
    assert tok.token_to_id("<|im_end|>") == 151645 and tok.id_to_token(151645) == "<|im_end|>"
    assert tok.token_to_id("no such token") is None


def test_decode_random_ids_matches_transformers(tok: Tokenizer, hf) -> None:
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_without_tokenizer_json_encodes_identically(tok: Tokenizer, slow_dir: Path) -> None:
    slow = Tokenizer.from_dir(slow_dir)
    assert slow.vocab_size == tok.vocab_size
    assert slow.eos_token_ids == tok.eos_token_ids
    assert (slow.think_start_id, slow.think_end_id) == (tok.think_start_id, tok.think_end_id)
    for text in TEXTS:
        assert slow.encode(text) == tok.encode(text), text
    ids = tok.encode(TEXTS[11] + TEXTS[12])
    assert slow.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert slow.apply_chat_template([{"role": "user", "content": "hi"}]) == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}]
    )


# -- chat template ---------------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CHATS = {
    "single_user": [{"role": "user", "content": "What is 2+2?"}],
    "multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "thinking_history": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nAgain.\n</think>\n\n6"},
    ],
    "reasoning_field": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Again.", "tool_calls": None},
    ],
    "non_ascii": [
        {"role": "system", "content": "Antworte auf Deutsch. 用中文也可以。"},
        {"role": "user", "content": "Wie geht's? 😀 مرحبا"},
    ],
    "think_switches": [
        {"role": "user", "content": "Explain gravity /no_think"},
        {"role": "assistant", "content": "<think>\n\n</think>\n\nMass attracts mass."},
        {"role": "user", "content": "Now in depth /think"},
    ],
}


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_chat_template_matches_transformers(tok, hf, name, add_generation_prompt, enable_thinking) -> None:
    messages = CHATS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt, enable_thinking)
    theirs = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
    )
    assert ours == theirs
    assert tok.encode_chat(messages, add_generation_prompt, enable_thinking) == hf.encode(theirs)


def test_thinking_dropped_from_earlier_turns(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(CHATS["thinking_history"], add_generation_prompt=False)
    assert "Add them." not in text and "<think>\nAgain.\n</think>\n\n6" in text
    no_think = tok.apply_chat_template(CHATS["single_user"], enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tools_and_helpers_match_transformers(tok: Tokenizer, hf, tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"ville": "Zürich <b>"}}}]
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "météo", "arguments": {"v": "é"}}}],
        },
        {"role": "tool", "content": "12°C"},
    ]
    theirs = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages, tools=tools) == theirs
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson(indent=2) }}  \n  {% endfor %}{{ ns.n }}{{ eos_token }}"
        "{{ dict(a=1) | tojson }}{{ strftime_now('%Y') }}{{ extra }}"
    )
    config = (QWEN3_DIR / "tokenizer_config.json").read_text()  # eos_token for the template
    custom = Tokenizer.from_dir(
        _folder_with(tmp_path, {"chat_template.jinja": template, "tokenizer_config.json": config})
    )
    ours = custom.apply_chat_template(messages, extra="x")
    assert ours == hf.apply_chat_template(messages, chat_template=template, tokenize=False, extra="x")


# -- template sources and errors ---------------------------------------------------------------


def test_fallback_chatml_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_folder_with(tmp_path))
    assert tok.chat_template == CHATML_TEMPLATE
    messages = [SYSTEM, {"role": "user", "content": "Hi"}]
    expected = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"


def test_template_sources(tmp_path: Path) -> None:
    listed = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    a = Tokenizer.from_dir(
        _folder_with(tmp_path / "a", {"tokenizer_config.json": json.dumps({"chat_template": listed})})
    )
    assert a.apply_chat_template([]) == "DEFAULT"
    assert a.apply_chat_template([], tools=[]) == "TOOLS"
    files = {"tokenizer_config.json": json.dumps({"chat_template": "CONFIG"}), "chat_template.jinja": "FILE"}
    b = Tokenizer.from_dir(_folder_with(tmp_path / "b", files))
    assert b.apply_chat_template([]) == "FILE"


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "has no tokenizer"),
        ({"tokenizer.json": "{not json"}, "not a valid tokenizer file"),
        ({"vocab.json": "{}", "merges.txt": "#version: 0.2\n"}, "has no tokenizer"),
        ({"vocab.json": "[", "merges.txt": "", "tokenizer_config.json": "{}"}, "not valid JSON"),
        ({"tokenizer.json": None, "tokenizer_config.json": "{"}, "not valid JSON"),
        ({"tokenizer.json": None, "generation_config.json": "{eos"}, "not valid JSON"),
        ({"tokenizer.json": None, "tokenizer_config.json": "[]"}, "JSON object"),
    ],
)
def test_bad_folders_raise_user_error(tmp_path: Path, files: dict, message: str) -> None:
    for name, text in files.items():
        if text is None:
            shutil.copy(QWEN3_DIR / name, tmp_path / name)
        else:
            (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message):
        Tokenizer.from_dir(tmp_path)


def test_missing_folder_raises_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
        "{{ raise_exception.__globals__['__builtins__']['open']('{marker}', 'w') }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ messages.append(1) }}",
        "{{ raise_exception('no system role here') }}",
        "{% for %}",
    ],
)
def test_hostile_or_broken_template_raises_user_error(tmp_path: Path, template: str) -> None:
    marker = tmp_path / "pwned"
    tok = Tokenizer.from_dir(
        _folder_with(tmp_path, {"chat_template.jinja": template.replace("{marker}", str(marker))})
    )
    with pytest.raises(UserError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert not marker.exists()


# -- streaming decode ------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> list[str]:
    decoder = tok.stream_decoder(skip_special_tokens=skip)
    return [decoder.add(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_never_splits_characters(tok: Tokenizer) -> None:
    text = "".join(TEXTS[3:8]) + "<|im_end|>"
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(ids) // 2  # text arrives as it is generated, not at the end
    skipped = _stream(tok, ids, skip=True)
    assert "".join(skipped) == tok.decode(ids, skip_special_tokens=True)
    # A multibyte character split across byte-level tokens is held back until it completes.
    assert _stream(tok, tok.encode("🫠 ok")) == ["", "", "🫠", " ok", ""]  # 🫠 is three byte tokens


def test_stream_decoder_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_a_prompt_that_opens_the_reasoning(tok):
    """The one test of "does the reply start inside <think>?" (the chat session and the server
    both ask it): the opener last, whitespace after it aside; a closed block is not open."""
    head = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.opens_reasoning(tok.encode(head + "<think>\n"))
    assert tok.opens_reasoning(tok.encode(head + "<think>"))
    assert not tok.opens_reasoning(tok.encode(head + "<think>\n\n</think>\n\n"))
    assert not tok.opens_reasoning(tok.encode(head))
    assert not tok.opens_reasoning([])
