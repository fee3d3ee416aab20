//! Proof generation over stored nodes. A [`NodeSource`] answers for complete, aligned subtrees
//! only; RFC 9162's recursive `MTH`, `PATH` and `PROOF` (§2.1.1, §2.1.3.1, §2.1.4.1) are walked
//! top-down so that each step needs either one stored node or the root of a right-hand range,
//! which is itself folded from at most one stored node per set bit of its size. A proof thus
//! costs O(log n) reads, and the reads a proof will make are known from the sizes alone (see
//! [`inclusion_proof_nodes`]) so a store can fetch them in one round trip.

use core::convert::Infallible;

use super::{Hash, NodeId, empty_root, node_hash, split_level};

/// Somewhere complete subtree roots can be read from: a database table, a cache, memory.
pub trait NodeSource {
    /// Why a read failed (I/O, or the node has not been stored yet).
    type Error;

    /// The root of the complete subtree `id`; see [`NodeId`] for the addressing.
    ///
    /// # Errors
    /// Whatever the store reports, including a node that does not exist (yet).
    fn node(&self, id: NodeId) -> Result<Hash, Self::Error>;
}

/// Why a proof or root could not be produced.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProveError<E> {
    /// The caller asked for a leaf that is not in the tree (a 4xx: nothing to prove).
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange {
        /// Requested leaf.
        index: u64,
        /// Tree size the proof was requested against.
        size: u64,
    },
    /// The caller asked for a consistency proof between sizes that have none: the old size is
    /// zero (RFC 9162 requires `0 < first`) or larger than the new one (a 4xx).
    #[error("no consistency proof exists from size {old_size} to size {new_size}")]
    InvalidSizes {
        /// Earlier tree size.
        old_size: u64,
        /// Later tree size.
        new_size: u64,
    },
    /// The node source failed (a 5xx, or a node that is not stored yet).
    #[error("reading a tree node failed")]
    Source(#[source] E),
}

/// The root of the tree made of the first `size` leaves.
///
/// # Errors
/// [`ProveError::Source`] when a node cannot be read.
pub fn root<S: NodeSource + ?Sized>(src: &S, size: u64) -> Result<Hash, ProveError<S::Error>> {
    if size == 0 {
        return Ok(empty_root());
    }
    range_root(src, 0, size).map_err(ProveError::Source)
}

/// The inclusion proof (RFC 9162 §2.1.3.1 `PATH(index, D[size])`) for leaf `index` in the tree of
/// the first `size` leaves, ordered from the leaf's sibling up to the root's child.
///
/// # Errors
/// [`ProveError::IndexOutOfRange`] unless `index < size`; [`ProveError::Source`] when a node
/// cannot be read.
pub fn inclusion_proof<S: NodeSource + ?Sized>(
    src: &S,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProveError<S::Error>> {
    if index >= size {
        return Err(ProveError::IndexOutOfRange { index, size });
    }
    // Walk down from the root; each step contributes the sibling of the half holding the leaf.
    // The RFC lists the deepest sibling first, so collect top-down and reverse.
    let mut proof = Vec::with_capacity(64);
    let (mut start, mut n, mut m) = (0u64, size, index);
    while n > 1 {
        let level = split_level(n);
        let k = 1u64 << level;
        if m < k {
            proof.push(range_root(src, start + k, n - k).map_err(ProveError::Source)?);
            n = k;
        } else {
            proof.push(
                src.node(NodeId::new(level, start >> level))
                    .map_err(ProveError::Source)?,
            );
            start += k;
            m -= k;
            n -= k;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// The consistency proof (RFC 9162 §2.1.4.1 `PROOF(old_size, D[new_size])`) that the tree of
/// `old_size` leaves is a prefix of the tree of `new_size` leaves. Empty when the sizes are equal.
///
/// # Errors
/// [`ProveError::InvalidSizes`] unless `0 < old_size <= new_size`; [`ProveError::Source`] when a
/// node cannot be read.
pub fn consistency_proof<S: NodeSource + ?Sized>(
    src: &S,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, ProveError<S::Error>> {
    if old_size == 0 || old_size > new_size {
        return Err(ProveError::InvalidSizes { old_size, new_size });
    }
    // SUBPROOF(m, D[start..start+n], b), unrolled. `whole` is the RFC's `b`: true while the
    // old tree is still the whole left edge, whose root the verifier already holds.
    let mut proof = Vec::with_capacity(64);
    let (mut start, mut n, mut m, mut whole) = (0u64, new_size, old_size, true);
    loop {
        if m == n {
            if !whole {
                // Reached only through left turns from a right turn: a complete, aligned subtree.
                proof.push(range_root(src, start, n).map_err(ProveError::Source)?);
            }
            break;
        }
        let level = split_level(n);
        let k = 1u64 << level;
        if m <= k {
            proof.push(range_root(src, start + k, n - k).map_err(ProveError::Source)?);
            n = k;
        } else {
            proof.push(
                src.node(NodeId::new(level, start >> level))
                    .map_err(ProveError::Source)?,
            );
            start += k;
            m -= k;
            n -= k;
            whole = false;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// The stored nodes [`root`] reads for `size`, in the order it reads them.
#[must_use]
pub fn root_nodes(size: u64) -> Vec<NodeId> {
    let rec = Recorder::default();
    // The recorder never fails, and a size alone cannot be invalid.
    let _ = root(&rec, size);
    rec.into_ids()
}

/// The stored nodes [`inclusion_proof`] reads for `(index, size)`, so a store can fetch them
/// all in one query and answer from a map.
///
/// # Errors
/// [`ProveError::IndexOutOfRange`] unless `index < size`.
pub fn inclusion_proof_nodes(index: u64, size: u64) -> Result<Vec<NodeId>, ProveError<Infallible>> {
    let rec = Recorder::default();
    inclusion_proof(&rec, index, size)?;
    Ok(rec.into_ids())
}

/// The stored nodes [`consistency_proof`] reads for `(old_size, new_size)`.
///
/// # Errors
/// [`ProveError::InvalidSizes`] unless `0 < old_size <= new_size`.
pub fn consistency_proof_nodes(
    old_size: u64,
    new_size: u64,
) -> Result<Vec<NodeId>, ProveError<Infallible>> {
    let rec = Recorder::default();
    consistency_proof(&rec, old_size, new_size)?;
    Ok(rec.into_ids())
}

/// `MTH(D[start..start+size])` for `size >= 1`, where `start` is a multiple of the largest power
/// of two not above `size` (true of every range RFC 9162's recursions visit). Splitting off the
/// largest power of two repeatedly means one complete subtree per set bit of `size`, largest
/// first, folded right to left.
fn range_root<S: NodeSource + ?Sized>(src: &S, start: u64, size: u64) -> Result<Hash, S::Error> {
    let mut parts = Vec::with_capacity(size.count_ones() as usize);
    let mut cursor = start;
    for level in (0..64u8).rev() {
        let width = 1u64 << level;
        if size & width != 0 {
            parts.push(src.node(NodeId::new(level, cursor >> level))?);
            cursor = cursor.wrapping_add(width);
        }
    }
    let mut acc: Option<Hash> = None;
    for part in parts.iter().rev() {
        acc = Some(match acc {
            None => *part,
            Some(right) => node_hash(part, &right),
        });
    }
    Ok(acc.unwrap_or_else(empty_root))
}

/// A node source that answers zeroes and remembers what was asked: proof shape depends only on
/// the sizes, never on hash values, so this yields exactly the reads a real proof makes.
#[derive(Debug, Default)]
struct Recorder {
    ids: core::cell::RefCell<Vec<NodeId>>,
}

impl Recorder {
    fn into_ids(self) -> Vec<NodeId> {
        self.ids.into_inner()
    }
}

impl NodeSource for Recorder {
    type Error = Infallible;

    fn node(&self, id: NodeId) -> Result<Hash, Infallible> {
        self.ids.borrow_mut().push(id);
        Ok([0; 32])
    }
}
