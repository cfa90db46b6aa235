//! The B-spline ops' bench shapes and rows.

use super::check::{random_inputs, random_knots, GridLayout};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::bspline::{self, BasisKind, KnotGrid};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_cuda, time_host, BenchContext, BenchRow, Repeats};

/// A standard B-spline benchmark shape.
#[derive(Clone, Copy, Debug)]
pub struct BasisShape {
    pub batch: usize,
    pub in_features: usize,
    pub grid_size: usize,
    pub order: usize,
}

/// The KAN layer shapes of the project's targets: 4096×1024 with G = 5 and 20, k = 3,
/// and the latency case 100×1000.
pub const BASIS_SHAPES: &[BasisShape] = &[
    BasisShape { batch: 4096, in_features: 1024, grid_size: 5, order: 3 },
    BasisShape { batch: 4096, in_features: 1024, grid_size: 20, order: 3 },
    BasisShape { batch: 100, in_features: 1000, grid_size: 5, order: 3 },
];

/// Arithmetic model for reporting TFLOP/s: each of the k + 1 non-zero bases of an
/// element costs k(k+1)/2 Cox–de Boor updates of 7 flops (2 sub, 2 div, 2 mul, 1 add);
/// the derivative stops one level lower and adds 5.
pub fn basis_flops(kind: BasisKind, rows: usize, order: usize) -> f64 {
    let k = order as f64;
    let levels = if kind == BasisKind::Value { k } else { (k - 1.0).max(0.0) };
    let per_basis = 7.0 * levels * (levels + 1.0) / 2.0 + if kind == BasisKind::Derivative { 5.0 } else { 0.0 };
    rows as f64 * (k + 1.0) * per_basis
}

/// Benchmarks one B-spline op at `shape` on `device`.
pub fn bench_basis(
    device: &Device,
    kind: BasisKind,
    dtype: DType,
    shape: BasisShape,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    let mut rng = Rng::new(0x5EED ^ shape.batch as u64);
    let n_knots = shape.grid_size + 2 * shape.order + 1;
    let knots = random_knots(&mut rng, shape.in_features, shape.grid_size, shape.order, GridLayout::Uniform);
    let grid =
        KnotGrid::from_knots(&Tensor::from_vec(knots.clone(), &[shape.in_features, n_knots], device)?, shape.order)?;
    let nb = grid.n_bases();
    let rows = shape.batch * shape.in_features;
    let set_bytes = (rows + rows * nb) * dtype.size_in_bytes();
    // Enough rotating sets that one pass over them is at least 4x a 50 MB L2.
    let sets = if device.is_cuda() { (200_000_000usize.div_ceil(set_bytes)).clamp(2, 64) } else { 1 };
    let mut xs = Vec::with_capacity(sets);
    let mut outs = Vec::with_capacity(sets);
    for _ in 0..sets {
        let x = random_inputs(&mut rng, shape.batch, &knots, n_knots);
        xs.push(Tensor::from_f32(&x, &[shape.batch, shape.in_features], dtype, device)?);
        outs.push(Tensor::full(f32::NAN, &[shape.batch, shape.in_features, nb], dtype, device)?);
    }
    let mut step = |i: usize| -> Result<()> {
        let s = i % sets;
        match kind {
            BasisKind::Value => bspline::bspline_basis_into(&xs[s], &grid, &mut outs[s]),
            BasisKind::Derivative => bspline::bspline_basis_derivative_into(&xs[s], &grid, &mut outs[s]),
        }
    };
    let timing = match device {
        Device::Cuda(dev) => time_cuda(dev, reps, step)?,
        Device::Cpu => time_host(Repeats { warmup: 1, iters: reps.iters.min(5) }, &mut step)?,
    };
    let op = match kind {
        BasisKind::Value => "bspline_basis",
        BasisKind::Derivative => "bspline_basis_derivative",
    };
    Ok(BenchRow {
        op: op.into(),
        dtype,
        shape: format!("{}x{} G={} k={}", shape.batch, shape.in_features, shape.grid_size, shape.order),
        device: device.to_string(),
        timing,
        bytes: (set_bytes + knots.len() * 4) as f64,
        flops: basis_flops(kind, rows, shape.order),
        copy_gbs,
        target_us: None,
        peak_extra_bytes: None,
    })
}

/// `bench basis`: both ops at every shape and dtype of the context (on the CPU, the batch
/// capped at 64: the f64 reference is slow at full size).
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for &shape in BASIS_SHAPES {
        let shape = if ctx.device.is_cuda() { shape } else { BasisShape { batch: shape.batch.min(64), ..shape } };
        for kind in [BasisKind::Value, BasisKind::Derivative] {
            for &dtype in ctx.dtypes() {
                rows.push(bench_basis(ctx.device, kind, dtype, shape, ctx.reps, ctx.copy_gbs)?);
            }
        }
    }
    Ok(rows)
}
