"""Routes: billing analytics for operators (/admin/transactions/analytics)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
