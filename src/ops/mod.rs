//! The kernels' public entry points. Each op is one unit: `cuda/<op>.cu`, `ops/<op>/`
//! (validation and public API in `mod.rs`, the f64 CPU reference in `cpu.rs`, launches in
//! `cuda.rs`), `tests/<op>*.rs` and `benches/<op>.rs`.

pub mod bspline;
pub mod causal_conv1d;
pub mod kan;
pub mod mlstm;
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
