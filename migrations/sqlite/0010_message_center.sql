-- The Message Center's tables (message-center/src/store.rs). The `mc-{mailbox}` event streams
-- are the record of what happened; these rows are what the MC works from: who a mailbox is
-- (its MC token only as SHA-256, its Noise key only as SHA-256, its push token, which no event
-- carries) and each outstanding message with its envelope and push state.
--
-- A mailbox row is inserted before its `mc.mailbox_registered` event; a message row before
-- its `mc.message_queued` event (the event id is derived from the message id, so a retry
-- re-appends nothing). A message row lives until the app acknowledges it or it expires.
CREATE TABLE mc_mailboxes (
    mailbox_id         BLOB    PRIMARY KEY CHECK (length(mailbox_id) = 16),
    token_hash         BLOB    NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    channel_key_digest BLOB    NOT NULL UNIQUE CHECK (length(channel_key_digest) = 32),
    platform           TEXT    NOT NULL CHECK (platform IN ('fcm', 'apns')),
    app_id             TEXT    NOT NULL,
    -- '' when the app registered for pull only.
    push_token         TEXT    NOT NULL,
    -- The provider said the token is gone: messages wait for pull until a new token.
    push_dropped       INTEGER NOT NULL DEFAULT 0,
    created_at         INTEGER NOT NULL
) WITHOUT ROWID;

-- push_state: 0 = awaiting a push (due at next_attempt_at_ms: a lease while a send is in
-- flight, or the retry time), 1 = pushed, 2 = mailbox only (no token, token dropped, refused).
CREATE TABLE mc_messages (
    message_id         BLOB    PRIMARY KEY CHECK (length(message_id) = 16),
    mailbox_id         BLOB    NOT NULL REFERENCES mc_mailboxes (mailbox_id),
    envelope           BLOB    NOT NULL,
    envelope_digest    BLOB    NOT NULL CHECK (length(envelope_digest) = 32),
    expires_at_ms      INTEGER NOT NULL,
    priority           INTEGER NOT NULL,
    collapse_id        TEXT,
    queued_at_ms       INTEGER NOT NULL,
    push_state         INTEGER NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX mc_messages_by_mailbox ON mc_messages (mailbox_id, queued_at_ms, message_id);
CREATE INDEX mc_messages_due ON mc_messages (next_attempt_at_ms) WHERE push_state = 0;
CREATE INDEX mc_messages_by_expiry ON mc_messages (expires_at_ms);
