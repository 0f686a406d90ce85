"""Token counts in o200k terms: a bound for every request, the real count only where it is billed.

- `estimate_text` / `estimate_prompt`: a conservative figure computed from the text's UTF-8 bytes,
  with no vocabulary, for the hold and the token limits of every request. o200k first splits text
  into pieces (a word with one leading space or punctuation mark, a number of up to three digits,
  a run of punctuation, a line break, an indentation) and almost every piece is one token; the
  estimate counts those pieces from byte-class transitions, adds a fifth for the pieces that split
  again, one for every eight letters of a long word, a third per punctuation mark, and a weight
  per non-ASCII character by its script (UTF-8 lead byte). Over English and other Latin-script
  prose, code, JSON, CSV, logs, CJK, Cyrillic, Arabic, Indic scripts and emoji it is at least the
  real count, typically 1.3-1.45 times it (about 2 for Cyrillic, Korean and Vietnamese); base64
  and strings of rare ideographs can be under-counted by up to a quarter, which the hold's prompt
  margin (credits.PROMPT_MARGIN) covers. tests/services/test_tokens.py holds the comparison.
- `count_text` / `count_prompt`: the real o200k BPE count (bpe-openai), to bill usage a provider did
  not report and to trim chat history to a context window. The tokenizer costs about 135 MiB and
  0.7 s to load, so a worker loads it on first need, off the event loop (`load`), never at start-up.

Counts are of OpenAI's tokenizer; other models' tokenizers differ, which is the other reason holds
add a margin.
"""

from __future__ import annotations

import asyncio
import math
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

# Per-message framing tokens in OpenAI's chat format (role markers and separators).
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3

TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "refusal"})
MEDIA_PART_TYPES = frozenset({"image_url", "input_image", "input_audio", "file", "input_file"})


# -- the bound -----------------------------------------------------------------------------------


def _byte_map(**classes: range | list[int]) -> bytes:
    """A bytes.translate table: each listed byte becomes its class letter, every other byte '-'."""
    table = bytearray(b"-" * 256)
    for symbol, members in classes.items():
        for byte in members:
            table[byte] = ord(symbol)
    return bytes(table)


_LOWER, _UPPER, _DIGITS = range(0x61, 0x7B), range(0x41, 0x5B), range(0x30, 0x3A)
_PUNCTUATION = list(string.punctuation.encode())
# Every non-ASCII byte continues a word: o200k's letter classes cover every script.
_WORD = [*_LOWER, *_UPPER, *range(0x80, 0x100)]
_BLANK = [0x20, 0x09, 0x0B, 0x0C]

_WORDS_AND_PUNCTUATION = _byte_map(L=_WORD, P=_PUNCTUATION)
_DIGITS_AND_BLANKS = _byte_map(D=_DIGITS, H=[0x20, 0x09])
_LINES_AND_BLANKS = _byte_map(N=[0x0A, 0x0D], H=_BLANK)
_CASE = _byte_map(a=_LOWER, A=_UPPER)
_ASCII_LETTERS = _byte_map(L=[*_LOWER, *_UPPER])
_LONG_WORD = b"L" * 8
_CONTINUATION = bytes(range(0x80, 0xC0))
# Non-ASCII characters by UTF-8 lead byte, and the tokens each adds to its word.
_SCRIPT_CLASSES: tuple[tuple[str, range, float], ...] = (
    ("l", range(0xC2, 0xCC), 1.5),  # U+0080-02FF Latin-1, Latin Extended, IPA: accents split words
    ("m", range(0xCC, 0xCE), 2.0),  # U+0300-037F combining marks
    ("g", range(0xCE, 0xE1), 1 / 3),  # U+0380-0FFF Greek, Cyrillic, Hebrew, Arabic, Indic, Thai
    ("e", range(0xE1, 0xE2), 1.25),  # U+1000-1FFF Georgian, Hangul Jamo, Ethiopic, Vietnamese
    ("s", range(0xE2, 0xE3), 0.5),  # U+2000-2FFF punctuation, symbols, arrows, box drawing
    ("c", range(0xE3, 0xF0), 1.0),  # U+3000-FFFF CJK, kana, Hangul, full-width forms
    ("x", range(0xF0, 0xF5), 3.0),  # U+10000- emoji, rare ideographs, historic scripts
)
_SCRIPTS = _byte_map(**{symbol: lead for symbol, lead, _ in _SCRIPT_CLASSES})
_SCRIPT_WEIGHTS = tuple((symbol.encode(), weight) for symbol, _, weight in _SCRIPT_CLASSES)
# Ethiopic (U+1200-137F, UTF-8 E1 88-8D ..) is about two tokens a character: more than its class.
_ETHIOPIC = tuple(bytes([0xE1, second]) for second in range(0x88, 0x8E))
ETHIOPIC_EXTRA_WEIGHT = 1.25
PIECE_WEIGHT = 1.2
LONG_WORD_WEIGHT = 1.0
PUNCTUATION_WEIGHT = 1 / 3


def _pieces(data: bytes, words: bytes) -> int:
    """How many pieces o200k's pre-tokenizer splits `data` into, from byte-class transitions.

    `words` is `data` translated by _WORDS_AND_PUNCTUATION.
    """
    # Word runs plus punctuation runs, less one punctuation mark alone before a word (it leads the
    # word's piece): -L + PL + -P + LP - (PL - PPL).
    pieces = words.count(b"-L") + words.count(b"-P") + words.count(b"LP") + words.count(b"PPL")
    pieces += words[:1] != b"-"
    digits = data.translate(_DIGITS_AND_BLANKS)
    # Numbers split every three digits; a blank before a number is a piece of its own.
    pieces += digits.count(b"-D") + 2 * digits.count(b"HD") + digits.count(b"DDD") + (digits[:1] == b"D")
    lines = data.translate(_LINES_AND_BLANKS)
    # Runs of line breaks, and runs of two or more blanks (indentation).
    pieces += lines.count(b"-N") + lines.count(b"HN") + (lines[:1] == b"N")
    pieces += lines.count(b"-HH") + lines.count(b"NHH") + (lines[:2] == b"HH")
    # camelCase: a capital after a small letter starts a piece.
    return pieces + data.translate(_CASE).count(b"aA")


def estimate_text(text: str) -> int:
    """A bound on the o200k tokens of `text`, from its bytes alone (see the module docstring)."""
    if not text:
        return 0
    encoded = text.encode("utf-8", "surrogatepass")
    ascii_only = text.isascii()
    # One byte a character: continuation bytes never change a class transition.
    data = encoded if ascii_only else encoded.translate(None, _CONTINUATION)
    words = data.translate(_WORDS_AND_PUNCTUATION)
    # In ASCII text the word class is exactly the letters.
    letters = words if ascii_only else data.translate(_ASCII_LETTERS)
    total = PIECE_WEIGHT * _pieces(data, words)
    total += LONG_WORD_WEIGHT * letters.count(_LONG_WORD)
    total += PUNCTUATION_WEIGHT * words.count(b"P")
    if not ascii_only:
        scripts = data.translate(_SCRIPTS)
        total += sum(weight * scripts.count(symbol) for symbol, weight in _SCRIPT_WEIGHTS)
        if b"\xe1" in encoded:
            total += ETHIOPIC_EXTRA_WEIGHT * sum(encoded.count(prefix) for prefix in _ETHIOPIC)
    return max(1, math.ceil(total))


# -- the real count ------------------------------------------------------------------------------

_encoding: Any = None
_encoding_lock = threading.Lock()


def _load_encoding() -> Any:
    global _encoding
    with _encoding_lock:
        if _encoding is None:
            # Imported here, not at start-up: the vocabulary is most of a worker's memory.
            import bpe_openai

            _encoding = bpe_openai.get_encoding("o200k_base")
    return _encoding


def loaded() -> bool:
    """Whether this process has loaded the o200k tokenizer."""
    return _encoding is not None


async def load() -> None:
    """Load the o200k tokenizer in a thread (once per process), so the event loop keeps serving."""
    if _encoding is None:
        await asyncio.to_thread(_load_encoding)


def count_text(text: str) -> int:
    """The real o200k token count of `text` (loads the tokenizer here if `load` has not)."""
    if not text:
        return 0
    encoding = _encoding if _encoding is not None else _load_encoding()
    return len(encoding.encode_ordinary(text))


# -- prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptEstimate:
    text_tokens: int
    media_parts: int


def _prompt_tokens(
    messages: list[dict[str, Any]], tools: list[Any] | None, measure: Callable[[str], int]
) -> PromptEstimate:
    """Tokens of every message's text (plus framing and tool definitions) and the media part count."""
    tokens = REPLY_PRIMING_TOKENS
    media = 0
    for message in messages:
        tokens += MESSAGE_OVERHEAD_TOKENS
        content = message.get("content")
        if isinstance(content, str):
            tokens += measure(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                kind = part.get("type")
                if kind in TEXT_PART_TYPES:
                    tokens += measure(str(part.get("text") or part.get("refusal") or ""))
                elif kind in MEDIA_PART_TYPES:
                    media += 1
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict):
                function = call.get("function") or {}
                tokens += measure(str(function.get("name", ""))) + measure(str(function.get("arguments", "")))
        if message.get("name"):
            tokens += measure(str(message["name"]))
    if tools:
        tokens += measure(orjson.dumps(tools).decode())
    return PromptEstimate(text_tokens=tokens, media_parts=media)


def estimate_prompt(messages: list[dict[str, Any]], *, tools: list[Any] | None = None) -> PromptEstimate:
    """The bound on a prompt's tokens, for holds and token limits; never loads the tokenizer."""
    return _prompt_tokens(messages, tools, estimate_text)


def count_prompt(messages: list[dict[str, Any]], *, tools: list[Any] | None = None) -> int:
    """The real o200k count of a prompt's text tokens (with framing and tools), to bill it."""
    return _prompt_tokens(messages, tools, count_text).text_tokens
