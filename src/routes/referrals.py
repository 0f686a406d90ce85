"""Routes: referral codes, validation and stats (/referral/...)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
