//! The RFC 9162 (Certificate Transparency v2) Merkle tree over the event log: hashing, node
//! addressing, proof generation over stored nodes, incremental building, and proof verification.
//!
//! Rules enforced here:
//! - Hashing is exactly RFC 9162 §2.1.1 (identical to RFC 6962): a leaf is
//!   `SHA-256(0x00 ‖ bytes)`, an interior node `SHA-256(0x01 ‖ left ‖ right)`, the empty tree
//!   `SHA-256("")`. The domain-separation prefixes are what stop a leaf being passed off as a node,
//!   and what make our proofs interoperate with CT and Sigstore tooling.
//! - Nodes are addressed as `(level, index)`: level 0 is the leaves, and node `(level, index)`
//!   is the root of the *complete, aligned* subtree over leaves
//!   `[index·2^level, (index+1)·2^level)`. Only such nodes exist in storage; the root of a tree
//!   whose size is not a power of two, and the incomplete right-hand siblings a proof needs, are
//!   recomputed from at most `log2(n)` of them, so every proof costs O(log n) node reads.
//! - Verification follows RFC 9162 §2.1.3.2 and §2.1.4.2 literally, and additionally checks the
//!   exact proof length up front; every malformed input is a typed [`ProofError`], never a panic.

mod compact;
mod memory;
mod prove;
mod verify;

pub use compact::{CompactRange, FrontierMismatch, TreeFull};
pub use memory::{MemoryTree, MissingNode};
pub use prove::{
    NodeSource, ProveError, consistency_proof, consistency_proof_nodes, inclusion_proof,
    inclusion_proof_nodes, root, root_nodes,
};
pub use verify::{ProofError, root_from_inclusion_proof, verify_consistency, verify_inclusion};

use sha2::{Digest, Sha256};

/// Length in bytes of every hash in the tree.
pub const HASH_LEN: usize = 32;

/// A SHA-256 output: a leaf hash, a node hash or a tree root.
pub type Hash = [u8; HASH_LEN];

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

/// The root of the tree with no leaves: `SHA-256("")` (RFC 9162 §2.1.1).
#[must_use]
pub fn empty_root() -> Hash {
    Sha256::digest(b"").into()
}

/// The hash of a leaf whose canonical bytes are `data`: `SHA-256(0x00 ‖ data)`.
#[must_use]
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([LEAF_PREFIX]);
    h.update(data);
    h.finalize().into()
}

/// The hash of an interior node: `SHA-256(0x01 ‖ left ‖ right)`.
#[must_use]
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE_PREFIX]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The address of a complete, aligned subtree: node `(level, index)` covers leaves
/// `[index·2^level, (index+1)·2^level)`. Level 0 is the leaves themselves (`(0, i)` is leaf
/// `i`'s hash); `(level + 1, index)` is the parent of `(level, 2·index)` and
/// `(level, 2·index + 1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    /// Height above the leaves; the subtree holds `2^level` leaves.
    pub level: u8,
    /// Position among the nodes of this level, counted from the left.
    pub index: u64,
}

impl NodeId {
    /// The node at `level` whose subtree holds leaf `index`·2^level first.
    #[must_use]
    pub const fn new(level: u8, index: u64) -> Self {
        Self { level, index }
    }

    /// The leaves this node covers, or `None` if the address lies beyond `u64` positions.
    #[must_use]
    pub fn leaves(&self) -> Option<core::ops::Range<u64>> {
        let width = 1u64.checked_shl(u32::from(self.level))?;
        let start = self.index.checked_mul(width)?;
        let end = start.checked_add(width)?;
        Some(start..end)
    }
}

/// The largest power of two strictly less than `n`, as an exponent; `n` must be at least 2.
/// This is the `k` of RFC 9162's recursive definitions.
fn split_level(n: u64) -> u8 {
    // For n >= 2, n - 1 >= 1, so leading_zeros <= 63 and the result is in 0..=62.
    (63 - (n.saturating_sub(1)).leading_zeros().min(63)) as u8
}

#[cfg(test)]
mod tests;
