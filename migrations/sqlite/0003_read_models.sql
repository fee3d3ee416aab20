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
    projection TEXT    PRIMARY KEY,
    position   INTEGER NOT NULL CHECK (position >= 0)
) WITHOUT ROWID;
INSERT INTO rm_checkpoints (projection, position) VALUES
    ('servers', 0), ('users', 0), ('accounts', 0), ('enrolments', 0), ('sessions', 0);

CREATE TABLE rm_servers (
    server_id      BLOB     PRIMARY KEY,
    name           TEXT     NOT NULL,
    logo_url       TEXT,
    settings       TEXT     NOT NULL,
    public_key     BLOB     NOT NULL,
    key_thumbprint BLOB     NOT NULL,
    created_at     INTEGER  NOT NULL,
    deleted_at     INTEGER,
    last_position  INTEGER  NOT NULL
) WITHOUT ROWID;

CREATE TABLE rm_api_keys (
    secret_hash BLOB    PRIMARY KEY,
    server_id   BLOB    NOT NULL,
    key_id      BLOB    NOT NULL,
    label       TEXT    NOT NULL,
    issued_at   INTEGER NOT NULL,
    revoked_at  INTEGER
) WITHOUT ROWID;
CREATE INDEX rm_api_keys_by_server ON rm_api_keys (server_id, key_id);

CREATE TABLE rm_users (
    server_id           BLOB    NOT NULL,
    user_digest         BLOB    NOT NULL,
    userid_sealed       BLOB    NOT NULL,
    registered_at       INTEGER NOT NULL,
    registered_position INTEGER NOT NULL,
    last_position       INTEGER NOT NULL,
    PRIMARY KEY (server_id, user_digest)
) WITHOUT ROWID;
CREATE INDEX rm_users_by_registration ON rm_users (server_id, registered_position);

CREATE TABLE rm_user_attributes (
    server_id    BLOB NOT NULL,
    user_digest  BLOB NOT NULL,
    name         TEXT NOT NULL,
    value_sealed BLOB NOT NULL,
    PRIMARY KEY (server_id, user_digest, name)
) WITHOUT ROWID;

CREATE TABLE rm_accounts (
    server_id              BLOB    NOT NULL,
    account_id             BLOB    NOT NULL,
    user_digest            BLOB,
    app_instance           BLOB    NOT NULL,
    second_factor          TEXT,
    signing_key_thumbprint BLOB    NOT NULL,
    registered_at          INTEGER NOT NULL,
    last_position          INTEGER NOT NULL,
    PRIMARY KEY (server_id, account_id)
) WITHOUT ROWID;
CREATE INDEX rm_accounts_by_user ON rm_accounts (server_id, user_digest);

CREATE TABLE rm_enrolments (
    server_id     BLOB    NOT NULL,
    enrolment_id  BLOB    NOT NULL,
    user_digest   BLOB    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('pending', 'completed', 'expired')),
    expires_at    INTEGER NOT NULL,
    account_id    BLOB,
    last_position INTEGER NOT NULL,
    PRIMARY KEY (server_id, enrolment_id)
) WITHOUT ROWID;
-- The expiry sweep reads pending enrolments by deadline; finished ones stay out of the index.
CREATE INDEX rm_enrolments_due ON rm_enrolments (expires_at) WHERE state = 'pending';

CREATE TABLE rm_sessions (
    server_id      BLOB     NOT NULL,
    hsid           BLOB     NOT NULL,
    state          TEXT     NOT NULL CHECK (state IN ('pending', 'scanned', 'logged_in',
                                                      'logged_out', 'aborted', 'expired', 'failed')),
    ping_time_secs INTEGER  NOT NULL,
    expires_at     INTEGER  NOT NULL,
    ping_deadline  INTEGER,
    app_login      INTEGER  NOT NULL,
    intended_user  BLOB,
    user_digest    BLOB,
    account_id     BLOB,
    announce_info  TEXT,
    session_info   TEXT,
    opened_at      INTEGER  NOT NULL,
    updated_at     INTEGER  NOT NULL,
    last_position  INTEGER  NOT NULL,
    -- State changes, oldest first: `position:state:at;` each.
    history        TEXT     NOT NULL,
    PRIMARY KEY (server_id, hsid)
) WITHOUT ROWID;
-- The expiry sweep: sessions waiting for the user by expiry, logged-in ones by ping deadline.
-- Partial, so the (many) finished and one-shot sessions cost nothing in these indexes.
CREATE INDEX rm_sessions_expiry ON rm_sessions (expires_at) WHERE state IN ('pending', 'scanned');
CREATE INDEX rm_sessions_ping ON rm_sessions (ping_deadline)
    WHERE state = 'logged_in' AND ping_deadline IS NOT NULL;
