"""Routes: plans, the caller's plan, and their administration (/plans, /user/plan, /admin/plans)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
