-- Read models of the business API, built only from the event log by `projections`.
-- Every table is keyed by server_id first (tenant isolation); ids and sealed values are
-- bytes; times are milliseconds since the Unix epoch. Personal data (userid, attribute
-- values) is stored only as the sealed CBOR bytes the events carry. A session's state history
-- is a column of its row (read only with the session; a table of one row per change cost
-- about as much to write as all the rest of a replay).
-- A derived cache: `countersign replay` deletes and rebuilds it from position 0.

-- Each projection's next position to process (last processed + 1), written in the same
-- transaction as its rows.
CREATE TABLE rm_checkpoints (
    projection text   PRIMARY KEY,
    position   bigint NOT NULL CHECK (position >= 0)
);
INSERT INTO rm_checkpoints (projection, position) VALUES
    ('servers', 0), ('users', 0), ('accounts', 0), ('enrolments', 0), ('sessions', 0);

CREATE TABLE rm_servers (
    server_id      bytea   PRIMARY KEY,
    name           text    NOT NULL,
    logo_url       text,
    settings       text    NOT NULL,
    public_key     bytea   NOT NULL,
    key_thumbprint bytea   NOT NULL,
    created_at     bigint  NOT NULL,
    deleted_at     bigint,
    last_position  bigint  NOT NULL
);

CREATE TABLE rm_api_keys (
    secret_hash bytea  PRIMARY KEY,
    server_id   bytea  NOT NULL,
    key_id      bytea  NOT NULL,
    label       text   NOT NULL,
    issued_at   bigint NOT NULL,
    revoked_at  bigint
);
CREATE INDEX rm_api_keys_by_server ON rm_api_keys (server_id, key_id);

CREATE TABLE rm_users (
    server_id           bytea  NOT NULL,
    user_digest         bytea  NOT NULL,
    userid_sealed       bytea  NOT NULL,
    registered_at       bigint NOT NULL,
    registered_position bigint NOT NULL,
    last_position       bigint NOT NULL,
    PRIMARY KEY (server_id, user_digest)
);
CREATE INDEX rm_users_by_registration ON rm_users (server_id, registered_position);

CREATE TABLE rm_user_attributes (
    server_id    bytea NOT NULL,
    user_digest  bytea NOT NULL,
    name         text  NOT NULL,
    value_sealed bytea NOT NULL,
    PRIMARY KEY (server_id, user_digest, name)
);

CREATE TABLE rm_accounts (
    server_id              bytea  NOT NULL,
    account_id             bytea  NOT NULL,
    user_digest            bytea,
    app_instance           bytea  NOT NULL,
    second_factor          text,
    signing_key_thumbprint bytea  NOT NULL,
    registered_at          bigint NOT NULL,
    last_position          bigint NOT NULL,
    PRIMARY KEY (server_id, account_id)
);
CREATE INDEX rm_accounts_by_user ON rm_accounts (server_id, user_digest);

CREATE TABLE rm_enrolments (
    server_id     bytea  NOT NULL,
    enrolment_id  bytea  NOT NULL,
    user_digest   bytea  NOT NULL,
    state         text   NOT NULL CHECK (state IN ('pending', 'completed', 'expired')),
    expires_at    bigint NOT NULL,
    account_id    bytea,
    last_position bigint NOT NULL,
    PRIMARY KEY (server_id, enrolment_id)
);
-- The expiry sweep reads pending enrolments by deadline; finished ones stay out of the index.
CREATE INDEX rm_enrolments_due ON rm_enrolments (expires_at) WHERE state = 'pending';

CREATE TABLE rm_sessions (
    server_id      bytea   NOT NULL,
    hsid           bytea   NOT NULL,
    state          text    NOT NULL CHECK (state IN ('pending', 'scanned', 'logged_in',
                                                     'logged_out', 'aborted', 'expired', 'failed')),
    ping_time_secs bigint  NOT NULL,
    expires_at     bigint  NOT NULL,
    ping_deadline  bigint,
    app_login      boolean NOT NULL,
    intended_user  bytea,
    user_digest    bytea,
    account_id     bytea,
    announce_info  text,
    session_info   text,
    opened_at      bigint  NOT NULL,
    updated_at     bigint  NOT NULL,
    last_position  bigint  NOT NULL,
    -- State changes, oldest first: `position:state:at;` each.
    history        text    NOT NULL,
    PRIMARY KEY (server_id, hsid)
);
-- The expiry sweep: sessions waiting for the user by expiry, logged-in ones by ping deadline.
-- Partial, so the (many) finished and one-shot sessions cost nothing in these indexes.
CREATE INDEX rm_sessions_expiry ON rm_sessions (expires_at) WHERE state IN ('pending', 'scanned');
CREATE INDEX rm_sessions_ping ON rm_sessions (ping_deadline)
    WHERE state = 'logged_in' AND ping_deadline IS NOT NULL;
