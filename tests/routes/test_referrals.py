"""Referrals: codes, attachment at sign-up only, one reward on the first qualifying purchase, reversal.

Purchases are simulated the way the payment code makes them: in one transaction, the 'purchase'
grant and then `reward_on_purchase`; a refund is the purchase's claw-back and `reverse_on_refund`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI

from src.config import Settings
from src.services import grants
from src.services import referrals as referrals_service
from tests.factories import TestUser, app_state, create_user
from tests.money import assert_money_invariants

APP_ID = "cm-gatewayz-referral-test"
SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_PEM = SIGNING_KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
D = Decimal
REFERRER_REWARD = D(10)
REFERRED_REWARD = D(5)
MIN_PURCHASE = D(20)
MAX_USES = 3


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "privy_app_id": APP_ID,
        "privy_verification_key": PUBLIC_PEM,
        # Sign-up trials are tested in tests/routes/test_trials.py; here a new account starts empty.
        "trial_on_signup": False,
        "referral_reward_referrer": REFERRER_REWARD,
        "referral_reward_referred": REFERRED_REWARD,
        "referral_min_purchase": MIN_PURCHASE,
        "referral_max_uses": MAX_USES,
    }


@pytest.fixture(autouse=True)
async def _money_invariants(db: asyncpg.Connection) -> AsyncIterator[None]:
    yield
    # For every user: balance = sum of the ledger, and no grant or reversal applied twice.
    await assert_money_invariants(db)


def _claims(sub: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sid": "s", "iss": "privy.io", "aud": APP_ID, "sub": sub, "iat": now, "exp": now + 3600, **extra}


def new_sub() -> str:
    return f"did:privy:{uuid.uuid4().hex}"


async def sign_up(
    client: httpx.AsyncClient, sub: str, *, email: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """POST /auth with a Privy access token, an identity token for `email`, and a referral code."""
    body: dict[str, Any] = {"access_token": jwt.encode(_claims(sub), SIGNING_KEY, algorithm="ES256")}
    if email is not None:
        linked = json.dumps([{"type": "email", "address": email}])
        body["identity_token"] = jwt.encode(
            _claims(sub, linked_accounts=linked), SIGNING_KEY, algorithm="ES256"
        )
    if code is not None:
        body["referral_code"] = code
    response = await client.post("/auth", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def bearer(login: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {login['api_key']}"}


async def code_of(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    response = await client.get("/referral/code", headers=headers)
    assert response.status_code == 200, response.text
    code: str = response.json()["code"]
    return code


async def stats_of(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    response = await client.get("/referral/stats", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def purchase(
    conn: asyncpg.Connection,
    settings: Settings,
    user_id: UUID | str,
    amount: Decimal,
    reference: str,
    *,
    customer: str | None = None,
) -> None:
    """One top-up as the payment code makes it: the purchase grant and the referral step together."""
    async with conn.transaction():
        granted = await grants.grant(
            conn,
            user_id=UUID(str(user_id)),
            amount=amount,
            source="purchase",
            reference=reference,
            actor="stripe",
        )
        assert granted is not None
        await referrals_service.reward_on_purchase(
            conn,
            settings,
            user_id=UUID(str(user_id)),
            amount=amount,
            payment_reference=reference,
            stripe_customer_id=customer,
        )


async def refund(conn: asyncpg.Connection, user_id: UUID | str, amount: Decimal, reference: str) -> None:
    """The purchase's claw-back and the referral reversal, in one transaction, as a refund does it."""
    async with conn.transaction():
        await grants.debit(
            conn,
            user_id=UUID(str(user_id)),
            amount=amount,
            type="refund",
            once_key=f"refund:{reference}",
            actor="stripe",
            from_grant=("purchase", reference),
        )
        await referrals_service.reverse_on_refund(
            conn, payment_reference=reference, actor="stripe:charge.refunded"
        )


async def credits(db: asyncpg.Connection, user_id: UUID | str) -> Decimal:
    value: Decimal = await db.fetchval("SELECT credits FROM users WHERE id = $1", UUID(str(user_id)))
    return value


async def ledger(db: asyncpg.Connection, user_id: UUID | str) -> list[tuple[str, Decimal]]:
    rows = await db.fetch(
        "SELECT type, amount FROM credit_transactions WHERE user_id = $1 ORDER BY id", UUID(str(user_id))
    )
    return [(row["type"], row["amount"]) for row in rows]


async def referral_of(db: asyncpg.Connection, referred_id: UUID | str) -> asyncpg.Record | None:
    return await db.fetchrow(
        """SELECT id, referrer_id, status, refusal_reason, purchase_reference, referrer_amount,
                  referred_amount FROM referrals WHERE referred_id = $1""",
        UUID(str(referred_id)),
    )


async def refusals(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT metadata FROM audit_logs WHERE action = 'referral.refused' ORDER BY id")


async def referrer_with_code(app: FastAPI, client: httpx.AsyncClient) -> tuple[TestUser, str]:
    referrer = await create_user(app)
    return referrer, await code_of(client, referrer.headers)


async def referred_pair(app: FastAPI, client: httpx.AsyncClient) -> tuple[TestUser, dict[str, Any]]:
    referrer, code = await referrer_with_code(app, client)
    login = await sign_up(client, new_sub(), code=code)
    assert login["referral"] == "attached"
    return referrer, login


class TestCode:
    async def test_created_on_first_request_then_stable(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        assert await db.fetchval("SELECT count(*) FROM referral_codes") == 0
        first = await code_of(client, user.headers)
        assert re.fullmatch(r"[A-HJ-NP-Z2-9]{8}", first)
        assert await code_of(client, user.headers) == first
        assert await db.fetchval("SELECT code FROM referral_codes WHERE user_id = $1", user.id) == first
        profile = (await client.get("/user/profile", headers=user.headers)).json()
        assert profile["referral_code"] == first

    async def test_concurrent_first_requests_create_one_code(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        user = await create_user(app)
        responses = await asyncio.gather(
            *(client.get("/referral/code", headers=user.headers) for _ in range(10))
        )
        assert [r.status_code for r in responses] == [200] * 10
        assert len({r.json()["code"] for r in responses}) == 1
        assert await db.fetchval("SELECT count(*) FROM referral_codes") == 1

    async def test_codes_differ_between_users(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        users = [await create_user(app) for _ in range(5)]
        codes = await asyncio.gather(*(code_of(client, user.headers) for user in users))
        assert len(set(codes)) == 5

    async def test_a_colliding_code_is_retried(self, app: FastAPI, db: asyncpg.Connection) -> None:
        taken_by, other = await create_user(app), await create_user(app)
        state = app_state(app)
        async with state.pool.acquire() as conn:
            taken = await referrals_service.get_or_create_code(conn, user_id=taken_by.id)
            candidates = iter([taken, taken, "FRESHCODE"])
            code = await referrals_service.get_or_create_code(
                conn, user_id=other.id, generate=lambda: next(candidates)
            )
        assert code == "FRESHCODE"
        rows = await db.fetch("SELECT user_id, code FROM referral_codes ORDER BY created_at")
        assert {(r["user_id"], r["code"]) for r in rows} == {(taken_by.id, taken), (other.id, "FRESHCODE")}

    async def test_needs_an_api_key(self, client: httpx.AsyncClient) -> None:
        for path in ("/referral/code", "/referral/stats"):
            response = await client.get(path)
            assert response.status_code == 401
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}


class TestValidate:
    async def test_valid_code_in_any_case_reveals_no_owner(
        self, app: FastAPI, client: httpx.AsyncClient
    ) -> None:
        referrer, code = await referrer_with_code(app, client)
        for spelling in (code, f"  {code.lower()} "):
            response = await client.post("/referral/validate", json={"code": spelling})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body == {
                "valid": True,
                "reason": None,
                "reward": "5.0000000000",
                "min_purchase": "20.0000000000",
            }
            assert str(referrer.id) not in response.text and referrer.email not in response.text

    async def test_unknown_code(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/referral/validate", json={"code": "NOSUCHCODE"})
        assert response.json()["valid"] is False and response.json()["reason"] == "not_found"

    async def test_code_of_a_deleted_account_is_not_valid(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        login = await sign_up(client, new_sub())
        code = await code_of(client, bearer(login))
        deleted = await client.request(
            "DELETE", "/user/account", headers=bearer(login), json={"confirm": "DELETE"}
        )
        assert deleted.status_code == 200
        response = await client.post("/referral/validate", json={"code": code})
        assert (response.json()["valid"], response.json()["reason"]) == (False, "not_found")
        referred = await sign_up(client, new_sub(), code=code)
        assert referred["referral"] == "unknown_code"
        assert await db.fetchval("SELECT count(*) FROM referrals") == 0

    async def test_full_code_is_not_valid(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        _, code = await referrer_with_code(app, client)
        for _ in range(MAX_USES):
            assert (await sign_up(client, new_sub(), code=code))["referral"] == "attached"
        response = await client.post("/referral/validate", json={"code": code})
        assert (response.json()["valid"], response.json()["reason"]) == (False, "max_uses_reached")

    @pytest.mark.parametrize("body", [{}, {"code": ""}, {"code": "X" * 65}, {"code": "A", "user": "x"}])
    async def test_bad_body(self, client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        response = await client.post("/referral/validate", json=body)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"


class TestSignup:
    async def test_code_attached_at_signup(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, code = await referrer_with_code(app, client)
        login = await sign_up(client, new_sub(), email="new@example.com", code=f" {code.lower()}")
        assert login["is_new_user"] is True and login["referral"] == "attached"
        referred_id = UUID(login["user"]["id"])
        referral = await referral_of(db, referred_id)
        assert referral is not None
        assert (referral["referrer_id"], referral["status"]) == (referrer.id, "pending")
        assert await db.fetchval("SELECT referred_by FROM users WHERE id = $1", referred_id) == referrer.id
        stats = await stats_of(client, referrer.headers)
        assert (stats["code"], stats["referred"], stats["pending"]) == (code, 1, 1)
        assert stats["rewards_earned"] == "0.0000000000"
        # Nothing is paid for a sign-up alone.
        assert await ledger(db, referred_id) == [] and await ledger(db, referrer.id) == []

    async def test_existing_user_logging_in_with_a_code_is_not_attached(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        _, code = await referrer_with_code(app, client)
        sub = new_sub()
        first = await sign_up(client, sub)
        assert first["referral"] is None
        again = await sign_up(client, sub, code=code)
        assert again["is_new_user"] is False and again["referral"] == "existing_account"
        assert await referral_of(db, first["user"]["id"]) is None
        assert (
            await db.fetchval("SELECT referred_by FROM users WHERE id = $1", UUID(first["user"]["id"]))
            is None
        )

    async def test_unknown_code_does_not_stop_the_signup(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        login = await sign_up(client, new_sub(), code="NOSUCHCODE")
        assert login["is_new_user"] is True and login["referral"] == "unknown_code"
        assert await db.fetchval("SELECT count(*) FROM referrals") == 0

    async def test_self_referral_by_normalised_email_refused(
        self, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer = await sign_up(client, new_sub(), email="ada.lovelace@gmail.com")
        code = await code_of(client, bearer(referrer))
        again = await sign_up(client, new_sub(), email="Ada.Lovelace+two@googlemail.com", code=code)
        assert again["is_new_user"] is True and again["referral"] == "self_referral"
        assert await referral_of(db, again["user"]["id"]) is None
        refused = await refusals(db)
        assert [(r["metadata"]["reason"], r["metadata"]["detail"]) for r in refused] == [
            ("self_referral", "same_email")
        ]
        assert (await stats_of(client, bearer(referrer)))["referred"] == 0

    async def test_self_referral_by_same_user_or_privy_id_refused(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        # A Privy id belongs to one live account, so these can only come from inside the sign-up
        # transaction; the service refuses them whatever the caller.
        state = app_state(app)
        sub = new_sub()
        referrer, newcomer = await create_user(app), await create_user(app)
        await db.execute("UPDATE users SET privy_id = $2 WHERE id = $1", referrer.id, sub)
        async with state.pool.acquire() as conn:
            code = await referrals_service.get_or_create_code(conn, user_id=referrer.id)
            outcomes = []
            for user_id, privy_id in ((referrer.id, None), (newcomer.id, sub)):
                async with conn.transaction():
                    outcomes.append(
                        await referrals_service.attach_at_signup(
                            conn,
                            state.settings,
                            user_id=user_id,
                            code=code,
                            privy_id=privy_id,
                            email=None,
                            meta=None,
                        )
                    )
        assert outcomes == ["self_referral", "self_referral"]
        refused = await refusals(db)
        assert [r["metadata"]["detail"] for r in refused] == ["same_user", "same_privy_id"]
        assert await db.fetchval("SELECT count(*) FROM referrals") == 0

    async def test_max_uses_under_concurrent_signups(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, code = await referrer_with_code(app, client)
        logins = await asyncio.gather(*(sign_up(client, new_sub(), code=code) for _ in range(8)))
        outcomes = sorted(login["referral"] for login in logins)
        assert outcomes == ["attached"] * MAX_USES + ["max_uses_reached"] * (8 - MAX_USES)
        assert (
            await db.fetchval("SELECT count(*) FROM referrals WHERE referrer_id = $1", referrer.id)
            == MAX_USES
        )
        stats = await stats_of(client, referrer.headers)
        assert (stats["referred"], stats["max_uses"], stats["remaining_uses"]) == (MAX_USES, MAX_USES, 0)


class TestReward:
    async def test_reward_once_under_concurrent_purchases(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, login = await referred_pair(app, client)
        referred_id = login["user"]["id"]
        state = app_state(app)

        async def buy(n: int) -> None:
            # Each purchase on a connection of its own, in its own transaction.
            async with state.pool.acquire() as conn:
                await purchase(conn, state.settings, referred_id, D(25), f"cs_test_{n}")

        await asyncio.gather(*(buy(n) for n in range(6)))
        referral = await referral_of(db, referred_id)
        assert referral is not None and referral["status"] == "rewarded"
        assert referral["purchase_reference"] in {f"cs_test_{n}" for n in range(6)}
        assert (referral["referrer_amount"], referral["referred_amount"]) == (
            REFERRER_REWARD,
            REFERRED_REWARD,
        )
        rewards = await db.fetch(
            "SELECT user_id, reference, amount FROM credit_grants"
            " WHERE source = 'referral' ORDER BY reference"
        )
        assert [(r["user_id"], r["reference"], r["amount"]) for r in rewards] == [
            (UUID(referred_id), f"referral:{referral['id']}:referred", REFERRED_REWARD),
            (referrer.id, f"referral:{referral['id']}:referrer", REFERRER_REWARD),
        ]
        assert await credits(db, referrer.id) == REFERRER_REWARD
        assert await credits(db, referred_id) == 6 * D(25) + REFERRED_REWARD
        # A later purchase pays nothing more.
        async with state.pool.acquire() as conn:
            await purchase(conn, state.settings, referred_id, D(100), "cs_test_later")
        assert await ledger(db, referrer.id) == [("referral", REFERRER_REWARD)]
        stats = await stats_of(client, referrer.headers)
        assert (stats["rewarded"], stats["pending"], stats["rewards_earned"]) == (1, 0, "10.0000000000")

    async def test_reward_in_the_purchase_transaction(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, login = await referred_pair(app, client)
        state = app_state(app)

        class Aborted(Exception):
            pass

        # A purchase transaction that fails after the referral step leaves no reward behind.
        async with state.pool.acquire() as conn:
            with pytest.raises(Aborted):
                async with conn.transaction():
                    await purchase(conn, state.settings, login["user"]["id"], D(30), "cs_failed")
                    raise Aborted
            await purchase(conn, state.settings, login["user"]["id"], D(30), "cs_ok")
        referral = await referral_of(db, login["user"]["id"])
        assert referral is not None and (referral["status"], referral["purchase_reference"]) == (
            "rewarded",
            "cs_ok",
        )
        assert await credits(db, referrer.id) == REFERRER_REWARD

    async def test_purchase_below_minimum_gives_nothing_ever(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, login = await referred_pair(app, client)
        referred_id = login["user"]["id"]
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await purchase(conn, state.settings, referred_id, MIN_PURCHASE - D("0.01"), "cs_small")
            # The first paid purchase decided it: a later, bigger one does not reward either.
            await purchase(conn, state.settings, referred_id, D(500), "cs_big")
        referral = await referral_of(db, referred_id)
        assert referral is not None
        assert (referral["status"], referral["refusal_reason"], referral["purchase_reference"]) == (
            "refused",
            "first_purchase_below_minimum",
            "cs_small",
        )
        assert await db.fetchval("SELECT count(*) FROM credit_grants WHERE source = 'referral'") == 0
        assert await ledger(db, referrer.id) == []
        assert await credits(db, referred_id) == MIN_PURCHASE - D("0.01") + D(500)
        assert (await stats_of(client, referrer.headers))["refused"] == 1

    async def test_purchase_of_exactly_the_minimum_qualifies(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, login = await referred_pair(app, client)
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await purchase(conn, state.settings, login["user"]["id"], MIN_PURCHASE, "cs_exact")
        assert await credits(db, referrer.id) == REFERRER_REWARD

    async def test_paid_by_the_referrers_stripe_customer_refused(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, login = await referred_pair(app, client)
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await purchase(conn, state.settings, referrer.id, D(50), "cs_referrer_own", customer="cus_same")
            await purchase(
                conn, state.settings, login["user"]["id"], D(50), "cs_referred", customer="cus_same"
            )
        referral = await referral_of(db, login["user"]["id"])
        assert referral is not None
        assert (referral["status"], referral["refusal_reason"]) == ("refused", "same_stripe_customer")
        assert await db.fetchval("SELECT count(*) FROM credit_grants WHERE source = 'referral'") == 0
        assert await credits(db, referrer.id) == D(50)

    async def test_purchase_without_a_referral_changes_nothing(
        self, app: FastAPI, db: asyncpg.Connection
    ) -> None:
        buyer = await create_user(app)
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await purchase(conn, state.settings, buyer.id, D(50), "cs_plain")
            await refund(conn, buyer.id, D(50), "cs_plain")
        assert await ledger(db, buyer.id) == [("purchase", D(50)), ("refund", D(-50))]
        assert await db.fetchval("SELECT count(*) FROM referrals") == 0


class TestReversal:
    async def test_refund_reverses_the_rewards_once(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, login = await referred_pair(app, client)
        referred_id = login["user"]["id"]
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await purchase(conn, state.settings, referred_id, D(25), "cs_paid")

        async def refund_once() -> None:
            async with state.pool.acquire() as conn:
                await refund(conn, referred_id, D(25), "cs_paid")

        # Replayed refund events, concurrently and again afterwards.
        await asyncio.gather(refund_once(), refund_once(), refund_once())
        await refund_once()
        async with state.pool.acquire() as conn:
            await referrals_service.reverse_on_refund(conn, payment_reference="cs_paid", actor="stripe")

        referral = await referral_of(db, referred_id)
        assert referral is not None and referral["status"] == "reversed"
        assert await ledger(db, referrer.id) == [
            ("referral", REFERRER_REWARD),
            ("referral_reversal", -REFERRER_REWARD),
        ]
        assert await ledger(db, referred_id) == [
            ("purchase", D(25)),
            ("referral", REFERRED_REWARD),
            ("refund", D(-25)),
            ("referral_reversal", -REFERRED_REWARD),
        ]
        assert await credits(db, referrer.id) == 0 and await credits(db, referred_id) == 0
        once_keys = await db.fetch(
            "SELECT once_key FROM credit_transactions WHERE type = 'referral_reversal' ORDER BY once_key"
        )
        assert [r["once_key"] for r in once_keys] == [
            f"referral-reversal:{referral['id']}:referred",
            f"referral-reversal:{referral['id']}:referrer",
        ]
        stats = await stats_of(client, referrer.headers)
        assert (stats["rewarded"], stats["reversed"], stats["rewards_earned"]) == (0, 1, "0.0000000000")

    async def test_reversal_of_spent_rewards_takes_the_balance_below_zero(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, login = await referred_pair(app, client)
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await purchase(conn, state.settings, login["user"]["id"], D(25), "cs_spent")
            async with conn.transaction():
                spent = await grants.debit(
                    conn,
                    user_id=referrer.id,
                    amount=D(8),
                    type="usage",
                    once_key=None,
                    actor="test",
                    require_available=True,
                )
            assert spent is not None
            await refund(conn, login["user"]["id"], D(25), "cs_spent")
        assert await credits(db, referrer.id) == D(-8)

    async def test_refund_of_another_purchase_keeps_the_rewards(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, login = await referred_pair(app, client)
        referred_id = login["user"]["id"]
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await purchase(conn, state.settings, referred_id, D(25), "cs_first")
            await purchase(conn, state.settings, referred_id, D(40), "cs_second")
            await refund(conn, referred_id, D(40), "cs_second")
        referral = await referral_of(db, referred_id)
        assert referral is not None and referral["status"] == "rewarded"
        assert await credits(db, referrer.id) == REFERRER_REWARD
        assert await credits(db, referred_id) == D(25) + REFERRED_REWARD

    async def test_refund_of_a_refused_referrals_purchase_reverses_nothing(
        self, app: FastAPI, client: httpx.AsyncClient, db: asyncpg.Connection
    ) -> None:
        referrer, login = await referred_pair(app, client)
        referred_id = login["user"]["id"]
        state = app_state(app)
        async with state.pool.acquire() as conn:
            await purchase(conn, state.settings, referred_id, D(5), "cs_tiny")
            await refund(conn, referred_id, D(5), "cs_tiny")
        referral = await referral_of(db, referred_id)
        assert referral is not None and referral["status"] == "refused"
        assert (
            await db.fetchval("SELECT count(*) FROM credit_transactions WHERE type = 'referral_reversal'")
            == 0
        )
        assert await ledger(db, referrer.id) == []
