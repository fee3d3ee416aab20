-- The OIDC clients of each server (projections/src/read_models/oidc.rs), from the
-- `server.oidc_client_*` events: the settings as the JSON of the full OidcClientSettings the
-- last event carried, the SHA-256 of a confidential client's secret (all the log holds of
-- it), and `removed` once the client is gone (its id stays taken).
CREATE TABLE rm_oidc_clients (
    server_id     BLOB    NOT NULL,
    client_id     BLOB    NOT NULL,
    settings      TEXT    NOT NULL,
    secret_hash   BLOB,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    removed       INTEGER NOT NULL,
    last_position INTEGER NOT NULL,
    PRIMARY KEY (server_id, client_id)
) WITHOUT ROWID;

-- The public halves of each server's OIDC signing keys (`server.oidc_key_rotated`); the
-- newest signs, the older ones stay published while their tokens may still be in flight.
CREATE TABLE rm_oidc_keys (
    server_id  BLOB    NOT NULL,
    kid        TEXT    NOT NULL,
    public_key BLOB    NOT NULL,
    rotated_at INTEGER NOT NULL,
    position   INTEGER NOT NULL,
    PRIMARY KEY (server_id, kid)
) WITHOUT ROWID;
