//! Proof generation and the incremental builder checked against a literal transcription of
//! RFC 9162's recursive definitions, and verification checked to reject every single-bit or
//! single-number change.

use proptest::prelude::*;

use super::*;

/// RFC 9162 §2.1.1 `MTH`, transcribed.
fn mth(d: &[Hash]) -> Hash {
    match d {
        [] => empty_root(),
        [one] => *one,
        _ => {
            let k = 1usize << split_level(d.len() as u64);
            let (l, r) = d.split_at(k);
            node_hash(&mth(l), &mth(r))
        }
    }
}

/// RFC 9162 §2.1.3.1 `PATH`, transcribed.
fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
    if d.len() <= 1 {
        return vec![];
    }
    let k = 1usize << split_level(d.len() as u64);
    let (l, r) = d.split_at(k);
    if m < k {
        let mut p = path(m, l);
        p.push(mth(r));
        p
    } else {
        let mut p = path(m - k, r);
        p.push(mth(l));
        p
    }
}

/// RFC 9162 §2.1.4.1 `SUBPROOF`, transcribed.
fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
    let n = d.len();
    if m == n {
        return if b { vec![] } else { vec![mth(d)] };
    }
    let k = 1usize << split_level(n as u64);
    let (l, r) = d.split_at(k);
    if m <= k {
        let mut p = subproof(m, l, b);
        p.push(mth(r));
        p
    } else {
        let mut p = subproof(m - k, r, false);
        p.push(mth(l));
        p
    }
}

/// Which side each inclusion-proof hash joins on, bottom-up (true = the proof hash is on the
/// left), from the PATH recursion. Two (index, size) claims with the same shape combine the same
/// hashes in the same way, so no verifier can tell them apart from the hashes alone: that is why
/// the tree size must come from a signed checkpoint.
fn inclusion_shape(index: u64, size: u64) -> Vec<bool> {
    let mut sides = vec![];
    let (mut m, mut n) = (index, size);
    while n > 1 {
        let k = 1u64 << split_level(n);
        if m < k {
            sides.push(false);
            n = k;
        } else {
            sides.push(true);
            m -= k;
            n -= k;
        }
    }
    sides.reverse();
    sides
}

/// The same for consistency proofs: whether the old root seeds the computation, then for each
/// proof hash whether it lies inside the old tree (joins both running roots on the left).
fn consistency_shape(old: u64, new: u64) -> (bool, Vec<bool>) {
    let mut sides = vec![];
    let (mut m, mut n, mut b) = (old, new, true);
    while m != n {
        let k = 1u64 << split_level(n);
        if m <= k {
            sides.push(false);
            n = k;
        } else {
            sides.push(true);
            m -= k;
            n -= k;
            b = false;
        }
    }
    sides.reverse();
    (b, sides)
}

fn leaves(n: usize) -> Vec<Hash> {
    (0..n as u64).map(|i| leaf_hash(&i.to_be_bytes())).collect()
}

fn flip(h: &mut Hash, bit: usize) {
    if let Some(b) = h.get_mut((bit / 8) % 32) {
        *b ^= 1 << (bit % 8);
    }
}

#[test]
fn hashing_is_rfc_6962() {
    // Well-known values: the empty tree and the empty leaf.
    assert_eq!(
        hex::encode(empty_root()),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        hex::encode(leaf_hash(b"")),
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    );
}

#[test]
fn every_small_tree_matches_the_rfc_definitions() {
    let all = leaves(70);
    let tree = MemoryTree::from_leaf_hashes(all.iter().copied());
    let mut compact = CompactRange::new();
    assert_eq!(compact.root(), empty_root());
    for n in 1..=all.len() {
        let d = &all[..n];
        let Some(leaf) = all.get(n - 1) else {
            unreachable!()
        };
        compact.append(*leaf).unwrap();
        let want = mth(d);
        assert_eq!(tree.root_at(n as u64).unwrap(), want, "root {n}");
        assert_eq!(compact.root(), want, "compact root {n}");
        for m in 0..n {
            assert_eq!(
                tree.inclusion_proof(m as u64, n as u64).unwrap(),
                path(m, d),
                "PATH({m}, {n})"
            );
            assert_eq!(
                tree.consistency_proof(m as u64 + 1, n as u64).unwrap(),
                subproof(m + 1, d, true),
                "PROOF({}, {n})",
                m + 1
            );
        }
    }
}

#[test]
fn compact_range_emits_every_complete_node_exactly_once() {
    let all = leaves(1000);
    let tree = MemoryTree::from_leaf_hashes(all.iter().copied());
    let mut compact = CompactRange::new();
    let mut emitted = std::collections::BTreeMap::new();
    for chunk in all.chunks(37) {
        for (id, h) in compact.extend(chunk.iter().copied()).unwrap() {
            assert!(emitted.insert(id, h).is_none(), "{id:?} emitted twice");
        }
    }
    // Complete nodes of a tree of n leaves: floor(n / 2^l) at each level l.
    let expected: u64 = (0..64).map(|l| 1000u64 >> l).sum();
    assert_eq!(emitted.len() as u64, expected);
    for (id, h) in &emitted {
        assert_eq!(tree.node(*id).unwrap(), *h, "{id:?}");
        let range = id.leaves().unwrap();
        assert_eq!(mth(&all[range.start as usize..range.end as usize]), *h);
    }
    // Resuming from the stored frontier continues the same tree.
    let frontier: Vec<Hash> = CompactRange::frontier_nodes(1000)
        .into_iter()
        .map(|id| emitted[&id])
        .collect();
    let mut resumed = CompactRange::from_frontier(1000, frontier).unwrap();
    assert_eq!(resumed, compact);
    resumed.append(leaf_hash(b"next")).unwrap();
    let mut with_next = all.clone();
    with_next.push(leaf_hash(b"next"));
    assert_eq!(resumed.root(), mth(&with_next));
    assert!(CompactRange::from_frontier(1000, vec![]).is_err());
}

#[test]
fn proofs_read_logarithmically_many_nodes() {
    // A changed size is accepted only when it is structurally identical: check that the shape
    // helper is not vacuous.
    assert_eq!(inclusion_shape(0, 3), inclusion_shape(0, 4));
    assert_ne!(inclusion_shape(2, 3), inclusion_shape(2, 4));
    for size in [1u64, 2, 3, 1000, 1 << 20, (1 << 40) + 12345, u64::MAX] {
        for index in [0, size / 3, size - 1] {
            let reads = inclusion_proof_nodes(index, size).unwrap();
            assert!(reads.len() <= 2 * 64, "{index}/{size}: {}", reads.len());
        }
        let reads = consistency_proof_nodes(size.div_ceil(2), size).unwrap();
        assert!(reads.len() <= 2 * 64, "{size}: {}", reads.len());
        assert_eq!(root_nodes(size).len(), size.count_ones() as usize);
    }
}

#[test]
fn out_of_range_requests_are_refused() {
    let tree = MemoryTree::from_leaf_hashes(leaves(5));
    assert!(matches!(
        tree.inclusion_proof(5, 5),
        Err(ProveError::IndexOutOfRange { .. })
    ));
    assert!(matches!(
        tree.consistency_proof(0, 5),
        Err(ProveError::InvalidSizes { .. })
    ));
    assert!(matches!(
        tree.consistency_proof(4, 3),
        Err(ProveError::InvalidSizes { .. })
    ));
    assert!(matches!(
        tree.inclusion_proof(0, 6),
        Err(ProveError::Source(_))
    ));
    assert!(tree.root_at(6).is_err());
}

fn tree_and_pair() -> impl Strategy<Value = (u64, u64, u64)> {
    (1u64..=2000).prop_flat_map(|size| (Just(size), 1..=size, 0..size))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn inclusion_proofs_verify_and_any_change_fails(
        (size, _, index) in tree_and_pair(),
        bit in 0usize..256,
        which in any::<prop::sample::Index>(),
    ) {
        let tree = MemoryTree::from_leaf_hashes(leaves(size as usize));
        let root = tree.root_at(size).unwrap();
        let leaf = tree.node(NodeId::new(0, index)).unwrap();
        let proof = tree.inclusion_proof(index, size).unwrap();
        prop_assert_eq!(verify_inclusion(&leaf, index, size, &proof, &root), Ok(()));

        if !proof.is_empty() {
            let mut bad = proof.clone();
            if let Some(h) = bad.get_mut(which.index(proof.len())) { flip(h, bit); }
            prop_assert!(verify_inclusion(&leaf, index, size, &bad, &root).is_err());
        }
        let mut bad_root = root;
        flip(&mut bad_root, bit);
        prop_assert!(verify_inclusion(&leaf, index, size, &proof, &bad_root).is_err());
        let mut bad_leaf = leaf;
        flip(&mut bad_leaf, bit);
        prop_assert!(verify_inclusion(&bad_leaf, index, size, &proof, &root).is_err());
        for other in [index.wrapping_sub(1), index + 1, index ^ 2] {
            if other != index {
                prop_assert!(verify_inclusion(&leaf, other, size, &proof, &root).is_err(),
                    "index {} for {}", other, index);
            }
        }
        for other in [size - 1, size + 1, size * 2, size / 2] {
            let accepted = verify_inclusion(&leaf, index, other, &proof, &root).is_ok();
            if other != size && accepted {
                // Only an indistinguishable claim may pass (see `inclusion_shape`).
                prop_assert!(index < other);
                prop_assert_eq!(inclusion_shape(index, other), inclusion_shape(index, size),
                    "size {} for {}", other, size);
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_and_any_change_fails(
        (new, old, _) in tree_and_pair(),
        bit in 0usize..256,
        which in any::<prop::sample::Index>(),
    ) {
        let tree = MemoryTree::from_leaf_hashes(leaves(new as usize));
        let old_root = tree.root_at(old).unwrap();
        let new_root = tree.root_at(new).unwrap();
        let proof = tree.consistency_proof(old, new).unwrap();
        prop_assert_eq!(verify_consistency(old, new, &old_root, &new_root, &proof), Ok(()));

        if !proof.is_empty() {
            let mut bad = proof.clone();
            if let Some(h) = bad.get_mut(which.index(proof.len())) { flip(h, bit); }
            prop_assert!(verify_consistency(old, new, &old_root, &new_root, &bad).is_err());
        }
        let mut bad = old_root;
        flip(&mut bad, bit);
        prop_assert!(verify_consistency(old, new, &bad, &new_root, &proof).is_err());
        let mut bad = new_root;
        flip(&mut bad, bit);
        prop_assert!(verify_consistency(old, new, &old_root, &bad, &proof).is_err());
        for (o, n) in [(old - 1, new), (old + 1, new), (old, new + 1), (old, new - 1), (old * 2, new)] {
            let accepted = verify_consistency(o, n, &old_root, &new_root, &proof).is_ok();
            if (o, n) != (old, new) && accepted {
                prop_assert!(0 < o && o < n && old < new);
                prop_assert_eq!(consistency_shape(o, n), consistency_shape(old, new),
                    "sizes {}->{} for {}->{}", o, n, old, new);
            }
        }
    }

    #[test]
    fn compact_range_root_equals_memory_tree_root(size in 0u64..=2000, batch in 1usize..100) {
        let all = leaves(size as usize);
        let tree = MemoryTree::from_leaf_hashes(all.iter().copied());
        let mut compact = CompactRange::new();
        for chunk in all.chunks(batch) {
            compact.extend(chunk.iter().copied()).unwrap();
        }
        prop_assert_eq!(compact.size(), size);
        prop_assert_eq!(compact.root(), tree.root());
    }
}
