-- The transactions read model: one row per transaction, built from `transaction.*` events.
-- The data and text stay here for as long as the log keeps them (records of approvals are not
-- crypto-shredded with the user, see domain/src/transaction/events.rs).
CREATE TABLE rm_transactions (
    server_id      bytea  NOT NULL,
    transaction_id bytea  NOT NULL,
    user_digest    bytea  NOT NULL,
    -- The one account that may sign, when the creator named one.
    account_id     bytea,
    origin         text   NOT NULL CHECK (origin IN ('api', 'device')),
    status         text   NOT NULL CHECK (status IN ('pending', 'presented', 'signed',
                                                     'rejected', 'expired')),
    content_type   text   NOT NULL,
    data           bytea  NOT NULL,
    text           text   NOT NULL,
    announce_info  text,
    created_at     bigint NOT NULL,
    expires_at     bigint NOT NULL,
    -- The account whose device last showed it.
    presented_by   bytea,
    signed_by      bytea,
    factor         text   CHECK (factor IN ('pin', 'biometric')),
    signed_at      bigint,
    rejected_by    bytea,
    rejected_at    bigint,
    expired_at     bigint,
    last_position  bigint NOT NULL,
    PRIMARY KEY (server_id, transaction_id)
);
-- A device asks for its user's open transactions, oldest first; ended ones stay out.
CREATE INDEX rm_transactions_open ON rm_transactions (server_id, user_digest, created_at)
    WHERE status IN ('pending', 'presented');
-- The expiry sweep reads open transactions by deadline.
CREATE INDEX rm_transactions_due ON rm_transactions (expires_at)
    WHERE status IN ('pending', 'presented');
