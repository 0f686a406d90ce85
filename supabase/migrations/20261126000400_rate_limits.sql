-- Per-user limit ceilings set by an admin (NULL: the plan's, or the settings defaults).

ALTER TABLE users
    ADD COLUMN rpm_limit integer CHECK (rpm_limit > 0),
    ADD COLUMN rpd_limit integer CHECK (rpd_limit > 0),
    ADD COLUMN tpm_limit bigint CHECK (tpm_limit > 0),
    ADD COLUMN tpd_limit bigint CHECK (tpd_limit > 0),
    ADD COLUMN concurrency_limit integer CHECK (concurrency_limit > 0);
