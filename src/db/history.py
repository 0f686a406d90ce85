"""SQL for chat history: sessions and their messages. Every query names the owner, so another
user's session is simply not found."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

import asyncpg

SESSION_COLUMNS = "id, title, model, created_at, updated_at"
MESSAGE_COLUMNS = "id, session_id, role, content, model, tokens, cost, request_id, created_at"
# How much of a search hit's message is returned around the match.
SNIPPET_BEFORE = 60
SNIPPET_LENGTH = 200


@dataclass(frozen=True)
class ChatSession:
    id: UUID
    title: str | None
    model: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ChatMessage:
    id: UUID
    session_id: UUID
    role: str
    content: str
    model: str | None
    tokens: int
    cost: Decimal
    request_id: UUID | None
    created_at: datetime


@dataclass(frozen=True)
class NewMessage:
    role: str
    content: str
    model: str | None = None
    tokens: int = 0
    cost: Decimal = Decimal(0)


@dataclass(frozen=True)
class Exchange:
    """Turns to append to a session in a settlement's transaction."""

    session_id: UUID
    user_id: UUID
    messages: list[NewMessage]


@dataclass(frozen=True)
class SearchHit:
    session: ChatSession
    title_matched: bool
    matched_messages: int
    snippet: str | None


def _session(row: asyncpg.Record) -> ChatSession:
    return ChatSession(**{name: row[name] for name in ("id", "title", "model", "created_at", "updated_at")})


def _message(row: asyncpg.Record) -> ChatMessage:
    return ChatMessage(
        id=row["id"],
        session_id=row["session_id"],
        role=row["role"],
        content=row["content"],
        model=row["model"],
        tokens=row["tokens"],
        cost=row["cost"],
        request_id=row["request_id"],
        created_at=row["created_at"],
    )


def like_pattern(text: str) -> str:
    """`text` as a literal ILIKE substring pattern (its own % and _ match only themselves)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def create_session(
    conn: asyncpg.Connection, *, user_id: UUID, title: str | None, model: str | None
) -> ChatSession:
    row = await conn.fetchrow(
        f"INSERT INTO chat_sessions (user_id, title, model) VALUES ($1, $2, $3) RETURNING {SESSION_COLUMNS}",
        user_id,
        title,
        model,
    )
    assert row is not None
    return _session(row)


async def get_session(conn: asyncpg.Connection, *, user_id: UUID, session_id: UUID) -> ChatSession | None:
    row = await conn.fetchrow(
        f"SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = $1 AND user_id = $2", session_id, user_id
    )
    return _session(row) if row is not None else None


async def list_sessions(
    conn: asyncpg.Connection, *, user_id: UUID, limit: int, offset: int
) -> tuple[list[ChatSession], int]:
    rows = await conn.fetch(
        f"""SELECT {SESSION_COLUMNS}, count(*) OVER () AS total FROM chat_sessions WHERE user_id = $1
            ORDER BY updated_at DESC, id DESC LIMIT $2 OFFSET $3""",
        user_id,
        limit,
        offset,
    )
    return [_session(row) for row in rows], (rows[0]["total"] if rows else 0)


async def update_session(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    session_id: UUID,
    title: str | None,
    set_title: bool,
    model: str | None,
    set_model: bool,
) -> ChatSession | None:
    """Change the fields flagged `set_*` (to None too); None when the session is not the user's."""
    row = await conn.fetchrow(
        f"""UPDATE chat_sessions SET
                title = CASE WHEN $3 THEN $4 ELSE title END,
                model = CASE WHEN $5 THEN $6 ELSE model END,
                updated_at = now()
            WHERE id = $1 AND user_id = $2
            RETURNING {SESSION_COLUMNS}""",
        session_id,
        user_id,
        set_title,
        title,
        set_model,
        model,
    )
    return _session(row) if row is not None else None


async def delete_session(conn: asyncpg.Connection, *, user_id: UUID, session_id: UUID) -> bool:
    """Delete the session and (by cascade) its messages; False when it is not the user's."""
    deleted = await conn.fetchval(
        "DELETE FROM chat_sessions WHERE id = $1 AND user_id = $2 RETURNING true", session_id, user_id
    )
    return bool(deleted)


async def list_messages(
    conn: asyncpg.Connection, *, user_id: UUID, session_id: UUID, limit: int, offset: int
) -> tuple[list[ChatMessage], int]:
    """A page of the session's messages in conversation order (oldest first)."""
    rows = await conn.fetch(
        f"""SELECT {MESSAGE_COLUMNS}, count(*) OVER () AS total FROM chat_messages
            WHERE session_id = $1 AND user_id = $2
            ORDER BY seq LIMIT $3 OFFSET $4""",
        session_id,
        user_id,
        limit,
        offset,
    )
    return [_message(row) for row in rows], (rows[0]["total"] if rows else 0)


async def recent_messages(
    conn: asyncpg.Connection, *, user_id: UUID, session_id: UUID, limit: int
) -> list[ChatMessage]:
    """The session's newest `limit` messages, oldest first (what a completion may prepend)."""
    rows = await conn.fetch(
        f"""SELECT {MESSAGE_COLUMNS} FROM (
                SELECT {MESSAGE_COLUMNS}, seq FROM chat_messages
                WHERE session_id = $1 AND user_id = $2 ORDER BY seq DESC LIMIT $3
            ) newest ORDER BY seq""",
        session_id,
        user_id,
        limit,
    )
    return [_message(row) for row in rows]


async def append_messages(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    session_id: UUID,
    messages: list[NewMessage],
    request_id: UUID | None = None,
) -> list[ChatMessage]:
    """Append turns in order and touch the session; nothing (an empty list) when it is not the user's.

    The session row is locked KEY SHARE first, so a delete racing this insert either waits for it
    or has already removed the row, in which case nothing is inserted (never a foreign-key error).
    A session without a title takes the first 80 characters of the first user turn.
    """
    rows = await conn.fetch(
        f"""WITH owned AS (
                SELECT id FROM chat_sessions WHERE id = $1 AND user_id = $2 FOR KEY SHARE
            ),
            added AS (
                INSERT INTO chat_messages (session_id, user_id, role, content, model, tokens, cost, request_id)
                SELECT owned.id, $2, m.role, m.content, m.model, m.tokens, m.cost, $8
                FROM owned, unnest($3::text[], $4::text[], $5::text[], $6::int[], $7::numeric[])
                    WITH ORDINALITY AS m(role, content, model, tokens, cost, position)
                ORDER BY m.position
                RETURNING {MESSAGE_COLUMNS}, seq
            ),
            touched AS (
                UPDATE chat_sessions s SET updated_at = now(),
                    title = COALESCE(s.title, (
                        SELECT left(regexp_replace(m.content, '\\s+', ' ', 'g'), 80)
                        FROM unnest($3::text[], $4::text[]) AS m(role, content)
                        WHERE m.role = 'user' AND btrim(m.content) <> '' LIMIT 1
                    ))
                FROM owned WHERE s.id = owned.id
                RETURNING s.id
            )
            SELECT {MESSAGE_COLUMNS} FROM added ORDER BY seq""",
        session_id,
        user_id,
        [m.role for m in messages],
        [m.content for m in messages],
        [m.model for m in messages],
        [m.tokens for m in messages],
        [m.cost for m in messages],
        request_id,
    )
    return [_message(row) for row in rows]


async def search(
    conn: asyncpg.Connection, *, user_id: UUID, query: str, limit: int, offset: int
) -> tuple[list[SearchHit], int]:
    """The user's sessions whose title or any message contains `query` (any case), newest first.

    Both sides read only this user's rows (chat_sessions_user_idx, chat_messages_user_idx), so the
    cost grows with one user's history, never with everyone's.
    """
    rows = await conn.fetch(
        f"""WITH hits AS (
                SELECT m.session_id, count(*) AS matched,
                    (array_agg(substr(m.content,
                        greatest(strpos(lower(m.content), lower($3)) - {SNIPPET_BEFORE}, 1),
                        {SNIPPET_LENGTH}) ORDER BY m.seq DESC))[1] AS snippet
                FROM chat_messages m
                WHERE m.user_id = $1 AND m.content ILIKE $2
                GROUP BY m.session_id
            )
            SELECT s.id, s.title, s.model, s.created_at, s.updated_at,
                COALESCE(s.title ILIKE $2, false) AS title_matched,
                COALESCE(hits.matched, 0) AS matched, hits.snippet, count(*) OVER () AS total
            FROM chat_sessions s LEFT JOIN hits ON hits.session_id = s.id
            WHERE s.user_id = $1 AND (s.title ILIKE $2 OR hits.session_id IS NOT NULL)
            ORDER BY s.updated_at DESC, s.id DESC LIMIT $4 OFFSET $5""",
        user_id,
        like_pattern(query),
        query,
        limit,
        offset,
    )
    hits = [
        SearchHit(
            session=_session(row),
            title_matched=row["title_matched"],
            matched_messages=row["matched"],
            snippet=row["snippet"],
        )
        for row in rows
    ]
    return hits, (rows[0]["total"] if rows else 0)
