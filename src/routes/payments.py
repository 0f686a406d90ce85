"""Routes: Stripe top-ups, subscriptions, payments and the webhook (/api/stripe/...)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
