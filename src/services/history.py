"""Chat history: sessions and messages a user keeps, and their use in chat completions.

With a `session_id`, a completion prepends the session's earlier turns, newest kept first, as many
as fit the model's context window next to the request and its output allowance; if the request
alone does not fit, nothing is prepended and the provider decides. After a successful call (or a
stream the client left part-way), the request's user turns and the assistant reply are appended
in the settlement's own transaction: the user turn carries the exchange's prompt tokens and input
cost (the history it re-sent included), the reply its completion tokens and the rest of the cost,
so one exchange's messages add up to its usage record. Only text is kept: media parts and tool
messages are not stored, and a request's own system messages are not saved (clients resend them).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from src.db import history as history_db
from src.db.history import ChatMessage, ChatSession, Exchange, NewMessage, SearchHit
from src.errors import NotFound
from src.services import tokens
from src.services.credits import Usage

# A completion reads at most this many of the newest turns before trimming to the context window.
HISTORY_LOAD_LIMIT = 500


def not_found() -> NotFound:
    # One body for an unknown, malformed or another user's session: existence is not disclosed.
    return NotFound("No such chat session.", param="session_id", code="session_not_found")


def parse_id(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise not_found() from None


async def create_session(
    conn: asyncpg.Connection, *, user_id: UUID, title: str | None, model: str | None
) -> ChatSession:
    return await history_db.create_session(conn, user_id=user_id, title=title, model=model)


async def list_sessions(
    conn: asyncpg.Connection, *, user_id: UUID, limit: int, offset: int
) -> tuple[list[ChatSession], int]:
    return await history_db.list_sessions(conn, user_id=user_id, limit=limit, offset=offset)


async def get_session(
    conn: asyncpg.Connection, *, user_id: UUID, session_id: UUID, limit: int, offset: int
) -> tuple[ChatSession, list[ChatMessage], int]:
    """The session with one page of its messages (oldest first) and their total."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        session = await history_db.get_session(conn, user_id=user_id, session_id=session_id)
        if session is None:
            raise not_found()
        messages, total = await history_db.list_messages(
            conn, user_id=user_id, session_id=session_id, limit=limit, offset=offset
        )
    return session, messages, total


async def update_session(
    conn: asyncpg.Connection, *, user_id: UUID, session_id: UUID, changes: dict[str, Any]
) -> ChatSession:
    session = await history_db.update_session(
        conn,
        user_id=user_id,
        session_id=session_id,
        title=changes.get("title"),
        set_title="title" in changes,
        model=changes.get("model"),
        set_model="model" in changes,
    )
    if session is None:
        raise not_found()
    return session


async def delete_session(conn: asyncpg.Connection, *, user_id: UUID, session_id: UUID) -> None:
    if not await history_db.delete_session(conn, user_id=user_id, session_id=session_id):
        raise not_found()


async def append_message(
    conn: asyncpg.Connection, *, user_id: UUID, session_id: UUID, role: str, content: str
) -> ChatMessage:
    """Append one turn without calling a model."""
    added = await history_db.append_messages(
        conn, user_id=user_id, session_id=session_id, messages=[NewMessage(role=role, content=content)]
    )
    if not added:
        raise not_found()
    return added[0]


async def search(
    conn: asyncpg.Connection, *, user_id: UUID, query: str, limit: int, offset: int
) -> tuple[list[SearchHit], int]:
    return await history_db.search(conn, user_id=user_id, query=query, limit=limit, offset=offset)


# --- chat completions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """A completion's session and the user turns it will save once the call succeeds."""

    session_id: UUID
    user_id: UUID
    user_turns: list[str]


def text_of(content: Any) -> str:
    """A message's text: the string itself, or its text parts joined (media parts are not kept)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text") or "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


async def load(
    pool: asyncpg.Pool, *, user_id: UUID, session_id: str, messages: list[dict[str, Any]]
) -> tuple[Pending, list[ChatMessage]]:
    """The caller's session (404 otherwise) and its newest turns, oldest first."""
    wanted = parse_id(session_id)
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        if await history_db.get_session(conn, user_id=user_id, session_id=wanted) is None:
            raise not_found()
        stored = await history_db.recent_messages(
            conn, user_id=user_id, session_id=wanted, limit=HISTORY_LOAD_LIMIT
        )
    turns = [text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    return Pending(session_id=wanted, user_id=user_id, user_turns=turns), stored


async def fit(
    stored: list[ChatMessage],
    request_messages: list[dict[str, Any]],
    *,
    tools: list[Any] | None,
    context_length: int | None,
    output_allowance: int,
) -> list[dict[str, Any]]:
    """The newest stored turns that fit beside the request in the context window, oldest first."""
    usable = [m for m in stored if m.content]
    if context_length is None:
        return [{"role": m.role, "content": m.content} for m in usable]
    room = context_length - output_allowance
    bound = tokens.estimate_prompt(request_messages, tools=tools).text_tokens + sum(
        tokens.MESSAGE_OVERHEAD_TOKENS + tokens.estimate_text(m.content) for m in usable
    )
    if bound <= room:
        # Everything fits even by the bound: no need for the tokenizer.
        return [{"role": m.role, "content": m.content} for m in usable]
    # Trimming keeps as many turns as really fit, so it counts them with the real tokenizer.
    await tokens.load()
    budget = room - tokens.count_prompt(request_messages, tools=tools)
    if budget < 0:
        # The request alone does not fit: adding history could only make it worse.
        return []
    kept: list[ChatMessage] = []
    for message in reversed(usable):
        needed = tokens.MESSAGE_OVERHEAD_TOKENS + tokens.count_text(message.content)
        if needed > budget:
            break
        budget -= needed
        kept.append(message)
    return [{"role": m.role, "content": m.content} for m in reversed(kept)]


def exchange(pending: Pending, usage: Usage, *, reply: str, model: str) -> Exchange:
    """The turns one settled exchange appends, with its tokens and cost split between them."""
    last = len(pending.user_turns) - 1
    messages = [
        NewMessage(
            role="user",
            content=text,
            model=model,
            tokens=usage.input_tokens if index == last else 0,
            cost=usage.cost.input_cost if index == last else Decimal(0),
        )
        for index, text in enumerate(pending.user_turns)
    ]
    messages.append(
        NewMessage(
            role="assistant",
            content=reply,
            model=model,
            tokens=usage.output_tokens,
            cost=max(usage.cost.total - usage.cost.input_cost, Decimal(0)),
        )
    )
    return Exchange(session_id=pending.session_id, user_id=pending.user_id, messages=messages)
