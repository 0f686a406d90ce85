-- Identity: roles, users with their balance row, API keys, the ledger and the audit log.

CREATE TABLE roles (
    name text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_\-]{1,39}$'),
    description text NOT NULL DEFAULT '',
    -- Named permissions; '*' grants every permission (the admin role).
    permissions text[] NOT NULL DEFAULT '{}',
    is_builtin boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO roles (name, description, permissions, is_builtin) VALUES
    ('user', 'A regular account', '{}', true),
    ('developer', 'A regular account that builds on the API', '{}', true),
    ('admin', 'Every administrative permission', '{*}', true);

CREATE TABLE users (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Only ever a verified address (Privy identity token or admin creation), stored lower-cased.
    email text,
    privy_id text UNIQUE,
    username text,
    -- The balance row: credits is the ledger's sum, held the sum of open holds.
    credits numeric(20, 10) NOT NULL DEFAULT 0,
    held numeric(20, 10) NOT NULL DEFAULT 0 CHECK (held >= 0),
    role text NOT NULL DEFAULT 'user' REFERENCES roles (name) ON UPDATE CASCADE,
    is_active boolean NOT NULL DEFAULT true,
    banned_at timestamptz,
    referral_code text UNIQUE,
    referred_by uuid REFERENCES users (id),
    preferences jsonb NOT NULL DEFAULT '{}',
    deleted_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX users_email_key ON users (email) WHERE email IS NOT NULL;
CREATE INDEX users_role_idx ON users (role);

CREATE TABLE api_keys (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id),
    name text NOT NULL,
    -- HMAC-SHA256(SECRET_KEY, key): the lookup; useless without the server secret.
    key_hash bytea NOT NULL UNIQUE,
    -- Fernet token of the key (ENCRYPTION_KEYS live outside the database).
    key_encrypted text NOT NULL,
    key_prefix text NOT NULL,
    key_last4 text NOT NULL,
    environment text NOT NULL CHECK (environment IN ('live', 'test', 'staging', 'dev')),
    is_primary boolean NOT NULL DEFAULT false,
    scopes text[] NOT NULL,
    ip_allowlist cidr[] NOT NULL DEFAULT '{}',
    domain_restrictions text[] NOT NULL DEFAULT '{}',
    -- Per-key limits; NULL means the owner's ceiling.
    rpm_limit integer CHECK (rpm_limit > 0),
    rpd_limit integer CHECK (rpd_limit > 0),
    tpm_limit bigint CHECK (tpm_limit > 0),
    tpd_limit bigint CHECK (tpd_limit > 0),
    concurrency_limit integer CHECK (concurrency_limit > 0),
    is_active boolean NOT NULL DEFAULT true,
    expires_at timestamptz,
    last_used_at timestamptz,
    revoked_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX api_keys_user_idx ON api_keys (user_id, created_at);
CREATE UNIQUE INDEX api_keys_one_primary ON api_keys (user_id) WHERE is_primary AND revoked_at IS NULL;

-- The ledger: every change of users.credits is one row here, in the same transaction.
CREATE TABLE credit_transactions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id),
    amount numeric(20, 10) NOT NULL,
    balance_after numeric(20, 10) NOT NULL,
    type text NOT NULL,
    reason text,
    actor text NOT NULL,
    reference text,
    request_id text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX credit_transactions_user_idx ON credit_transactions (user_id, created_at DESC, id DESC);
CREATE INDEX credit_transactions_type_idx ON credit_transactions (type, created_at DESC);

-- Append-only audit log. No foreign keys: rows outlive the users and keys they speak of.
CREATE TABLE audit_logs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    actor_type text NOT NULL CHECK (actor_type IN ('user', 'operator', 'system', 'anonymous')),
    actor_id uuid,
    user_id uuid,
    action text NOT NULL,
    subject_type text,
    subject_id text,
    before jsonb,
    after jsonb,
    metadata jsonb,
    ip inet,
    user_agent text,
    request_id text
);

CREATE INDEX audit_logs_created_idx ON audit_logs (created_at DESC, id DESC);
CREATE INDEX audit_logs_user_idx ON audit_logs (user_id, created_at DESC);
CREATE INDEX audit_logs_action_idx ON audit_logs (action, created_at DESC);

-- Rows may only be removed by the retention sweep, which declares itself with
-- SET LOCAL gatewayz.audit_retention_days, and only when older than that.
CREATE FUNCTION audit_logs_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    retention text := current_setting('gatewayz.audit_retention_days', true);
BEGIN
    IF TG_OP = 'DELETE' AND retention IS NOT NULL AND retention <> ''
       AND OLD.created_at < now() - make_interval(days => retention::int) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_logs is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_logs_append_only
    BEFORE UPDATE OR DELETE ON audit_logs
    FOR EACH ROW EXECUTE FUNCTION audit_logs_guard();

CREATE FUNCTION audit_logs_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_logs is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_logs_no_truncate
    BEFORE TRUNCATE ON audit_logs
    FOR EACH STATEMENT EXECUTE FUNCTION audit_logs_no_truncate();
