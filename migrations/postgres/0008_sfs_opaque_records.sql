-- The SFS's OPAQUE registration records, keyed by (app instance, SHA-256 of the record):
-- the stream's `second_factor.pin_registered` names the current one by its digest. A
-- registration stores its record before appending that event and never overwrites a row, so
-- a crash between the two leaves an extra row that no event names, which a login never reads
-- (it asks for the stream's digest); the next registration removes superseded rows and old
-- orphans. Replaces `sfs_records` (one row per app instance, overwritten in place), which is
-- still read, by digest, until its app instance registers again.
CREATE TABLE sfs_opaque_records (
    app_instance  bytea NOT NULL CHECK (length(app_instance) = 16),
    record_digest bytea NOT NULL CHECK (length(record_digest) = 32),
    record        bytea NOT NULL,
    created_at    bigint NOT NULL,
    PRIMARY KEY (app_instance, record_digest)
);
