-- Plans (what a subscription buys: a monthly credit allowance and rate-limit ceilings) and the plan
-- each user is on. A user with no current user_plans row is on the default (free) plan.

CREATE TABLE plans (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    description text NOT NULL DEFAULT '',
    price_cents integer NOT NULL DEFAULT 0 CHECK (price_cents >= 0),
    currency text NOT NULL DEFAULT 'usd' CHECK (currency ~ '^[a-z]{3}$'),
    billing_interval text NOT NULL DEFAULT 'month' CHECK (billing_interval IN ('month', 'year')),
    -- Credits granted each period (they expire at the period's end).
    credits_included numeric(20, 10) NOT NULL DEFAULT 0 CHECK (credits_included >= 0),
    -- Ceilings of every key of a user on this plan; NULL: the settings default (DEFAULT_RPM, ...).
    rpm_limit integer CHECK (rpm_limit > 0),
    rpd_limit integer CHECK (rpd_limit > 0),
    tpm_limit bigint CHECK (tpm_limit > 0),
    tpd_limit bigint CHECK (tpd_limit > 0),
    concurrency_limit integer CHECK (concurrency_limit > 0),
    features jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(features) = 'object'),
    stripe_price_id text UNIQUE,
    is_default boolean NOT NULL DEFAULT false,
    is_active boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- The default plan is what everyone without a subscription is on: it is always offered.
    CHECK (is_active OR NOT is_default)
);

-- Exactly one default plan: at most one by this index, at least one because the default can be
-- moved to another plan but never removed or retired.
CREATE UNIQUE INDEX plans_one_default ON plans (is_default) WHERE is_default;

INSERT INTO plans (name, description, is_default)
VALUES ('Free', 'Pay as you go with prepaid credits, at the default rate limits.', true);

CREATE TABLE user_plans (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id),
    plan_id bigint NOT NULL REFERENCES plans (id),
    status text NOT NULL CHECK (status IN ('active', 'cancelled', 'past_due', 'expired')),
    current_period_start timestamptz NOT NULL DEFAULT now(),
    -- NULL: no end. A row without a Stripe subscription lapses at its end; a Stripe subscription's
    -- period is moved (or the row ended) by Stripe's events.
    current_period_end timestamptz,
    auto_renew boolean NOT NULL DEFAULT false,
    stripe_subscription_id text UNIQUE,
    stripe_customer_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- At most one current plan per user. The authentication lookup finds it through this index.
CREATE UNIQUE INDEX user_plans_one_current ON user_plans (user_id) WHERE status IN ('active', 'past_due');
CREATE INDEX user_plans_user_idx ON user_plans (user_id, created_at DESC);
CREATE INDEX user_plans_plan_idx ON user_plans (plan_id);
