//! Index spaces: the algebra that tracks which positions of which tensors are the same channel.
//!
//! Every tensor dimension is one space. Two dimensions that must be cut together (the output rows
//! of a projection and the input columns of its consumer) are *unified*, a union-find merge that
//! means "index i here is index i there". A space can be *refined*: a reshape of 4096 into 32×128
//! refines it into a `Product` of a 32-space (heads) and a 128-space (within a head); a slice or a
//! split refines it into a `Concat` of segments (q | k | v of a fused projection). Refinements are
//! kept on the union-find root, and unifying two refined spaces aligns their parts, so structure
//! discovered anywhere in the graph reaches every tensor that shares the space.
//!
//! A space that must never be cut (indexed by token ids, normalised by a softmax, fixed by an
//! attention scale, produced by an op without a rule) is *pinned*, with the reason.

use std::collections::BTreeSet;

pub type SpaceId = usize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refinement {
    /// Row-major product: index = Σ i_k · Π sizes after k.
    Product(Vec<SpaceId>),
    /// Consecutive segments.
    Concat(Vec<SpaceId>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tag {
    QueryHeads,
    KvHeads,
    Hidden,
    /// Created by `expand`/`repeat`: the same data seen several times (GQA's query heads per KV head).
    Broadcast,
    /// Picked by a router's top-k indices (`gate_up_proj[top_k_index]`): the experts of an MoE layer.
    Experts,
}

#[derive(Debug, Clone)]
struct Space {
    parent: SpaceId,
    size: u64,
    refinement: Option<Refinement>,
    pinned: Option<String>,
    tags: BTreeSet<Tag>,
    notes: BTreeSet<String>,
}

#[derive(Debug, Default, Clone)]
pub struct Spaces {
    spaces: Vec<Space>,
}

/// Where one leaf space sits inside a dimension: index in the dimension =
/// `offset + unit · stride + Σ j_k · free_k.1` for `j_k < free_k.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occurrence {
    pub root: SpaceId,
    pub offset: u64,
    pub stride: u64,
    pub free: Vec<(u64, u64)>,
    /// Reason inherited from a pinned enclosing space.
    pub pinned_by_parent: Option<String>,
}

impl Spaces {
    pub fn fresh(&mut self, size: u64) -> SpaceId {
        let id = self.spaces.len();
        self.spaces.push(Space { parent: id, size, refinement: None, pinned: None, tags: BTreeSet::new(), notes: BTreeSet::new() });
        id
    }

    pub fn fresh_refined(&mut self, refinement: Refinement) -> SpaceId {
        let size = match &refinement {
            Refinement::Product(parts) => parts.iter().map(|&p| self.size(p)).product(),
            Refinement::Concat(parts) => parts.iter().map(|&p| self.size(p)).sum(),
        };
        let id = self.fresh(size);
        self.spaces[id].refinement = Some(refinement);
        id
    }

    pub fn find(&mut self, id: SpaceId) -> SpaceId {
        let mut root = id;
        while self.spaces[root].parent != root {
            root = self.spaces[root].parent;
        }
        let mut node = id;
        while self.spaces[node].parent != root {
            let next = self.spaces[node].parent;
            self.spaces[node].parent = root;
            node = next;
        }
        root
    }

    pub fn size(&self, id: SpaceId) -> u64 {
        self.spaces[id].size
    }

    pub fn refinement(&mut self, id: SpaceId) -> Option<Refinement> {
        let root = self.find(id);
        self.spaces[root].refinement.clone()
    }

    pub fn pin(&mut self, id: SpaceId, reason: &str) {
        let root = self.find(id);
        if self.spaces[root].size > 1 && self.spaces[root].pinned.is_none() {
            self.spaces[root].pinned = Some(reason.to_owned());
        }
    }

    pub fn pinned(&mut self, id: SpaceId) -> Option<String> {
        let root = self.find(id);
        self.spaces[root].pinned.clone()
    }

    pub fn tag(&mut self, id: SpaceId, tag: Tag) {
        let root = self.find(id);
        self.spaces[root].tags.insert(tag);
    }

    pub fn tags(&mut self, id: SpaceId) -> BTreeSet<Tag> {
        let root = self.find(id);
        self.spaces[root].tags.clone()
    }

    pub fn note(&mut self, id: SpaceId, note: String) {
        let root = self.find(id);
        self.spaces[root].notes.insert(note);
    }

    pub fn notes(&mut self, id: SpaceId) -> BTreeSet<String> {
        let root = self.find(id);
        self.spaces[root].notes.clone()
    }

    /// Pins a space and everything it is made of.
    pub fn pin_deep(&mut self, id: SpaceId, reason: &str) {
        self.pin(id, reason);
        match self.refinement(id) {
            Some(Refinement::Product(parts)) | Some(Refinement::Concat(parts)) => {
                for part in parts {
                    self.pin_deep(part, reason);
                }
            }
            None => {}
        }
    }

    /// Declares that index i of `a` is index i of `b`. Returns false (and pins both) when their
    /// structures cannot be aligned, so an unrepresentable coupling is never silently dropped.
    pub fn unify(&mut self, a: SpaceId, b: SpaceId, context: &str) -> bool {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return true;
        }
        if self.spaces[ra].size != self.spaces[rb].size {
            let reason = format!("{context}: sizes {} and {} cannot be matched", self.spaces[ra].size, self.spaces[rb].size);
            self.pin_deep(ra, &reason);
            self.pin_deep(rb, &reason);
            return false;
        }
        let refinement_a = self.spaces[ra].refinement.take();
        let refinement_b = self.spaces[rb].refinement.take();
        self.spaces[rb].parent = ra;
        let moved = std::mem::take(&mut self.spaces[rb].tags);
        self.spaces[ra].tags.extend(moved);
        let moved = std::mem::take(&mut self.spaces[rb].notes);
        self.spaces[ra].notes.extend(moved);
        if self.spaces[ra].pinned.is_none() {
            self.spaces[ra].pinned = self.spaces[rb].pinned.take();
        }
        match (refinement_a, refinement_b) {
            (None, None) => true,
            (Some(r), None) | (None, Some(r)) => {
                self.spaces[ra].refinement = Some(r);
                true
            }
            (Some(x), Some(y)) => {
                self.spaces[ra].refinement = Some(x.clone());
                let aligned = match (x, y) {
                    (Refinement::Product(p), Refinement::Product(q)) => self.align(p, q, true, context),
                    (Refinement::Concat(p), Refinement::Concat(q)) => self.align(p, q, false, context),
                    _ => false,
                };
                if !aligned {
                    self.pin_deep(ra, &format!("{context}: a reshape and a slice of the same dimension do not line up"));
                }
                aligned
            }
        }
    }

    /// Unifies two equal-sized sequences of parts, splitting parts where their boundaries differ.
    fn align(&mut self, mut left: Vec<SpaceId>, mut right: Vec<SpaceId>, product: bool, context: &str) -> bool {
        left.reverse();
        right.reverse();
        loop {
            let (a, b) = match (left.pop(), right.pop()) {
                (None, None) => return true,
                (Some(a), Some(b)) => (a, b),
                _ => return false,
            };
            let (sa, sb) = (self.size(self.find_const(a)), self.size(self.find_const(b)));
            if sa == sb {
                if !self.unify(a, b, context) {
                    return false;
                }
                continue;
            }
            let (big, small_size, big_is_left) = if sa > sb { (a, sb, true) } else { (b, sa, false) };
            let Some((head, tail)) = self.split_front(big, small_size, product) else { return false };
            let (small, stack_big, stack_small) = if big_is_left { (b, &mut left, &mut right) } else { (a, &mut right, &mut left) };
            stack_big.push(tail);
            stack_small.push(small);
            stack_big.push(head);
        }
    }

    fn find_const(&self, id: SpaceId) -> SpaceId {
        let mut root = id;
        while self.spaces[root].parent != root {
            root = self.spaces[root].parent;
        }
        root
    }

    /// Splits `id` into a front part of `front` (outer factor, or first segment) and the rest.
    pub fn split_front(&mut self, id: SpaceId, front: u64, product: bool) -> Option<(SpaceId, SpaceId)> {
        let root = self.find(id);
        let size = self.size(root);
        if front == 0 || front >= size || (product && !size.is_multiple_of(front)) {
            return None;
        }
        match self.refinement(root) {
            None => {
                let head = self.fresh(front);
                let tail = self.fresh(if product { size / front } else { size - front });
                self.spaces[root].refinement =
                    Some(if product { Refinement::Product(vec![head, tail]) } else { Refinement::Concat(vec![head, tail]) });
                Some((head, tail))
            }
            Some(Refinement::Product(parts)) if product => self.split_parts(parts, front, true),
            Some(Refinement::Concat(parts)) if !product => self.split_parts(parts, front, false),
            Some(_) => None,
        }
    }

    /// Splits an existing list of parts at `front`, returning the two sides as spaces.
    fn split_parts(&mut self, parts: Vec<SpaceId>, front: u64, product: bool) -> Option<(SpaceId, SpaceId)> {
        let mut taken = Vec::new();
        let mut acc: u64 = if product { 1 } else { 0 };
        let mut rest = parts.into_iter();
        for part in rest.by_ref() {
            let s = self.size(self.find_const(part));
            let next = if product { acc * s } else { acc + s };
            if next <= front {
                taken.push(part);
                acc = next;
                if acc == front {
                    break;
                }
            } else {
                let remaining = if product {
                    if !front.is_multiple_of(acc) {
                        return None;
                    }
                    front / acc
                } else {
                    front - acc
                };
                let (head, tail) = self.split_front(part, remaining, product)?;
                taken.push(head);
                let mut others = vec![tail];
                others.extend(rest);
                return Some((self.group(taken, product), self.group(others, product)));
            }
        }
        let others: Vec<SpaceId> = rest.collect();
        if others.is_empty() {
            return None;
        }
        Some((self.group(taken, product), self.group(others, product)))
    }

    fn group(&mut self, parts: Vec<SpaceId>, product: bool) -> SpaceId {
        if parts.len() == 1 {
            return parts[0];
        }
        self.fresh_refined(if product { Refinement::Product(parts) } else { Refinement::Concat(parts) })
    }

    /// The segment `[start, end)` of `id` as a space, refining `id` into segments as needed.
    /// `None` when the cut points fall inside a product's inner factors.
    pub fn segment(&mut self, id: SpaceId, start: u64, end: u64) -> Option<SpaceId> {
        let size = self.size(self.find_const(id));
        if start == 0 && end == size {
            return Some(id);
        }
        if start >= end || end > size {
            return None;
        }
        if let Some(Refinement::Product(parts)) = self.refinement(id) {
            let outer = parts[0];
            let stride = size / self.size(self.find_const(outer));
            if !start.is_multiple_of(stride) || !end.is_multiple_of(stride) {
                return None;
            }
            let outer_segment = self.segment(outer, start / stride, end / stride)?;
            let mut new_parts = vec![outer_segment];
            new_parts.extend_from_slice(&parts[1..]);
            return Some(self.fresh_refined(Refinement::Product(new_parts)));
        }
        let rest = if start > 0 { self.split_front(id, start, false)?.1 } else { id };
        if end - start == self.size(self.find_const(rest)) {
            return Some(rest);
        }
        Some(self.split_front(rest, end - start, false)?.0)
    }

    /// Every leaf of `id`'s refinement tree with its index expression inside `id`.
    pub fn occurrences(&mut self, id: SpaceId) -> Vec<Occurrence> {
        let mut out = Vec::new();
        self.collect(id, 0, 1, &mut Vec::new(), None, &mut out);
        out
    }

    fn collect(
        &mut self,
        id: SpaceId,
        offset: u64,
        stride: u64,
        free: &mut Vec<(u64, u64)>,
        pinned_above: Option<String>,
        out: &mut Vec<Occurrence>,
    ) {
        let root = self.find(id);
        let pinned_here = pinned_above.clone().or_else(|| self.spaces[root].pinned.clone());
        match self.spaces[root].refinement.clone() {
            None => out.push(Occurrence { root, offset, stride, free: free.clone(), pinned_by_parent: pinned_above }),
            Some(Refinement::Product(parts)) => {
                let sizes: Vec<u64> = parts.iter().map(|&p| self.size(self.find_const(p))).collect();
                let strides: Vec<u64> = (0..parts.len()).map(|k| stride * sizes[k + 1..].iter().product::<u64>()).collect();
                for (k, &part) in parts.iter().enumerate() {
                    let before = free.len();
                    for j in (0..parts.len()).filter(|&j| j != k && sizes[j] > 1) {
                        free.push((sizes[j], strides[j]));
                    }
                    self.collect(part, offset, strides[k], free, pinned_here.clone(), out);
                    free.truncate(before);
                }
            }
            Some(Refinement::Concat(parts)) => {
                let mut start = 0;
                for part in parts {
                    let part_size = self.size(self.find_const(part));
                    self.collect(part, offset + start * stride, stride, free, pinned_here.clone(), out);
                    start += part_size;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All indices of the containing dimension that belong to unit `u` of an occurrence.
    fn indices(o: &Occurrence, u: u64) -> Vec<u64> {
        let mut out = vec![o.offset + u * o.stride];
        for &(count, stride) in &o.free {
            out = out.iter().flat_map(|&base| (0..count).map(move |j| base + j * stride)).collect();
        }
        out.sort();
        out
    }

    #[test]
    fn gqa_heads_align_into_groups_and_repeats() {
        let mut s = Spaces::default();
        // q rows: 4 heads × 3 dims; k rows: 2 kv heads × 3 dims, repeated twice per kv head.
        let q = s.fresh(12);
        let (q_heads, _q_dim) = s.split_front(q, 4, true).unwrap();
        let kv = s.fresh(2);
        let rep = s.fresh(2);
        s.tag(rep, Tag::Broadcast);
        let k_heads = s.fresh_refined(Refinement::Product(vec![kv, rep]));
        assert!(s.unify(q_heads, k_heads, "attention"));
        let occurrences = s.occurrences(q);
        let group = occurrences.iter().find(|o| s.find_const(o.root) == s.find_const(kv)).unwrap();
        assert_eq!(indices(group, 1), vec![6, 7, 8, 9, 10, 11]);
        let repeat = occurrences.iter().find(|o| s.find_const(o.root) == s.find_const(rep)).unwrap();
        assert_eq!(indices(repeat, 1), vec![3, 4, 5, 9, 10, 11]);
    }

    #[test]
    fn slices_of_a_fused_projection_become_segments() {
        let mut s = Spaces::default();
        let fused = s.fresh(10);
        let q = s.segment(fused, 0, 4).unwrap();
        let k = s.segment(fused, 4, 7).unwrap();
        let v = s.segment(fused, 7, 10).unwrap();
        assert_eq!((s.size(q), s.size(k), s.size(v)), (4, 3, 3));
        let occurrences = s.occurrences(fused);
        assert_eq!(occurrences.len(), 3);
        let k_occurrence = occurrences.iter().find(|o| o.root == s.find_const(k)).unwrap();
        assert_eq!(indices(k_occurrence, 2), vec![6]);
    }

    #[test]
    fn unified_halves_couple_rows_of_a_fused_gate_up() {
        let mut s = Spaces::default();
        let gate_up = s.fresh(8);
        let gate = s.segment(gate_up, 0, 4).unwrap();
        let up = s.segment(gate_up, 4, 8).unwrap();
        assert!(s.unify(gate, up, "mul"));
        let occurrences = s.occurrences(gate_up);
        assert_eq!(occurrences.len(), 2);
        assert!(occurrences.iter().all(|o| o.root == occurrences[0].root));
        let rows: Vec<u64> = occurrences.iter().flat_map(|o| indices(o, 1)).collect();
        assert_eq!(rows, vec![1, 5]);
    }

    #[test]
    fn mismatched_structure_pins_instead_of_guessing() {
        let mut s = Spaces::default();
        let a = s.fresh(6);
        s.split_front(a, 2, true).unwrap();
        let b = s.fresh(6);
        s.split_front(b, 2, false).unwrap();
        assert!(!s.unify(a, b, "op"));
        assert!(s.pinned(a).is_some());
        assert!(s.occurrences(a).iter().all(|o| o.pinned_by_parent.is_some() || s.pinned(o.root).is_some()));
    }

    #[test]
    fn nested_products_align_by_splitting() {
        let mut s = Spaces::default();
        let x = s.fresh(24);
        let (x_outer, _x_inner) = s.split_front(x, 6, true).unwrap(); // 6 × 4
        let y = s.fresh(24);
        let (y_a, y_rest) = s.split_front(y, 2, true).unwrap(); // 2 × 12
        let (_y_b, _y_c) = s.split_front(y_rest, 3, true).unwrap(); // 2 × 3 × 4
        assert!(s.unify(x, y, "view"));
        assert_eq!(s.refinement(x_outer).map(|r| matches!(r, Refinement::Product(_))), Some(true));
        let first = s.occurrences(x).into_iter().find(|o| o.root == s.find_const(y_a)).unwrap();
        assert_eq!(first.stride, 12);
    }
}
