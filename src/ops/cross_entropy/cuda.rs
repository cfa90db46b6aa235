//! Launches of `cuda/cross_entropy.cu`.

use super::{CrossEntropyDims, CrossEntropyOptions, CrossEntropyOutput};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::Result;
use crate::kernels::{kernel_name, KernelModule};
use crate::tensor::{CudaElement, Tensor};
use crate::tokens::TokenIds;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_ce::CeParams` in cuda/cross_entropy.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CeParams {
    rows: u32,
    vocab: u32,
    ignore_index: i32,
    flags: u32,
    softcap: f32,
    grad_scale: f32,
}
crate::kernels::assert_kernel_params!(CeParams, 6);

// SAFETY: six 4-byte fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for CeParams {}

const SOFTCAP: u32 = 2;
const IGNORE: u32 = 4;
/// `hk_ce::MAX_THREADS`.
const MAX_THREADS: usize = 512;

/// The logits, read (evaluation) or overwritten by their gradient.
pub(super) enum Logits<'a> {
    Read(&'a Tensor),
    Overwrite(&'a mut Tensor),
}

/// The instantiation for a vocabulary of `vocab` elements of `dtype`: (elements per 16-byte
/// vector or 1, threads: one per vector up to 512).
fn variant(dtype: DType, vocab: usize) -> (usize, u32) {
    let full = 16 / dtype.size_in_bytes();
    let vec = if vocab % full == 0 { full } else { 1 };
    let threads = (vocab / vec).next_multiple_of(32).clamp(32, MAX_THREADS) as u32;
    (vec, threads)
}

pub(super) fn run(
    dev: &CudaDevice,
    logits: Logits,
    targets: &TokenIds,
    opts: &CrossEntropyOptions,
    d: &CrossEntropyDims,
) -> Result<CrossEntropyOutput> {
    match d.dtype {
        DType::F32 => run_typed::<f32>(dev, logits, targets, opts, d),
        DType::BF16 => run_typed::<bf16>(dev, logits, targets, opts, d),
        DType::F16 => run_typed::<f16>(dev, logits, targets, opts, d),
    }
}

fn run_typed<T: CudaElement>(
    dev: &CudaDevice,
    logits: Logits,
    targets: &TokenIds,
    opts: &CrossEntropyOptions,
    d: &CrossEntropyDims,
) -> Result<CrossEntropyOutput> {
    let lead = targets.shape().to_vec();
    // SAFETY (allocations): the row kernel writes losses and hits for every row; the reduction
    // writes both totals.
    let mut losses = unsafe { Tensor::cuda_uninit(dev, DType::F32, &lead)? };
    let mut hits = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[d.rows.max(1)])? };
    let mut totals = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[2])? };
    let write_grad = matches!(logits, Logits::Overwrite(_));
    if d.rows > 0 {
        let (vec, threads) = variant(d.dtype, d.vocab);
        let kind = if write_grad { "fused" } else { "fwd" };
        let name = kernel_name("cross_entropy", kind, T::DTYPE, &format!("_v{vec}"));
        let f = dev.function(KernelModule::CrossEntropy, &name)?;
        let cfg = dev.grid_stride_config(KernelModule::CrossEntropy, &name, threads, d.rows, 1)?;
        let mut flags = if opts.softcap.is_some() { SOFTCAP } else { 0 };
        flags |= if opts.ignore_index.is_some() { IGNORE } else { 0 };
        let p = CeParams {
            rows: d.rows as u32,
            vocab: d.vocab as u32,
            ignore_index: opts.ignore_index.unwrap_or(0),
            flags,
            softcap: opts.softcap.unwrap_or(1.0),
            grad_scale: opts.grad_scale / d.valid.max(1) as f32,
        };
        let mut args = dev.stream().launch_builder(&f);
        match logits {
            Logits::Read(t) => args.arg(t.cuda_slice::<T>("logits")?),
            Logits::Overwrite(t) => args.arg(t.cuda_slice_mut::<T>("logits")?),
        };
        args.arg(targets.cuda_slice("targets")?)
            .arg(losses.cuda_slice_mut::<f32>("losses")?)
            .arg(hits.cuda_slice_mut::<f32>("hits")?)
            .arg(&p);
        // SAFETY: cross_entropy_<kind>_<T>_v<vec>(T* logits, const int* targets, float*
        // losses, float* correct, CeParams): logits hold rows * vocab elements (vocab a multiple
        // of vec, 256-byte aligned), targets, losses and correct rows; every target is in
        // 0..vocab or the ignore index with IGNORE set (checked on the host in `dims`), so the
        // target logit read is in bounds; the fwd kernel never writes the logits (only `fused`,
        // given the mutable borrow); threads <= MAX_THREADS, a multiple of 32.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching cross_entropy", e))?;
    }
    let name = "cross_entropy_reduce";
    let f = dev.function(KernelModule::CrossEntropy, name)?;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let (rows, inv_valid) = (d.rows as u32, 1.0 / d.valid.max(1) as f32);
    let mut args = dev.stream().launch_builder(&f);
    args.arg(losses.cuda_slice::<f32>("losses")?)
        .arg(hits.cuda_slice::<f32>("hits")?)
        .arg(totals.cuda_slice_mut::<f32>("totals")?)
        .arg(&rows)
        .arg(&inv_valid);
    // SAFETY: cross_entropy_reduce(const float* losses, const float* correct, float* out, u32
    // rows, float): losses and correct hold `rows` floats (written above; none read when rows
    // is 0), out 2; one block of 1024 threads as its tree needs.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching cross_entropy_reduce", e))?;
    Ok(CrossEntropyOutput { losses, totals, valid: d.valid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chosen_variant_is_a_kernel_of_the_module() {
        let ptx = KernelModule::CrossEntropy.ptx();
        for dtype in DType::ALL {
            for vocab in [1, 7, 8, 1000, 32000, 50257, 50304, 151936, 256000] {
                let (vec, threads) = variant(dtype, vocab);
                assert!(threads % 32 == 0 && (32..=512).contains(&threads));
                for kind in ["fwd", "fused"] {
                    let name = kernel_name("cross_entropy", kind, dtype, &format!("_v{vec}"));
                    assert!(ptx.contains(&format!(".entry {name}(")), "{name} is not in the module");
                }
            }
        }
    }
}
