-- The second-factor server's OPAQUE registration records, one per app instance (the PIN's
-- "password file"; the PIN itself is never known to the server). The event log holds only
-- each record's SHA-256 (`second_factor.pin_registered`), so a record here is current only
-- while its digest matches the stream's; a changed PIN replaces the row. Not derived: the
-- OPAQUE server setup in the key vault plus these rows are what a PIN login needs.
CREATE TABLE sfs_records (
    app_instance bytea  PRIMARY KEY CHECK (length(app_instance) = 16),
    record       bytea  NOT NULL,
    updated_at   bigint NOT NULL
);
