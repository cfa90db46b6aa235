//! Where packed sequences start, shared by the sequence ops (the selective scan, the causal
//! conv1d): one object describes a packed batch for every layer of a Mamba block.

use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;
use std::sync::Arc;

/// Where packed sequences start: at a flagged step `t` of row `b` a new sequence begins, and
/// nothing before `t` reaches it. The selective scan drops the state carried in (zero); the
/// causal conv1d sees zeros left of `t`. A start at step 0 drops the initial state.
#[derive(Clone, Debug)]
pub struct SequenceResets {
    batch: usize,
    len: usize,
    flags: Vec<bool>,
    device: Option<(CudaDevice, Arc<CudaSlice<u8>>)>,
}

impl SequenceResets {
    /// From `(batch, len)` flags, row-major.
    pub fn from_flags(batch: usize, len: usize, flags: &[bool]) -> Result<SequenceResets> {
        let n = batch.checked_mul(len).ok_or_else(|| Error::invalid("flags", "batch * len in usize", "overflow"))?;
        if flags.len() != n {
            return Err(Error::invalid(
                "flags",
                format!("{n} flags (batch {batch} x len {len})"),
                flags.len().to_string(),
            ));
        }
        Ok(SequenceResets { batch, len, flags: flags.to_vec(), device: None })
    }

    /// From each row's sequence start positions (unsorted is fine; each below `len`).
    pub fn from_starts(len: usize, starts: &[Vec<usize>]) -> Result<SequenceResets> {
        SequenceResets::flags_from_starts("len", len, starts)
    }

    /// [`SequenceResets::from_starts`] with `len_arg` naming where `len` came from.
    fn flags_from_starts(len_arg: &'static str, len: usize, starts: &[Vec<usize>]) -> Result<SequenceResets> {
        let n = starts.len().checked_mul(len).ok_or_else(|| {
            Error::invalid(len_arg, "rows x len in usize", format!("{} rows x len {len}", starts.len()))
        })?;
        let mut flags = crate::memory::host_vec(len_arg, n, false)?;
        for (b, row) in starts.iter().enumerate() {
            for &t in row {
                if t >= len {
                    return Err(Error::invalid(
                        "starts",
                        format!("positions below len {len}"),
                        format!("{t} in row {b}"),
                    ));
                }
                flags[b * len + t] = true;
            }
        }
        SequenceResets::from_flags(starts.len(), len, &flags)
    }

    /// One packed row (batch 1) of sequences with cumulative lengths `cu_seqlens`
    /// (`[0, l0, l0 + l1, ..., len]`, non-decreasing) as flash-attention and mamba take
    /// them. The first sequence keeps `h0`.
    pub fn from_cu_seqlens(cu_seqlens: &[usize]) -> Result<SequenceResets> {
        let (Some(&first), Some(&len)) = (cu_seqlens.first(), cu_seqlens.last()) else {
            return Err(Error::invalid("cu_seqlens", "at least [0, len]", "an empty list"));
        };
        if first != 0 || cu_seqlens.windows(2).any(|w| w[1] < w[0]) {
            return Err(Error::invalid(
                "cu_seqlens",
                "non-decreasing offsets starting at 0",
                format!("{cu_seqlens:?}"),
            ));
        }
        let starts: Vec<usize> = cu_seqlens[1..].iter().copied().filter(|&t| t > 0 && t < len).collect();
        SequenceResets::flags_from_starts("cu_seqlens", len, &[starts])
    }

    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }
    pub fn flags(&self) -> &[bool] {
        &self.flags
    }

    /// A copy with the flags also on `device` (kept, so repeated scans do not upload them).
    pub fn to_device(&self, device: &Device) -> Result<SequenceResets> {
        let mut r = SequenceResets { device: None, ..self.clone() };
        if let Device::Cuda(dev) = device {
            r.device = Some((dev.clone(), Arc::new(upload_flags(dev, &self.flags)?)));
        }
        Ok(r)
    }

    /// An error naming `resets` unless the flags cover `batch x len`.
    pub(crate) fn expect_size(&self, batch: usize, len: usize) -> Result<()> {
        if self.batch != batch || self.len != len {
            return Err(Error::invalid(
                "resets",
                format!("flags for batch {batch} x len {len}"),
                format!("batch {} x len {}", self.batch, self.len),
            ));
        }
        Ok(())
    }

    /// The flags as bytes on `dev`: the copy made by [`SequenceResets::to_device`], or a
    /// fresh upload.
    pub(crate) fn on_device(&self, dev: &CudaDevice) -> Result<Arc<CudaSlice<u8>>> {
        match &self.device {
            Some((d, s)) if d == dev => Ok(s.clone()),
            _ => Ok(Arc::new(upload_flags(dev, &self.flags)?)),
        }
    }
}

fn upload_flags(dev: &CudaDevice, flags: &[bool]) -> Result<CudaSlice<u8>> {
    let bytes: Vec<u8> = flags.iter().map(|&f| u8::from(f)).collect();
    dev.stream().clone_htod(&bytes).map_err(|e| dev.map_err_bytes("copying reset flags", e, bytes.len()))
}
