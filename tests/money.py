"""Money invariants that must hold after every billing test, for every user.

- the stored balance is the sum of the ledger;
- the credits left in grants are exactly the positive part of the stored balance;
- every grant has exactly one ledger row (so none was applied twice), and every once-only ledger
  row appears once.
"""

from __future__ import annotations

import asyncpg


async def assert_money_invariants(db: asyncpg.Connection) -> None:
    mismatched = await db.fetch(
        """SELECT u.id, u.credits, COALESCE(l.total, 0) AS ledger, COALESCE(g.remaining, 0) AS remaining
            FROM users u
            LEFT JOIN (SELECT user_id, sum(amount) AS total FROM credit_transactions GROUP BY user_id) l
                ON l.user_id = u.id
            LEFT JOIN (SELECT user_id, sum(remaining) AS remaining FROM credit_grants GROUP BY user_id) g
                ON g.user_id = u.id
            WHERE u.credits <> COALESCE(l.total, 0) OR GREATEST(u.credits, 0) <> COALESCE(g.remaining, 0)"""
    )
    assert [dict(row) for row in mismatched] == []
    ungranted = await db.fetch(
        """SELECT g.id, g.source, g.reference, count(t.id) AS rows FROM credit_grants g
            LEFT JOIN credit_transactions t ON t.once_key = 'grant:' || g.source || ':' || g.reference
            WHERE g.reference NOT LIKE 'opening-balance:%'
            GROUP BY g.id HAVING count(t.id) <> 1"""
    )
    assert [dict(row) for row in ungranted] == []
    negative_holds = await db.fetchval("SELECT count(*) FROM users WHERE held < 0")
    assert negative_holds == 0
