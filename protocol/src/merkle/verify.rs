//! Proof verification, RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency), over bytes as
//! they arrive from outside: every hash's length is checked here rather than trusted, the exact
//! proof length is computed from the sizes and enforced before any hashing (so preceding or
//! trailing garbage, a dropped or an inserted element is a [`ProofError::WrongProofLength`]), and
//! then the RFC's algorithm runs with all of its own checks.

use super::{Hash, node_hash};

/// Why a proof was rejected. Every variant means "not proven" (a 4xx for whoever sent it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf index is not below the tree size.
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange {
        /// Claimed leaf index.
        index: u64,
        /// Claimed tree size.
        size: u64,
    },
    /// The old tree is larger than the new one.
    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    SizesOutOfOrder {
        /// Claimed earlier size.
        old_size: u64,
        /// Claimed later size.
        new_size: u64,
    },
    /// Consistency with the empty tree proves nothing; RFC 9162 requires `0 < first`.
    #[error("a consistency proof from the empty tree proves nothing")]
    EmptyOldTree,
    /// The proof does not have the one length the sizes allow.
    #[error("proof has {got} hashes, the sizes require exactly {expected}")]
    WrongProofLength {
        /// Length implied by the sizes.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// A hash is not 32 bytes long.
    #[error("{what} is {len} bytes long, not 32")]
    MalformedHash {
        /// Which input: "leaf hash", "root", "old root", "new root" or "proof hash".
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// The proof leads to a different root than the one supplied.
    #[error("the proof does not lead to the supplied root")]
    RootMismatch,
    /// The consistency proof does not reproduce the old root.
    #[error("the proof does not reproduce the old root")]
    OldRootMismatch,
    /// The consistency proof does not reproduce the new root.
    #[error("the proof does not reproduce the new root")]
    NewRootMismatch,
}

/// Checks that `leaf_hash` is leaf `index` of the tree of `tree_size` leaves whose root is
/// `root` (RFC 9162 §2.1.3.2).
///
/// # Errors
/// A [`ProofError`] naming the first check that failed.
pub fn verify_inclusion<P: AsRef<[u8]>>(
    leaf_hash: &[u8],
    index: u64,
    tree_size: u64,
    proof: &[P],
    root: &[u8],
) -> Result<(), ProofError> {
    let root = as_hash(root, "root")?;
    let computed = root_from_inclusion_proof(leaf_hash, index, tree_size, proof)?;
    if computed == root {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// The root an inclusion proof leads to: the first half of [`verify_inclusion`], for callers that
/// look the root up afterwards (a monitor comparing against several checkpoints).
///
/// # Errors
/// A [`ProofError`] for a bad index, hash length or proof length.
pub fn root_from_inclusion_proof<P: AsRef<[u8]>>(
    leaf_hash: &[u8],
    index: u64,
    tree_size: u64,
    proof: &[P],
) -> Result<Hash, ProofError> {
    // Step 1.
    if index >= tree_size {
        return Err(ProofError::IndexOutOfRange {
            index,
            size: tree_size,
        });
    }
    let leaf = as_hash(leaf_hash, "leaf hash")?;
    let proof = as_hashes(proof)?;
    let (inner, border) = decompose_inclusion(index, tree_size);
    check_len(inner + border, proof.len())?;

    // Steps 2–5, verbatim.
    let (mut fn_, mut sn) = (index, tree_size - 1);
    let mut r = leaf;
    for p in &proof {
        if sn == 0 {
            return Err(ProofError::WrongProofLength {
                expected: inner + border,
                got: proof.len(),
            });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongProofLength {
            expected: inner + border,
            got: proof.len(),
        });
    }
    Ok(r)
}

/// Checks that the tree of `old_size` leaves with root `old_root` is a prefix of the tree of
/// `new_size` leaves with root `new_root` (RFC 9162 §2.1.4.2).
///
/// When the sizes are equal the proof must be empty and nothing is hashed: the claim is only
/// that the two roots are the same, so they are compared as given.
///
/// # Errors
/// A [`ProofError`] naming the first check that failed.
pub fn verify_consistency<P: AsRef<[u8]>>(
    old_size: u64,
    new_size: u64,
    old_root: &[u8],
    new_root: &[u8],
    proof: &[P],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizesOutOfOrder { old_size, new_size });
    }
    if old_size == 0 {
        return Err(ProofError::EmptyOldTree);
    }
    if old_size == new_size {
        check_len(0, proof.len())?;
        return if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::NewRootMismatch)
        };
    }
    let first_hash = as_hash(old_root, "old root")?;
    let second_hash = as_hash(new_root, "new root")?;
    let proof = as_hashes(proof)?;

    // When old_size is a power of two, the old tree is a complete subtree of the new one and the
    // verifier seeds with the old root itself (step 2); otherwise the proof's first hash is the
    // seed and the old root is rebuilt from the rest.
    let shift = old_size.trailing_zeros();
    let (inner, border) = decompose_inclusion(old_size - 1, new_size);
    let inner = inner.saturating_sub(shift as usize);
    let old_is_pow2 = old_size.is_power_of_two();
    let expected = usize::from(!old_is_pow2) + inner + border;
    check_len(expected, proof.len())?;

    let (seed, rest): (Hash, &[Hash]) = if old_is_pow2 {
        (first_hash, &proof)
    } else {
        match proof.split_first() {
            Some((first, rest)) => (*first, rest),
            None => return Err(ProofError::WrongProofLength { expected, got: 0 }),
        }
    };

    // Steps 3–7, verbatim.
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (seed, seed);
    for c in rest {
        if sn == 0 {
            return Err(ProofError::WrongProofLength {
                expected,
                got: proof.len(),
            });
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::WrongProofLength {
            expected,
            got: proof.len(),
        });
    }
    if fr != first_hash {
        return Err(ProofError::OldRootMismatch);
    }
    if sr != second_hash {
        return Err(ProofError::NewRootMismatch);
    }
    Ok(())
}

/// How many proof hashes an inclusion proof for `index` in a tree of `size` has, split as in
/// transparency-dev: `inner` siblings below the point where the leaf's path and the tree's right
/// border part, and `border` complete left subtrees above it.
fn decompose_inclusion(index: u64, size: u64) -> (usize, usize) {
    let inner = (64 - (index ^ (size - 1)).leading_zeros()) as usize;
    let border = index.checked_shr(inner as u32).unwrap_or(0).count_ones() as usize;
    (inner, border)
}

fn check_len(expected: usize, got: usize) -> Result<(), ProofError> {
    if expected == got {
        Ok(())
    } else {
        Err(ProofError::WrongProofLength { expected, got })
    }
}

fn as_hash(bytes: &[u8], what: &'static str) -> Result<Hash, ProofError> {
    <Hash>::try_from(bytes).map_err(|_| ProofError::MalformedHash {
        what,
        len: bytes.len(),
    })
}

fn as_hashes<P: AsRef<[u8]>>(proof: &[P]) -> Result<Vec<Hash>, ProofError> {
    proof
        .iter()
        .map(|p| as_hash(p.as_ref(), "proof hash"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decomposition_matches_known_lengths() {
        // Tree of 8: every leaf has 3 siblings. Tree of 7, leaf 6: one sibling (the left 4 and
        // the [4,6) pair) → 2.
        assert_eq!(decompose_inclusion(0, 8), (3, 0));
        let (i, b) = decompose_inclusion(6, 7);
        assert_eq!(i + b, 2);
        assert_eq!(decompose_inclusion(0, 1), (0, 0));
    }
}
