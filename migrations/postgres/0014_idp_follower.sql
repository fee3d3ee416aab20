-- The IdP's log follower (idp/src/backchannel.rs): where it has reached in the log (the next
-- position to read; moved only past events whose deliveries, logout tokens and CIBA ping
-- notifications, are all finished), and what it learnt from the grant streams.
CREATE TABLE idp_follower_checkpoint (
    name     text   PRIMARY KEY,
    position bigint NOT NULL
);

-- The OIDC clients that received tokens for a login session (a code, or a completed CIBA
-- request): each one with a back-channel logout URI gets a logout token when it logs out.
CREATE TABLE idp_session_clients (
    server_id bytea NOT NULL,
    hsid      bytea NOT NULL,
    client_id bytea NOT NULL,
    -- The session's user (the logout token's `sub` is derived from it).
    user_digest bytea NOT NULL,
    PRIMARY KEY (server_id, hsid, client_id)
);

-- CIBA requests in ping mode, by the push session they opened: when it logs in, the client's
-- notification endpoint is called (and when it is declined, fails or expires).
CREATE TABLE idp_ciba_pings (
    server_id bytea NOT NULL,
    hsid      bytea NOT NULL,
    grant_id  bytea NOT NULL,
    PRIMARY KEY (server_id, hsid, grant_id)
);
