//! A whole tree in memory: every complete node, level by level. It is the reference
//! [`NodeSource`] for tests and the in-process audit verifier, and what a store's table of
//! persisted nodes looks like from the proof code's side.

use super::{Hash, NodeId, NodeSource, ProveError, empty_root, leaf_hash, node_hash, prove};

/// A node the tree does not have (yet): beyond its size, or not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("node (level {}, index {}) is not in the tree", .0.level, .0.index)]
pub struct MissingNode(pub NodeId);

/// Every complete node of a tree: `levels[l][i]` is node `(l, i)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryTree {
    levels: Vec<Vec<Hash>>,
}

impl MemoryTree {
    /// The empty tree.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A tree of the given leaf hashes, in order.
    #[must_use]
    pub fn from_leaf_hashes<I: IntoIterator<Item = Hash>>(leaves: I) -> Self {
        let mut t = Self::new();
        for leaf in leaves {
            t.push_leaf_hash(leaf);
        }
        t
    }

    /// Appends the leaf whose canonical bytes are `data`.
    pub fn push_leaf(&mut self, data: &[u8]) {
        self.push_leaf_hash(leaf_hash(data));
    }

    /// Appends a leaf hash and every parent it completes.
    pub fn push_leaf_hash(&mut self, leaf: Hash) {
        let mut carry = leaf;
        let mut level = 0usize;
        loop {
            if self.levels.len() <= level {
                self.levels.push(Vec::new());
            }
            let Some(row) = self.levels.get_mut(level) else {
                return;
            };
            row.push(carry);
            if row.len() % 2 == 1 {
                return;
            }
            // The row now ends in a complete pair: its parent is complete too.
            match row.as_slice() {
                [.., left, right] => carry = node_hash(left, right),
                _ => return,
            }
            level += 1;
        }
    }

    /// Number of leaves.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// Whether the tree has no leaves.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The root of the whole tree.
    #[must_use]
    pub fn root(&self) -> Hash {
        self.root_at(self.len()).unwrap_or_else(|_| empty_root())
    }

    /// The root of the tree of its first `size` leaves.
    ///
    /// # Errors
    /// [`MissingNode`] if `size` is larger than the tree.
    pub fn root_at(&self, size: u64) -> Result<Hash, MissingNode> {
        prove::root(self, size).map_err(unwrap_source)
    }

    /// [`prove::inclusion_proof`] against this tree.
    ///
    /// # Errors
    /// As [`prove::inclusion_proof`].
    pub fn inclusion_proof(
        &self,
        index: u64,
        size: u64,
    ) -> Result<Vec<Hash>, ProveError<MissingNode>> {
        prove::inclusion_proof(self, index, size)
    }

    /// [`prove::consistency_proof`] against this tree.
    ///
    /// # Errors
    /// As [`prove::consistency_proof`].
    pub fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<Vec<Hash>, ProveError<MissingNode>> {
        prove::consistency_proof(self, old_size, new_size)
    }
}

fn unwrap_source(e: ProveError<MissingNode>) -> MissingNode {
    match e {
        ProveError::Source(m) => m,
        // `root` only fails through its source.
        ProveError::IndexOutOfRange { .. } | ProveError::InvalidSizes { .. } => {
            MissingNode(NodeId::new(0, 0))
        }
    }
}

impl NodeSource for MemoryTree {
    type Error = MissingNode;

    fn node(&self, id: NodeId) -> Result<Hash, MissingNode> {
        let index = usize::try_from(id.index).map_err(|_| MissingNode(id))?;
        self.levels
            .get(usize::from(id.level))
            .and_then(|row| row.get(index))
            .copied()
            .ok_or(MissingNode(id))
    }
}
