-- The outbox relay's checkpoint (the relay runs on PostgreSQL only; the table keeps the two
-- schemas alike).
CREATE TABLE relay_checkpoints (
    name     TEXT    PRIMARY KEY,
    position INTEGER NOT NULL CHECK (position >= 0)
);
