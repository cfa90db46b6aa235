//! Token ids: the integer input of the embedding and the targets of the cross-entropy. They
//! come from the host (a data loader, a tokenizer, the sampler), so a [`TokenIds`] keeps the
//! host copy beside the device one: the ops check every id against the vocabulary on the host,
//! before any launch, and build the embedding backward's deterministic row order from it.

use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

/// Ids of shape `shape` (i32, as PyTorch's `ignore_index = -100` needs a negative value), on
/// the host and, for a CUDA device, copied there.
#[derive(Clone, Debug)]
pub struct TokenIds {
    shape: Vec<usize>,
    host: Vec<i32>,
    device: Option<(CudaDevice, CudaSlice<i32>)>,
}

impl TokenIds {
    /// `ids` of `shape` on `device`.
    pub fn new(ids: &[i32], shape: &[usize], device: &Device) -> Result<TokenIds> {
        let n = crate::tensor::elem_count("shape", shape)?;
        if n != ids.len() {
            return Err(Error::invalid("ids", format!("{n} ids for shape {shape:?}"), format!("{} ids", ids.len())));
        }
        crate::memory::check_buffers(device, &[("ids", Some(n), 4)])?;
        let host = crate::memory::host_collect("ids", n, ids.iter().copied())?;
        let device = match device {
            Device::Cpu => None,
            Device::Cuda(dev) => {
                let s = dev.stream();
                let bytes = n * 4;
                let slice = if n == 0 {
                    s.alloc_zeros::<i32>(1).map_err(|e| dev.map_err_bytes("allocating token ids", e, 4))?
                } else {
                    s.clone_htod(&host).map_err(|e| dev.map_err_bytes("copying token ids to the device", e, bytes))?
                };
                Some((dev.clone(), slice))
            }
        };
        Ok(TokenIds { shape: shape.to_vec(), host, device })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.host.len()
    }

    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }

    /// The ids, from the host copy.
    pub fn as_slice(&self) -> &[i32] {
        &self.host
    }

    pub fn device(&self) -> Device {
        match &self.device {
            Some((dev, _)) => Device::Cuda(dev.clone()),
            None => Device::Cpu,
        }
    }

    /// The device copy (at least one element long, so it is never a null pointer).
    pub(crate) fn cuda_slice(&self, arg: &'static str) -> Result<&CudaSlice<i32>> {
        match &self.device {
            Some((_, s)) => Ok(s),
            None => Err(Error::DeviceMismatch { arg, expected: "a CUDA device".into(), found: "cpu".into() }),
        }
    }

    /// Checks that every id is in `0..vocab`, or equals `ignore` when given: the first that is
    /// not is an error naming `arg`, its index and value.
    pub(crate) fn check_range(&self, arg: &'static str, vocab: usize, ignore: Option<i32>) -> Result<()> {
        match self.host.iter().enumerate().find(|&(_, &id)| Some(id) != ignore && (id < 0 || id as usize >= vocab)) {
            None => Ok(()),
            Some((i, &id)) => Err(Error::invalid(
                arg,
                match ignore {
                    Some(ig) => format!("ids in 0..{vocab} or the ignore index {ig}"),
                    None => format!("ids in 0..{vocab}"),
                },
                format!("{id} at flat index {i}"),
            )),
        }
    }
}
