//! B-spline bases of a KAN layer's inputs, on the GPU when one is present, else on the CPU,
//! checked against the CPU reference.
//!
//! cargo run --release --example bspline_basis

use hybrid_kernels::check::relative_error;
use hybrid_kernels::ops::bspline::{bspline_basis, bspline_basis_derivative, KnotGrid};
use hybrid_kernels::{DType, Device, Tensor};

fn main() -> hybrid_kernels::Result<()> {
    let (device, why) = Device::cuda_or_cpu();
    if let Some(why) = why {
        println!("running on the CPU: {why}");
    }
    let (batch, in_features, grid_size, order) = (256, 64, 5, 3);
    // efficient-kan's default grid: 5 intervals on [-1, 1], cubic splines.
    let grid = KnotGrid::uniform(in_features, grid_size, order, (-1.0, 1.0), &device)?;
    let x: Vec<f32> = (0..batch * in_features).map(|i| ((i as f32 * 0.618_034).fract() * 2.4) - 1.2).collect();
    let x = Tensor::from_f32(&x, &[batch, in_features], DType::BF16, &device)?;

    let bases = bspline_basis(&x, &grid)?;
    let derivs = bspline_basis_derivative(&x, &grid)?;
    println!(
        "x {:?} {} on {device} -> bases {:?}, derivatives {:?}",
        x.shape(),
        x.dtype(),
        bases.shape(),
        derivs.shape()
    );

    let cpu = Device::Cpu;
    let reference = bspline_basis(&x.to_device(&cpu)?.to_dtype(DType::F32)?, &grid.to_device(&cpu)?)?;
    let err = relative_error(&bases.to_f64_vec()?, &reference.to_f64_vec()?);
    println!("relative error of the bf16 bases against the f32 CPU reference: {err:.2e}");
    let first: Vec<f32> = bases.to_f32_vec()?.into_iter().take(grid.n_bases()).collect();
    println!("bases of x[0, 0]: {first:?} (sum {:.4})", first.iter().sum::<f32>());
    Ok(())
}
