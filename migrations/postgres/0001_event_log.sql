-- The event log. Append-only: rows are inserted by the store's writer and never changed.
--
-- `position` is global, gapless and starts at 0. Gaplessness and in-order visibility come
-- from the single-row `es_head` lock that every appending transaction takes first: the
-- transaction holding position n commits (and becomes visible) before the next one can
-- read the head, so no reader can ever see n+1 without n.
CREATE TABLE es_events (
    position       bigint   PRIMARY KEY CHECK (position >= 0),
    stream         text     NOT NULL,
    version        bigint   NOT NULL CHECK (version >= 0),
    event_id       uuid     NOT NULL UNIQUE,
    event_type     text     NOT NULL,
    schema_version integer  NOT NULL CHECK (schema_version > 0),
    payload        bytea    NOT NULL,
    metadata       bytea    NOT NULL,
    server_id      text,
    recorded_at    bigint   NOT NULL,
    UNIQUE (stream, version)
);

CREATE TABLE es_head (
    id            smallint PRIMARY KEY CHECK (id = 1),
    last_position bigint   NOT NULL CHECK (last_position >= -1)
);
INSERT INTO es_head (id, last_position) VALUES (1, -1);

CREATE FUNCTION es_events_are_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'es_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER es_events_no_update BEFORE UPDATE OR DELETE ON es_events
    FOR EACH ROW EXECUTE FUNCTION es_events_are_immutable();
CREATE TRIGGER es_events_no_truncate BEFORE TRUNCATE ON es_events
    FOR EACH STATEMENT EXECUTE FUNCTION es_events_are_immutable();

-- Secrets that must stay deletable (server private keys, per-user data keys for
-- crypto-shredding) live outside the log, sealed under the deployment's master key.
CREATE TABLE key_vault (
    key_ref    text   PRIMARY KEY,
    sealed     bytea  NOT NULL,
    created_at bigint NOT NULL
);
