-- Billing analytics (GET /admin/transactions/analytics) reads each table by time over a window of
-- up to a year: payments by when they were paid, grants by when they were made. Usage records
-- (usage_records_created_idx) and trials (trials_started_idx) have their time indexes already.
CREATE INDEX payments_paid_idx ON payments (paid_at) WHERE paid_at IS NOT NULL;
CREATE INDEX credit_grants_created_idx ON credit_grants (created_at);
