"""Routes: the caller's trial and its administration (/trial, /admin/trials)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
