//! The incremental builder: a compact range (the "frontier") holding one complete subtree root
//! per set bit of the tree size. Appending a leaf reports every node it completes, so a store
//! that persists what [`CompactRange::append`] returns has stored every complete node of the
//! tree, which is all [`super::NodeSource`] is ever asked for. The frontier is also the state to
//! resume from: [`CompactRange::frontier_nodes`] names the nodes to reload after a restart.

use super::{Hash, NodeId, empty_root, node_hash};

/// The tree already holds 2^64 − 1 leaves, the most a `u64` size can count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the tree is full: it cannot hold more than u64::MAX leaves")]
pub struct TreeFull;

/// The right edge of a Merkle tree: enough to append leaves and compute the root without the
/// rest of the tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    /// Roots of the complete subtrees that make up the tree, left (largest) to right: one per set
    /// bit of `size`, highest bit first. Invariant: `frontier.len() == size.count_ones()`.
    frontier: Vec<Hash>,
}

/// Why a frontier could not be resumed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a tree of size {size} has {expected} frontier nodes, {got} were given")]
pub struct FrontierMismatch {
    /// The size given.
    pub size: u64,
    /// Nodes a tree of that size has on its frontier.
    pub expected: usize,
    /// Nodes given.
    pub got: usize,
}

impl CompactRange {
    /// The empty tree.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Resumes from the stored nodes [`Self::frontier_nodes`]`(size)` names, in that order.
    ///
    /// # Errors
    /// [`FrontierMismatch`] if there are not exactly as many hashes as the size needs.
    pub fn from_frontier(size: u64, frontier: Vec<Hash>) -> Result<Self, FrontierMismatch> {
        let expected = size.count_ones() as usize;
        if frontier.len() != expected {
            return Err(FrontierMismatch {
                size,
                expected,
                got: frontier.len(),
            });
        }
        Ok(Self { size, frontier })
    }

    /// The complete subtrees a tree of `size` leaves is made of, left to right: one per set bit
    /// of `size`, highest first. Their roots are the frontier.
    #[must_use]
    pub fn frontier_nodes(size: u64) -> Vec<NodeId> {
        let mut ids = Vec::with_capacity(size.count_ones() as usize);
        let mut start = 0u64;
        for level in (0..64u8).rev() {
            let width = 1u64 << level;
            if size & width != 0 {
                ids.push(NodeId::new(level, start >> level));
                start = start.wrapping_add(width);
            }
        }
        ids
    }

    /// Number of leaves appended so far.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The frontier hashes, in the order [`Self::frontier_nodes`] names them.
    #[must_use]
    pub fn frontier(&self) -> &[Hash] {
        &self.frontier
    }

    /// Appends one leaf hash and returns every node this completes, the leaf itself (level 0)
    /// first and then each new parent upwards.
    ///
    /// # Errors
    /// [`TreeFull`] when the size would overflow `u64`; nothing is changed.
    pub fn append(&mut self, leaf: Hash) -> Result<Vec<(NodeId, Hash)>, TreeFull> {
        let index = self.size;
        let new_size = index.checked_add(1).ok_or(TreeFull)?;
        // Appending leaf `index` closes one subtree per trailing one bit of `index`.
        let merges = index.trailing_ones();
        let mut done = Vec::with_capacity(merges as usize + 1);
        done.push((NodeId::new(0, index), leaf));
        let mut right = leaf;
        for level in 1..=merges {
            // The invariant (one frontier entry per set bit) guarantees an entry per merge.
            let Some(left) = self.frontier.pop() else {
                break;
            };
            right = node_hash(&left, &right);
            done.push((NodeId::new(level as u8, index >> level), right));
        }
        self.frontier.push(right);
        self.size = new_size;
        Ok(done)
    }

    /// Appends a batch of leaf hashes; returns the nodes completed, in the order they were.
    ///
    /// # Errors
    /// [`TreeFull`] when the size would overflow `u64`; leaves before that point are kept.
    pub fn extend<I: IntoIterator<Item = Hash>>(
        &mut self,
        leaves: I,
    ) -> Result<Vec<(NodeId, Hash)>, TreeFull> {
        let mut done = Vec::new();
        for leaf in leaves {
            done.extend(self.append(leaf)?);
        }
        Ok(done)
    }

    /// The root of the tree so far (RFC 9162 `MTH`): the frontier folded right to left.
    #[must_use]
    pub fn root(&self) -> Hash {
        let mut acc: Option<Hash> = None;
        for part in self.frontier.iter().rev() {
            acc = Some(match acc {
                None => *part,
                Some(right) => node_hash(part, &right),
            });
        }
        acc.unwrap_or_else(empty_root)
    }
}
