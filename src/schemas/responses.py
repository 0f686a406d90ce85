"""The OpenAI Responses request (POST /v1/responses), validated against the spec's bounds.

The gateway serves it by translating to a chat completion, so the schema covers what has a chat
equivalent: text, image and file input, function tools and their round trips, the sampling knobs.
Unions are tagged by small functions whose tags start with "=", so `error_param` can drop them and
name the field the way OpenAI does (`input[0].content[1].text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from src.schemas.chat import MAX_TOKENS_BOUND, MODEL_ID

# Fields of the Responses API that need state the gateway does not keep: refused with 400.
STATEFUL_FIELDS = {
    "previous_response_id": "The gateway stores no responses, so 'previous_response_id' is not supported:"
    " send the earlier turns in 'input' instead.",
    "conversation": "The gateway stores no conversations, so 'conversation' is not supported:"
    " send the earlier turns in 'input' instead.",
    "prompt": "Stored prompt templates are not supported: send the prompt in 'instructions' and 'input'.",
}
# Chat Completions fields whose Responses counterpart the translation owns: refused, naming it.
CHAT_ONLY_FIELDS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "n": None,
    "response_format": "text.format",
    "functions": "tools",
    "function_call": "tool_choice",
    "reasoning_effort": "reasoning.effort",
    "verbosity": "text.verbosity",
}


class _Open(BaseModel):
    """Fields beyond the spec are tolerated (clients replay output items with ids and statuses)."""

    model_config = ConfigDict(extra="allow")


def _tagged(prefix: str, key: str = "type") -> Any:
    """A discriminator reading `key` of a dict, for tags written `=<prefix><value>`."""

    def tag(value: Any) -> str | None:
        found = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        return f"={prefix}{found}" if isinstance(found, str) else None

    return tag


def _str_or_list(value: Any) -> str:
    return "=str" if isinstance(value, str) else "=list"


def _input_form(value: Any) -> str | None:
    if isinstance(value, str):
        return "=str"
    return "=list" if isinstance(value, list) else None


# -- content parts ---------------------------------------------------------------------------------


class InputText(_Open):
    type: Literal["input_text"]
    text: str


class InputImage(_Open):
    type: Literal["input_image"]
    image_url: str | None = Field(None, max_length=20_000_000, description="An https or data: URL.")
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None

    @model_validator(mode="after")
    def _needs_url(self) -> InputImage:
        if self.image_url is None:
            raise ValueError("the gateway keeps no files: send image_url (an https or data: URL)")
        return self


class InputFile(_Open):
    type: Literal["input_file"]
    file_data: str | None = Field(None, description="The file's content as a data: URL.")
    filename: str | None = Field(None, max_length=1024)
    file_id: str | None = None
    file_url: str | None = None

    @model_validator(mode="after")
    def _needs_data(self) -> InputFile:
        if self.file_data is None:
            raise ValueError("the gateway keeps no files: send file_data (a data: URL) with a filename")
        return self


class OutputText(_Open):
    type: Literal["output_text"]
    text: str


class Refusal(_Open):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[
    Annotated[InputText, Tag("=input_text")]
    | Annotated[InputImage, Tag("=input_image")]
    | Annotated[InputFile, Tag("=input_file")],
    Discriminator(
        _tagged(""),
        custom_error_type="invalid_content_part",
        custom_error_message="a user content part is input_text, input_image or input_file",
    ),
]
TextOnlyPart = Annotated[
    Annotated[InputText, Tag("=input_text")],
    Discriminator(
        _tagged(""),
        custom_error_type="invalid_content_part",
        custom_error_message="this content takes input_text parts only",
    ),
]
AssistantPart = Annotated[
    Annotated[OutputText, Tag("=output_text")]
    | Annotated[Refusal, Tag("=refusal")]
    | Annotated[InputText, Tag("=input_text")],
    Discriminator(
        _tagged(""),
        custom_error_type="invalid_content_part",
        custom_error_message="an assistant content part is output_text or refusal",
    ),
]


UserContent = Annotated[
    Annotated[str, Tag("=str")] | Annotated[list[UserPart], Tag("=list"), Field(min_length=1)],
    Discriminator(_str_or_list),
]
TextOnlyContent = Annotated[
    Annotated[str, Tag("=str")] | Annotated[list[TextOnlyPart], Tag("=list"), Field(min_length=1)],
    Discriminator(_str_or_list),
]
AssistantContent = Annotated[
    Annotated[str, Tag("=str")] | Annotated[list[AssistantPart], Tag("=list"), Field(min_length=1)],
    Discriminator(_str_or_list),
]


# -- input items -----------------------------------------------------------------------------------


class _Message(_Open):
    type: Literal["message"] | None = None


class UserMessage(_Message):
    role: Literal["user"]
    content: UserContent


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: TextOnlyContent


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: AssistantContent


class FunctionCall(_Open):
    """A tool call the model made earlier, sent back so the conversation is complete."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str


class FunctionCallOutput(_Open):
    """The result of a tool call, answering the function_call with the same call_id."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: TextOnlyContent


def _item_tag(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    if kind in (None, "message"):
        return f"=message:{role}" if isinstance(role, str) else None
    return f"={kind}" if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[UserMessage, Tag("=message:user")]
    | Annotated[SystemMessage, Tag("=message:system")]
    | Annotated[SystemMessage, Tag("=message:developer")]
    | Annotated[AssistantMessage, Tag("=message:assistant")]
    | Annotated[FunctionCall, Tag("=function_call")]
    | Annotated[FunctionCallOutput, Tag("=function_call_output")],
    Discriminator(
        _item_tag,
        custom_error_type="invalid_input_item",
        custom_error_message=(
            "an input item is a message (role user, assistant, system or developer),"
            " a function_call or a function_call_output"
        ),
    ),
]


# -- tools and output format -----------------------------------------------------------------------


class FunctionTool(_Open):
    type: str = Field(description="Only function tools: the gateway hosts no tools.")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("type")
    @classmethod
    def _function_only(cls, value: str) -> str:
        if value != "function":
            raise ValueError("only function tools are supported: the gateway hosts no tools of its own")
        return value


class FunctionChoice(_Open):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("=str")] | Annotated[FunctionChoice, Tag("=list")],
    Discriminator(_str_or_list),
]


class TextFormat(_Open):
    type: Literal["text"]


class JsonObjectFormat(_Open):
    type: Literal["json_object"]


class JsonSchemaFormat(_Open):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


Format = Annotated[
    Annotated[TextFormat, Tag("=text")]
    | Annotated[JsonObjectFormat, Tag("=json_object")]
    | Annotated[JsonSchemaFormat, Tag("=json_schema")],
    Discriminator(
        _tagged(""),
        custom_error_type="invalid_format",
        custom_error_message="the format type is text, json_object or json_schema",
    ),
]


class TextConfig(_Open):
    format: Format | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Open):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


# -- the request -----------------------------------------------------------------------------------


class ResponsesRequest(_Open):
    """POST /v1/responses, as OpenAI defines it; fields it does not define go on to the provider."""

    model: str = Field(min_length=1, max_length=256, description="Model id, e.g. openai/gpt-4o-mini.")
    input: Annotated[
        Annotated[str, Tag("=str")] | Annotated[list[InputItem], Tag("=list"), Field(min_length=1)],
        Discriminator(
            _input_form,
            custom_error_type="invalid_input",
            custom_error_message="input is a string or a list of input items",
        ),
    ] = Field(description="A user message as a string, or a list of input items.")
    instructions: str | None = Field(None, description="Sent first, as a system message.")
    max_output_tokens: int | None = Field(None, ge=16, le=MAX_TOKENS_BOUND)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    tools: list[FunctionTool] | None = Field(None, max_length=512)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    metadata: dict[str, str] | None = Field(None, description="Echoed on the response; up to 16 pairs.")
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=64)
    store: bool | None = Field(None, description="Accepted; the gateway keeps no response objects.")
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    background: bool | None = Field(None, description="Only false: the gateway keeps no response objects.")
    # Accepted and not used: they tune storage, output extras or truncation the gateway does not do.
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    stream_options: dict[str, Any] | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    prompt_cache_key: str | None = Field(None, max_length=1024)
    service_tier: str | None = Field(None, max_length=32)

    @field_validator("model")
    @classmethod
    def _model_id(cls, value: str) -> str:
        if not MODEL_ID.match(value) or ".." in value:
            raise ValueError("the model id contains characters that are not allowed")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("at most 16 metadata pairs")
        if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise ValueError("metadata keys hold at most 64 characters, values at most 512")
        return value

    @field_validator("background")
    @classmethod
    def _foreground(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("background responses are not supported: the gateway keeps no response objects")
        return value


def error_param(loc: Sequence[int | str]) -> str | None:
    """A validation error's location as OpenAI names it: `input[0].content[1].text`."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not part.startswith("="):
            param += f".{part}" if param else part
    return param or None
