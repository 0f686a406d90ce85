-- The newest state of each Stripe subscription that the webhook applied to user_plans. Stripe
-- delivers a subscription's events late and out of order: an event older than the last one
-- applied is skipped, and a subscription that reached an end state (canceled,
-- incomplete_expired: final in Stripe) is never brought back by a late event. The row lock taken
-- by the upsert also serialises concurrent events of one subscription.
CREATE TABLE stripe_subscriptions (
    stripe_subscription_id text PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id),
    -- Stripe's own status (active, trialing, past_due, unpaid, canceled, ...), as last applied.
    stripe_status text NOT NULL,
    -- The `created` time of the newest event applied.
    last_event_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX stripe_subscriptions_user_idx ON stripe_subscriptions (user_id);
