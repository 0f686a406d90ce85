"""Routes: billing analytics for operators (/admin/transactions/analytics).

`authenticate` is a router-level dependency and the permission check the route's first
parameter, so nobody is answered (not even 400 for a bad query) before the caller is known.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from src.deps import Conn, State
from src.schemas.analytics import BillingAnalytics
from src.security.deps import Principal, authenticate, require_permission
from src.services import analytics as analytics_service

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authenticate)])

BillingReader = Annotated[Principal, Depends(require_permission("billing.read"))]


@router.get(
    "/transactions/analytics",
    responses={
        400: {"description": "An invalid date, 'end' before 'start', or a window over 366 days."},
        401: {"description": "Missing or invalid credentials."},
        403: {"description": "The caller's role lacks billing.read, or the key's scopes exclude /admin."},
    },
)
async def billing_analytics(
    actor: BillingReader,
    conn: Conn,
    state: State,
    start: Annotated[
        date | None, Query(description="First day (UTC, YYYY-MM-DD); default: 29 days before 'end'.")
    ] = None,
    end: Annotated[date | None, Query(description="Last day (UTC), included; default: today.")] = None,
    top: Annotated[int, Query(ge=1, le=100, description="How many top payers to list.")] = 10,
) -> BillingAnalytics:
    """Revenue, credits granted, usage spend, top payers, refunds and trial conversion over a window."""
    found = await analytics_service.report(conn, state.settings, start=start, end=end, top=top)
    return BillingAnalytics.model_validate(found, from_attributes=True)
