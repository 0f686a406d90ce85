"""Routes: coupon redemption and administration (/coupons, /admin/coupons)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
