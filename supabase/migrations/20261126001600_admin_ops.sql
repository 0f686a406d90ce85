-- Operator views at millions of rows: the ledger of every user newest first, and a user search by
-- e-mail prefix.
CREATE INDEX credit_transactions_created_idx ON credit_transactions (created_at DESC, id DESC);
CREATE INDEX users_email_prefix_idx ON users (lower(email) text_pattern_ops);
CREATE INDEX users_created_idx ON users (created_at DESC, id DESC);
