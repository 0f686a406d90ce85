-- Inference: the model catalog and prices, credit holds, and usage records.

-- Models as each provider lists them; prices per token as the provider quotes them (NULL: none).
CREATE TABLE models (
    provider text NOT NULL,
    model_id text NOT NULL,
    upstream_id text NOT NULL,
    name text,
    owned_by text,
    context_length integer,
    max_output_tokens integer,
    prompt_price numeric(24, 14),
    completion_price numeric(24, 14),
    image_price numeric(24, 14),
    request_price numeric(24, 14),
    created integer NOT NULL DEFAULT 0,
    is_active boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, model_id)
);

CREATE INDEX models_model_idx ON models (model_id);

-- Admin prices: per (model, provider), or for every provider of a model when provider IS NULL.
CREATE TABLE model_pricing (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_id text NOT NULL,
    provider text,
    prompt_price numeric(24, 14) CHECK (prompt_price >= 0),
    completion_price numeric(24, 14) CHECK (completion_price >= 0),
    image_price numeric(24, 14) CHECK (image_price >= 0),
    request_price numeric(24, 14) CHECK (request_price >= 0),
    is_free boolean NOT NULL DEFAULT false,
    updated_by text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (model_id, provider)
);

-- An open hold: the worst-case cost of one in-flight request, keyed by a server-generated id.
CREATE TABLE credit_holds (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id),
    api_key_id uuid,
    amount numeric(20, 10) NOT NULL CHECK (amount >= 0),
    model text NOT NULL,
    request_type text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX credit_holds_expiry_idx ON credit_holds (expires_at);
CREATE INDEX credit_holds_user_idx ON credit_holds (user_id);

-- One row per request, written by its settlement (the unique request id makes it exactly once).
CREATE TABLE usage_records (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id uuid NOT NULL UNIQUE,
    user_id uuid NOT NULL REFERENCES users (id),
    api_key_id uuid,
    model text NOT NULL,
    provider text,
    request_type text NOT NULL,
    input_tokens integer NOT NULL DEFAULT 0,
    output_tokens integer NOT NULL DEFAULT 0,
    input_cost numeric(20, 10) NOT NULL DEFAULT 0,
    output_cost numeric(20, 10) NOT NULL DEFAULT 0,
    cost numeric(20, 10) NOT NULL DEFAULT 0,
    charged numeric(20, 10) NOT NULL DEFAULT 0,
    shortfall numeric(20, 10) NOT NULL DEFAULT 0,
    held numeric(20, 10) NOT NULL DEFAULT 0,
    estimated boolean NOT NULL DEFAULT false,
    status text NOT NULL,
    error_code text,
    latency_ms integer,
    client_request_id text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX usage_records_user_idx ON usage_records (user_id, created_at DESC);
CREATE INDEX usage_records_created_idx ON usage_records (created_at);
CREATE INDEX usage_records_key_idx ON usage_records (api_key_id, created_at DESC);
