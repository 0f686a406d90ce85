-- Credit grants: every addition of credits, with its source and expiry. Usage consumes the grant
-- that expires soonest first; an expiry is a ledger row, so users.credits = sum of the ledger holds.
--
-- The functions that spend and expire grants and settle requests (gw_expire_due, gw_consume,
-- gw_due_expiry, gw_settle) are in 20261126001800_settlement.sql, after the tables they write.
--
-- Invariants kept by these functions (each takes the user's row lock first, so every change of
-- one user's grants is serialised):
--   users.credits = sum(credit_transactions.amount)
--   sum(credit_grants.remaining) = GREATEST(users.credits, 0)
-- A claw-back may take credits below zero; the next grant repays that debt before it adds anything
-- spendable (its `remaining` starts lower than its `amount`).

-- Exactly-once guard for ledger rows that must never repeat (claw-backs, reversals, expiries).
ALTER TABLE credit_transactions ADD COLUMN once_key text UNIQUE;

CREATE TABLE credit_grants (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id),
    source text NOT NULL CHECK (
        source IN ('purchase', 'subscription', 'trial', 'coupon', 'referral', 'admin', 'refund_reversal')
    ),
    -- What the grant is for (a checkout session, an invoice, a redemption...): with the source, unique.
    reference text NOT NULL,
    amount numeric(20, 10) NOT NULL CHECK (amount > 0),
    remaining numeric(20, 10) NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    expires_at timestamptz,
    expired_at timestamptz,
    expired_amount numeric(20, 10) NOT NULL DEFAULT 0,
    reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- What the live-grant indexes name instead of `remaining`: it changes only when a grant runs
    -- out or expires, so spending from a grant (every settlement) is a HOT update that touches no
    -- index; with `remaining` in an index predicate every settlement would write a new row version
    -- elsewhere and an entry in every index of the table.
    live boolean GENERATED ALWAYS AS (remaining > 0) STORED,
    UNIQUE (source, reference)
) WITH (fillfactor = 80);  -- room on each page for the new versions of its rows

CREATE INDEX credit_grants_live_idx ON credit_grants (user_id, expires_at, id) WHERE live;
CREATE INDEX credit_grants_due_idx ON credit_grants (expires_at) WHERE live AND expires_at IS NOT NULL;
CREATE INDEX credit_grants_user_idx ON credit_grants (user_id, created_at DESC);

-- Balances that existed before grants: one never-expiring grant each.
INSERT INTO credit_grants (user_id, source, reference, amount, remaining, reason)
SELECT id, 'admin', 'opening-balance:' || id::text, credits, credits, 'balance before grants'
FROM users WHERE credits > 0;

-- A trial: its credits are the 'trial' grant; settlement counts its use and ends it at a limit.
CREATE TABLE trials (
    user_id uuid PRIMARY KEY REFERENCES users (id),
    credits numeric(20, 10) NOT NULL CHECK (credits >= 0),
    max_tokens bigint NOT NULL CHECK (max_tokens > 0),
    max_requests integer NOT NULL CHECK (max_requests > 0),
    started_at timestamptz NOT NULL DEFAULT now(),
    ends_at timestamptz NOT NULL,
    used_tokens bigint NOT NULL DEFAULT 0,
    used_requests integer NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'ended', 'used_up')),
    ended_at timestamptz,
    converted_at timestamptz,
    conversion_reference text,
    granted_by text NOT NULL DEFAULT 'system'
);

CREATE INDEX trials_started_idx ON trials (started_at);

-- Add credits as a grant and its ledger row. Nothing (no row returned) when the grant
-- (source, reference) exists already, or when the user does not.
CREATE FUNCTION gw_grant(
    p_user uuid, p_amount numeric, p_source text, p_reference text, p_expires_at timestamptz,
    p_type text, p_reason text, p_actor text, p_request_id text
) RETURNS TABLE (grant_id bigint, balance_after numeric, transaction_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    gid bigint;
    cur numeric;
    bal numeric;
    tid bigint;
BEGIN
    PERFORM 1 FROM users WHERE id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO credit_grants (user_id, source, reference, amount, remaining, expires_at, reason)
    VALUES (p_user, p_source, p_reference, p_amount, 0, p_expires_at, p_reason)
    ON CONFLICT (source, reference) DO NOTHING
    RETURNING id INTO gid;
    IF gid IS NULL THEN
        RETURN;
    END IF;
    PERFORM gw_expire_due(p_user);
    SELECT credits INTO cur FROM users WHERE id = p_user;
    -- A negative balance (a claw-back) is repaid first.
    UPDATE credit_grants SET remaining = p_amount - LEAST(p_amount, GREATEST(-cur, 0)) WHERE id = gid;
    UPDATE users SET credits = credits + p_amount, updated_at = now() WHERE id = p_user
    RETURNING credits INTO bal;
    INSERT INTO credit_transactions (user_id, amount, balance_after, type, reason, actor, reference, request_id, once_key)
    VALUES (p_user, p_amount, bal, p_type, p_reason, p_actor, p_source || ':' || p_reference, p_request_id,
            'grant:' || p_source || ':' || p_reference)
    RETURNING id INTO tid;
    -- A grant that is already past its expiry (back-dated) expires at once, as its own ledger row.
    PERFORM gw_expire_due(p_user);
    SELECT credits INTO bal FROM users WHERE id = p_user;
    RETURN QUERY SELECT gid, bal, tid;
END
$$;

-- Remove credits (an admin removal, a refund or dispute claw-back, a reward reversal). With
-- p_once_key, the ledger row's unique once_key makes the removal happen at most once. With
-- p_require_available, nothing happens unless the available balance covers it; otherwise the
-- balance may go below zero.
CREATE FUNCTION gw_debit(
    p_user uuid, p_amount numeric, p_type text, p_once_key text, p_actor text, p_reason text,
    p_reference text, p_request_id text, p_from_source text, p_from_reference text, p_require_available boolean
) RETURNS TABLE (balance_after numeric, transaction_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    cur numeric;
    hld numeric;
    bal numeric;
    tid bigint;
BEGIN
    PERFORM 1 FROM users WHERE id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM gw_expire_due(p_user);
    SELECT credits, held INTO cur, hld FROM users WHERE id = p_user;
    IF p_require_available AND cur - hld < p_amount THEN
        RETURN;
    END IF;
    INSERT INTO credit_transactions (user_id, amount, balance_after, type, reason, actor, reference, request_id, once_key)
    VALUES (p_user, -p_amount, cur - p_amount, p_type, p_reason, p_actor, p_reference, p_request_id, p_once_key)
    ON CONFLICT (once_key) DO NOTHING
    RETURNING id INTO tid;
    IF tid IS NULL THEN
        RETURN;
    END IF;
    PERFORM gw_consume(p_user, p_amount, p_from_source, p_from_reference);
    UPDATE users SET credits = credits - p_amount, updated_at = now() WHERE id = p_user
    RETURNING credits INTO bal;
    RETURN QUERY SELECT bal, tid;
END
$$;

-- Idempotency-Key on money-moving POSTs: the first request with a key runs, its answer is kept,
-- and a repeat within the retention gets that answer again (scope: the caller).
CREATE TABLE idempotency_keys (
    scope text NOT NULL,
    key text NOT NULL,
    fingerprint text NOT NULL,
    status_code integer,
    body jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz,
    PRIMARY KEY (scope, key)
);

CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
