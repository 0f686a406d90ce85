"""Accounts: sign-up and login through Privy, admin creation, profile, balance and deletion."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from src.config import Settings
from src.db import api_keys as keys_db
from src.db import ledger as ledger_db
from src.db import users as users_db
from src.db.ledger import CreditTransaction
from src.db.users import User
from src.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
)
from src.security.deps import Principal, RequestMeta
from src.services import api_keys as keys_service
from src.services import audit, grants
from src.services import notifications as notifications_service
from src.services import referrals as referrals_service
from src.services import trials as trials_service
from src.services.grants import Grant
from src.services.privy import PrivyVerifier, get_verifier, normalise_email
from src.state import AppState

logger = logging.getLogger("gatewayz.users")

PRIMARY_KEY_NAME = "Primary key"


@dataclass(frozen=True)
class Balance:
    balance: Decimal
    held: Decimal
    available: Decimal


@dataclass(frozen=True)
class LoginResult:
    user: User
    api_key: str
    is_new: bool
    # What became of a referral code sent with the login (None: none was sent).
    referral: referrals_service.SignupOutcome | None = None


def balance_of(user: User) -> Balance:
    return Balance(balance=user.credits, held=user.held, available=user.available)


def public_profile(user: User) -> dict[str, Any]:
    """The user as the user sees it (no internal fields)."""
    return {
        "id": user.id,
        "email": user.email,
        "contact_email": user.contact_email,
        "username": user.username,
        "role": user.role,
        "is_active": user.is_active,
        "referral_code": user.referral_code,
        "preferences": user.preferences,
        "created_at": user.created_at,
    }


def _privy_verifier(settings: Settings) -> PrivyVerifier:
    if not settings.privy_app_id or settings.privy_verification_key is None:
        raise ServiceUnavailable("Privy login is not configured.", code="privy_not_configured")
    try:
        return get_verifier(settings.privy_app_id, settings.privy_verification_key.get_secret_value())
    except ValueError as exc:
        logger.error("privy login is misconfigured: %s", exc)
        raise ServiceUnavailable("Privy login is not configured.", code="privy_not_configured") from None


async def _attachable_email(
    conn: asyncpg.Connection, email: str | None, *, meta: RequestMeta | None, privy_id: str | None
) -> str | None:
    """A verified e-mail that belongs to no other account; a conflict is audited, not attached."""
    if email is None:
        return None
    # Two sign-ups racing for one address: the second waits, then sees it taken.
    await users_db.lock_identity(conn, name="email:" + email)
    if not await users_db.email_taken(conn, email=email):
        return email
    await audit.record(
        conn,
        action="user.email_conflict",
        actor=None,
        meta=meta,
        metadata={"privy_id": privy_id, "reason": "verified e-mail already belongs to another account"},
    )
    return None


async def _verify_privy(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    access_token: str | None,
    identity_token: str | None,
    meta: RequestMeta,
) -> tuple[str, str | None]:
    """The verified Privy user id and e-mail; every refusal is counted and audited."""
    verifier = _privy_verifier(state.settings)
    try:
        if not access_token:
            raise AuthenticationFailed(
                "Missing Privy access token: send it as 'Authorization: Bearer <token>' or 'access_token'."
            )
        privy_id = verifier.verify_access_token(access_token)
        email = (
            verifier.verify_identity_token(identity_token, expected_sub=privy_id) if identity_token else None
        )
    except AuthenticationFailed:
        state.auth_failures.record(meta.ip)
        async with conn.transaction():
            await audit.record(
                conn, action="auth.login_failed", actor=None, meta=meta, metadata={"method": "privy"}
            )
        raise
    return privy_id, email


async def _find_or_create_privy_user(
    conn: asyncpg.Connection, *, privy_id: str, email: str | None, meta: RequestMeta
) -> tuple[User, bool]:
    """The account of this Privy user, created on first login; call under the Privy id lock."""
    user = await users_db.get_user_by_privy_id(conn, privy_id=privy_id)
    if user is None:
        email = await _attachable_email(conn, email, meta=meta, privy_id=privy_id)
        user = await users_db.create_user(conn, email=email, privy_id=privy_id, username=None)
        await audit.record(
            conn,
            action="user.signup",
            actor=None,
            meta=meta,
            user_id=user.id,
            subject_type="user",
            subject_id=user.id,
            after={"email": user.email, "method": "privy"},
            actor_type="system",
        )
        return user, True
    if email and user.email is None:
        attachable = await _attachable_email(conn, email, meta=meta, privy_id=privy_id)
        if attachable:
            updated = await users_db.set_verified_email(conn, user_id=user.id, email=attachable)
            assert updated is not None
            await audit.record(
                conn,
                action="user.email_verified",
                actor=None,
                meta=meta,
                user_id=user.id,
                subject_type="user",
                subject_id=user.id,
                before={"email": None},
                after={"email": attachable},
                actor_type="system",
            )
            user = updated
    return user, False


async def login_with_privy(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    access_token: str | None,
    identity_token: str | None,
    meta: RequestMeta,
    referral_code: str | None = None,
) -> LoginResult:
    """Verify the Privy tokens; create the user and primary key on first login.

    A referral code is attached only when this login creates the account.
    """
    privy_id, email = await _verify_privy(
        conn, state, access_token=access_token, identity_token=identity_token, meta=meta
    )
    plaintext: str | None = None
    referral: referrals_service.SignupOutcome | None = None
    async with conn.transaction():
        # Serialise logins of one Privy user so two concurrent first logins create one account.
        await users_db.lock_identity(conn, name="privy:" + privy_id)
        user, is_new = await _find_or_create_privy_user(conn, privy_id=privy_id, email=email, meta=meta)
        if is_new:
            await notifications_service.welcome(conn, user_id=user.id)
        if is_new and await trials_service.start_signup_trial(
            conn, state.settings, user_id=user.id, privy_id=privy_id, email=email
        ):
            user = await get_user(conn, user_id=user.id)
        if referral_code is not None:
            referral = "existing_account"
            if is_new:
                referral = await referrals_service.attach_at_signup(
                    conn,
                    state.settings,
                    user_id=user.id,
                    code=referral_code,
                    privy_id=privy_id,
                    email=email,
                    meta=meta,
                )
        if not user.can_act:
            await audit.record(
                conn,
                action="auth.login_failed",
                actor=None,
                meta=meta,
                user_id=user.id,
                metadata={"method": "privy", "reason": "account disabled"},
            )
        else:
            primary = await keys_service.reveal_primary(conn, state, owner_id=user.id)
            if primary is None:
                _, plaintext = await keys_service.create_key(
                    conn,
                    state,
                    owner_id=user.id,
                    actor=None,
                    meta=meta,
                    name=PRIMARY_KEY_NAME,
                    is_primary=True,
                )
            else:
                plaintext = primary[1]
            await audit.record(
                conn,
                action="auth.login",
                actor=Principal(user_id=user.id, key_id=None, is_operator=False),
                meta=meta,
                user_id=user.id,
                metadata={"method": "privy", "new_user": is_new},
            )
    if plaintext is None:
        # Raised after the transaction, so the failed-login audit row is kept.
        raise PermissionDenied("This account is disabled.", code="account_disabled")
    return LoginResult(user=user, api_key=plaintext, is_new=is_new, referral=referral)


async def create_user_as_admin(
    conn: asyncpg.Connection,
    state: AppState,
    *,
    email: str,
    credits: Decimal,
    role: str,
    actor: Principal | None,
    meta: RequestMeta | None,
    reason: str = "initial credits",
    trial: bool = False,
) -> tuple[User, str]:
    """An operator-made account with a primary key, optional starting credits and, if asked, a trial."""
    email = normalise_email(email)
    async with conn.transaction():
        await users_db.lock_identity(conn, name="email:" + email)
        if await users_db.email_taken(conn, email=email):
            raise Conflict("A user with this e-mail already exists.", param="email", code="email_taken")
        if not await users_db.role_exists(conn, role=role):
            raise InvalidRequest(f"Unknown role '{role}'.", param="role", code="unknown_role")
        try:
            user = await users_db.create_user(conn, email=email, privy_id=None, username=None, role=role)
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(
                "A user with this e-mail already exists.", param="email", code="email_taken"
            ) from exc
        await audit.record(
            conn,
            action="user.create",
            actor=actor,
            meta=meta,
            user_id=user.id,
            subject_type="user",
            subject_id=user.id,
            after={"email": email, "role": role, "credits": str(credits)},
            actor_type="system" if actor is None else None,
        )
        _, plaintext = await keys_service.create_key(
            conn, state, owner_id=user.id, actor=actor, meta=meta, name=PRIMARY_KEY_NAME, is_primary=True
        )
        if credits:
            await change_credits(
                conn,
                user_id=user.id,
                amount=credits,
                reason=reason,
                actor=actor,
                meta=meta,
                in_transaction=True,
            )
        if trial:
            await trials_service.grant_trial(
                conn,
                state.settings,
                user_id=user.id,
                credits=None,
                days=None,
                max_tokens=None,
                max_requests=None,
                reason="trial asked for at account creation",
                actor=actor,
                meta=meta,
            )
        fresh = await users_db.get_user(conn, user_id=user.id)
        assert fresh is not None
    return fresh, plaintext


async def change_credits(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    amount: Decimal,
    reason: str,
    actor: Principal | None,
    meta: RequestMeta | None,
    in_transaction: bool = False,
) -> CreditTransaction:
    """An admin credit adjustment: the ledger row and the audit row in one transaction."""
    if not amount.is_finite() or amount == 0:
        raise InvalidRequest("The amount must be a non-zero number.", param="amount", code="invalid_amount")
    if in_transaction:
        return await _change_credits(
            conn, user_id=user_id, amount=amount, reason=reason, actor=actor, meta=meta
        )
    async with conn.transaction():
        return await _change_credits(
            conn, user_id=user_id, amount=amount, reason=reason, actor=actor, meta=meta
        )


async def _change_credits(
    conn: asyncpg.Connection,
    *,
    user_id: UUID,
    amount: Decimal,
    reason: str,
    actor: Principal | None,
    meta: RequestMeta | None,
) -> CreditTransaction:
    before = await users_db.get_user(conn, user_id=user_id, for_update=True)
    if before is None or before.deleted_at is not None:
        raise NotFound("No such user.", param="user_id", code="user_not_found")
    actor_name = actor.actor if actor else "system"
    transaction = await ledger_db.change_credits(
        conn,
        user_id=user_id,
        amount=amount,
        type="admin_adjustment",
        actor=actor_name,
        reason=reason,
        request_id=meta.request_id if meta else None,
    )
    if transaction is None:
        raise Conflict(
            f"Cannot remove {-amount} credits: only {before.available} are available.",
            param="amount",
            code="insufficient_available_balance",
        )
    await audit.record(
        conn,
        action="credits.adjust",
        actor=actor,
        meta=meta,
        user_id=user_id,
        subject_type="user",
        subject_id=user_id,
        before={"balance": str(before.credits)},
        after={"balance": str(transaction.balance_after)},
        metadata={"amount": str(amount), "reason": reason, "transaction_id": transaction.id},
        actor_type="system" if actor is None else None,
    )
    return transaction


async def get_user(conn: asyncpg.Connection, *, user_id: UUID) -> User:
    user = await users_db.get_user(conn, user_id=user_id)
    if user is None or user.deleted_at is not None:
        raise NotFound("No such user.", code="user_not_found")
    return user


@dataclass(frozen=True)
class AccountBalance(Balance):
    grants: list[Grant]


async def get_balance(conn: asyncpg.Connection, *, user_id: UUID) -> AccountBalance:
    """The three numbers and the live grants, read in one snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        user = await get_user(conn, user_id=user_id)
        live = await grants.live_grants(conn, user_id=user_id)
    return AccountBalance(balance=user.credits, held=user.held, available=user.available, grants=live)


# Profile body field -> users column. `email` typed by the user is a contact address, never the
# verified users.email: a typed address is trusted for nothing (uniqueness, trials, referrals).
PROFILE_COLUMNS = {"username": "username", "email": "contact_email", "preferences": "preferences"}


async def update_profile(
    conn: asyncpg.Connection,
    *,
    principal: Principal,
    meta: RequestMeta,
    changes: dict[str, Any],
) -> User:
    """Apply the caller's own profile changes (username, contact e-mail, preferences), audited."""
    assert principal.user_id is not None
    unknown = set(changes) - PROFILE_COLUMNS.keys()
    assert not unknown, f"unexpected profile fields {unknown}"
    if not changes:
        raise InvalidRequest(
            "Nothing to update: send 'username', 'email' or 'preferences'.", code="empty_update"
        )
    contact_email = changes.get("email")
    async with conn.transaction():
        before = await users_db.get_user(conn, user_id=principal.user_id, for_update=True)
        if before is None or before.deleted_at is not None:
            raise NotFound("No such user.", code="user_not_found")
        user = await users_db.update_profile(
            conn,
            user_id=principal.user_id,
            username=changes.get("username"),
            contact_email=normalise_email(contact_email) if contact_email else None,
            preferences=changes.get("preferences"),
            set_username="username" in changes,
            set_contact_email="email" in changes,
        )
        assert user is not None
        columns = [PROFILE_COLUMNS[name] for name in changes]
        await audit.record(
            conn,
            action="user.profile_update",
            actor=principal,
            meta=meta,
            user_id=user.id,
            subject_type="user",
            subject_id=user.id,
            before={column: getattr(before, column) for column in columns},
            after={column: getattr(user, column) for column in columns},
        )
    return user


async def list_credit_transactions(
    conn: asyncpg.Connection, *, user_id: UUID, limit: int, offset: int, type: str | None = None
) -> tuple[list[CreditTransaction], int]:
    """The user's own ledger rows, newest first, with the total that match."""
    return await ledger_db.list_transactions(conn, user_id=user_id, limit=limit, offset=offset, type=type)


async def delete_account(
    conn: asyncpg.Connection, state: AppState, *, principal: Principal, meta: RequestMeta
) -> None:
    """Anonymise the user's personal data and revoke every key; audit rows stay."""
    assert principal.user_id is not None
    async with conn.transaction():
        before = await users_db.get_user(conn, user_id=principal.user_id, for_update=True)
        if before is None or before.deleted_at is not None:
            raise NotFound("No such user.", code="user_not_found")
        revoked = await keys_db.revoke_all_for_user(conn, user_id=principal.user_id)
        await users_db.anonymise_user(conn, user_id=principal.user_id)
        await audit.record(
            conn,
            action="user.delete",
            actor=principal,
            meta=meta,
            user_id=principal.user_id,
            subject_type="user",
            subject_id=principal.user_id,
            metadata={"keys_revoked": len(revoked)},
        )
    await state.auth_cache.invalidate(state.redis, digests=revoked, user_id=principal.user_id)
