-- Usage per day (UTC), user, key, model and provider, kept by the settlement (gw_settle, migration
-- 20261126001800) in the same transaction as the usage record: admin usage reports and today's figures read these rows instead of
-- aggregating millions of usage records.
CREATE TABLE usage_daily (
    day date NOT NULL,
    user_id uuid NOT NULL,
    -- The zero uuid: a request without a key (none today; kept total-preserving).
    api_key_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
    model text NOT NULL,
    provider text NOT NULL DEFAULT '',
    requests bigint NOT NULL DEFAULT 0,
    errors bigint NOT NULL DEFAULT 0,
    input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens bigint NOT NULL DEFAULT 0,
    spent numeric(20, 10) NOT NULL DEFAULT 0,
    shortfall numeric(20, 10) NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user_id, api_key_id, model, provider)
);

CREATE INDEX usage_daily_user_idx ON usage_daily (user_id, day);

INSERT INTO usage_daily (day, user_id, api_key_id, model, provider, requests, errors, input_tokens,
    output_tokens, spent, shortfall)
SELECT (created_at AT TIME ZONE 'UTC')::date, user_id,
       COALESCE(api_key_id, '00000000-0000-0000-0000-000000000000'), model, COALESCE(provider, ''),
       count(*), count(*) FILTER (WHERE error_code IS NOT NULL OR status = 'upstream_error'),
       sum(input_tokens), sum(output_tokens), sum(charged), sum(shortfall)
FROM usage_records GROUP BY 1, 2, 3, 4, 5;
