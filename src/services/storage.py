"""Supabase Storage for generated images, through the `supabase` client.

Images go to SUPABASE_STORAGE_BUCKET under `<user id>/<request id>/<index>.<ext>` and the client
gets a signed URL for each, valid for SIGNED_URL_SECONDS (an hour, as OpenAI's own image URLs).
Signed rather than public URLs: the bucket can stay private, so one user's images are reachable
only through the links handed to that user, and a link stops working after the hour.

The client is built per call on the app's shared HTTP client (building it takes microseconds and
makes no request), so uploads use the same connection pool and no client outlives its app.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from uuid import UUID

import httpx
from storage3.utils import StorageException
from supabase import AsyncClientOptions, acreate_client

from src.config import Settings

logger = logging.getLogger("gatewayz.storage")

SIGNED_URL_SECONDS = 3600
STORAGE_TIMEOUT_SECONDS = 60.0


class StorageFailed(Exception):
    """The images could not be stored or signed; nothing about the cause reaches the client."""


@dataclass(frozen=True)
class Image:
    data: bytes
    extension: str
    content_type: str


# Providers answer PNG unless asked otherwise (`output_format`); the bytes say which it is.
_SIGNATURES: tuple[tuple[bytes, int, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "png", "image/png"),
    (b"\xff\xd8\xff", 0, "jpeg", "image/jpeg"),
    (b"WEBP", 8, "webp", "image/webp"),
    (b"GIF8", 0, "gif", "image/gif"),
)


def image(data: bytes) -> Image:
    """The image with its file extension and content type, PNG unless its bytes say otherwise."""
    for signature, offset, extension, content_type in _SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return Image(data=data, extension=extension, content_type=content_type)
    if data.lstrip()[:5] in (b"<?xml", b"<svg ", b"<svg>"):
        return Image(data=data, extension="svg", content_type="image/svg+xml")
    return Image(data=data, extension="png", content_type="image/png")


def configured(settings: Settings) -> bool:
    return bool(settings.supabase_url and settings.supabase_service_key)


async def store_images(
    settings: Settings, http: httpx.AsyncClient, *, user_id: UUID, request_id: UUID, images: list[Image]
) -> list[str]:
    """Upload every image and return a signed URL for each, in order; StorageFailed otherwise."""
    assert settings.supabase_url is not None and settings.supabase_service_key is not None
    paths = [f"{user_id}/{request_id}/{index}.{item.extension}" for index, item in enumerate(images)]
    try:
        async with asyncio.timeout(STORAGE_TIMEOUT_SECONDS):
            client = await acreate_client(
                settings.supabase_url,
                settings.supabase_service_key.get_secret_value(),
                AsyncClientOptions(httpx_client=http, auto_refresh_token=False, persist_session=False),
            )
            bucket = client.storage.from_(settings.supabase_storage_bucket)
            await asyncio.gather(
                *(
                    bucket.upload(path, item.data, {"content-type": item.content_type})
                    for path, item in zip(paths, images, strict=True)
                )
            )
            signed = await bucket.create_signed_urls(paths, SIGNED_URL_SECONDS)
    except (StorageException, httpx.HTTPError, TimeoutError, ValueError, KeyError) as exc:
        # The exception text may carry the storage URL; the type is enough for the log.
        logger.error("storing %d generated images failed: %s", len(images), type(exc).__name__)
        raise StorageFailed from exc
    urls = {item["path"]: item["signedURL"] for item in signed}
    if any(not urls.get(path) for path in paths):
        logger.error("the storage did not sign every generated image")
        raise StorageFailed
    return [str(urls[path]) for path in paths]
