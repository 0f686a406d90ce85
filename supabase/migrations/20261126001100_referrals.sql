-- Referrals: one code per user, attached to a new account at sign-up only, rewarded once when the
-- referred user's first paid purchase clears the minimum, reversed once if that purchase is refunded.
--
-- Exactly-once comes from constraints, not from read-then-write checks:
--   referral_codes PRIMARY KEY (user_id)    one code per user, however many first requests race
--   referral_codes UNIQUE (code)            a generated code that collides is retried
--   referrals UNIQUE (referred_id)          a user is referred at most once
--   status 'pending' -> one conditional UPDATE: of concurrent purchases only one resolves it
--   credit_grants UNIQUE (source, reference) with reference 'referral:<id>:referrer' / ':referred'
--   credit_transactions.once_key 'referral-reversal:<id>:referrer' / ':referred' for the reversal

CREATE TABLE referral_codes (
    user_id uuid PRIMARY KEY REFERENCES users (id),
    -- Upper-case letters and digits; what users type is trimmed and upper-cased before lookup.
    code text NOT NULL UNIQUE CHECK (code ~ '^[A-Z0-9]{4,32}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE referrals (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    referrer_id uuid NOT NULL REFERENCES users (id),
    referred_id uuid NOT NULL UNIQUE REFERENCES users (id),
    code text NOT NULL REFERENCES referral_codes (code),
    -- pending: waiting for the referred user's first paid purchase; rewarded: both rewards granted;
    -- reversed: that purchase was refunded or disputed and the rewards taken back; refused: the first
    -- purchase did not qualify (below the minimum, paid by the referrer's own Stripe customer, ...).
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'rewarded', 'reversed', 'refused')),
    refusal_reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    rewarded_at timestamptz,
    reversed_at timestamptz,
    refused_at timestamptz,
    -- The payment that resolved the referral (a Stripe payment reference), once it is resolved.
    purchase_reference text UNIQUE,
    referrer_amount numeric(20, 10) CHECK (referrer_amount >= 0),
    referred_amount numeric(20, 10) CHECK (referred_amount >= 0),
    CHECK (referrer_id <> referred_id),
    CHECK (status = 'pending' OR purchase_reference IS NOT NULL),
    CHECK (status NOT IN ('rewarded', 'reversed') OR (rewarded_at IS NOT NULL AND referrer_amount IS NOT NULL
                                                       AND referred_amount IS NOT NULL)),
    CHECK (status <> 'reversed' OR reversed_at IS NOT NULL),
    CHECK (status <> 'refused' OR (refused_at IS NOT NULL AND refusal_reason IS NOT NULL))
);

CREATE INDEX referrals_referrer_idx ON referrals (referrer_id, created_at DESC);
CREATE INDEX referrals_code_idx ON referrals (code);

-- The Stripe customers seen paying for each user's top-ups, so a referred purchase paid through the
-- referrer's own Stripe customer is recognised as a self-referral (subscriptions' customers are in
-- user_plans).
CREATE TABLE referral_customers (
    stripe_customer_id text NOT NULL,
    user_id uuid NOT NULL REFERENCES users (id),
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stripe_customer_id, user_id)
);

CREATE INDEX referral_customers_user_idx ON referral_customers (user_id);
