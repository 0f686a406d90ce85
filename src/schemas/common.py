"""Shared schema pieces: the base model and paging."""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class Strict(BaseModel):
    """A request body that refuses fields it does not define (no mass assignment)."""

    model_config = ConfigDict(extra="forbid")


class PageParams(BaseModel):
    limit: int
    offset: int


def page_params(
    limit: Annotated[int, Query(ge=1, le=200, description="How many items to return.")] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="How many items to skip.")] = 0,
) -> PageParams:
    return PageParams(limit=limit, offset=offset)


Paging = Annotated[PageParams, Depends(page_params)]


class Page(BaseModel, Generic[T]):
    object: str = "list"
    data: list[T]
    total: int = Field(description="How many items match, across all pages.")
    limit: int
    offset: int
