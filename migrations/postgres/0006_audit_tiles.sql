-- The audit tree stored as tiles (as transparency logs store theirs, cf. tlog tiles):
-- tile (level, idx) holds, in order, the hashes of the complete tree nodes (4·level, j) for
-- j in [16·idx, 16·idx + 16), 32 bytes each. The three tree levels between two tile levels
-- are recomputed in memory from the tile below, so an inclusion proof reads one row per tile
-- level (the upper ones are cached by the server) instead of one row per tree level. Full
-- tiles never change; the right-edge tile of each level holds fewer than 16 hashes and is
-- rewritten as the tree grows, in the same transaction as audit_state.tree_size.
--
-- Existing deployments: audit_nodes (one row per node, ≈ 2 rows per leaf) is dropped and the
-- committed size set back to 0. The tree is a derived cache of the log: the next `serve`
-- checkpointer run (or `countersign audit build`) rebuilds it from position 0, with the same
-- roots, so every stored checkpoint still verifies. Until it has caught up, proofs for sizes
-- beyond the rebuilt part answer "out of range".
DROP TABLE audit_nodes;

CREATE TABLE audit_tiles (
    level  integer  NOT NULL CHECK (level >= 0 AND level < 16),
    idx    bigint   NOT NULL CHECK (idx >= 0),
    hashes bytea    NOT NULL CHECK (length(hashes) BETWEEN 32 AND 512 AND length(hashes) % 32 = 0),
    PRIMARY KEY (level, idx)
);

UPDATE audit_state SET tree_size = 0 WHERE id = 1;
