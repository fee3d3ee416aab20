-- The audit tree: an RFC 9162 Merkle tree over the log in position order. Node (level, idx)
-- is the root of the complete subtree over leaves [idx * 2^level, (idx + 1) * 2^level);
-- level 0 holds the leaf hashes. Only complete subtrees are stored, so any inclusion or
-- consistency proof is O(log n) lookups by primary key. A derived cache: `audit verify`
-- recomputes it from the events and the signed checkpoints.
CREATE TABLE audit_nodes (
    level INTEGER NOT NULL CHECK (level >= 0 AND level < 64),
    idx   INTEGER NOT NULL CHECK (idx >= 0),
    hash  BLOB    NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;

-- How many leaves the tree holds: the projection's checkpoint, written in the same
-- transaction as the nodes.
CREATE TABLE audit_state (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    tree_size INTEGER NOT NULL CHECK (tree_size >= 0)
);
INSERT INTO audit_state (id, tree_size) VALUES (1, 0);

-- Signed tree heads, kept for good: COSE_Sign1 (ES256) by the deployment's audit key.
CREATE TABLE audit_checkpoints (
    tree_size    INTEGER PRIMARY KEY CHECK (tree_size > 0),
    root_hash    BLOB NOT NULL CHECK (length(root_hash) = 32),
    timestamp_ms INTEGER NOT NULL,
    signed       BLOB    NOT NULL
);
