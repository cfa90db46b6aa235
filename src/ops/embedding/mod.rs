//! Token embedding: `out[.., :] = table[id, :]`, and its backward as a deterministic
//! scatter-add into an existing f32 gradient (a model sums gradients over uses, e.g. a table
//! tied to the output layer): `dtable[v, :] += sum over tokens with id v of dout[token, :]`,
//! the tokens of each id summed in token order, so repeated calls agree bit for bit (no float
//! atomics). PyTorch's `nn.Embedding` without padding_idx or max_norm.
//!
//! `table` `(vocab, dim)` in f32, bf16 or f16; ids [`TokenIds`] of any shape, each in
//! `0..vocab` (checked on the host before any launch: never an out-of-bounds read); out
//! `(ids..., dim)` in the table's type; `dtable` `(vocab, dim)` f32 (master gradients), `dout`
//! in any element type.

pub mod bench;
pub mod check;
pub(crate) mod cli;
pub mod cpu;
mod cuda;

/// The embedding in the CLI's `check`, `bench embedding` and `run`.
pub const ENTRY: crate::ops::registry::OpEntry = crate::ops::registry::OpEntry {
    name: "embedding",
    bench_group: "embedding",
    check: check::check_rows,
    bench: bench::bench_rows,
    run: cli::COMMANDS,
};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::tokens::TokenIds;

/// `(vocab, dim)` of a table, checked.
fn table_dims(arg: &'static str, table: &Tensor) -> Result<(usize, usize)> {
    match *table.shape() {
        [vocab, dim] if vocab <= i32::MAX as usize && dim <= u32::MAX as usize => Ok((vocab, dim)),
        _ => Err(Error::invalid(
            arg,
            "a (vocab, dim) table with vocab < 2^31 and dim < 2^32",
            format!("shape {:?}", table.shape()),
        )),
    }
}

fn out_shape(ids: &TokenIds, dim: usize) -> Vec<usize> {
    let mut s = ids.shape().to_vec();
    s.push(dim);
    s
}

fn check_ids(ids: &TokenIds, vocab: usize, device: &Device) -> Result<()> {
    if ids.device() != *device {
        return Err(Error::DeviceMismatch {
            arg: "ids",
            expected: device.to_string(),
            found: ids.device().to_string(),
        });
    }
    if ids.len() > i32::MAX as usize {
        return Err(Error::invalid("ids", "fewer than 2^31 tokens", ids.len().to_string()));
    }
    ids.check_range("ids", vocab, None)
}

/// The rows of `table` at `ids`: shape `(ids..., dim)`.
pub fn embedding(table: &Tensor, ids: &TokenIds) -> Result<Tensor> {
    let (vocab, dim) = table_dims("table", table)?;
    let device = table.device();
    check_ids(ids, vocab, &device)?;
    let shape = out_shape(ids, dim);
    crate::memory::check_buffers(&device, &[("ids", ids.len().checked_mul(dim), table.dtype().size_in_bytes())])?;
    match device {
        Device::Cpu => {
            let out = cpu::forward(&table.to_f64_vec()?, ids.as_slice(), dim);
            Tensor::from_f64_rounded(&out, &shape, table.dtype())
        }
        Device::Cuda(dev) => cuda::forward(&dev, table, ids, dim, &shape),
    }
}

/// `dtable[v, :] += sum over tokens with id v of dout[token, :]`, in place.
pub fn embedding_backward(dtable: &mut Tensor, ids: &TokenIds, dout: &Tensor) -> Result<()> {
    let (vocab, dim) = table_dims("dtable", dtable)?;
    dtable.expect_dtype("dtable", DType::F32)?;
    let device = dtable.device();
    check_ids(ids, vocab, &device)?;
    dout.expect_shape("dout", &out_shape(ids, dim))?;
    dout.expect_device("dout", &device)?;
    let groups = ids.groups()?;
    match device {
        Device::Cpu => {
            let mut acc = dtable.to_f64_vec()?;
            cpu::backward(&mut acc, &groups.groups, &dout.to_f64_vec()?, dim);
            *dtable = Tensor::from_f64_rounded(&acc, dtable.shape(), DType::F32)?;
            Ok(())
        }
        Device::Cuda(dev) => cuda::backward(&dev, dtable, &groups, dout, dim),
    }
}
