-- Credit grants: every addition of credits, with its source and expiry. Usage consumes the grant
-- that expires soonest first; an expiry is a ledger row, so users.credits = sum of the ledger holds.
--
-- Invariants kept by the functions below (each takes the user's row lock first, so every change of
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
    UNIQUE (source, reference)
);

CREATE INDEX credit_grants_live_idx ON credit_grants (user_id, expires_at, id) WHERE remaining > 0;
CREATE INDEX credit_grants_due_idx ON credit_grants (expires_at) WHERE remaining > 0 AND expires_at IS NOT NULL;
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

-- Expire every due grant of one user: one 'expiry' ledger row per grant. The caller holds the
-- user's row lock. Returns the amount expired.
CREATE FUNCTION gw_expire_due(p_user uuid) RETURNS numeric
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    g record;
    total numeric := 0;
    bal numeric;
BEGIN
    FOR g IN
        SELECT id, remaining FROM credit_grants
        WHERE user_id = p_user AND remaining > 0 AND expires_at <= now()
        ORDER BY expires_at, id
    LOOP
        UPDATE users SET credits = credits - g.remaining, updated_at = now()
        WHERE id = p_user RETURNING credits INTO bal;
        INSERT INTO credit_transactions (user_id, amount, balance_after, type, reason, actor, reference, once_key)
        VALUES (p_user, -g.remaining, bal, 'expiry', 'credits expired', 'system:expiry', g.id::text,
                'expiry:' || g.id::text);
        UPDATE credit_grants SET expired_amount = g.remaining, remaining = 0, expired_at = now()
        WHERE id = g.id;
        total := total + g.remaining;
    END LOOP;
    RETURN total;
END
$$;

-- Take `p_amount` out of the live grants of one user: the named grant first (if any), then the
-- soonest-expiring (never-expiring last). The caller holds the row lock and has already expired
-- what was due; anything beyond the grants is debt (credits below zero).
CREATE FUNCTION gw_consume(p_user uuid, p_amount numeric, p_source text, p_reference text) RETURNS void
LANGUAGE sql AS $$
    UPDATE credit_grants g SET remaining = g.remaining - c.take
    FROM (
        SELECT id, LEAST(remaining, GREATEST(p_amount - (sum(remaining) OVER w - remaining), 0)) AS take
        FROM credit_grants
        WHERE user_id = p_user AND remaining > 0
        WINDOW w AS (
            ORDER BY (source = p_source AND reference = p_reference) IS TRUE DESC,
                     expires_at ASC NULLS LAST, id
            ROWS UNBOUNDED PRECEDING
        )
    ) c
    WHERE g.id = c.id AND c.take > 0
$$;

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

-- Settle one request: release its hold, expire what is due, charge the real cost (beyond the hold
-- only from what is still available, never below zero), consume grants soonest-expiring first,
-- write the usage record and the ledger row, and count a trial's use (ending the trial and its
-- grant at a limit). Nothing when the hold was already settled or swept.
CREATE FUNCTION gw_settle(
    p_hold uuid, p_cost numeric, p_provider text, p_input_tokens integer, p_output_tokens integer,
    p_input_cost numeric, p_output_cost numeric, p_estimated boolean, p_status text, p_error_code text,
    p_latency_ms integer, p_client_request_id text, p_actor text
) RETURNS TABLE (charge numeric, shortfall numeric, balance_after numeric)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    h record;
    cur numeric;
    hld numeric;
    taken numeric;
    bal numeric;
    used_up boolean;
BEGIN
    DELETE FROM credit_holds WHERE id = p_hold
    RETURNING user_id, api_key_id, amount, model, request_type INTO h;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM 1 FROM users WHERE id = h.user_id FOR UPDATE;
    IF EXISTS (
        SELECT 1 FROM credit_grants
        WHERE user_id = h.user_id AND remaining > 0 AND expires_at <= now()
    ) THEN
        PERFORM gw_expire_due(h.user_id);
    END IF;
    SELECT credits, held INTO cur, hld FROM users WHERE id = h.user_id;
    taken := LEAST(p_cost, GREATEST(cur - hld + h.amount, 0));
    UPDATE users SET held = held - h.amount, credits = credits - taken,
        updated_at = CASE WHEN taken > 0 THEN now() ELSE updated_at END
    WHERE id = h.user_id
    RETURNING credits INTO bal;
    INSERT INTO usage_records (request_id, user_id, api_key_id, model, provider, request_type,
        input_tokens, output_tokens, input_cost, output_cost, cost, charged, shortfall, held,
        estimated, status, error_code, latency_ms, client_request_id)
    VALUES (p_hold, h.user_id, h.api_key_id, h.model, p_provider, h.request_type, p_input_tokens,
        p_output_tokens, p_input_cost, p_output_cost, p_cost, taken, p_cost - taken, h.amount,
        p_estimated, p_status, p_error_code, p_latency_ms, p_client_request_id)
    ON CONFLICT (request_id) DO NOTHING;
    IF taken > 0 THEN
        PERFORM gw_consume(h.user_id, taken, NULL, NULL);
        INSERT INTO credit_transactions (user_id, amount, balance_after, type, reason, actor, reference)
        VALUES (h.user_id, -taken, bal, 'usage', h.model, p_actor, p_hold::text);
    END IF;
    IF p_status <> 'expired' THEN
        UPDATE trials t SET used_tokens = t.used_tokens + p_input_tokens + p_output_tokens,
            used_requests = t.used_requests + 1
        WHERE t.user_id = h.user_id AND t.status = 'active'
        RETURNING (t.used_tokens >= t.max_tokens OR t.used_requests >= t.max_requests) INTO used_up;
        IF used_up THEN
            UPDATE trials SET status = 'used_up', ended_at = now() WHERE user_id = h.user_id;
            UPDATE credit_grants SET expires_at = now()
            WHERE user_id = h.user_id AND source = 'trial' AND remaining > 0;
            PERFORM gw_expire_due(h.user_id);
            SELECT credits INTO bal FROM users WHERE id = h.user_id;
        END IF;
    END IF;
    RETURN QUERY SELECT taken, p_cost - taken, bal;
END
$$;

-- Credits of a user's grants that are past their expiry but not yet written off by the sweeper or
-- a balance change: every balance read subtracts them, so no one sees (or spends) expired credits.
CREATE FUNCTION gw_due_expiry(p_user uuid) RETURNS numeric
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(remaining), 0) FROM credit_grants
    WHERE user_id = p_user AND remaining > 0 AND expires_at <= now()
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
