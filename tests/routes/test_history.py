"""Chat history: session and message routes, search, isolation between users, and sessions on
/v1/chat/completions (history sent upstream, trimmed to the context window, turns saved with the
settlement, streams included)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI

from src.config import Settings
from src.services import tokens
from tests.factories import TestUser, create_user, create_user_for
from tests.fakes.live_server import LiveServer
from tests.fakes.upstream import FakeUpstream

MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def settings_overrides(upstream_server: FakeUpstream) -> dict[str, Any]:
    return {"custom_provider_base_url": upstream_server.base_url, "custom_provider_name": "fake"}


async def new_session(client: httpx.AsyncClient, user: TestUser, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/chat/sessions", json=body, headers=user.headers)
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return session


async def append(client: httpx.AsyncClient, user: TestUser, session_id: str, role: str, content: str) -> None:
    response = await client.post(
        f"/v1/chat/sessions/{session_id}/messages",
        json={"role": role, "content": content},
        headers=user.headers,
    )
    assert response.status_code == 201, response.text


async def stored(db: asyncpg.Connection, session_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT role, content, model, tokens, cost, request_id, user_id FROM chat_messages"
        " WHERE session_id = $1 ORDER BY seq",
        UUID(session_id),
    )
    return rows


async def assert_ledger(db: asyncpg.Connection) -> None:
    """For every user: credits = sum of the ledger, no open hold, never below zero."""
    for row in await db.fetch(
        """SELECT u.credits, u.held,
                  COALESCE((SELECT sum(t.amount) FROM credit_transactions t WHERE t.user_id = u.id), 0)
                      AS ledger,
                  (SELECT count(*) FROM credit_holds h WHERE h.user_id = u.id) AS holds
           FROM users u"""
    ):
        assert row["credits"] == row["ledger"], row
        assert row["held"] == 0 and row["holds"] == 0, row
        assert row["credits"] >= 0, row


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


class TestSessions:
    async def test_create_get_update_delete(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        created = await new_session(client, user, title="Trip to Lisbon", model=MODEL)
        assert created["object"] == "chat.session"
        assert (created["title"], created["model"]) == ("Trip to Lisbon", MODEL)
        await append(client, user, created["id"], "user", "Where should I eat?")

        got = (await client.get(f"/v1/chat/sessions/{created['id']}", headers=user.headers)).json()
        assert got["title"] == "Trip to Lisbon"
        assert [m["content"] for m in got["messages"]["data"]] == ["Where should I eat?"]
        assert got["messages"]["total"] == 1

        renamed = await client.put(
            f"/v1/chat/sessions/{created['id']}", json={"title": "Lisbon"}, headers=user.headers
        )
        assert renamed.status_code == 200
        assert (renamed.json()["title"], renamed.json()["model"]) == ("Lisbon", MODEL)  # model untouched
        cleared = await client.put(
            f"/v1/chat/sessions/{created['id']}", json={"model": None}, headers=user.headers
        )
        assert (cleared.json()["title"], cleared.json()["model"]) == ("Lisbon", None)

        deleted = await client.delete(f"/v1/chat/sessions/{created['id']}", headers=user.headers)
        assert deleted.status_code == 200
        assert deleted.json() == {"id": created["id"], "object": "chat.session.deleted", "deleted": True}
        again = await client.get(f"/v1/chat/sessions/{created['id']}", headers=user.headers)
        assert again.status_code == 404
        assert await stored(db, created["id"]) == []  # the messages went with it

    async def test_bad_bodies_are_400(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        session = await new_session(client, user)
        for path, body in [
            ("/v1/chat/sessions", {"title": "x", "user_id": str(uuid4())}),
            ("/v1/chat/sessions", {"title": "x" * 201}),
            (f"/v1/chat/sessions/{session['id']}/messages", {"role": "tool", "content": "x"}),
            (f"/v1/chat/sessions/{session['id']}/messages", {"role": "user", "content": ""}),
        ]:
            response = await client.post(path, json=body, headers=user.headers)
            assert response.status_code == 400, (path, body, response.text)
            assert response.json()["error"]["type"] == "invalid_request_error"

    async def test_needs_a_key(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/v1/chat/sessions")).status_code == 401

    async def test_listing_is_paged_most_recent_first(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        first, second, third = [await new_session(client, user, title=t) for t in ("one", "two", "three")]
        # A new message makes a conversation the most recent.
        await append(client, user, first["id"], "user", "back to this one")

        page = (await client.get("/v1/chat/sessions?limit=2", headers=user.headers)).json()
        assert [s["title"] for s in page["data"]] == ["one", "three"]
        assert (page["total"], page["limit"], page["offset"]) == (3, 2, 0)
        rest = (await client.get("/v1/chat/sessions?limit=2&offset=2", headers=user.headers)).json()
        assert [s["id"] for s in rest["data"]] == [second["id"]]
        assert third["id"] not in {s["id"] for s in rest["data"]}

    async def test_messages_are_paged_in_conversation_order(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        user = await create_user(app)
        session = await new_session(client, user)
        for index in range(5):
            await append(
                client, user, session["id"], "user" if index % 2 == 0 else "assistant", f"turn {index}"
            )
        page = (
            await client.get(f"/v1/chat/sessions/{session['id']}?limit=2&offset=1", headers=user.headers)
        ).json()
        assert [(m["role"], m["content"]) for m in page["messages"]["data"]] == [
            ("assistant", "turn 1"),
            ("user", "turn 2"),
        ]
        assert page["messages"]["total"] == 5
        assert all(m["tokens"] == 0 and m["cost"] == "0.0000000000" for m in page["messages"]["data"])

    async def test_search_finds_titles_and_content_any_case(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        user = await create_user(app)
        trip = await new_session(client, user, title="Trip to LISBON")
        food = await new_session(client, user, title="Groceries")
        other = await new_session(client, user, title="Taxes")
        await append(
            client, user, food["id"], "user", "Buy pastéis de nata like the ones in Lisbon, and bread"
        )
        await append(client, user, other["id"], "user", "Nothing to see here")

        found = (await client.get("/v1/chat/search?q=lisbon", headers=user.headers)).json()
        hits = {hit["session"]["id"]: hit for hit in found["data"]}
        assert set(hits) == {trip["id"], food["id"]}
        assert found["total"] == 2
        assert (hits[trip["id"]]["title_matched"], hits[trip["id"]]["matched_messages"]) == (True, 0)
        assert (hits[food["id"]]["title_matched"], hits[food["id"]]["matched_messages"]) == (False, 1)
        assert "in Lisbon" in hits[food["id"]]["snippet"]

        paged = (await client.get("/v1/chat/search?q=lisbon&limit=1&offset=1", headers=user.headers)).json()
        assert (len(paged["data"]), paged["total"]) == (1, 2)

    async def test_search_wildcards_are_literal(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        sale = await new_session(client, user, title="50% off")
        await new_session(client, user, title="plain title")
        found = (await client.get("/v1/chat/search", params={"q": "%"}, headers=user.headers)).json()
        assert [hit["session"]["id"] for hit in found["data"]] == [sale["id"]]
        underscore = (await client.get("/v1/chat/search", params={"q": "_"}, headers=user.headers)).json()
        assert underscore["data"] == []

    async def test_search_needs_a_query(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app)
        response = await client.get("/v1/chat/search", headers=user.headers)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "q"


class TestIsolation:
    async def test_another_users_session_is_not_found_anywhere(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        alice = await create_user(app, credits="5")
        bob = await create_user(app, credits="5")
        session = await new_session(client, alice, title="Alice's secret plans")
        await append(client, alice, session["id"], "user", "the secret is rosebud")
        sid = session["id"]

        unknown = await client.get(f"/v1/chat/sessions/{uuid4()}", headers=bob.headers)
        malformed = await client.get("/v1/chat/sessions/not-a-uuid", headers=bob.headers)
        assert unknown.status_code == malformed.status_code == 404
        attempts = [
            await client.get(f"/v1/chat/sessions/{sid}", headers=bob.headers),
            await client.put(f"/v1/chat/sessions/{sid}", json={"title": "mine"}, headers=bob.headers),
            await client.post(
                f"/v1/chat/sessions/{sid}/messages",
                json={"role": "user", "content": "hi"},
                headers=bob.headers,
            ),
            await client.delete(f"/v1/chat/sessions/{sid}", headers=bob.headers),
            await client.post("/v1/chat/completions", json=chat("hi", session_id=sid), headers=bob.headers),
            await client.post(
                "/v1/chat/completions", params={"session_id": sid}, json=chat("hi"), headers=bob.headers
            ),
        ]
        for response in attempts:
            assert response.status_code == 404, response.text
            assert response.json() == unknown.json()  # indistinguishable from a session that does not exist

        listed = (await client.get("/v1/chat/sessions", headers=bob.headers)).json()
        searched = (await client.get("/v1/chat/search?q=secret", headers=bob.headers)).json()
        assert listed["data"] == [] and listed["total"] == 0
        assert searched["data"] == [] and searched["total"] == 0

        # Nothing reached the provider, nothing was held or billed for Bob.
        assert upstream.chat_requests == []
        assert await db.fetchval("SELECT count(*) FROM usage_records WHERE user_id = $1", bob.id) == 0
        assert await db.fetchval("SELECT credits FROM users WHERE id = $1", bob.id) == Decimal(5)
        await assert_ledger(db)
        # Alice's session is exactly as she left it.
        mine = (await client.get(f"/v1/chat/sessions/{sid}", headers=alice.headers)).json()
        assert mine["title"] == "Alice's secret plans"
        assert [m["content"] for m in mine["messages"]["data"]] == ["the secret is rosebud"]


class TestInjection:
    async def test_second_request_sends_the_first_exchange(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="5")
        session = await new_session(client, user)
        upstream.set_reply(content="Nice to meet you, Ada.")
        first = await client.post(
            "/v1/chat/completions",
            json=chat("My name is Ada.", session_id=session["id"]),
            headers=user.headers,
        )
        assert first.status_code == 200, first.text
        assert upstream.last_request.body["messages"] == [{"role": "user", "content": "My name is Ada."}]
        assert "session_id" not in upstream.last_request.body

        upstream.set_reply(content="Your name is Ada.")
        second = await client.post(
            "/v1/chat/completions",
            params={"session_id": session["id"]},
            json=chat("What is my name?"),
            headers=user.headers,
        )
        assert second.status_code == 200, second.text
        assert upstream.last_request.body["messages"] == [
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Nice to meet you, Ada."},
            {"role": "user", "content": "What is my name?"},
        ]

        rows = await stored(db, session["id"])
        assert [(r["role"], r["content"]) for r in rows] == [
            ("user", "My name is Ada."),
            ("assistant", "Nice to meet you, Ada."),
            ("user", "What is my name?"),
            ("assistant", "Your name is Ada."),
        ]
        records = await db.fetch(
            "SELECT request_id, input_tokens, output_tokens, input_cost, cost FROM usage_records"
            " WHERE user_id = $1 ORDER BY id",
            user.id,
        )
        for (turn, reply), record in zip([rows[0:2], rows[2:4]], records, strict=True):
            assert turn["request_id"] == reply["request_id"] == record["request_id"]
            assert (turn["tokens"], reply["tokens"]) == (record["input_tokens"], record["output_tokens"])
            assert turn["cost"] == record["input_cost"]
            assert turn["cost"] + reply["cost"] == record["cost"]
            assert turn["model"] == reply["model"] == MODEL
        # The second exchange paid for the history it re-sent.
        assert records[1]["input_tokens"] > records[0]["input_tokens"]
        listed = (await client.get("/v1/chat/sessions", headers=user.headers)).json()
        assert listed["data"][0]["title"] == "My name is Ada."  # an untitled session takes its first turn
        await assert_ledger(db)

    async def test_long_history_is_trimmed_oldest_first(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        context, max_tokens = 300, 50
        upstream.models[0]["context_length"] = context  # before the app's catalog first loads
        user = await create_user(app, credits="5")
        session = await new_session(client, user)
        history = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "lorem ipsum " * 8}
            for i in range(20)
        ]
        for message in history:
            await append(client, user, session["id"], message["role"], message["content"])

        request = chat("And now?", session_id=session["id"], max_tokens=max_tokens)
        response = await client.post("/v1/chat/completions", json=request, headers=user.headers)
        assert response.status_code == 200, response.text

        sent = upstream.last_request.body["messages"]
        assert sent[-1] == {"role": "user", "content": "And now?"}
        injected = sent[:-1]
        assert 0 < len(injected) < len(history)
        assert injected == history[-len(injected) :]  # the newest turns, in order
        # Trimming counts with the real tokenizer: as many turns as really fit, not as the bound says.
        budget = context - max_tokens
        assert tokens.count_prompt(sent) <= budget
        one_more = [history[-len(injected) - 1], *sent]
        assert tokens.count_prompt(one_more) > budget

    async def test_request_that_alone_overflows_gets_no_history(
        self, app: FastAPI, client: httpx.AsyncClient, upstream: FakeUpstream
    ) -> None:
        upstream.models[0]["context_length"] = 300
        user = await create_user(app, credits="5")
        session = await new_session(client, user)
        await append(client, user, session["id"], "user", "short")
        big = "word " * 400
        response = await client.post(
            "/v1/chat/completions",
            json=chat(big, session_id=session["id"], max_tokens=10),
            headers=user.headers,
        )
        assert response.status_code == 200, response.text  # the provider decides, not the gateway
        assert upstream.last_request.body["messages"] == [{"role": "user", "content": big}]

    async def test_failed_call_saves_nothing(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection, upstream: FakeUpstream
    ) -> None:
        user = await create_user(app, credits="5")
        session = await new_session(client, user)
        upstream.set_fault(status=500)
        response = await client.post(
            "/v1/chat/completions", json=chat("hello?", session_id=session["id"]), headers=user.headers
        )
        assert response.status_code == 502
        assert await stored(db, session["id"]) == []
        assert (
            await db.fetchval("SELECT status FROM usage_records WHERE user_id = $1", user.id)
            == "upstream_error"
        )
        await assert_ledger(db)

    async def test_body_and_query_must_agree(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        user = await create_user(app, credits="5")
        one, two = await new_session(client, user), await new_session(client, user)
        response = await client.post(
            "/v1/chat/completions",
            params={"session_id": one["id"]},
            json=chat("hi", session_id=two["id"]),
            headers=user.headers,
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "session_id"


async def stream_chat(gateway: LiveServer, user: TestUser, body: dict[str, Any]) -> str:
    text = []
    async with (
        httpx.AsyncClient(base_url=gateway.url, headers=user.headers, timeout=10) as http,
        http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in orjson.loads(line[6:]).get("choices") or ():
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


async def live_session(gateway: LiveServer, user: TestUser) -> str:
    async with httpx.AsyncClient(base_url=gateway.url, headers=user.headers) as http:
        response = await http.post("/v1/chat/sessions", json={"title": "streamed"})
    assert response.status_code == 201
    session_id: str = response.json()["id"]
    return session_id


class TestStreamingTurns:
    async def test_streamed_turn_is_saved_with_its_usage(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_reply(content="One two three four five.", chunks=5)
        user = await create_user_for(gateway_settings, credits="5")
        session_id = await live_session(live_gateway, user)

        streamed = await stream_chat(live_gateway, user, chat("Count to five.", session_id=session_id))
        assert streamed == "One two three four five."

        turn, reply = await stored(db, session_id)
        record = await db.fetchrow(
            "SELECT request_id, input_tokens, output_tokens, input_cost, cost, status FROM usage_records"
            " WHERE user_id = $1",
            user.id,
        )
        assert record is not None and record["status"] == "success"
        assert (turn["role"], turn["content"]) == ("user", "Count to five.")
        assert (reply["role"], reply["content"]) == ("assistant", streamed)
        assert (turn["tokens"], reply["tokens"]) == (record["input_tokens"], record["output_tokens"])
        assert turn["cost"] + reply["cost"] == record["cost"]
        assert turn["request_id"] == reply["request_id"] == record["request_id"]
        assert turn["user_id"] == reply["user_id"] == user.id

        # The next streamed request carries the streamed exchange upstream.
        await stream_chat(live_gateway, user, chat("Again?", session_id=session_id))
        assert upstream.last_request.body["messages"][:2] == [
            {"role": "user", "content": "Count to five."},
            {"role": "assistant", "content": streamed},
        ]
        await assert_ledger(db)

    async def test_client_leaving_mid_stream_keeps_what_was_sent(
        self,
        live_gateway: LiveServer,
        gateway_settings: Settings,
        upstream: FakeUpstream,
        db: asyncpg.Connection,
    ) -> None:
        upstream.set_reply(content=" ".join(f"w{i}" for i in range(40)), chunks=40, chunk_delay=0.02)
        user = await create_user_for(gateway_settings, credits="5")
        session_id = await live_session(live_gateway, user)

        received = []
        async with (
            httpx.AsyncClient(base_url=live_gateway.url, headers=user.headers, timeout=10) as http,
            http.stream(
                "POST", "/v1/chat/completions", json={**chat("Go", session_id=session_id), "stream": True}
            ) as response,
        ):
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    for choice in orjson.loads(line[6:]).get("choices") or ():
                        received.append(choice.get("delta", {}).get("content") or "")
                if len("".join(received)) > 6:
                    break  # leave with the stream half-way

        for _ in range(50):
            status = await db.fetchval("SELECT status FROM usage_records WHERE user_id = $1", user.id)
            if status is not None:
                break
            await asyncio.sleep(0.05)
        assert status == "client_disconnect"
        turn, reply = await stored(db, session_id)
        assert turn["content"] == "Go"
        assert reply["content"].startswith("".join(received))
        assert len(reply["content"]) < len(upstream.reply.content)
        output_tokens = await db.fetchval(
            "SELECT output_tokens FROM usage_records WHERE user_id = $1", user.id
        )
        assert reply["tokens"] == output_tokens
        await assert_ledger(db)
