-- Chat history (sessions and their messages) and the index behind the public model ranking.

-- A conversation. Deleting one is a hard delete: the user asked for it to be gone, and its
-- messages go with it (ON DELETE CASCADE); the usage records of its turns stay, as billing does.
CREATE TABLE chat_sessions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title text CHECK (char_length(title) <= 200),
    model text CHECK (char_length(model) <= 256),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Listing (newest first), ownership checks and title search all start from the user: a search is
-- `title ILIKE '%q%'` over one user's sessions, which this index bounds. (A b-tree on lower(title)
-- cannot serve a match in the middle of a title; pg_trgm would, if histories ever grow that large.)
CREATE INDEX chat_sessions_user_idx ON chat_sessions (user_id, updated_at DESC, id);

-- One turn. `seq` orders turns written in one transaction (which share created_at); it is never
-- shown. `request_id` is the usage record's request id for turns saved by a completion.
CREATE TABLE chat_messages (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq bigint GENERATED ALWAYS AS IDENTITY,
    session_id uuid NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role text NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content text NOT NULL,
    model text,
    tokens integer NOT NULL DEFAULT 0 CHECK (tokens >= 0),
    cost numeric(20, 10) NOT NULL DEFAULT 0 CHECK (cost >= 0),
    request_id uuid,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX chat_messages_session_idx ON chat_messages (session_id, seq);
-- Search reads only the caller's messages: this index bounds the ILIKE scan to their rows.
CREATE INDEX chat_messages_user_idx ON chat_messages (user_id, session_id);

-- GET /ranking/models reads successful requests in a time window: an index-only scan of this
-- partial covering index, never the wide usage_records heap.
CREATE INDEX usage_records_ranking_idx ON usage_records (created_at)
    INCLUDE (model, input_tokens, output_tokens) WHERE status = 'success';
