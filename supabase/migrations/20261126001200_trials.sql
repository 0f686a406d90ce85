-- Who has had a trial: one row per identity of the person it went to, so a trial is given once per
-- person however many accounts they make. An identity is 'privy:<Privy user id>' or
-- 'email:<normalised verified e-mail>' (see src/services/trials.py for the normalisation).
-- No foreign key to users: the record outlives the account (a deleted account is anonymised and
-- its Privy id and e-mail are freed for a new account, which must not get a second trial).
-- A trial is granted only when every identity of the new user is inserted here, inside the
-- sign-up transaction; the primary key is what decides between concurrent sign-ups.
CREATE TABLE trial_claims (
    identity text PRIMARY KEY CHECK (identity ~ '^(privy|email):.+$'),
    user_id uuid NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX trial_claims_user_idx ON trial_claims (user_id);
