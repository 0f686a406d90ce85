"""A fake of the Supabase Storage endpoints the `supabase` client calls, on a real socket.

`FakeStorage` serves, under ``/storage/v1`` on 127.0.0.1 (uvicorn in a thread, like the fake
upstream)::

    POST /object/{bucket}/{path}           upload (multipart `file`; 409 when it exists, no upsert)
    POST /object/sign/{bucket}/{path}      sign one object  -> {"signedURL": "/object/sign/...?token=..."}
    POST /object/sign/{bucket}             sign many        -> [{"path", "signedURL", "error"}]
    GET  /object/sign/{bucket}/{path}      download with ?token= (what a signed URL points to)
    GET  /object/public/{bucket}/{path}    download (public URL)

Writes and signing need ``apikey: <service key>`` and ``Authorization: Bearer <service key>``, as
Supabase does; errors use Storage's body shape ``{"statusCode", "error", "message"}``.

Knobs: ``fail_uploads`` (an HTTP status every upload answers). Observation: `uploads` (every
accepted upload, with its bytes, content type and credentials), `objects`, `requests`.
`reset` clears both.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from tests.fakes.live_server import LiveServer, ServedFake

__all__ = ["DEFAULT_BUCKET", "SERVICE_KEY", "FakeStorage", "StoredObject"]

SERVICE_KEY = "fake-supabase-service-key-" + "k" * 24
DEFAULT_BUCKET = "generated-images"


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    path: str
    data: bytes
    content_type: str
    cache_control: str | None
    authorization: str | None
    apikey: str | None


@dataclass(frozen=True)
class _Signed:
    bucket: str
    path: str
    expires_at: float


def _error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"statusCode": str(status), "error": error, "message": message}, status_code=status)


def _multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Form fields by name: (content type, bytes). Enough of RFC 7578 for httpx's encoder."""
    boundary = next(
        (p.split("=", 1)[1].strip('"') for p in content_type.split(";") if p.strip().startswith("boundary=")),
        None,
    )
    if boundary is None:
        return {}
    fields: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(b"--" + boundary.encode())[1:-1]:
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.decode("latin-1").partition(":") for line in head.split(b"\r\n"))
        }
        disposition = headers.get("content-disposition", "")
        name = next(
            (p.split("=", 1)[1].strip('"') for p in disposition.split(";") if p.strip().startswith("name=")),
            None,
        )
        if name is not None:
            fields[name] = (headers.get("content-type"), data.removesuffix(b"\r\n"))
    return fields


@dataclass
class FakeStorage(ServedFake):
    service_key: str = SERVICE_KEY
    buckets: tuple[str, ...] = (DEFAULT_BUCKET,)
    fail_uploads: int | None = None
    _objects: dict[tuple[str, str], StoredObject] = field(default_factory=dict)
    _uploads: list[StoredObject] = field(default_factory=list)
    _requests: list[tuple[str, str]] = field(default_factory=list)
    _tokens: dict[str, _Signed] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: LiveServer | None = None

    # -- observation -----------------------------------------------------

    @property
    def uploads(self) -> list[StoredObject]:
        with self._lock:
            return list(self._uploads)

    @property
    def objects(self) -> dict[tuple[str, str], StoredObject]:
        with self._lock:
            return dict(self._objects)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request received, oldest first."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._objects.clear()
            self._uploads.clear()
            self._requests.clear()
            self._tokens.clear()
        self.fail_uploads = None

    # -- the API ---------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        return (
            request.headers.get("apikey") == self.service_key
            and request.headers.get("authorization") == f"Bearer {self.service_key}"
        )

    def _sign(self, bucket: str, path: str, expires_in: Any) -> str | None:
        with self._lock:
            if (bucket, path) not in self._objects:
                return None
            token = secrets.token_urlsafe(16)
            self._tokens[token] = _Signed(bucket, path, time.time() + int(expires_in))
        return f"/object/sign/{bucket}/{path}?token={token}"

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Response:
            with self._lock:
                self._requests.append((request.method, request.url.path))
            response: Response = await call_next(request)
            return response

        # Registered before the upload route, whose {bucket}/{path} would also match "sign/...".
        @app.post("/storage/v1/object/sign/{bucket}/{path:path}")
        async def sign_one(bucket: str, path: str, request: Request) -> Response:
            if not self._authorized(request):
                return _error(403, "Unauthorized", "Invalid JWT")
            body = await request.json()
            signed = self._sign(bucket, path, body.get("expiresIn", 60))
            if signed is None:
                return _error(404, "not_found", "Object not found")
            return JSONResponse({"signedURL": signed})

        @app.post("/storage/v1/object/sign/{bucket}")
        async def sign_many(bucket: str, request: Request) -> Response:
            if not self._authorized(request):
                return _error(403, "Unauthorized", "Invalid JWT")
            body = await request.json()
            items = []
            for path in body.get("paths", []):
                signed = self._sign(bucket, path, body.get("expiresIn", 60))
                items.append(
                    {
                        "path": path,
                        "signedURL": signed,
                        "error": None
                        if signed
                        else "Either the object does not exist or you do not have access to it",
                    }
                )
            return JSONResponse(items)

        @app.get("/storage/v1/object/sign/{bucket}/{path:path}")
        async def download_signed(bucket: str, path: str, token: str = "") -> Response:
            with self._lock:
                signed = self._tokens.get(token)
                stored = self._objects.get((bucket, path))
            if (
                signed is None
                or (signed.bucket, signed.path) != (bucket, path)
                or signed.expires_at < time.time()
            ):
                return _error(400, "InvalidSignature", "The signature is invalid or expired")
            assert stored is not None
            return Response(stored.data, media_type=stored.content_type)

        @app.get("/storage/v1/object/public/{bucket}/{path:path}")
        async def download_public(bucket: str, path: str) -> Response:
            with self._lock:
                stored = self._objects.get((bucket, path))
            if stored is None:
                return _error(404, "not_found", "Object not found")
            return Response(stored.data, media_type=stored.content_type)

        @app.post("/storage/v1/object/{bucket}/{path:path}")
        async def upload(bucket: str, path: str, request: Request) -> Response:
            if not self._authorized(request):
                return _error(403, "Unauthorized", "Invalid JWT")
            if self.fail_uploads is not None:
                return _error(self.fail_uploads, "InternalError", "The fake storage is failing on purpose")
            if bucket not in self.buckets:
                return _error(404, "Bucket not found", "Bucket not found")
            fields = _multipart(await request.body(), request.headers.get("content-type", ""))
            if "file" not in fields:
                return _error(400, "InvalidRequest", "No file in the form")
            content_type, data = fields["file"]
            cache_control = fields.get("cacheControl", (None, b""))[1].decode() or None
            stored = StoredObject(
                bucket=bucket,
                path=path,
                data=data,
                content_type=content_type or "application/octet-stream",
                cache_control=cache_control,
                authorization=request.headers.get("authorization"),
                apikey=request.headers.get("apikey"),
            )
            with self._lock:
                if (bucket, path) in self._objects and request.headers.get("x-upsert") != "true":
                    return _error(409, "Duplicate", "The resource already exists")
                self._objects[(bucket, path)] = stored
                self._uploads.append(stored)
            return JSONResponse({"Key": f"{bucket}/{path}", "Id": str(uuid.uuid4())})

        return app
