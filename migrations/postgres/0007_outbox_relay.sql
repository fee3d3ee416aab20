-- The outbox relay's checkpoint: the next position to publish to the event topic, per relay
-- name (one per topic). Written by the one relay that holds the advisory lock.
CREATE TABLE relay_checkpoints (
    name     text   PRIMARY KEY,
    position bigint NOT NULL CHECK (position >= 0)
);
