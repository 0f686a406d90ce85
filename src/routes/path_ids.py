"""Ids in URL paths. A malformed id gets the same 404 as an unknown one: its format is nobody's
business, and a 422 would tell a prober which ids are worth trying."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import Depends, Path

from src.errors import NotFound
from src.schemas.api_keys import INT8_MAX


def parse_uuid(value: str, *, param: str, what: str, code: str) -> UUID:
    """`value` as a UUID, or the 404 of an unknown `what`."""
    try:
        return UUID(value)
    except ValueError:
        raise NotFound(f"No such {what}.", param=param, code=code) from None


def parse_serial(value: str, *, param: str, what: str, code: str) -> int:
    """`value` as a positive bigint id, or the 404 of an unknown `what`."""
    if value.isascii() and value.isdigit() and 0 < int(value) <= INT8_MAX:
        return int(value)
    raise NotFound(f"No such {what}.", param=param, code=code)


def _user_id(user_id: Annotated[str, Path(description="The user's id.")]) -> UUID:
    return parse_uuid(user_id, param="user_id", what="user", code="user_not_found")


def _key_id(key_id: Annotated[str, Path(description="The API key's id.")]) -> UUID:
    return parse_uuid(key_id, param="key_id", what="API key", code="api_key_not_found")


UserID = Annotated[UUID, Depends(_user_id)]
KeyID = Annotated[UUID, Depends(_key_id)]
