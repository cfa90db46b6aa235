//! f64 reference for the B-spline basis, also the CPU backend of the public functions.
//!
//! It follows efficient-kan's `b_splines` literally: the order-0 indicators of all
//! `n_knots - 1` intervals, raised one order at a time over the whole knot vector. The
//! GPU kernel instead evaluates each basis on its own local triangle, so agreement
//! between the two checks the indexing of both.

use super::{BasisDims, BasisKind, KnotGrid};
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::tensor::{HostData, Tensor};
use half::{bf16, f16};

/// `num / den`, or 0 for a zero-width span (where efficient-kan would produce 0/0).
fn span_ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// The B-splines of order `level` on `knots` at `x`, for every start knot
/// (`knots.len() - 1 - level` values). `x` must lie in `[knots[0], knots[last])`.
fn bases_of_order(x: f64, knots: &[f64], level: usize) -> Vec<f64> {
    let t = knots;
    let mut n: Vec<f64> = t.windows(2).map(|w| if x >= w[0] && x < w[1] { 1.0 } else { 0.0 }).collect();
    for d in 1..=level {
        for a in 0..t.len() - 1 - d {
            n[a] = span_ratio(x - t[a], t[a + d] - t[a]) * n[a]
                + span_ratio(t[a + d + 1] - x, t[a + d + 1] - t[a + 1]) * n[a + 1];
        }
        n.pop();
    }
    n
}

/// The bases of order `order` at `x` that can be non-zero, as `(first, values)`: `values[i]`
/// is `B_{first + i}(x)`. The same recurrence as [`basis_values`] on the knots around `x`'s
/// interval only (the values agree bit for bit), so it costs O(order^2) after a binary search
/// whatever the number of knots. `None` outside `[t_0, t_last)` and for NaN.
pub fn nonzero_bases(x: f64, knots: &[f64], order: usize) -> Option<(usize, Vec<f64>)> {
    let last = knots.len().checked_sub(1)?;
    if last <= order || !(x >= knots[0] && x < knots[last]) {
        return None;
    }
    let s = knots.partition_point(|&t| t <= x) - 1; // t_s <= x < t_{s+1}
    let lo = s.saturating_sub(order);
    let hi = (s + order + 1).min(last);
    Some((lo, bases_of_order(x, &knots[lo..=hi], order)))
}

/// Writes `B_j(x)` for `j = 0..knots.len() - 1 - order` into `out`.
pub fn basis_values(x: f64, knots: &[f64], order: usize, out: &mut [f64]) {
    debug_assert_eq!(out.len(), knots.len() - 1 - order);
    if x.is_nan() {
        out.fill(f64::NAN);
    } else if !(x >= knots[0] && x < knots[knots.len() - 1]) {
        out.fill(0.0);
    } else {
        out.copy_from_slice(&bases_of_order(x, knots, order));
    }
}

/// Writes `dB_j/dx (x) = k (B_{j,k-1} / (t_{j+k} - t_j) - B_{j+1,k-1} / (t_{j+k+1} - t_{j+1}))`.
pub fn basis_derivatives(x: f64, knots: &[f64], order: usize, out: &mut [f64]) {
    debug_assert_eq!(out.len(), knots.len() - 1 - order);
    if x.is_nan() {
        out.fill(f64::NAN);
    } else if order == 0 || !(x >= knots[0] && x < knots[knots.len() - 1]) {
        out.fill(0.0);
    } else {
        let (k, t) = (order, knots);
        let lower = bases_of_order(x, knots, k - 1);
        for (j, o) in out.iter_mut().enumerate() {
            *o = k as f64 * (span_ratio(lower[j], t[j + k] - t[j]) - span_ratio(lower[j + 1], t[j + k + 1] - t[j + 1]));
        }
    }
}

/// The whole op on host tensors, rows split across threads.
pub(super) fn evaluate(
    kind: BasisKind,
    x: &Tensor,
    grid: &KnotGrid,
    dims: BasisDims,
    out_shape: Vec<usize>,
) -> Result<Tensor> {
    let xs = x.to_f64_vec()?;
    let knots = grid.knots().to_f64_vec()?;
    let data = match x.dtype() {
        DType::F32 => HostData::F32(fill::<f32>(kind, &xs, &knots, dims)),
        DType::BF16 => HostData::BF16(fill::<bf16>(kind, &xs, &knots, dims)),
        DType::F16 => HostData::F16(fill::<f16>(kind, &xs, &knots, dims)),
    };
    Ok(Tensor::from_host(out_shape, data))
}

/// f64 values of the op for every row, without rounding to a storage type.
pub fn evaluate_f64(kind: BasisKind, xs: &[f64], knots: &[f64], n_knots: usize, order: usize) -> Vec<f64> {
    let in_features = knots.len() / n_knots;
    let dims = BasisDims { rows: xs.len(), in_features, n_knots, n_bases: n_knots - 1 - order, order };
    let mut out = vec![0.0f64; dims.rows * dims.n_bases];
    for_rows(kind, xs, knots, dims, &mut out, |v| v);
    out
}

fn fill<T: Element>(kind: BasisKind, xs: &[f64], knots: &[f64], dims: BasisDims) -> Vec<T> {
    let mut out = vec![T::default(); dims.rows * dims.n_bases];
    for_rows(kind, xs, knots, dims, &mut out, T::from_f64);
    out
}

fn for_rows<T: Send>(
    kind: BasisKind,
    xs: &[f64],
    knots: &[f64],
    dims: BasisDims,
    out: &mut [T],
    convert: impl Fn(f64) -> T + Sync,
) {
    let nb = dims.n_bases;
    if nb == 0 || xs.is_empty() {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(xs.len().div_ceil(4096)).max(1);
    let rows_per_thread = xs.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (chunk, out_chunk) in out.chunks_mut(rows_per_thread * nb).enumerate() {
            let convert = &convert;
            s.spawn(move || {
                let mut row_vals = vec![0.0f64; nb];
                for (r, o) in out_chunk.chunks_exact_mut(nb).enumerate() {
                    let row = chunk * rows_per_thread + r;
                    let f = row % dims.in_features;
                    let t = &knots[f * dims.n_knots..(f + 1) * dims.n_knots];
                    match kind {
                        BasisKind::Value => basis_values(xs[row], t, dims.order, &mut row_vals),
                        BasisKind::Derivative => basis_derivatives(xs[row], t, dims.order, &mut row_vals),
                    }
                    for (dst, &v) in o.iter_mut().zip(&row_vals) {
                        *dst = convert(v);
                    }
                }
            });
        }
    });
}
