"""The OpenAI image generation request (POST /v1/images/generations), validated against the spec's bounds.

Fields the gateway does not know (quality, style, background, output_format, moderation, ...) are
kept (extra="allow") and passed through to the provider; the service forwards the client's own
JSON, not a re-serialisation of this model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from src.schemas.chat import MODEL_ID

MAX_PROMPT_CHARS = 32_000
MAX_IMAGES = 10

# "auto" or WIDTHxHEIGHT: the legacy fixed sizes, and the arbitrary resolutions newer models take;
# whether a model supports a given size is the provider's call.
SIZE_PATTERN = r"^(auto|[1-9][0-9]{1,4}x[1-9][0-9]{1,4})$"


class ImageGenerationRequest(BaseModel):
    """POST /v1/images/generations, as OpenAI defines it; `model` is required (there is no default)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(
        min_length=1, max_length=256, description="Image model id.", examples=["openai/dall-e-3"]
    )
    prompt: str = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw.", examples=["A red bicycle"]
    )
    n: int | None = Field(None, ge=1, le=MAX_IMAGES, description="How many images (1 to 10); default 1.")
    size: str | None = Field(
        None,
        pattern=SIZE_PATTERN,
        description="`auto` or `WIDTHxHEIGHT`; the provider's default when omitted.",
        examples=["1024x1024"],
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="`url` (default) or `b64_json`."
    )
    user: str | None = Field(None, max_length=256)
    stream: bool | None = Field(None, description="Not supported: must be false or omitted.")
    provider: str | dict[str, Any] | None = Field(
        None,
        description="A provider name pins the request to it; an object is OpenRouter's routing preference.",
    )
    allow_fallbacks: bool | None = Field(None, description="With a pinned provider, allow others on failure.")

    @field_validator("model")
    @classmethod
    def _model_id(cls, value: str) -> str:
        if not MODEL_ID.match(value) or ".." in value:
            raise ValueError("the model id contains characters that are not allowed")
        return value

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value: bool | None) -> bool | None:
        # A streamed image reply is a different protocol (partial images as SSE events).
        if value:
            raise ValueError("streaming image generation is not supported")
        return value

    @property
    def count(self) -> int:
        return self.n or 1

    @property
    def wants_url(self) -> bool:
        return self.response_format != "b64_json"

    @property
    def pinned_provider(self) -> str | None:
        return self.provider if isinstance(self.provider, str) else None
