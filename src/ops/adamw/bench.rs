//! AdamW's bench rows: the parameter sets of GPT-style models of 125M (d 768, 12 layers) and
//! 1.3B (d 2048, 24 layers) parameters, a tensor per matrix and vector as a model holds them,
//! bf16 copies, clipping and zeroing on (the full training step of the optimizer).

use super::{adamw_step, AdamWConfig, AdamWParam, ParamGroup};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;
use crate::timing::{time_on, BenchContext, BenchRow, Repeats};

/// The tensor sizes of a GPT-style model of width `d` and `layers` layers over a 50304
/// vocabulary: the embedding, then per layer the attention and MLP matrices and their vectors.
pub fn model_tensor_sizes(d: usize, layers: usize) -> Vec<usize> {
    let mut sizes = vec![50304 * d, 1024 * d];
    for _ in 0..layers {
        sizes.extend([d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]);
    }
    sizes.extend([d, d]);
    sizes
}

struct Slot {
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    copy: Tensor,
}

/// Times one step over the tensors of `sizes` on `device`.
pub fn bench_adamw(
    device: &Device,
    label: &str,
    sizes: &[usize],
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    let mut slots = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let f = |v: f32| Tensor::full(v, &[n], DType::F32, device);
        slots.push(Slot {
            w: f(0.02)?,
            g: f(1e-3)?,
            m: f(0.0)?,
            v: f(0.0)?,
            copy: Tensor::full(0.0, &[n], DType::BF16, device)?,
        });
    }
    let groups = [ParamGroup { lr: 6e-4, weight_decay: 0.1 }, ParamGroup { lr: 6e-4, weight_decay: 0.0 }];
    let config = AdamWConfig { beta2: 0.95, max_grad_norm: Some(1.0), zero_grad: true, ..Default::default() };
    let mut step = |i: usize| -> Result<()> {
        let mut params: Vec<AdamWParam> = slots
            .iter_mut()
            .map(|s| {
                let group = if s.w.elem_count() % 1024 == 0 && s.w.elem_count() > 50304 { 0 } else { 1 };
                AdamWParam { param: &mut s.w, grad: &mut s.g, m: &mut s.m, v: &mut s.v, copy: Some(&mut s.copy), group }
            })
            .collect();
        adamw_step(&config, i as u64 + 1, &groups, &mut params).map(drop)
    };
    let timing = time_on(device, reps, &mut step)?;
    let n: usize = sizes.iter().sum();
    // The norm reads g; the update reads w, g, m, v and writes w, m, v, the bf16 copy and g = 0.
    let bytes = 38.0 * n as f64;
    let shape = format!("{label}: {:.0}M params in {} tensors", n as f64 / 1e6, sizes.len());
    Ok(BenchRow::memory_bound(
        "adamw step (clip, bf16 copy, zero)".into(),
        DType::F32,
        shape,
        device,
        timing,
        bytes,
        copy_gbs,
    ))
}

/// `bench adamw`: 125M and 1.3B parameters on the GPU (the short table only 125M); a 2-layer
/// d 64 model on the CPU.
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let reps = Repeats { warmup: ctx.reps.warmup.min(3), iters: ctx.reps.iters.min(20) };
    if !ctx.device.is_cuda() {
        return Ok(vec![bench_adamw(ctx.device, "tiny", &[64 * 64, 64, 3 * 64 * 64], reps, ctx.copy_gbs)?]);
    }
    let mut rows = vec![bench_adamw(ctx.device, "GPT 125M", &model_tensor_sizes(768, 12), reps, ctx.copy_gbs)?];
    if !ctx.short {
        rows.push(bench_adamw(ctx.device, "GPT 1.3B", &model_tensor_sizes(2048, 24), reps, ctx.copy_gbs)?);
    }
    Ok(rows)
}
