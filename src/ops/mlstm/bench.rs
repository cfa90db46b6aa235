//! The mLSTM's bench shapes, targets and rows.

use super::check::MlstmCase;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_on, BenchContext, BenchRow, Repeats};

/// A standard mLSTM benchmark shape: batch, heads, sequence length, head dimension (dqk =
/// dhv).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlstmShape {
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub head_dim: usize,
}

impl MlstmShape {
    pub const D128: MlstmShape = MlstmShape { batch: 8, heads: 16, len: 4096, head_dim: 128 };
    pub const D256: MlstmShape = MlstmShape { batch: 8, heads: 8, len: 4096, head_dim: 256 };
}

/// The targets (H100, bf16): forward 400 µs at D128, 600 µs at D256.
pub fn mlstm_target_us(shape: MlstmShape, dtype: DType) -> Option<f64> {
    match (shape, dtype) {
        (MlstmShape::D128, DType::BF16) => Some(400.0),
        (MlstmShape::D256, DType::BF16) => Some(600.0),
        _ => None,
    }
}

/// Benchmarks the mLSTM forward (`mlstm`, no initial state) at `shape`, chunk `chunk` (None:
/// the default); two input sets rotate on the GPU.
pub fn bench_mlstm(
    device: &Device,
    dtype: DType,
    shape: MlstmShape,
    chunk: Option<usize>,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::ops::mlstm::mlstm;
    let MlstmShape { batch, heads, len, head_dim: d } = shape;
    let case = MlstmCase { chunk, ..MlstmCase::new(batch, heads, len, d, d, dtype) };
    let sets = if device.is_cuda() { 2 } else { 1 };
    let mut rng = Rng::new(0x3157);
    let data = (0..sets).map(|_| case.tensors(&mut rng)?.to_device(device)).collect::<Result<Vec<_>>>()?;
    let timing = time_on(device, reps, |i| mlstm(&data[i % sets].inputs()).map(drop))?;
    let tokens = (batch * heads * len) as f64;
    let (es, d) = (dtype.size_in_bytes() as f64, d as f64);
    // Read q, k, v and the gates; write h.
    let bytes = tokens * (4.0 * d * es + 8.0);
    // Causal halves of Q K^T and P V per chunk, Q C and K^T V at every step.
    // The CPU reference is the recurrence: its chunk is one step.
    let (l, op) = match device {
        Device::Cuda(dev) => {
            let t = crate::ops::mlstm::forward_tiling(dev, &case_dims(&case), chunk)?;
            let kernel = if t.fused { "fused" } else { "chunked" };
            (t.chunk as f64, format!("mlstm forward ({kernel}, chunk {})", t.chunk))
        }
        Device::Cpu => (1.0, "mlstm forward (recurrent)".to_string()),
    };
    let flops = tokens * (2.0 * l * d + 4.0 * d * d);
    Ok(BenchRow {
        op,
        dtype,
        shape: format!("B{batch} NH{heads} S{len} D{}", shape.head_dim),
        device: device.to_string(),
        timing,
        bytes,
        flops,
        copy_gbs,
        // The targets are for the default configuration; a chosen chunk is a row for
        // comparison (chunk 128 runs the chunked kernel).
        target_us: if chunk.is_none() { mlstm_target_us(shape, dtype) } else { None },
        peak_extra_bytes: None,
    })
}

/// The forward+backward targets (H100, bf16): 1.6 ms at D128, 2.4 ms at D256.
pub fn mlstm_train_target_us(shape: MlstmShape, dtype: DType) -> Option<f64> {
    match (shape, dtype) {
        (MlstmShape::D128, DType::BF16) => Some(1600.0),
        (MlstmShape::D256, DType::BF16) => Some(2400.0),
        _ => None,
    }
}

/// Benchmarks a training step of the mLSTM: `mlstm_for_backward` then `mlstm_backward`
/// (Exact) with its saved forward and a given dh, at `shape`; two input sets rotate on the
/// GPU.
pub fn bench_mlstm_fwd_bwd(
    device: &Device,
    dtype: DType,
    shape: MlstmShape,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::ops::mlstm::{mlstm_backward, mlstm_for_backward, NormalizerGrad};
    let MlstmShape { batch, heads, len, head_dim: d } = shape;
    let case = MlstmCase::new(batch, heads, len, d, d, dtype);
    let sets = if device.is_cuda() { 2 } else { 1 };
    let mut rng = Rng::new(0x3158);
    let data = (0..sets)
        .map(|_| -> Result<_> {
            let t = case.tensors(&mut rng)?.to_device(device)?;
            let dh: Vec<f32> = (0..batch * heads * len * d).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
            let dh = Tensor::from_f32(&dh, &[batch, heads, len, d], dtype, device)?;
            Ok((t, dh))
        })
        .collect::<Result<Vec<_>>>()?;
    let timing = time_on(device, reps, |i| {
        let (t, dh) = &data[i % sets];
        let saved = mlstm_for_backward(&t.inputs())?;
        mlstm_backward(&t.inputs(), dh, None, NormalizerGrad::Exact, Some(&saved)).map(drop)
    })?;
    let tokens = (batch * heads * len) as f64;
    let (es, df) = (dtype.size_in_bytes() as f64, d as f64);
    // The backward runs the forward again unless the saved one carries its stats.
    let forwards = if mlstm_for_backward(&data[0].0.inputs())?.has_stats() { 1.0 } else { 2.0 };
    // Forward: q, k, v, gates in, h out. Backward: three passes reading three operands each
    // and writing dq, dk, dv, and the gate kernels.
    let bytes = tokens * (4.0 * df * es + 8.0) * forwards + tokens * (12.0 * df * es + 32.0);
    let l = match device {
        Device::Cuda(dev) => crate::ops::mlstm::forward_tiling(dev, &case_dims(&case), None)?.chunk as f64,
        Device::Cpu => 1.0,
    };
    // The forwards and three passes of the forward's work.
    let flops = (forwards + 3.0) * tokens * (2.0 * l * df + 4.0 * df * df);
    Ok(BenchRow {
        op: "mlstm forward+backward".to_string(),
        dtype,
        shape: format!("B{batch} NH{heads} S{len} D{d}"),
        device: device.to_string(),
        timing,
        bytes,
        flops,
        copy_gbs,
        target_us: mlstm_train_target_us(shape, dtype),
        peak_extra_bytes: None,
    })
}

fn case_dims(case: &MlstmCase) -> crate::ops::mlstm::MlstmDims {
    crate::ops::mlstm::MlstmDims {
        batch: case.batch,
        heads: case.heads,
        len: case.len,
        dqk: case.dqk,
        dhv: case.dhv,
        dtype: case.dtype,
    }
}

/// Benchmarks one decoding step (`mlstm_step`) at `batch` x 16 heads, head dim 128; states
/// rotate among copies (up to 16, or as many as exceed ~150 MB).
pub fn bench_mlstm_step(
    device: &Device,
    dtype: DType,
    batch: usize,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    use crate::ops::mlstm::{mlstm_step, DEFAULT_EPS};
    let (heads, d) = (16, 128);
    let state_bytes = batch * heads * (d * d + d + 1) * 4;
    let sets = if device.is_cuda() { (150_000_000 / state_bytes).clamp(2, 16) } else { 1 };
    let case = MlstmCase { with_init: true, ..MlstmCase::new(batch, heads, 1, d, d, dtype) };
    let mut rng = Rng::new(0x57E9);
    let mut data = Vec::with_capacity(sets);
    for _ in 0..sets {
        let t = case.tensors(&mut rng)?.to_device(device)?;
        let shape_qk = [batch, heads, d];
        let q = t.q.clone().reshape(&shape_qk)?;
        let k = t.k.clone().reshape(&shape_qk)?;
        let v = t.v.clone().reshape(&shape_qk)?;
        let i = t.i.clone().reshape(&[batch, heads])?;
        let f = t.f.clone().reshape(&[batch, heads])?;
        let state = t.initial.clone().ok_or_else(|| Error::invalid("state", "an initial state", "none"))?;
        data.push((state, q, k, v, i, f));
    }
    let timing = time_on(device, reps, |n| {
        let (state, q, k, v, i, f) = &mut data[n % sets];
        mlstm_step(state, q, k, v, i, f, DEFAULT_EPS).map(drop)
    })?;
    let es = dtype.size_in_bytes() as f64;
    let hb = (batch * heads) as f64;
    let dd = d as f64;
    // Read and write C, n, m; read q, k, v and the gates; write h.
    let bytes = hb * (2.0 * 4.0 * (dd * dd + dd + 1.0) + 4.0 * dd * es + 8.0);
    Ok(BenchRow {
        op: "mlstm_step (decode)".into(),
        dtype,
        shape: format!("B{batch} NH{heads} D{d}"),
        device: device.to_string(),
        timing,
        bytes,
        flops: hb * 4.0 * dd * dd,
        copy_gbs,
        target_us: None,
        peak_extra_bytes: None,
    })
}

/// `bench mlstm`: on the GPU the forward at D128 and D256 in bf16, f16 (full table) and
/// f32 and the training step in bf16; in the full table also the forward at constant tokens
/// (B x NH x S) and the other chunk sizes. Then the decode step at batch 1, 64, 256 (64 only
/// in the short table and on the CPU). On the CPU one small shape.
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let (device, reps, short, copy_gbs) = (ctx.device, ctx.reps, ctx.short, ctx.copy_gbs);
    let mut rows = Vec::new();
    if device.is_cuda() {
        for shape in [MlstmShape::D128, MlstmShape::D256] {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                if short && dtype == DType::F16 {
                    continue;
                }
                rows.push(bench_mlstm(device, dtype, shape, None, reps, copy_gbs)?);
            }
            rows.push(bench_mlstm_fwd_bwd(device, DType::BF16, shape, reps, copy_gbs)?);
        }
        if !short {
            for (batch, heads, len) in [(64, 16, 512), (2, 16, 16384), (1, 8, 65536)] {
                let shape = MlstmShape { batch, heads, len, head_dim: 128 };
                rows.push(bench_mlstm(device, DType::BF16, shape, None, reps, copy_gbs)?);
            }
            for chunk in [64, 128] {
                rows.push(bench_mlstm(device, DType::BF16, MlstmShape::D128, Some(chunk), reps, copy_gbs)?);
            }
        }
    } else {
        let shape = MlstmShape { batch: 1, heads: 2, len: 64, head_dim: 16 };
        rows.push(bench_mlstm(device, DType::F32, shape, None, reps, copy_gbs)?);
        rows.push(bench_mlstm_fwd_bwd(device, DType::F32, shape, reps, copy_gbs)?);
    }
    for batch in [1usize, 64, 256] {
        if (short || !device.is_cuda()) && batch != 64 {
            continue;
        }
        for dtype in [DType::BF16, DType::F32] {
            rows.push(bench_mlstm_step(device, dtype, batch, reps, copy_gbs)?);
        }
    }
    Ok(rows)
}
