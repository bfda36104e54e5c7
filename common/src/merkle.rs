//! The Merkle tree of RFC 9162 (Certificate Transparency 2.0, §2.1) under the audit log: tree
//! heads, inclusion proofs (a record is in the log) and consistency proofs (a later log extends
//! an earlier one: nothing cut or rewritten).
//!
//! Leaves are given as their leaf hashes (`leaf_hash` of the record's bytes). The free functions
//! state the definitions over a slice of leaves; [`Tree`] keeps subtree roots so the writer
//! answers in O(log n). The verifiers need only the proof, the sizes and the heads, which is
//! what an offline verifier or a tenant has.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// `SHA-256(0x00 || data)`: a leaf.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`: an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// MTH: the root of the tree over `leaves` (the hash of the empty string for none).
pub fn root(leaves: &[Hash]) -> Hash {
    root_of_slice(leaves)
}

fn root_of_slice(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest(b"").into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root_of_slice(&leaves[..k]), &root_of_slice(&leaves[k..]))
        }
    }
}

/// The root of leaves `a..b`, through `sub`, which knows the roots of whole aligned subtrees
/// (and may know more).
type Sub<'a> = &'a dyn Fn(usize, usize) -> Hash;

/// PATH(index): the audit path of leaf `index` in the tree over `leaves`, or `None` when
/// there is no such leaf.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut proof = Vec::new();
    path(
        &|a, b| root_of_slice(&leaves[a..b]),
        0,
        leaves.len(),
        index,
        &mut proof,
    );
    Some(proof)
}

fn path(sub: Sub, a: usize, b: usize, index: usize, proof: &mut Vec<Hash>) {
    let n = b - a;
    if n <= 1 {
        return;
    }
    let k = split(n);
    if index < k {
        path(sub, a, a + k, index, proof);
        proof.push(sub(a + k, b));
    } else {
        path(sub, a + k, b, index - k, proof);
        proof.push(sub(a, a + k));
    }
}

/// PROOF(first): that the tree over `leaves` extends its first `first` leaves; `None` unless
/// `0 < first <= leaves.len()`.
pub fn consistency_proof(leaves: &[Hash], first: usize) -> Option<Vec<Hash>> {
    if first == 0 || first > leaves.len() {
        return None;
    }
    let mut proof = Vec::new();
    subproof(
        &|a, b| root_of_slice(&leaves[a..b]),
        0,
        leaves.len(),
        first,
        true,
        &mut proof,
    );
    Some(proof)
}

fn subproof(sub: Sub, a: usize, b: usize, m: usize, whole: bool, proof: &mut Vec<Hash>) {
    let n = b - a;
    if m == n {
        if !whole {
            proof.push(sub(a, b));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(sub, a, a + k, m, whole, proof);
        proof.push(sub(a + k, b));
    } else {
        subproof(sub, a + k, b, m - k, false, proof);
        proof.push(sub(a, a + k));
    }
}

/// A growing tree that keeps every whole aligned subtree's root (two hashes per leaf), so
/// appends cost one node hash on average and roots and proofs for any size cost O(log n).
#[derive(Debug, Default, Clone)]
pub struct Tree {
    /// `levels[h][i]`: the root of leaves `i·2^h .. (i+1)·2^h`, for whole subtrees only.
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    pub fn size(&self) -> usize {
        self.levels.first().map_or(0, Vec::len)
    }

    pub fn leaf(&self, index: usize) -> Option<&Hash> {
        self.levels.first().and_then(|l| l.get(index))
    }

    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut h = 0;
        // A level whose length became even completed a subtree one level up.
        while self.levels[h].len().is_multiple_of(2) {
            let n = self.levels[h].len();
            let parent = node_hash(&self.levels[h][n - 2], &self.levels[h][n - 1]);
            if self.levels.len() == h + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[h + 1].push(parent);
            h += 1;
        }
    }

    /// Keeps the first `size` leaves (and the whole subtrees over them).
    pub fn truncate(&mut self, size: usize) {
        for (h, level) in self.levels.iter_mut().enumerate() {
            level.truncate(size >> h);
        }
        while self.levels.len() > 1 && self.levels.last().is_some_and(Vec::is_empty) {
            self.levels.pop();
        }
    }

    /// The root of leaves `a..b` (`a < b <= size`).
    fn range(&self, a: usize, b: usize) -> Hash {
        let n = b - a;
        if n == 0 {
            return Sha256::digest(b"").into();
        }
        if n.is_power_of_two() && a.is_multiple_of(n) {
            let h = n.trailing_zeros() as usize;
            return self.levels[h][a / n];
        }
        let k = split(n);
        node_hash(&self.range(a, a + k), &self.range(a + k, b))
    }

    /// The root of the tree's first `size` leaves; `None` past the end.
    pub fn root_at(&self, size: usize) -> Option<Hash> {
        (size <= self.size()).then(|| self.range(0, size))
    }

    /// The audit path of leaf `index` in the tree of the first `size` leaves.
    pub fn inclusion_proof(&self, index: usize, size: usize) -> Option<Vec<Hash>> {
        if index >= size || size > self.size() {
            return None;
        }
        let mut proof = Vec::new();
        path(&|a, b| self.range(a, b), 0, size, index, &mut proof);
        Some(proof)
    }

    /// That the tree of `second` leaves extends the tree of `first` leaves.
    pub fn consistency_proof(&self, first: usize, second: usize) -> Option<Vec<Hash>> {
        if first == 0 || first > second || second > self.size() {
            return None;
        }
        let mut proof = Vec::new();
        subproof(&|a, b| self.range(a, b), 0, second, first, true, &mut proof);
        Some(proof)
    }
}

/// Checks that `leaf` is leaf `index` of the tree of `size` leaves whose root is `root`
/// (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// Checks that the tree of `second` leaves with root `second_root` extends the tree of `first`
/// leaves with root `first_root` (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> bool {
    if first == 0 || first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    // A first tree that is a whole subtree is its own first node.
    let mut nodes: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        nodes.push(*first_root);
    }
    nodes.extend_from_slice(proof);
    let Some((start, rest)) = nodes.split_first() else {
        return false;
    };
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*start, *start);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *first_root && sr == *second_root && s == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("record {i}").as_bytes()))
            .collect()
    }

    /// The eight inputs of the Certificate Transparency reference tests.
    fn reference_inputs() -> Vec<Vec<u8>> {
        vec![
            vec![],
            vec![0x00],
            vec![0x10],
            vec![0x20, 0x21],
            vec![0x30, 0x31],
            vec![0x40, 0x41, 0x42, 0x43],
            (0x50..=0x57).collect(),
            (0x60..=0x6f).collect(),
        ]
    }

    #[test]
    fn hashes_match_the_reference_values() {
        assert_eq!(
            hex::encode(root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
        let all: Vec<Hash> = reference_inputs().iter().map(|d| leaf_hash(d)).collect();
        assert_eq!(
            hex::encode(root(&all)),
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
        );
    }

    #[test]
    fn every_inclusion_proof_verifies_and_nothing_else_does() {
        for n in 1..=40 {
            let tree = leaves(n);
            let head = root(&tree);
            for i in 0..n {
                let proof = inclusion_proof(&tree, i).expect("leaf exists");
                let (i, size) = (i as u64, n as u64);
                let leaf = &tree[i as usize];
                assert!(verify_inclusion(i, size, leaf, &proof, &head), "{i} of {n}");
                assert!(!verify_inclusion(
                    i,
                    size,
                    &leaf_hash(b"forged"),
                    &proof,
                    &head
                ));
                // (The size itself is bound by the signed tree head the root comes with: for
                // some leaves, paths in trees of two sizes have the same shape.)
                assert!(!verify_inclusion(
                    i,
                    size,
                    leaf,
                    &proof,
                    &root(&tree[..n - 1])
                ));
                if n > 1 {
                    assert!(!verify_inclusion((i + 1) % size, size, leaf, &proof, &head));
                    let mut bent = proof.clone();
                    bent[0][0] ^= 1;
                    assert!(!verify_inclusion(i, size, leaf, &bent, &head));
                }
            }
            assert!(inclusion_proof(&tree, n).is_none());
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_a_rewritten_past_does_not() {
        for n in 1..=40 {
            let tree = leaves(n);
            let head = root(&tree);
            for m in 1..=n {
                let proof = consistency_proof(&tree, m).expect("0 < m <= n");
                let old = root(&tree[..m]);
                let (m64, n64) = (m as u64, n as u64);
                assert!(
                    verify_consistency(m64, n64, &old, &head, &proof),
                    "{m} -> {n}"
                );
                // An earlier head the log no longer extends: a record rewritten or cut.
                let mut rewritten = tree[..m].to_vec();
                rewritten[m - 1] = leaf_hash(b"rewritten");
                let other = root(&rewritten);
                assert!(!verify_consistency(m64, n64, &other, &head, &proof));
                if m < n {
                    assert!(!verify_consistency(m64, n64, &old, &old, &proof));
                    assert!(!verify_consistency(
                        m64,
                        n64,
                        &old,
                        &root(&tree[..n - 1]),
                        &proof
                    ));
                }
            }
            assert!(consistency_proof(&tree, 0).is_none());
            assert!(consistency_proof(&tree, n + 1).is_none());
        }
    }

    #[test]
    fn the_kept_tree_agrees_with_the_definitions_at_every_size() {
        let all = leaves(70);
        let mut tree = Tree::new();
        assert_eq!(tree.root_at(0), Some(root(&[])));
        for (i, leaf) in all.iter().enumerate() {
            tree.push(*leaf);
            assert_eq!(tree.size(), i + 1);
        }
        for size in 1..=all.len() {
            assert_eq!(tree.root_at(size), Some(root(&all[..size])), "root {size}");
            for index in [0, size / 2, size - 1] {
                assert_eq!(
                    tree.inclusion_proof(index, size),
                    inclusion_proof(&all[..size], index)
                );
            }
            for first in [1, size / 2 + 1, size] {
                assert_eq!(
                    tree.consistency_proof(first, size),
                    consistency_proof(&all[..size], first)
                );
            }
        }
        assert_eq!(tree.root_at(71), None);
        assert_eq!(tree.inclusion_proof(3, 71), None);
        assert_eq!(tree.consistency_proof(0, 5), None);
    }

    #[test]
    fn a_truncated_tree_is_the_tree_of_its_first_leaves() {
        let all = leaves(40);
        for size in [0, 1, 2, 3, 16, 17, 31, 39] {
            let mut tree = Tree::new();
            all.iter().for_each(|l| tree.push(*l));
            tree.truncate(size);
            assert_eq!(tree.size(), size);
            assert_eq!(tree.root_at(size), Some(root(&all[..size])), "size {size}");
            // And it grows on as a tree that never held the cut leaves.
            tree.push(all[size]);
            assert_eq!(
                tree.root_at(size + 1),
                Some(root(&all[..=size])),
                "size {size}"
            );
        }
    }
}
