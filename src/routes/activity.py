"""Routes: the public model ranking, and the caller's own activity (stats and usage log)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from src.deps import Conn, State
from src.schemas.activity import ActivityEntry, ActivityStats, ModelRanking
from src.schemas.common import Page, Paging
from src.security.deps import CurrentUser, public_ip_limit
from src.services import activity as activity_service
from src.services.activity import RankBy, Window

router = APIRouter(tags=["activity"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "An invalid query parameter; `param` names it."},
    401: {"description": "Missing or invalid API key."},
    403: {
        "description": "The key may not read the account, the account is disabled, or it is the operator key."
    },
}
MAX_DAYS = 366


@router.get(
    "/ranking/models",
    dependencies=[Depends(public_ip_limit)],
    responses={400: _ERRORS[400], 429: {"description": "Too many requests from this address."}},
)
async def rank_models(
    state: State,
    window: Annotated[Window, Query(description="The period: the last day, week or 30 days.")] = "week",
    sort: Annotated[RankBy, Query(description="Rank by successful requests or by tokens.")] = "requests",
) -> ModelRanking:
    """Public (no key): models ranked by use over a window; aggregate counts only, no user data."""
    ranking = await activity_service.ranking(state, window=window, sort=sort)
    return ModelRanking.model_validate(ranking, from_attributes=True)


@router.get("/user/activity/stats", responses=_ERRORS)
async def activity_stats(
    user: CurrentUser,
    conn: Conn,
    days: Annotated[int, Query(ge=1, le=MAX_DAYS, description="How many UTC days, today included.")] = 30,
) -> ActivityStats:
    """Your requests, tokens and spend per day, per model and per API key."""
    assert user.user_id is not None
    stats = await activity_service.stats(conn, user_id=user.user_id, days=days)
    return ActivityStats.model_validate(stats, from_attributes=True)


@router.get("/user/activity/log", responses=_ERRORS)
async def activity_log(user: CurrentUser, conn: Conn, paging: Paging) -> Page[ActivityEntry]:
    """Your requests, newest first."""
    assert user.user_id is not None
    entries, total = await activity_service.log(
        conn, user_id=user.user_id, limit=paging.limit, offset=paging.offset
    )
    return Page[ActivityEntry](
        data=[ActivityEntry.model_validate(e, from_attributes=True) for e in entries],
        total=total,
        limit=paging.limit,
        offset=paging.offset,
    )
