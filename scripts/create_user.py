"""Create a user with a primary key and starting credits, for operators without the HTTP API.

    python -m scripts.create_user --email ada@example.com --credits 5 [--admin]

Reads the same settings as the server (DATABASE_URL, SECRET_KEY, ENCRYPTION_KEYS, ...), migrates the
database if needed, and audits the creation as the system. The key is printed once, on stdout, so it
can be piped; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from decimal import Decimal, InvalidOperation

from pydantic import ValidationError

from src.config import Settings, get_settings
from src.db.users import User
from src.errors import GatewayError
from src.logging_config import configure_logging
from src.schemas.users import EMAIL_PATTERN
from src.services import users as users_service
from src.state import close_state, open_state


def _email(value: str) -> str:
    if not EMAIL_PATTERN.match(value.strip()):
        raise argparse.ArgumentTypeError(f"not an e-mail address: {value!r}")
    return value.strip()


def _credits(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError("credits must be a finite number, zero or more")
    return amount


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.create_user",
        description="Create a user and print their new API key once.",
    )
    parser.add_argument("--email", required=True, type=_email, help="the user's (verified) e-mail")
    parser.add_argument("--credits", type=_credits, default=Decimal("0"), help="starting credits (0)")
    parser.add_argument("--admin", action="store_true", help="give the user the admin role")
    return parser.parse_args(argv)


async def create(settings: Settings, *, email: str, credits: Decimal, role: str) -> tuple[User, str]:
    state = await open_state(settings)
    try:
        async with state.pool.acquire() as conn:
            return await users_service.create_user_as_admin(
                conn,
                state,
                email=email,
                credits=credits,
                role=role,
                actor=None,
                meta=None,
                reason="created with scripts.create_user",
            )
    finally:
        await close_state(state)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        settings = get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            print(f"gatewayz: configuration error: {error['msg']}", file=sys.stderr)
        return 2
    configure_logging(level="WARNING", secrets=settings.secret_values(), json_output=settings.log_json)
    role = "admin" if args.admin else "user"
    try:
        user, api_key = asyncio.run(create(settings, email=args.email, credits=args.credits, role=role))
    except GatewayError as exc:
        print(f"gatewayz: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"created user {user.id} ({user.email}, role {user.role}, {format(user.credits, 'f')} credits)",
        file=sys.stderr,
    )
    print(api_key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
