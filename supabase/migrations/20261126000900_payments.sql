-- Stripe top-ups: the checkouts the server created, the webhook events it handled, each user's
-- Stripe customer, and the disputes it clawed credits back for.
--
-- Exactly-once comes from unique constraints, never from read-then-write checks:
--   a purchase grant        credit_grants UNIQUE (source 'purchase', reference = checkout session id)
--   a webhook event         stripe_webhook_events PRIMARY KEY (event_id), inserted in the event's
--                           own transaction (a failure rolls the claim back with the work)
--   a refund claw-back      credit_transactions.once_key 'refund:<charge>:<cumulative cents refunded>'
--   a dispute claw-back     credit_transactions.once_key 'dispute:<dispute id>'
--   a won dispute restored  credit_grants UNIQUE (source 'refund_reversal', reference 'dispute:<id>')
--   a checkout, a payment intent, a charge can belong to one payment only (UNIQUE columns below).

CREATE TABLE stripe_customers (
    user_id uuid NOT NULL REFERENCES users (id),
    -- Test-mode and live-mode customers are different objects at Stripe.
    livemode boolean NOT NULL,
    customer_id text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, livemode)
);

CREATE TABLE payments (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id),
    kind text NOT NULL DEFAULT 'topup' CHECK (kind IN ('topup', 'subscription')),
    -- The credit package bought, or NULL for a custom amount.
    package_id text,
    -- The price before any discount, and what the coupon took off it: the customer pays the
    -- difference (amount_paid_cents). The credits never depend on the discount.
    amount_cents integer NOT NULL CHECK (amount_cents > 0),
    discount_cents integer NOT NULL DEFAULT 0 CHECK (discount_cents >= 0 AND discount_cents < amount_cents),
    amount_paid_cents integer GENERATED ALWAYS AS (amount_cents - discount_cents) STORED,
    currency text NOT NULL,
    coupon_code text,
    -- Decided by the server when the checkout is created; what the purchase grant adds.
    credits numeric(20, 10) NOT NULL CHECK (credits > 0),
    status text NOT NULL DEFAULT 'pending' CHECK (
        status IN ('pending', 'paid', 'partially_refunded', 'refunded', 'disputed', 'expired', 'failed')
    ),
    livemode boolean NOT NULL DEFAULT false,
    stripe_checkout_session_id text UNIQUE,
    stripe_payment_intent_id text UNIQUE,
    stripe_charge_id text UNIQUE,
    stripe_customer_id text,
    stripe_invoice_id text,
    checkout_url text,
    checkout_expires_at timestamptz,
    -- Refunds: the charge's cumulative refunded amount last applied, and the credits clawed back for it.
    refunded_cents integer NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0),
    credits_refunded numeric(20, 10) NOT NULL DEFAULT 0 CHECK (credits_refunded >= 0),
    -- Credits clawed back for disputes still open or lost (a won dispute gives its share back).
    credits_disputed numeric(20, 10) NOT NULL DEFAULT 0 CHECK (credits_disputed >= 0),
    CHECK (credits_refunded + credits_disputed <= credits),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    paid_at timestamptz,
    granted_at timestamptz
);

CREATE INDEX payments_user_idx ON payments (user_id, created_at DESC, id DESC);
CREATE INDEX payments_created_idx ON payments (created_at DESC, id DESC);
CREATE INDEX payments_status_idx ON payments (status, created_at DESC);

-- One row per Stripe event handled (or deliberately ignored); written in the event's transaction.
CREATE TABLE stripe_webhook_events (
    event_id text PRIMARY KEY,
    type text NOT NULL,
    livemode boolean NOT NULL,
    -- The id of the event's object (a session, a charge, a dispute, ...).
    object_id text,
    outcome text CHECK (outcome IN ('handled', 'ignored')),
    created_at timestamptz,
    received_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz
);

CREATE INDEX stripe_webhook_events_received_idx ON stripe_webhook_events (received_at DESC);

-- A dispute of a top-up's charge and the credits clawed back for it (restored if it is won).
CREATE TABLE payment_disputes (
    dispute_id text PRIMARY KEY,
    payment_id uuid NOT NULL REFERENCES payments (id),
    amount_cents integer NOT NULL CHECK (amount_cents >= 0),
    -- Stripe's status as last seen (needs_response, under_review, won, lost, warning_*, ...).
    status text NOT NULL,
    credits_clawed_back numeric(20, 10) NOT NULL DEFAULT 0 CHECK (credits_clawed_back >= 0),
    clawed_back_at timestamptz,
    restored_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX payment_disputes_payment_idx ON payment_disputes (payment_id);
