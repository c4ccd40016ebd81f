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

/// Source segments of one output tensor, restricted to a range of output rows (dimension 0), in
/// increasing offset order with neighbours coalesced.
pub struct SegmentIter {
    outer: Vec<Axis>,
    outer_strides: Vec<u64>,
    inner_runs: Vec<Segment>,
    counter: Vec<u64>,
    run_pos: usize,
    exhausted: bool,
    pending: Option<Segment>,
}

impl SegmentIter {
    /// `rows` is a range of output indices along dimension 0; it is ignored for 0-d tensors.
    pub fn new(t: &OutputTensor, rows: Range<u64>) -> SegmentIter {
        let shape = &t.source_shape;
        let Some(last_cut) = t.keep.iter().rposition(Option::is_some) else {
            // Uncut: the rows' bytes in one piece (computed in bits: a row of a packed sub-byte
            // dtype need not be whole bytes, a range of rows the engine asks for always is).
            let (offset, len) = t.row_span(&rows);
            return SegmentIter::from_parts(Vec::new(), Vec::new(), vec![Segment { offset, len }]);
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
        let axes: Vec<Axis> = (0..=last_cut)
            .map(|d| Axis::new(&t.keep[d], shape[d], (d == 0).then_some(&rows)))
            .collect();
        let inner = &axes[last_cut];
        let block = strides[last_cut];
        let mut inner_runs: Vec<Segment> = Vec::new();
        for i in 0..inner.len() {
            let offset = inner.index(i) * block;
            match inner_runs.last_mut() {
                Some(run) if run.offset + run.len == offset => run.len += block,
                _ => inner_runs.push(Segment { offset, len: block }),
            }
        }
        let outer = axes[..last_cut].to_vec();
        SegmentIter::from_parts(outer, strides[..last_cut].to_vec(), inner_runs)
    }

    fn from_parts(outer: Vec<Axis>, outer_strides: Vec<u64>, inner_runs: Vec<Segment>) -> SegmentIter {
        let exhausted = inner_runs.iter().all(|s| s.len == 0) || outer.iter().any(|a| a.len() == 0);
        SegmentIter {
            counter: vec![0; outer.len()],
            outer,
            outer_strides,
            inner_runs,
            run_pos: 0,
            exhausted,
            pending: None,
        }
    }

    fn outer_offset(&self) -> u64 {
        self.counter
            .iter()
            .zip(&self.outer)
            .zip(&self.outer_strides)
            .map(|((&c, axis), stride)| axis.index(c) * stride)
            .sum()
    }

    /// Steps the odometer over the outer dimensions; false once every position was visited.
    fn advance_outer(&mut self) -> bool {
        for d in (0..self.counter.len()).rev() {
            self.counter[d] += 1;
            if self.counter[d] < self.outer[d].len() {
                return true;
            }
            self.counter[d] = 0;
        }
        false
    }

    fn next_uncoalesced(&mut self) -> Option<Segment> {
        if self.exhausted {
            return None;
        }
        let base = self.outer_offset();
        let run = self.inner_runs[self.run_pos];
        self.run_pos += 1;
        if self.run_pos == self.inner_runs.len() {
            self.run_pos = 0;
            self.exhausted = !self.advance_outer();
        }
        Some(Segment { offset: base + run.offset, len: run.len })
    }
}

impl Iterator for SegmentIter {
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
        let out_shape: Vec<u64> =
            shape.iter().zip(&keep).map(|(&s, k)| k.as_ref().map_or(s, |l| l.len() as u64)).collect();
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
        let kept = |d: usize| -> Vec<u64> {
            keep[d].clone().unwrap_or_else(|| (0..shape[d]).collect())
        };
        let mut positions: Vec<Vec<u64>> = vec![vec![]];
        for d in 0..shape.len() {
            let mut axis = kept(d);
            if d == 0 {
                axis = axis[rows.start as usize..rows.end as usize].to_vec();
            }
            positions = positions
                .into_iter()
                .flat_map(|p| axis.iter().map(move |&i| [p.clone(), vec![i]].concat()))
                .collect();
        }
        positions
            .into_iter()
            .flat_map(|p| {
                let flat = p.iter().zip(shape).fold(0u64, |acc, (&i, &s)| acc * s + i);
                [flat * 2, flat * 2 + 1]
            })
            .collect()
    }

    fn segment_bytes(iter: SegmentIter) -> Vec<u64> {
        let segments: Vec<Segment> = iter.collect();
        for pair in segments.windows(2) {
            assert!(pair[0].offset + pair[0].len < pair[1].offset, "not coalesced or not increasing: {pair:?}");
        }
        segments.iter().flat_map(|s| s.offset..s.offset + s.len).collect()
    }

    #[test]
    fn column_cut_gives_one_run_per_row() {
        let t = output(vec![3, 4], vec![None, Some(vec![1, 2])]);
        let segments: Vec<Segment> = SegmentIter::new(&t, 0..3).collect();
        assert_eq!(
            segments,
            vec![
                Segment { offset: 2, len: 4 },
                Segment { offset: 10, len: 4 },
                Segment { offset: 18, len: 4 }
            ]
        );
    }

    #[test]
    fn row_cut_coalesces_neighbouring_rows() {
        let t = output(vec![4, 2], vec![Some(vec![0, 1, 3]), None]);
        let segments: Vec<Segment> = SegmentIter::new(&t, 0..3).collect();
        assert_eq!(segments, vec![Segment { offset: 0, len: 8 }, Segment { offset: 12, len: 4 }]);
    }

    fn cut_strategy() -> impl Strategy<Value = (Vec<u64>, Vec<Option<Vec<u64>>>, Range<u64>)> {
        proptest::collection::vec(0u64..5, 1..4)
            .prop_flat_map(|shape| {
                let keeps: Vec<_> = shape
                    .iter()
                    .map(|&s| {
                        proptest::option::of(proptest::sample::subsequence((0..s).collect::<Vec<_>>(), 0..=s as usize))
                    })
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
            let got = segment_bytes(SegmentIter::new(&t, rows.clone()));
            prop_assert_eq!(got, reference_bytes(&shape, &keep, rows));
        }
    }
}
