"""Routes: subscribing to a plan through Stripe, and changing or cancelling the subscription."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
