//! The kernels' public entry points. Each op is one unit: `cuda/<op>.cu` or `cuda/<op>/`
//! (a shared header and one file per pass, each its own module), and `ops/<op>/`: validation
//! and public API in `mod.rs`, the f64 CPU reference in `cpu.rs`, launches in `cuda.rs`, its
//! check cases and tolerances in `check.rs`, bench shapes, targets and rows in `bench.rs`,
//! its `hybrid-kernels run` commands in `cli.rs`; then `tests/<op>*.rs` and
//! `benches/<op>.rs`. Adding an op: its folders, its module ids in `crate::kernels`, one line
//! in [`registry::OPS`]. Nothing here imports [`crate::check`] or [`crate::bench`], which drive
//! the CLI over the registry.

pub mod adamw;
pub mod bspline;
pub mod causal_conv1d;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod kan;
pub mod mlstm;
pub mod norm;
pub mod registry;
pub mod selective_scan;
pub mod sequence_resets;
pub mod spline_activation;

/// Pushes `t`'s device slice as a kernel argument, or `null` (a `0u64` the caller keeps alive)
/// when the optional input is absent; the kernels test a flag before reading it.
pub(crate) fn push_opt<'a, T: crate::tensor::CudaElement>(
    args: &mut cudarc::driver::LaunchArgs<'a>,
    t: Option<&'a crate::tensor::Tensor>,
    arg: &'static str,
    null: &'a u64,
) -> crate::error::Result<()> {
    use cudarc::driver::PushKernelArg;
    match t {
        Some(t) => args.arg(t.cuda_slice::<T>(arg)?),
        None => args.arg(null),
    };
    Ok(())
}

/// [`push_opt`] for an optional output.
pub(crate) fn push_opt_mut<'a, T: crate::tensor::CudaElement>(
    args: &mut cudarc::driver::LaunchArgs<'a>,
    t: Option<&'a mut crate::tensor::Tensor>,
    arg: &'static str,
    null: &'a u64,
) -> crate::error::Result<()> {
    use cudarc::driver::PushKernelArg;
    match t {
        Some(t) => args.arg(t.cuda_slice_mut::<T>(arg)?),
        None => args.arg(null),
    };
    Ok(())
}
