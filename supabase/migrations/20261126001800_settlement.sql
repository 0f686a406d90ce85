-- The settlement as it runs on every request, and the grant functions it calls.
--
-- gw_settle (one round trip, under the user's row lock): release the hold, expire what is due,
-- charge the real cost (beyond the hold only from what is still available, never below zero; the
-- rest is a recorded shortfall), spend grants soonest-expiring first, write the usage record, the
-- day's usage_daily row and the ledger row, count a running trial's use (ending the trial and its
-- grant at a limit), and queue the low-balance e-mail when the settled balance crosses below the
-- user's threshold (once per crossing). Nothing when the hold was already settled or swept.
--
-- Kept cheap on purpose:
-- - every function called per request is plpgsql, whose statement plans are cached per
--   connection (a LANGUAGE sql function that PostgreSQL does not inline is parsed and planned on
--   every call: 0.1-0.2 ms each on a 2-core machine);
-- - spending takes the soonest-expiring grant alone when it covers the charge (one index probe,
--   one row), the window over every live grant otherwise;
-- - spending is a HOT update: the live-grant indexes name `live` (see credit_grants), so the
--   settlement's update of `remaining` leaves every indexed column as it was and the new row
--   version stays on its page.

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
        WHERE user_id = p_user AND live AND expires_at <= now()
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

-- Credits of a user's grants past their expiry but not yet written off: every balance read
-- subtracts them, so no one sees (or spends) expired credits.
CREATE FUNCTION gw_due_expiry(p_user uuid) RETURNS numeric
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT COALESCE(sum(remaining), 0) FROM credit_grants
        WHERE user_id = p_user AND live AND expires_at <= now()
    );
END
$$;

-- Take `p_amount` out of the live grants of one user: the named grant first (if any), then the
-- soonest-expiring (never-expiring last). The caller holds the row lock and has expired what was
-- due; anything beyond the grants is debt (credits below zero).
CREATE FUNCTION gw_consume(p_user uuid, p_amount numeric, p_source text, p_reference text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    first_id bigint;
    first_left numeric;
BEGIN
    IF p_source IS NULL THEN
        -- The order of the window below when no grant is named: soonest expiry first, never last.
        SELECT id, remaining INTO first_id, first_left FROM credit_grants
        WHERE user_id = p_user AND live
        ORDER BY expires_at ASC NULLS LAST, id
        LIMIT 1;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        IF first_left >= p_amount THEN
            UPDATE credit_grants SET remaining = remaining - p_amount WHERE id = first_id;
            RETURN;
        END IF;
    END IF;
    UPDATE credit_grants g SET remaining = g.remaining - c.take
    FROM (
        SELECT id, LEAST(remaining, GREATEST(p_amount - (sum(remaining) OVER w - remaining), 0)) AS take
        FROM credit_grants
        WHERE user_id = p_user AND live
        WINDOW w AS (
            ORDER BY (source = p_source AND reference = p_reference) IS TRUE DESC,
                     expires_at ASC NULLS LAST, id
            ROWS UNBOUNDED PRECEDING
        )
    ) c
    WHERE g.id = c.id AND c.take > 0;
END
$$;

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
    SELECT credits, held INTO cur, hld FROM users WHERE id = h.user_id FOR UPDATE;
    IF EXISTS (
        SELECT 1 FROM credit_grants
        WHERE user_id = h.user_id AND live AND expires_at <= now()
    ) THEN
        PERFORM gw_expire_due(h.user_id);
        SELECT credits, held INTO cur, hld FROM users WHERE id = h.user_id;
    END IF;
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
    IF FOUND THEN
        INSERT INTO usage_daily AS d (day, user_id, api_key_id, model, provider, requests, errors,
            input_tokens, output_tokens, spent, shortfall)
        VALUES ((now() AT TIME ZONE 'UTC')::date, h.user_id,
            COALESCE(h.api_key_id, '00000000-0000-0000-0000-000000000000'), h.model, COALESCE(p_provider, ''),
            1, CASE WHEN p_error_code IS NOT NULL OR p_status = 'upstream_error' THEN 1 ELSE 0 END,
            p_input_tokens, p_output_tokens, taken, p_cost - taken)
        ON CONFLICT (day, user_id, api_key_id, model, provider) DO UPDATE SET
            requests = d.requests + 1, errors = d.errors + EXCLUDED.errors,
            input_tokens = d.input_tokens + EXCLUDED.input_tokens,
            output_tokens = d.output_tokens + EXCLUDED.output_tokens,
            spent = d.spent + EXCLUDED.spent, shortfall = d.shortfall + EXCLUDED.shortfall;
    END IF;
    IF taken > 0 THEN
        PERFORM gw_consume(h.user_id, taken, NULL, NULL);
        INSERT INTO credit_transactions (user_id, amount, balance_after, type, reason, actor, reference)
        VALUES (h.user_id, -taken, bal, 'usage', h.model, p_actor, p_hold::text);
    END IF;
    IF p_status <> 'expired' THEN
        UPDATE trials t SET used_tokens = t.used_tokens + p_input_tokens + p_output_tokens,
            used_requests = t.used_requests + 1
        WHERE t.user_id = h.user_id AND t.status = 'active' AND t.ends_at > now()
        RETURNING (t.used_tokens >= t.max_tokens OR t.used_requests >= t.max_requests) INTO used_up;
        IF used_up THEN
            UPDATE trials SET status = 'used_up', ended_at = now() WHERE user_id = h.user_id;
            UPDATE credit_grants SET expires_at = now()
            WHERE user_id = h.user_id AND source = 'trial' AND live;
            PERFORM gw_expire_due(h.user_id);
            SELECT credits INTO bal FROM users WHERE id = h.user_id;
        END IF;
    END IF;
    IF bal < cur THEN
        PERFORM gw_notify_low_balance(h.user_id, cur, bal);
    END IF;
    RETURN QUERY SELECT taken, p_cost - taken, bal;
END
$$;
