-- The event log. Append-only: rows are inserted by the store's writer and never changed.
-- `position` is global, gapless and starts at 0; SQLite has one writer at a time, and the
-- writer reads `es_head` inside its IMMEDIATE transaction, so positions follow commit order.
CREATE TABLE es_events (
    position       INTEGER PRIMARY KEY CHECK (position >= 0),
    stream         TEXT    NOT NULL,
    version        INTEGER NOT NULL CHECK (version >= 0),
    event_id       BLOB    NOT NULL UNIQUE,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL CHECK (schema_version > 0),
    payload        BLOB    NOT NULL,
    metadata       BLOB    NOT NULL,
    server_id      TEXT,
    recorded_at    INTEGER NOT NULL,
    UNIQUE (stream, version)
);

CREATE TABLE es_head (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    last_position INTEGER NOT NULL CHECK (last_position >= -1)
);
INSERT INTO es_head (id, last_position) VALUES (1, -1);

CREATE TRIGGER es_events_no_update BEFORE UPDATE ON es_events
BEGIN SELECT RAISE(ABORT, 'es_events is append-only: UPDATE refused'); END;
CREATE TRIGGER es_events_no_delete BEFORE DELETE ON es_events
BEGIN SELECT RAISE(ABORT, 'es_events is append-only: DELETE refused'); END;

CREATE TABLE key_vault (
    key_ref    TEXT    PRIMARY KEY,
    sealed     BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
