//! Turning a cut of a row-major tensor into the byte ranges to copy.
//!
//! Kept indices are strictly increasing along every dimension, so walking the output in row-major
//! order visits the source at strictly increasing offsets: a cut tensor is a forward scan over its
//! source bytes. That is what lets the engine read each source byte at most once, skip removed rows,
//! and stream any tensor through a fixed buffer.

use std::ops::Range;

use crate::plan::{KeepList, OutputTensor};

/// A contiguous byte range of the source tensor, relative to the tensor's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
}

/// The source indices visited along one dimension, in output order.
#[derive(Debug, Clone)]
enum Axis {
    Range { start: u64, len: u64 },
    Kept { list: KeepList, start: usize, len: usize },
}

impl Axis {
    fn new(keep: &Option<KeepList>, size: u64, rows: Option<&Range<u64>>) -> Axis {
        let (start, len) = match (keep, rows) {
            (_, Some(r)) => (r.start, r.end - r.start),
            (Some(list), None) => (0, list.len() as u64),
            (None, None) => (0, size),
        };
        match keep {
            Some(list) => Axis::Kept { list: list.clone(), start: start as usize, len: len as usize },
            None => Axis::Range { start, len },
        }
    }

    fn len(&self) -> u64 {
        match self {
            Axis::Range { len, .. } => *len,
            Axis::Kept { len, .. } => *len as u64,
        }
    }

    fn index(&self, i: u64) -> u64 {
        match self {
            Axis::Range { start, .. } => start + i,
            Axis::Kept { list, start, .. } => list[*start + i as usize],
        }
    }
}

/// The source bytes of one output tensor over a range of its output rows (dimension 0): one base
/// offset per position of the outer dimensions, in increasing order, and the same runs relative to
/// every base. A column cut is the runs of one row repeated; a row cut is one run (a whole row
/// slice) per kept row, and neighbouring rows' runs join.
pub struct Pattern {
    outer: Vec<Axis>,
    outer_strides: Vec<u64>,
    runs: Vec<Segment>,
    /// Whether the runs of neighbouring positions can touch: they span the whole stride of the
    /// last outer dimension (a row cut, an uncut tensor), so coalescing across positions pays.
    joins: bool,
}

impl Pattern {
    /// `rows` is a range of output indices along dimension 0; it is ignored for 0-d tensors.
    pub fn new(t: &OutputTensor, rows: Range<u64>) -> Pattern {
        let shape = &t.source_shape;
        let Some(last_cut) = t.keep.iter().rposition(Option::is_some) else {
            // Uncut: the rows' bytes in one piece (computed in bits: a row of a packed sub-byte
            // dtype need not be whole bytes, a range of rows the engine asks for always is).
            let (offset, len) = t.row_span(&rows);
            return Pattern::from_parts(Vec::new(), Vec::new(), vec![Segment { offset, len }], true);
        };
        // Strides in bits, then bytes: plans cut a packed sub-byte dtype only along dimensions whose
        // slices are whole bytes, and the strides of the dimensions before a cut one are multiples
        // of its slice, so every stride used here is whole bytes.
        let bits = u128::from(t.dtype.bits());
        let mut stride_bits = vec![bits; shape.len()];
        for d in (0..shape.len() - 1).rev() {
            stride_bits[d] = stride_bits[d + 1].saturating_mul(u128::from(shape[d + 1]));
        }
        debug_assert!(stride_bits[..=last_cut].iter().all(|b| b % 8 == 0), "a cut through a byte");
        let strides: Vec<u64> = stride_bits.iter().map(|b| (b / 8).min(u128::from(u64::MAX)) as u64).collect();
        let axes: Vec<Axis> = (0..=last_cut).map(|d| Axis::new(&t.keep[d], shape[d], (d == 0).then_some(&rows))).collect();
        if last_cut == 0 {
            // Rows are the positions, each one run: a list of runs would grow with the rows asked for.
            let run = Segment { offset: 0, len: strides[0] };
            return Pattern::from_parts(axes, strides[..1].to_vec(), vec![run], true);
        }
        let inner = &axes[last_cut];
        let block = strides[last_cut];
        let mut runs: Vec<Segment> = Vec::new();
        for i in 0..inner.len() {
            let offset = inner.index(i) * block;
            match runs.last_mut() {
                Some(run) if run.offset + run.len == offset => run.len += block,
                _ => runs.push(Segment { offset, len: block }),
            }
        }
        let joins = runs.len() == 1 && runs[0].len == strides[last_cut - 1];
        let outer = axes[..last_cut].to_vec();
        Pattern::from_parts(outer, strides[..last_cut].to_vec(), runs, joins)
    }

    fn from_parts(outer: Vec<Axis>, outer_strides: Vec<u64>, mut runs: Vec<Segment>, joins: bool) -> Pattern {
        runs.retain(|run| run.len > 0);
        if outer.iter().any(|a| a.len() == 0) {
            runs.clear();
        }
        Pattern { outer, outer_strides, runs, joins }
    }

    /// The runs of one position, relative to its base, in increasing order (none when the range
    /// holds no bytes).
    pub fn runs(&self) -> &[Segment] {
        &self.runs
    }

    pub fn joins(&self) -> bool {
        self.joins
    }

    /// The base offsets of the positions, in increasing order.
    pub fn bases(&self) -> Bases<'_> {
        Bases { outer: &self.outer, strides: &self.outer_strides, counter: vec![0; self.outer.len()], done: self.runs.is_empty() }
    }

    /// One past the last source byte of the range (0 when it has none).
    pub fn end(&self) -> u64 {
        let Some(last) = self.runs.last() else { return 0 };
        let base: u64 = self.outer.iter().zip(&self.outer_strides).map(|(axis, stride)| axis.index(axis.len() - 1) * stride).sum();
        base + last.offset + last.len
    }

    /// Every source range, in increasing order, neighbours coalesced.
    pub fn segments(&self) -> SegmentIter<'_> {
        SegmentIter { bases: self.bases(), runs: &self.runs, base: 0, run_pos: self.runs.len(), pending: None }
    }
}

/// The odometer over the outer dimensions of a [`Pattern`].
#[derive(Clone)]
pub struct Bases<'a> {
    outer: &'a [Axis],
    strides: &'a [u64],
    counter: Vec<u64>,
    done: bool,
}

impl Iterator for Bases<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.done {
            return None;
        }
        let base = self.counter.iter().zip(self.outer).zip(self.strides).map(|((&c, axis), stride)| axis.index(c) * stride).sum();
        self.done = true;
        for d in (0..self.counter.len()).rev() {
            self.counter[d] += 1;
            if self.counter[d] < self.outer[d].len() {
                self.done = false;
                break;
            }
            self.counter[d] = 0;
        }
        Some(base)
    }
}

/// The source ranges of a [`Pattern`], in increasing offset order with neighbours coalesced.
pub struct SegmentIter<'a> {
    bases: Bases<'a>,
    runs: &'a [Segment],
    base: u64,
    run_pos: usize,
    pending: Option<Segment>,
}

impl SegmentIter<'_> {
    fn next_uncoalesced(&mut self) -> Option<Segment> {
        if self.run_pos == self.runs.len() {
            self.base = self.bases.next()?;
            self.run_pos = 0;
        }
        let run = self.runs[self.run_pos];
        self.run_pos += 1;
        Some(Segment { offset: self.base + run.offset, len: run.len })
    }
}

impl Iterator for SegmentIter<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        let mut current = match self.pending.take() {
            Some(segment) => segment,
            None => self.next_uncoalesced()?,
        };
        while let Some(next) = self.next_uncoalesced() {
            if next.offset == current.offset + current.len {
                current.len += next.len;
            } else {
                self.pending = Some(next);
                break;
            }
        }
        Some(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorRef;
    use crate::dtype::Dtype;
    use crate::plan::Data;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn output(shape: Vec<u64>, keep: Vec<Option<Vec<u64>>>) -> OutputTensor {
        let out_shape: Vec<u64> = shape.iter().zip(&keep).map(|(&s, k)| k.as_ref().map_or(s, |l| l.len() as u64)).collect();
        OutputTensor {
            name: "t".into(),
            data: Data::Stored(TensorRef { shard: 0, entry: 0 }),
            dtype: Dtype::I16,
            nbytes: out_shape.iter().product::<u64>() * 2,
            source_shape: shape,
            shape: out_shape,
            keep: keep.into_iter().map(|k| k.map(Arc::new)).collect(),
        }
    }

    /// Byte offsets of every kept element, by brute force over all source positions.
    fn reference_bytes(shape: &[u64], keep: &[Option<Vec<u64>>], rows: Range<u64>) -> Vec<u64> {
        let kept = |d: usize| -> Vec<u64> { keep[d].clone().unwrap_or_else(|| (0..shape[d]).collect()) };
        let mut positions: Vec<Vec<u64>> = vec![vec![]];
        for d in 0..shape.len() {
            let mut axis = kept(d);
            if d == 0 {
                axis = axis[rows.start as usize..rows.end as usize].to_vec();
            }
            positions = positions.into_iter().flat_map(|p| axis.iter().map(move |&i| [p.clone(), vec![i]].concat())).collect();
        }
        positions
            .into_iter()
            .flat_map(|p| {
                let flat = p.iter().zip(shape).fold(0u64, |acc, (&i, &s)| acc * s + i);
                [flat * 2, flat * 2 + 1]
            })
            .collect()
    }

    fn segment_bytes(pattern: &Pattern) -> Vec<u64> {
        let segments: Vec<Segment> = pattern.segments().collect();
        for pair in segments.windows(2) {
            assert!(pair[0].offset + pair[0].len < pair[1].offset, "not coalesced or not increasing: {pair:?}");
        }
        segments.iter().flat_map(|s| s.offset..s.offset + s.len).collect()
    }

    #[test]
    fn column_cut_gives_one_run_per_row() {
        let t = output(vec![3, 4], vec![None, Some(vec![1, 2])]);
        let segments: Vec<Segment> = Pattern::new(&t, 0..3).segments().collect();
        assert_eq!(segments, vec![Segment { offset: 2, len: 4 }, Segment { offset: 10, len: 4 }, Segment { offset: 18, len: 4 }]);
    }

    #[test]
    fn row_cut_coalesces_neighbouring_rows() {
        let t = output(vec![4, 2], vec![Some(vec![0, 1, 3]), None]);
        let segments: Vec<Segment> = Pattern::new(&t, 0..3).segments().collect();
        assert_eq!(segments, vec![Segment { offset: 0, len: 8 }, Segment { offset: 12, len: 4 }]);
    }

    fn cut_strategy() -> impl Strategy<Value = (Vec<u64>, Vec<Option<Vec<u64>>>, Range<u64>)> {
        proptest::collection::vec(0u64..5, 1..4)
            .prop_flat_map(|shape| {
                let keeps: Vec<_> = shape
                    .iter()
                    .map(|&s| proptest::option::of(proptest::sample::subsequence((0..s).collect::<Vec<_>>(), 0..=s as usize)))
                    .collect();
                (Just(shape), keeps)
            })
            .prop_flat_map(|(shape, keep)| {
                let rows = keep[0].as_ref().map_or(shape[0], |l| l.len() as u64);
                (Just(shape), Just(keep), (0..=rows).prop_flat_map(move |a| (Just(a), a..=rows)))
            })
            .prop_map(|(shape, keep, (a, b))| (shape, keep, a..b))
    }

    proptest! {
        #[test]
        fn segments_match_brute_force((shape, keep, rows) in cut_strategy()) {
            let t = output(shape.clone(), keep.clone());
            let pattern = Pattern::new(&t, rows.clone());
            let expected = reference_bytes(&shape, &keep, rows);
            prop_assert_eq!(segment_bytes(&pattern), expected.clone());
            // Bases × runs, what the column gather walks, visit the same bytes.
            let walked: Vec<u64> = pattern
                .bases()
                .flat_map(|base| pattern.runs().iter().flat_map(move |r| base + r.offset..base + r.offset + r.len))
                .collect();
            prop_assert_eq!(pattern.end(), expected.last().map_or(0, |last| last + 1));
            prop_assert_eq!(walked, expected);
        }
    }
}
