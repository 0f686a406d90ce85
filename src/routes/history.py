"""Routes: the caller's chat sessions and their messages. Another user's session is a 404."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Path, Query

from src.db.history import ChatMessage, ChatSession
from src.deps import Conn
from src.schemas.common import Page, Paging
from src.schemas.history import (
    MessageCreate,
    MessageView,
    SearchResult,
    SessionCreate,
    SessionDeleted,
    SessionUpdate,
    SessionView,
    SessionWithMessages,
)
from src.security.deps import LimitedPrincipal
from src.services import history as history_service

router = APIRouter(prefix="/v1/chat", tags=["chat-history"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "An unknown field or an invalid value; `param` names it."},
    401: {"description": "Missing or invalid API key."},
    403: {"description": "The key lacks the 'inference' scope, or the account is disabled."},
    429: {"description": "Rate limited; see Retry-After."},
}
_SESSION_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    404: {"description": "No such session among yours."},
}


def _session_id(session_id: Annotated[str, Path(description="The chat session id.")]) -> UUID:
    # A malformed id gets the same 404 as an unknown one.
    return history_service.parse_id(session_id)


# Routes declare the caller before the session id, so a request without a valid key gets 401 first.
SessionID = Annotated[UUID, Depends(_session_id)]


def _session(session: ChatSession) -> SessionView:
    return SessionView.model_validate(session, from_attributes=True)


def _message(message: ChatMessage) -> MessageView:
    return MessageView.model_validate(message, from_attributes=True)


@router.post("/sessions", status_code=201, responses=_ERRORS)
async def create_session(body: SessionCreate, user: LimitedPrincipal, conn: Conn) -> SessionView:
    """Start a conversation."""
    assert user.user_id is not None
    session = await history_service.create_session(
        conn, user_id=user.user_id, title=body.title, model=body.model
    )
    return _session(session)


@router.get("/sessions", responses=_ERRORS)
async def list_sessions(user: LimitedPrincipal, conn: Conn, paging: Paging) -> Page[SessionView]:
    """Your conversations, most recently active first."""
    assert user.user_id is not None
    sessions, total = await history_service.list_sessions(
        conn, user_id=user.user_id, limit=paging.limit, offset=paging.offset
    )
    return Page[SessionView](
        data=[_session(s) for s in sessions], total=total, limit=paging.limit, offset=paging.offset
    )


@router.get("/sessions/{session_id}", responses=_SESSION_ERRORS)
async def get_session(
    user: LimitedPrincipal, session_id: SessionID, conn: Conn, paging: Paging
) -> SessionWithMessages:
    """One conversation with a page of its messages, oldest first."""
    assert user.user_id is not None
    session, messages, total = await history_service.get_session(
        conn, user_id=user.user_id, session_id=session_id, limit=paging.limit, offset=paging.offset
    )
    return SessionWithMessages(
        **_session(session).model_dump(),
        messages=Page[MessageView](
            data=[_message(m) for m in messages], total=total, limit=paging.limit, offset=paging.offset
        ),
    )


@router.put("/sessions/{session_id}", responses=_SESSION_ERRORS)
async def update_session(
    user: LimitedPrincipal, session_id: SessionID, body: SessionUpdate, conn: Conn
) -> SessionView:
    """Rename a conversation or change its model; fields not sent stay as they are."""
    assert user.user_id is not None
    session = await history_service.update_session(
        conn,
        user_id=user.user_id,
        session_id=session_id,
        changes=body.model_dump(include=body.model_fields_set),
    )
    return _session(session)


@router.delete("/sessions/{session_id}", responses=_SESSION_ERRORS)
async def delete_session(user: LimitedPrincipal, session_id: SessionID, conn: Conn) -> SessionDeleted:
    """Delete a conversation and all its messages, for good."""
    assert user.user_id is not None
    await history_service.delete_session(conn, user_id=user.user_id, session_id=session_id)
    return SessionDeleted(id=session_id)


@router.post("/sessions/{session_id}/messages", status_code=201, responses=_SESSION_ERRORS)
async def append_message(
    user: LimitedPrincipal, session_id: SessionID, body: MessageCreate, conn: Conn
) -> MessageView:
    """Add a turn to a conversation without calling a model."""
    assert user.user_id is not None
    message = await history_service.append_message(
        conn, user_id=user.user_id, session_id=session_id, role=body.role, content=body.content
    )
    return _message(message)


@router.get("/search", responses=_ERRORS)
async def search_sessions(
    user: LimitedPrincipal,
    conn: Conn,
    paging: Paging,
    q: Annotated[
        str, Query(min_length=1, max_length=200, description="Text to find in titles and messages, any case.")
    ],
) -> Page[SearchResult]:
    """Your conversations whose title or messages contain the text, most recently active first."""
    assert user.user_id is not None
    hits, total = await history_service.search(
        conn, user_id=user.user_id, query=q, limit=paging.limit, offset=paging.offset
    )
    return Page[SearchResult](
        data=[
            SearchResult(
                session=_session(hit.session),
                title_matched=hit.title_matched,
                matched_messages=hit.matched_messages,
                snippet=hit.snippet,
            )
            for hit in hits
        ],
        total=total,
        limit=paging.limit,
        offset=paging.offset,
    )
