"""Bodies and views of the chat history routes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, Field, StringConstraints

from src.schemas.common import Page, Strict
from src.schemas.users import Money

# A turn is text: long answers and pasted documents fit, and MAX_BODY_BYTES bounds the request.
MAX_CONTENT_CHARS = 1_000_000

Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    Field(description="A name for the conversation.", examples=["Trip to Lisbon"]),
]
ModelName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=256),
    Field(description="The model the conversation is meant for.", examples=["openai/gpt-4o-mini"]),
]


class SessionCreate(Strict):
    title: Title | None = None
    model: ModelName | None = None


class SessionUpdate(Strict):
    """Only the fields sent change; null clears one."""

    title: Title | None = None
    model: ModelName | None = None


class MessageCreate(Strict):
    role: Literal["system", "user", "assistant"] = Field(description="Who said it.")
    content: str = Field(min_length=1, max_length=MAX_CONTENT_CHARS, description="The turn's text.")


class SessionView(BaseModel):
    id: UUID
    object: Literal["chat.session"] = "chat.session"
    title: str | None = Field(description="Set by you, or taken from the first user turn a completion saved.")
    model: str | None
    created_at: datetime
    updated_at: datetime


class MessageView(BaseModel):
    id: UUID
    object: Literal["chat.message"] = "chat.message"
    session_id: UUID
    role: str
    content: str
    model: str | None
    tokens: int = Field(
        description="A saved user turn: the exchange's prompt tokens (history included); a reply: its"
        " completion tokens; 0 for turns you appended."
    )
    cost: Money = Field(description="The part of the exchange's cost this turn accounts for.")
    request_id: UUID | None = Field(description="The request that saved this turn, as in /user/activity/log.")
    created_at: datetime


class SessionWithMessages(SessionView):
    messages: Page[MessageView] = Field(description="A page of the messages, oldest first.")


class SessionDeleted(BaseModel):
    id: UUID
    object: Literal["chat.session.deleted"] = "chat.session.deleted"
    deleted: bool = True


class SearchResult(BaseModel):
    session: SessionView
    title_matched: bool = Field(description="Whether the title contains the query.")
    matched_messages: int = Field(description="How many of the session's messages contain it.")
    snippet: str | None = Field(description="Text around the match in the newest matching message.")
