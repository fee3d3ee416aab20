-- The transactions read model: one row per transaction, built from `transaction.*` events.
-- The data and text stay here for as long as the log keeps them (records of approvals are not
-- crypto-shredded with the user, see domain/src/transaction/events.rs).
CREATE TABLE rm_transactions (
    server_id      BLOB    NOT NULL,
    transaction_id BLOB    NOT NULL,
    user_digest    BLOB    NOT NULL,
    -- The one account that may sign, when the creator named one.
    account_id     BLOB,
    origin         TEXT    NOT NULL CHECK (origin IN ('api', 'device')),
    status         TEXT    NOT NULL CHECK (status IN ('pending', 'presented', 'signed',
                                                      'rejected', 'expired')),
    content_type   TEXT    NOT NULL,
    data           BLOB    NOT NULL,
    text           TEXT    NOT NULL,
    announce_info  TEXT,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    -- The account whose device last showed it.
    presented_by   BLOB,
    signed_by      BLOB,
    factor         TEXT    CHECK (factor IN ('pin', 'biometric')),
    signed_at      INTEGER,
    rejected_by    BLOB,
    rejected_at    INTEGER,
    expired_at     INTEGER,
    last_position  INTEGER NOT NULL,
    PRIMARY KEY (server_id, transaction_id)
) WITHOUT ROWID;
-- A device asks for its user's open transactions, oldest first; ended ones stay out.
CREATE INDEX rm_transactions_open ON rm_transactions (server_id, user_digest, created_at)
    WHERE status IN ('pending', 'presented');
-- The expiry sweep reads open transactions by deadline.
CREATE INDEX rm_transactions_due ON rm_transactions (expires_at)
    WHERE status IN ('pending', 'presented');
