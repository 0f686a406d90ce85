-- Coupons: codes that grant credits (`credits`) or take money off a top-up checkout (`discount`),
-- and every use of one (coupon_redemptions).
--
-- Exactly once, under any concurrency:
--   * a use is taken with one conditional UPDATE of coupons.uses (active, in its validity window,
--     assigned to nobody or to the caller, not exhausted), so the total never exceeds max_uses;
--   * the redemption row's unique (coupon_id, user_id, use_number), use_number in
--     1..max_uses_per_user, decides the per-user limit; a conflict rolls the use back;
--   * a credits coupon's grant is credit_grants (source 'coupon', reference
--     '<coupon id>:<user id>:<use number>'), unique, in the same transaction;
--   * a discount is tied to its checkout by the unique `reference`, and given back (released) once.

CREATE TABLE coupons (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Stored normalised (trimmed, upper-case): ' save10 ' and 'SAVE10' are the same code.
    code text NOT NULL CHECK (code ~ '^[A-Z0-9][A-Z0-9_-]{0,63}$'),
    kind text NOT NULL CHECK (kind IN ('credits', 'discount')),
    -- credits: the credits granted; discount/percent: 0-100 (% off); discount/fixed: cents off.
    value numeric(20, 10) NOT NULL CHECK (value > 0),
    discount_type text CHECK (discount_type IN ('percent', 'fixed')),
    -- NULL: unlimited.
    max_uses integer CHECK (max_uses > 0),
    max_uses_per_user integer NOT NULL DEFAULT 1 CHECK (max_uses_per_user BETWEEN 1 AND 1000),
    uses integer NOT NULL DEFAULT 0 CHECK (uses >= 0),
    valid_from timestamptz NOT NULL DEFAULT now(),
    -- NULL: never expires.
    valid_until timestamptz,
    is_active boolean NOT NULL DEFAULT true,
    -- Set: only this user may use the coupon.
    assigned_user_id uuid REFERENCES users (id),
    description text NOT NULL DEFAULT '',
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'discount') = (discount_type IS NOT NULL)),
    CHECK (discount_type IS DISTINCT FROM 'percent' OR value <= 100),
    CHECK (discount_type IS DISTINCT FROM 'fixed' OR value = trunc(value)),
    CHECK (valid_until IS NULL OR valid_until > valid_from)
);

CREATE UNIQUE INDEX coupons_code_key ON coupons (code);
CREATE INDEX coupons_created_idx ON coupons (created_at DESC, id DESC);
CREATE INDEX coupons_assigned_idx ON coupons (assigned_user_id) WHERE assigned_user_id IS NOT NULL;

CREATE TABLE coupon_redemptions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    coupon_id bigint NOT NULL REFERENCES coupons (id),
    user_id uuid NOT NULL REFERENCES users (id),
    -- Which of the user's max_uses_per_user uses of the coupon this is.
    use_number integer NOT NULL CHECK (use_number >= 1),
    kind text NOT NULL CHECK (kind IN ('credits', 'discount')),
    credits_granted numeric(20, 10) CHECK (credits_granted > 0),
    discount_cents integer CHECK (discount_cents > 0),
    -- The checkout a discount belongs to (its own id); NULL for credits.
    reference text UNIQUE,
    -- A discount whose checkout expired or was never created: its use was given back.
    released_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (
        (kind = 'credits' AND credits_granted IS NOT NULL AND discount_cents IS NULL
            AND reference IS NULL AND released_at IS NULL)
        OR (kind = 'discount' AND discount_cents IS NOT NULL AND reference IS NOT NULL
            AND credits_granted IS NULL)
    )
);

-- The per-user limit: one live row per (coupon, user, use number). A released discount leaves
-- it, so the user gets that use back.
CREATE UNIQUE INDEX coupon_redemptions_use_key
    ON coupon_redemptions (coupon_id, user_id, use_number) WHERE released_at IS NULL;
CREATE INDEX coupon_redemptions_user_idx ON coupon_redemptions (user_id, created_at DESC, id DESC);
CREATE INDEX coupon_redemptions_coupon_idx ON coupon_redemptions (coupon_id, created_at DESC, id DESC);
