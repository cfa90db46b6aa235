//! Softmax cross-entropy over the vocabulary, fused with its backward: the logits are
//! overwritten by their gradient, so no probability tensor exists (llm.c's
//! `fused_classifier`). Per token (row of logits), with the optional logit soft-cap
//! `v = cap * tanh(x / cap)` (xLSTM-7B's output soft-cap, 30):
//!
//! `loss = logsumexp(v) - v[target]`, `dlogits = (softmax(v) - onehot(target)) * scale * dv/dx`,
//!
//! with `scale = grad_scale / valid tokens`: the gradient of the mean loss over the tokens
//! whose target is not the ignore index (PyTorch's `F.cross_entropy(..., ignore_index=-100,
//! reduction="mean")`; tokens ignored get loss 0 and gradient 0). Also counts the valid tokens
//! whose argmax (first index of the maximum logit, before the cap: the cap is increasing) is
//! the target. With no valid token the mean is 0, not PyTorch's NaN.
//!
//! Logits `(..., vocab)` in f32, bf16 or f16 with f32 arithmetic; targets [`TokenIds`] of the
//! leading shape, each in `0..vocab` or the ignore index (checked on the host first: an
//! out-of-range id is a typed error, never an out-of-bounds read). Per-token losses f32; the
//! mean and the hit count are summed in a fixed order (deterministic).

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;

/// The cross-entropy in the CLI's `check`, `bench cross_entropy` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "cross_entropy",
    bench_group: "cross_entropy",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::tokens::TokenIds;

/// PyTorch's default ignore index.
pub const DEFAULT_IGNORE_INDEX: i32 = -100;

/// Options of the cross-entropy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyOptions {
    /// Targets equal to this count neither in the loss nor in its gradient (None: every
    /// target must be a vocabulary id).
    pub ignore_index: Option<i32>,
    /// `cap * tanh(x / cap)` applied to the logits first.
    pub softcap: Option<f32>,
    /// Multiplies the gradient of the mean loss (e.g. 1 / gradient-accumulation steps).
    pub grad_scale: f32,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        CrossEntropyOptions { ignore_index: Some(DEFAULT_IGNORE_INDEX), softcap: None, grad_scale: 1.0 }
    }
}

/// Per-token losses and the totals.
#[derive(Clone, Debug)]
pub struct CrossEntropyOutput {
    /// `(...)` f32, 0 where the target is ignored.
    pub losses: Tensor,
    /// `[2]` f32 on the logits' device: the mean loss over valid tokens, and the count of
    /// valid tokens predicted right (exact below 2^24).
    pub totals: Tensor,
    /// Tokens whose target is not the ignore index.
    pub valid: usize,
}

impl CrossEntropyOutput {
    /// The mean loss (reads the device: a synchronisation).
    pub fn mean_loss(&self) -> Result<f32> {
        Ok(self.totals.to_f32_vec()?[0])
    }

    /// The valid tokens whose argmax is the target (reads the device).
    pub fn correct(&self) -> Result<usize> {
        Ok(self.totals.to_f32_vec()?[1] as usize)
    }
}

/// Validated sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrossEntropyDims {
    pub rows: usize,
    pub vocab: usize,
    pub dtype: DType,
    pub valid: usize,
}

fn dims(logits: &Tensor, targets: &TokenIds, opts: &CrossEntropyOptions) -> Result<CrossEntropyDims> {
    let Some((&vocab, lead)) = logits.shape().split_last() else {
        return Err(Error::invalid("logits", "a tensor of shape (..., vocab), rank >= 1", "a scalar (rank 0)"));
    };
    if vocab == 0 || vocab > i32::MAX as usize {
        return Err(Error::invalid(
            "logits",
            "a vocabulary of 1 to 2^31 - 1 entries",
            format!("shape {:?}", logits.shape()),
        ));
    }
    if targets.shape() != lead {
        return Err(Error::invalid(
            "targets",
            format!("shape {lead:?} (the logits' leading dimensions)"),
            format!("{:?}", targets.shape()),
        ));
    }
    let device = logits.device();
    if targets.device() != device {
        return Err(Error::DeviceMismatch {
            arg: "targets",
            expected: device.to_string(),
            found: targets.device().to_string(),
        });
    }
    if let Some(c) = opts.softcap {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::invalid("softcap", "a finite cap > 0", c.to_string()));
        }
    }
    if !opts.grad_scale.is_finite() {
        return Err(Error::invalid("grad_scale", "a finite value", opts.grad_scale.to_string()));
    }
    let rows = targets.len();
    if rows > u32::MAX as usize {
        return Err(Error::invalid("targets", "fewer than 2^32 tokens", rows.to_string()));
    }
    targets.check_range("targets", vocab, opts.ignore_index)?;
    crate::memory::check_buffers(&device, &[("logits", Some(logits.elem_count()), 0), ("targets", Some(rows), 8)])?;
    let valid = targets.as_slice().iter().filter(|&&t| Some(t) != opts.ignore_index).count();
    Ok(CrossEntropyDims { rows, vocab, dtype: logits.dtype(), valid })
}

/// The losses of `logits` against `targets`, logits left as they are (evaluation).
pub fn cross_entropy(logits: &Tensor, targets: &TokenIds, opts: CrossEntropyOptions) -> Result<CrossEntropyOutput> {
    let d = dims(logits, targets, &opts)?;
    match logits.device() {
        Device::Cpu => cpu_path(logits, targets, &opts, &d).map(|(o, _)| o),
        Device::Cuda(dev) => {
            // The evaluation kernel never writes the logits: a shared borrow is enough, and
            // the launch takes the same pointer type as the fused one.
            cuda::run(&dev, cuda::Logits::Read(logits), targets, &opts, &d)
        }
    }
}

/// The losses, and `logits` overwritten by the gradient of the mean loss (times
/// `grad_scale`) with respect to them: the training step's classifier in one pass.
pub fn cross_entropy_fused(
    logits: &mut Tensor,
    targets: &TokenIds,
    opts: CrossEntropyOptions,
) -> Result<CrossEntropyOutput> {
    let d = dims(logits, targets, &opts)?;
    match logits.device() {
        Device::Cpu => {
            let (o, grad) = cpu_path(logits, targets, &opts, &d)?;
            *logits = Tensor::from_f64_rounded(&grad, logits.shape(), d.dtype)?;
            Ok(o)
        }
        Device::Cuda(dev) => cuda::run(&dev, cuda::Logits::Overwrite(logits), targets, &opts, &d),
    }
}

fn cpu_path(
    logits: &Tensor,
    targets: &TokenIds,
    opts: &CrossEntropyOptions,
    d: &CrossEntropyDims,
) -> Result<(CrossEntropyOutput, Vec<f64>)> {
    let r = cpu::cross_entropy(&logits.to_f64_vec()?, targets.as_slice(), d.vocab, opts);
    let lead = &logits.shape()[..logits.rank() - 1];
    Ok((
        CrossEntropyOutput {
            losses: Tensor::from_f64_rounded(&r.losses, lead, DType::F32)?,
            totals: Tensor::from_f64_rounded(&[r.mean, r.correct as f64], &[2], DType::F32)?,
            valid: d.valid,
        },
        r.dlogits,
    ))
}
