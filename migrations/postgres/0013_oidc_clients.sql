-- The OIDC clients of each server (projections/src/read_models/oidc.rs), from the
-- `server.oidc_client_*` events: the settings as the JSON of the full OidcClientSettings the
-- last event carried, the SHA-256 of a confidential client's secret (all the log holds of
-- it), and `removed` once the client is gone (its id stays taken).
CREATE TABLE rm_oidc_clients (
    server_id     bytea   NOT NULL,
    client_id     bytea   NOT NULL,
    settings      text    NOT NULL,
    secret_hash   bytea,
    created_at    bigint  NOT NULL,
    updated_at    bigint  NOT NULL,
    removed       boolean NOT NULL,
    last_position bigint  NOT NULL,
    PRIMARY KEY (server_id, client_id)
);

-- The public halves of each server's OIDC signing keys (`server.oidc_key_rotated`); the
-- newest signs, the older ones stay published while their tokens may still be in flight.
CREATE TABLE rm_oidc_keys (
    server_id  bytea  NOT NULL,
    kid        text   NOT NULL,
    public_key bytea  NOT NULL,
    rotated_at bigint NOT NULL,
    position   bigint NOT NULL,
    PRIMARY KEY (server_id, kid)
);
