//! Error measures and the tolerances they are held to, shared by every op's check cases
//! (the CLI's `check`, the test suites and the proptests).
//!
//! Error measure: `‖out − ref‖₂ / ‖ref‖₂` over all elements ([`relative_error`]), where `ref`
//! is the f64 CPU reference evaluated on the same (already rounded) inputs; sums whose terms
//! cancel are measured against the sizes of their terms instead ([`scaled_error`]). A NaN in
//! `out` where `ref` has none (or the reverse) is an infinite error, so unwritten
//! NaN-poisoned outputs always fail.
//!
//! Tolerances are written once, here, as a number of roundings of the element type plus
//! the f32 arithmetic of the kernel ([`rounding_tolerance`]). One rounding to nearest of
//! a value `x` to `p` significant bits moves it by at most `2^-p |x|` ([`unit_roundoff`]):
//! bf16 keeps 8 bits (2⁻⁸ ≈ 3.9e-3), f16 11 (2⁻¹¹ ≈ 4.9e-4), f32 24 (2⁻²⁴ ≈ 6.0e-8), so an
//! output rounded once from an exact value has a relative error of at most one unit
//! roundoff, element by element and therefore in the norm. Below the smallest normal
//! number (f16: 2⁻¹⁴ ≈ 6.1e-5) the spacing stops shrinking and a rounding moves a value by
//! up to half the smallest subnormal ([`underflow_step`]) whatever its size: the measures
//! add that absolute floor, `√n · underflow_step` for `n` elements, to the norm they divide by
//! ([`relative_error_in`]), so a tensor of tiny values is held to what its type can store.
//! Each op's `check.rs` states how many roundings its outputs take and why.

use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;

/// The largest relative error of one rounding to nearest into `dtype` (for normal numbers):
/// 2^-p for p significant bits.
pub const fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1.0 / (1u64 << 24) as f64,
        DType::BF16 => 1.0 / (1u64 << 8) as f64,
        DType::F16 => 1.0 / (1u64 << 11) as f64,
    }
}

/// The largest absolute error of one rounding into `dtype` below its normal range: half the
/// smallest subnormal (f32 and bf16: 2^-150 and 2^-134; f16: 2^-25).
pub fn underflow_step(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2f64.powi(-150),
        DType::BF16 => 2f64.powi(-134),
        DType::F16 => 2f64.powi(-25),
    }
}

/// A tolerance of `roundings` roundings of `dtype` plus `f32_arithmetic`, the relative error
/// the kernel's f32 arithmetic adds (exponentials, sums over a row or a sequence).
pub fn rounding_tolerance(dtype: DType, roundings: f64, f32_arithmetic: f64) -> f64 {
    roundings * unit_roundoff(dtype) + f32_arithmetic
}

/// One row of `check`: the worst error of an op's cases for one element type, and the
/// tolerance it is held to.
#[derive(Clone, Debug)]
pub struct CheckRow {
    /// The kernel or pass checked, as the table names it.
    pub kernel: &'static str,
    pub dtype: DType,
    /// How many random cases the row ran.
    pub cases: usize,
    pub worst: f64,
    pub tolerance: f64,
}

impl CheckRow {
    pub fn passed(&self) -> bool {
        self.worst <= self.tolerance
    }
}

/// `‖out − ref‖₂ / ‖ref‖₂`; infinite when NaNs do not line up; the absolute norm of
/// `out` when `ref` is all zeros.
pub fn relative_error(out: &[f64], reference: &[f64]) -> f64 {
    relative_error_floored(out, reference, 0.0)
}

/// [`relative_error`] of values stored as `dtype`: the reference's norm counts every element
/// as at least the smallest normal number of `dtype` (`√n · underflow_step / unit_roundoff`
/// is added to it), so that roundings below the normal range, which are absolute, are held
/// to what the type can store rather than to its relative precision.
pub fn relative_error_in(out: &[f64], reference: &[f64], dtype: DType) -> f64 {
    let floor = (out.len() as f64).sqrt() * underflow_step(dtype) / unit_roundoff(dtype);
    relative_error_floored(out, reference, floor)
}

fn relative_error_floored(out: &[f64], reference: &[f64], floor: f64) -> f64 {
    if out.len() != reference.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if o.is_nan() != r.is_nan() || o.is_infinite() != r.is_infinite() {
            return f64::INFINITY;
        }
        if r.is_nan() || (r.is_infinite() && o == r) {
            continue;
        }
        diff += (o - r) * (o - r);
        norm += r * r;
    }
    let norm = norm.sqrt() + floor;
    if norm == 0.0 {
        diff.sqrt()
    } else {
        diff.sqrt() / norm
    }
}

/// `‖out − ref‖₂ / ‖magnitude‖₂`, where `magnitude` is the reference computed over absolute
/// values of every term (the scale of a sum's rounding error): the error measure for GEMM
/// outputs, which plain relative error overstates when the terms cancel (a single output
/// summing hundreds of terms of size one to nearly zero). NaNs must line up as in
/// [`relative_error`].
pub fn scaled_error(out: &[f64], reference: &[f64], magnitude: &[f64]) -> f64 {
    if out.len() != reference.len() || out.len() != magnitude.len() {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for ((&o, &r), &m) in out.iter().zip(reference).zip(magnitude) {
        if o.is_nan() != r.is_nan() || o.is_infinite() != r.is_infinite() {
            return f64::INFINITY;
        }
        if r.is_nan() || r.is_infinite() {
            continue;
        }
        diff += (o - r) * (o - r);
        norm += m * m;
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// [`relative_error_in`] of a device or host tensor against its reference, in the tensor's
/// element type.
pub fn tensor_error(t: &Tensor, reference: &[f64]) -> Result<f64> {
    Ok(relative_error_in(&t.to_f64_vec()?, reference, t.dtype()))
}

/// [`tensor_error`] of an optional gradient: 0 when both are absent, infinite when only one is.
pub fn optional_error(t: &Option<Tensor>, reference: &Option<Vec<f64>>) -> Result<f64> {
    match (t, reference) {
        (Some(t), Some(r)) => tensor_error(t, r),
        (None, None) => Ok(0.0),
        _ => Ok(f64::INFINITY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::tensor::Tensor;

    /// One rounding into each type, of values spread over its whole range (subnormals, normal
    /// numbers, values near the largest finite), measured as the checks measure a tensor:
    /// never above one unit roundoff, over 1000 seeds. This is why a correct build's
    /// `check --device cpu` (which measures only output rounding) cannot fail any row, whose
    /// tolerances are two roundings or more.
    #[test]
    fn one_rounding_stays_within_one_unit_roundoff_over_1000_seeds() {
        for seed in 0..1000u64 {
            let mut rng = Rng::new(seed);
            for dtype in DType::ALL {
                let n = 1 + rng.below(64);
                let (lo, hi) = match dtype {
                    DType::F16 => (-30.0, 15.0),
                    DType::BF16 => (-140.0, 127.0),
                    DType::F32 => (-150.0, 127.0),
                };
                // A common scale per tensor (so whole tensors of tiny values occur), spread by
                // up to 2^8 between elements, random signs.
                let scale = rng.uniform(lo, hi);
                let exact: Vec<f64> = (0..n)
                    .map(|_| {
                        let sign = if rng.below(2) == 0 { -1.0 } else { 1.0 };
                        sign * 2f64.powf((scale + rng.uniform(-8.0, 0.0)).min(hi))
                    })
                    .collect();
                let as_f32: Vec<f32> = exact.iter().map(|&v| v as f32).collect();
                // The reference is exact where f32 holds it; the rounding under test is to dtype.
                let reference: Vec<f64> = as_f32.iter().map(|&v| f64::from(v)).collect();
                let t = Tensor::from_f32(&as_f32, &[n], dtype, &crate::device::Device::Cpu).unwrap();
                let err = relative_error_in(&t.to_f64_vec().unwrap(), &reference, dtype);
                assert!(
                    err <= unit_roundoff(dtype),
                    "seed {seed} {dtype}: {err:e} > {:e} (scale 2^{scale:.1})",
                    unit_roundoff(dtype)
                );
            }
        }
    }

    #[test]
    fn the_underflow_floor_only_matters_below_the_normal_range() {
        let reference = [1.0, -2.0, 0.5];
        let out = [1.0 + 1e-3, -2.0, 0.5];
        let plain = relative_error(&out, &reference);
        assert!((relative_error_in(&out, &reference, DType::F16) - plain).abs() < 1e-4 * plain);
        // Tiny values: an absolute error of half the smallest f16 subnormal is within one
        // rounding there, however large relative to the values.
        let tiny = [3e-7, -1e-7];
        let off = [3e-7 + 2f64.powi(-25), -1e-7];
        assert!(relative_error(&off, &tiny) > 0.09);
        assert!(relative_error_in(&off, &tiny, DType::F16) <= unit_roundoff(DType::F16));
        assert!(rounding_tolerance(DType::BF16, 2.0, 0.0) == 2.0 / 256.0);
    }
}
