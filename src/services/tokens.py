"""Offline token counting (o200k BPE, built into the package), for holds and for usage a provider
did not report. Counts are estimates of another model's tokenizer, so holds add a margin."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import bpe_openai
import orjson

# Per-message framing tokens in OpenAI's chat format (role markers and separators).
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3


@lru_cache(maxsize=1)
def _encoding() -> Any:
    return bpe_openai.get_encoding("o200k_base")


def count_text(text: str) -> int:
    if not text:
        return 0
    return len(_encoding().encode_ordinary(text))


@dataclass(frozen=True)
class PromptEstimate:
    text_tokens: int
    media_parts: int


def _content_tokens(content: Any) -> tuple[int, int]:
    if content is None:
        return 0, 0
    if isinstance(content, str):
        return count_text(content), 0
    tokens = media = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind in {"text", "input_text", "output_text", "refusal"}:
                tokens += count_text(str(part.get("text") or part.get("refusal") or ""))
            elif kind in {"image_url", "input_image", "input_audio", "file", "input_file"}:
                media += 1
    return tokens, media


def estimate_prompt(messages: list[dict[str, Any]], *, tools: list[Any] | None = None) -> PromptEstimate:
    """Tokens of every message's text (plus framing and tool definitions) and the media part count."""
    tokens = REPLY_PRIMING_TOKENS
    media = 0
    for message in messages:
        text, parts = _content_tokens(message.get("content"))
        tokens += MESSAGE_OVERHEAD_TOKENS + text
        media += parts
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict):
                function = call.get("function") or {}
                tokens += count_text(str(function.get("name", ""))) + count_text(
                    str(function.get("arguments", ""))
                )
        if message.get("name"):
            tokens += count_text(str(message["name"]))
    if tools:
        tokens += count_text(orjson.dumps(tools).decode())
    return PromptEstimate(text_tokens=tokens, media_parts=media)
