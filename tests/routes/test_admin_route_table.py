"""Every /admin route and /metrics, found from the route table, refuse all but admins and the operator."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from tests.factories import create_key, create_user

# The routes this table must at least contain, so an empty or broken walk cannot pass.
EXPECTED = {
    ("POST", "/admin/users"),
    ("POST", "/admin/add_credits"),
    ("GET", "/admin/roles"),
    ("GET", "/admin/roles/permissions"),
    ("POST", "/admin/roles"),
    ("PUT", "/admin/roles/{name}"),
    ("DELETE", "/admin/roles/{name}"),
    ("POST", "/admin/roles/assign"),
    ("GET", "/admin/audit-logs"),
    ("POST", "/admin/audit-logs/sweep"),
    ("GET", "/admin/security/auth-failures"),
    ("GET", "/metrics"),
}
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def admin_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route under /admin, included routers walked through."""
    found = []
    # Included routers are resolved lazily (app.routes holds one entry per router), so walk
    # their effective routes, with prefixes applied, the way the OpenAPI generator does.
    for context in iter_route_contexts(app.routes):
        path = context.path or ""
        # /metrics is an admin route too (admin credentials or METRICS_TOKEN).
        if not (path.startswith("/admin") or path == "/metrics"):
            continue
        # Anything but an APIRoute (a bare Starlette route, a mount) would skip the dependencies.
        assert isinstance(context.original_route, APIRoute), path
        found += [(method, path) for method in context.methods or ()]
    return sorted(found)


def concrete(path: str) -> str:
    """The path with each parameter filled: a plausible role name, else a random uuid."""
    return _PARAM.sub(lambda m: "some-role" if m.group(1) == "name" else str(uuid.uuid4()), path)


async def call(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], body: Any = None
) -> httpx.Response:
    if body is None and method in BODY_METHODS:
        body = {}
    return await client.request(method, concrete(path), headers=headers, json=body)


async def test_the_walk_finds_every_admin_route(app: FastAPI) -> None:
    found = set(admin_routes(app))
    assert found >= EXPECTED, EXPECTED - found


async def test_every_admin_route_refuses_everyone_else(app: FastAPI, client: httpx.AsyncClient) -> None:
    plain = await create_user(app)
    admin = await create_user(app, role="admin")
    _, inference_only = await create_key(app, admin, name="inference only", scopes=["inference"])
    routes = admin_routes(app)
    assert len(routes) >= len(EXPECTED)

    for method, path in routes:
        where = f"{method} {path}"
        anonymous = await call(client, method, path, {})
        assert anonymous.status_code == 401, where
        assert anonymous.json()["error"]["code"] == "invalid_api_key", where

        # Authentication is decided before the body is looked at: a body that would fail
        # validation still gets 401, never a 400 that answers for an unauthenticated caller.
        wrong_body = await call(client, method, path, {}, body={"unexpected": [1, 2, 3]})
        assert wrong_body.status_code == 401, where
        bad_key = await call(client, method, path, {"Authorization": "Bearer gw_live_" + "0" * 43})
        assert bad_key.status_code == 401, where

        as_user = await call(client, method, path, plain.headers)
        assert as_user.status_code == 403, where
        assert as_user.json()["error"]["code"] == "permission_denied", where
        as_user_bad_body = await call(client, method, path, plain.headers, body={"unexpected": True})
        assert as_user_bad_body.status_code == 403, where

        # Scopes apply on /admin too: an admin's key limited to inference is not an admin key.
        scoped = await call(client, method, path, {"Authorization": f"Bearer {inference_only}"})
        assert scoped.status_code == 403, where
        assert scoped.json()["error"]["code"] == "insufficient_scope", where


async def test_admins_get_past_the_guard_on_every_route(app: FastAPI, client: httpx.AsyncClient) -> None:
    """The same requests with an admin's key reach the handlers, so the refusals above are the guard's."""
    admin = await create_user(app, role="admin")
    for method, path in admin_routes(app):
        response = await call(client, method, path, admin.headers)
        # {} is an invalid body and the random ids name nothing: 400/404 mean the handler ran.
        assert response.status_code in {200, 201, 400, 404}, f"{method} {path}: {response.status_code}"


@pytest.mark.parametrize("path", ["/admin", "/admin/", "/admin/nope"])
async def test_unknown_admin_paths_do_not_exist(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path, headers={})
    assert response.status_code == 404
