-- Where the NS's push follower (device-gateway/src/pusher.rs) has reached in the log: the
-- next position to read. Moved only after every push message of the events before it was
-- taken by its Message Center.
CREATE TABLE ns_push_checkpoint (
    name     text   PRIMARY KEY,
    position bigint NOT NULL
);
