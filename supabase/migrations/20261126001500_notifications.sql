-- E-mail notifications. A message is an outbox row written in the transaction of the event that
-- causes it (a sign-up, a new key, a payment, a settlement that crosses the low-balance threshold),
-- so it commits or rolls back with that event. A background worker renders it from its type and
-- context, sends it and records the outcome (see src/services/notifications.py and
-- docs/notifications.md). `dedupe_key` is what makes a message exactly-once per event:
--   welcome:<user>, api-key:<key id>, payment:<payment reference>, low-balance:<user>:<crossing n>,
--   trial-expiring:<user>:<trial end, epoch>, trial-ended:<user>:<trial start, epoch>,
--   announcement:<announcement id>:<user>; admin test messages have none.

CREATE TABLE notification_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id uuid REFERENCES users (id),
    to_email text NOT NULL CHECK (char_length(to_email) BETWEEN 3 AND 254),
    type text NOT NULL CHECK (
        type IN (
            'welcome', 'api_key_created', 'low_balance', 'payment_confirmation', 'trial_expiring',
            'trial_ended', 'announcement', 'test'
        )
    ),
    -- What the templates need; rendered at delivery, so SQL functions can enqueue too.
    context jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(context) = 'object'),
    -- The rendered message, kept once the worker has rendered it.
    subject text,
    html text,
    text text,
    status text NOT NULL DEFAULT 'queued' CHECK (
        status IN ('queued', 'sending', 'sent', 'delivered', 'bounced', 'failed')
    ),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- For 'queued': when the next attempt is due; for 'sending': when the claim's lease runs out.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    provider_message_id text,
    -- Sent as the provider's Idempotency-Key: a retry after an unrecorded success is not sent again.
    idempotency_key uuid NOT NULL DEFAULT gen_random_uuid(),
    dedupe_key text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz,
    delivered_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX notification_outbox_due_idx ON notification_outbox (next_attempt_at)
    WHERE status IN ('queued', 'sending');
CREATE INDEX notification_outbox_user_idx ON notification_outbox (user_id, created_at DESC, id DESC);
CREATE INDEX notification_outbox_created_idx ON notification_outbox (created_at DESC, id DESC);
CREATE INDEX notification_outbox_status_idx ON notification_outbox (status, created_at DESC, id DESC);
CREATE INDEX notification_outbox_provider_idx ON notification_outbox (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- One row per user who changed a preference or crossed the low-balance threshold; no row means
-- the defaults (every type on, threshold 1 credit). `types` maps a type to false to turn it off;
-- only the optional types read it (receipts and security notices always go).
CREATE TABLE notification_preferences (
    user_id uuid PRIMARY KEY REFERENCES users (id),
    types jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(types) = 'object'),
    low_balance_threshold numeric(20, 10) NOT NULL DEFAULT 1 CHECK (low_balance_threshold >= 0),
    -- How many times the settled balance has crossed below the threshold: names each crossing.
    low_balance_crossings integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Addresses no message goes to any more: a hard bounce or a spam complaint reported by Resend.
CREATE TABLE email_suppressions (
    email text PRIMARY KEY CHECK (email = lower(email)),
    reason text NOT NULL CHECK (reason IN ('hard_bounce', 'complaint')),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Resend (Svix) webhook deliveries already processed: a replay is acknowledged and ignored.
CREATE TABLE resend_webhook_events (
    svix_id text PRIMARY KEY,
    type text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- Where a message of this type to this user goes: the verified e-mail, else the contact address
-- the user typed. NULL when there is none, the account is deleted, the address is suppressed, or
-- the user turned this (optional) type off.
CREATE FUNCTION gw_notification_address(p_user uuid, p_type text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT a.address
    FROM (
        SELECT lower(COALESCE(u.email, u.contact_email)) AS address
        FROM users u
        WHERE u.id = p_user AND u.deleted_at IS NULL
    ) a
    WHERE a.address IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM email_suppressions s WHERE s.email = a.address)
      AND (
          p_type NOT IN ('low_balance', 'trial_expiring', 'trial_ended', 'announcement')
          OR NOT EXISTS (
              SELECT 1 FROM notification_preferences p
              WHERE p.user_id = p_user AND p.types ->> p_type = 'false'
          )
      )
$$;

-- Queue one message for a user in the caller's transaction. Returns the outbox id, or NULL when
-- nothing was queued (no address, suppressed, turned off, or this dedupe key was queued before).
CREATE FUNCTION gw_enqueue_notification(p_user uuid, p_type text, p_dedupe_key text, p_context jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    addr text;
    nid bigint;
BEGIN
    addr := gw_notification_address(p_user, p_type);
    IF addr IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO notification_outbox (user_id, to_email, type, context, dedupe_key)
    SELECT p_user, addr, p_type, jsonb_build_object('name', u.username) || COALESCE(p_context, '{}'),
           p_dedupe_key
    FROM users u WHERE u.id = p_user
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING id INTO nid;
    RETURN nid;
END
$$;

-- The low-balance e-mail: queued when the settled balance goes from at or above the user's
-- threshold to below it, once per crossing (a top-up above the threshold arms the next one).
-- Settlement calls it with the balance before and after, under the user's row lock, in its own
-- transaction; the fast path (no charge, or no crossing) is one primary-key lookup at most.
CREATE FUNCTION gw_notify_low_balance(p_user uuid, p_before numeric, p_after numeric) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    thr numeric;
    n integer;
BEGIN
    IF p_before IS NULL OR p_after IS NULL OR p_after >= p_before THEN
        RETURN false;
    END IF;
    SELECT low_balance_threshold INTO thr FROM notification_preferences WHERE user_id = p_user;
    thr := COALESCE(thr, 1);
    IF NOT (p_before >= thr AND p_after < thr) THEN
        RETURN false;
    END IF;
    INSERT INTO notification_preferences AS p (user_id, low_balance_crossings) VALUES (p_user, 1)
    ON CONFLICT (user_id) DO UPDATE
        SET low_balance_crossings = p.low_balance_crossings + 1, updated_at = now()
    RETURNING low_balance_crossings INTO n;
    RETURN gw_enqueue_notification(
        p_user, 'low_balance', 'low-balance:' || p_user::text || ':' || n::text,
        jsonb_build_object('balance', p_after::text, 'threshold', thr::text)
    ) IS NOT NULL;
END
$$;
