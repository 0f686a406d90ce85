-- Foundation: service statistics kept by the gateway itself.

CREATE TABLE ping_stats (
    id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    total_pings bigint NOT NULL DEFAULT 0,
    last_ping_at timestamptz
);

INSERT INTO ping_stats (id, total_pings) VALUES (1, 0);
