//! Token ids: the integer input of the embedding and the targets of the cross-entropy. They
//! come from the host (a data loader, a tokenizer, the sampler), so a [`TokenIds`] keeps the
//! host copy beside the device one: the ops check every id against the vocabulary on the host,
//! before any launch, and build the embedding backward's deterministic row order from it.

use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;
use std::sync::{Arc, OnceLock};

/// Tokens grouped by id: `ids` the distinct ids in increasing order, `offsets` (one more than
/// `ids`) delimiting each id's tokens in `rows`, in token order. The embedding backward sums
/// each id's rows in this order, without atomics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Groups {
    pub ids: Vec<i32>,
    pub offsets: Vec<i32>,
    pub rows: Vec<i32>,
}

/// Groups token indices by id, stably: a counting sort when the largest id is small against
/// the token count (a vocabulary of a language model against a batch), else a stable
/// comparison sort. Every id must be >= 0 and there must be fewer than 2^31 tokens.
pub fn group_by_id(ids: &[i32]) -> Groups {
    let n = ids.len();
    let max = ids.iter().copied().max().unwrap_or(0).max(0) as usize;
    let rows: Vec<i32> = if max < 4 * n + (1 << 16) {
        let mut start = vec![0u32; max + 2];
        for &id in ids {
            start[id as usize + 1] += 1;
        }
        for v in 0..=max {
            start[v + 1] += start[v];
        }
        let mut rows = vec![0i32; n];
        for (r, &id) in ids.iter().enumerate() {
            rows[start[id as usize] as usize] = r as i32;
            start[id as usize] += 1;
        }
        rows
    } else {
        let mut rows: Vec<i32> = (0..n as i32).collect();
        rows.sort_by_key(|&r| ids[r as usize]);
        rows
    };
    let mut distinct = Vec::new();
    let mut offsets = vec![0i32];
    for (k, &r) in rows.iter().enumerate() {
        let id = ids[r as usize];
        if distinct.last() != Some(&id) {
            if k > 0 {
                offsets.push(k as i32);
            }
            distinct.push(id);
        }
    }
    if n > 0 {
        offsets.push(n as i32);
    }
    Groups { ids: distinct, offsets, rows }
}

/// [`Groups`] of a [`TokenIds`], computed once, and on a CUDA device packed there as
/// `[ids | offsets | rows]`.
#[derive(Debug)]
pub(crate) struct GroupsCache {
    pub groups: Groups,
    pub packed: Option<CudaSlice<i32>>,
}

/// Ids of shape `shape` (i32, as PyTorch's `ignore_index = -100` needs a negative value), on
/// the host and, for a CUDA device, copied there.
#[derive(Clone, Debug)]
pub struct TokenIds {
    shape: Vec<usize>,
    host: Vec<i32>,
    device: Option<(CudaDevice, CudaSlice<i32>)>,
    /// The grouping by id, computed on first use (the embedding backward) and kept: computed
    /// when the batch is made, a training step's backward reuses it.
    groups: OnceLock<Arc<GroupsCache>>,
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
        Ok(TokenIds { shape: shape.to_vec(), host, device, groups: OnceLock::new() })
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

    /// The ids grouped by value (stable), computed once per `TokenIds` and, on a CUDA device,
    /// uploaded once. The ids must be non-negative (the callers check the range first).
    pub(crate) fn groups(&self) -> Result<Arc<GroupsCache>> {
        if let Some(g) = self.groups.get() {
            return Ok(g.clone());
        }
        let groups = group_by_id(&self.host);
        let packed = match &self.device {
            None => None,
            Some((dev, _)) => {
                let mut v = Vec::with_capacity(groups.ids.len() + groups.offsets.len() + groups.rows.len());
                v.extend_from_slice(&groups.ids);
                v.extend_from_slice(&groups.offsets);
                v.extend_from_slice(&groups.rows);
                let bytes = 4 * v.len();
                Some(dev.stream().clone_htod(&v).map_err(|e| dev.map_err_bytes("copying the id groups", e, bytes))?)
            }
        };
        let cache = Arc::new(GroupsCache { groups, packed });
        // Another thread may have filled it meanwhile: either value is the same.
        Ok(self.groups.get_or_init(|| cache).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_is_stable_and_complete_by_either_sort() {
        let g = group_by_id(&[3, 1, 3, 0, 1, 3]);
        assert_eq!(g.ids, vec![0, 1, 3]);
        assert_eq!(g.offsets, vec![0, 1, 3, 6]);
        assert_eq!(g.rows, vec![3, 1, 4, 0, 2, 5]);
        assert_eq!(group_by_id(&[]), Groups { ids: vec![], offsets: vec![0], rows: vec![] });
        // Ids far above the token count take the comparison sort: the same result.
        let big = group_by_id(&[3 << 20, 1 << 20, 3 << 20, 0, 1 << 20, 3 << 20]);
        assert_eq!((big.offsets, big.rows), (g.offsets, g.rows));
    }
}
