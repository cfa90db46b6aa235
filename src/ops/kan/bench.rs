//! KANLinear's bench shapes, targets and rows.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::kan::KanForwardPath;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_cuda, time_host, BenchContext, BenchRow, Repeats};

/// A KANLinear benchmark case.
#[derive(Clone, Copy, Debug)]
pub struct KanShape {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub grid_size: usize,
    pub order: usize,
}

/// What to time of a KANLinear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KanPass {
    Forward,
    ForwardBackward,
}

/// The project's KANLinear shapes: 4096x1024->1024 with G = 5 and 20 (k = 3), and the
/// latency case 100x1000->1000.
pub const KAN_SHAPES: &[KanShape] = &[
    KanShape { batch: 4096, in_features: 1024, out_features: 1024, grid_size: 5, order: 3 },
    KanShape { batch: 4096, in_features: 1024, out_features: 1024, grid_size: 20, order: 3 },
    KanShape { batch: 100, in_features: 1000, out_features: 1000, grid_size: 5, order: 3 },
];

/// The targets of the KAN issue (H100), in microseconds.
pub fn kan_target_us(shape: KanShape, pass: KanPass, dtype: DType, tf32: bool) -> Option<f64> {
    let main = shape.batch == 4096 && shape.in_features == 1024 && shape.out_features == 1024 && shape.grid_size == 5;
    let latency = shape.batch == 100 && shape.in_features == 1000;
    match (main, latency, pass, dtype, tf32) {
        (true, _, KanPass::Forward, DType::BF16, _) => Some(240.0),
        (true, _, KanPass::ForwardBackward, DType::BF16, _) => Some(900.0),
        (true, _, KanPass::Forward, DType::F32, false) => Some(2000.0),
        (true, _, KanPass::ForwardBackward, DType::F32, false) => Some(6000.0),
        (_, true, KanPass::Forward, DType::F32, false) => Some(60.0),
        _ => None,
    }
}

/// Benchmarks a KANLinear pass on the forward pipeline `path`; FLOPs count the GEMMs
/// (forward: 2 rows out in (G + k + 1), forward + backward: three times that) whichever
/// path runs, bytes the inputs, parameters and outputs once. Inputs rotate among 4 sets and
/// the layer among copies whose parameters together exceed 150 MB, so that neither is
/// served from L2 (as in a model, where other layers run between two calls of one).
pub fn bench_kan(
    device: &Device,
    pass: KanPass,
    dtype: DType,
    tf32: bool,
    path: crate::ops::kan::KanForwardPath,
    shape: KanShape,
    reps: Repeats,
) -> Result<BenchRow> {
    use crate::ops::kan::{KanForwardPath, KanLinear, KanLinearConfig};
    let mut cfg = KanLinearConfig::new(shape.in_features, shape.out_features);
    cfg.grid_size = shape.grid_size;
    cfg.spline_order = shape.order;
    let mut layer = KanLinear::new(cfg, dtype, device, 1)?;
    layer.set_allow_tf32(tf32);
    layer.set_forward_path(path);
    let param_bytes = (shape.in_features * shape.out_features * (shape.grid_size + shape.order + 2)) as f64
        * dtype.size_in_bytes() as f64;
    let copies = if device.is_cuda() { ((150e6 / param_bytes).ceil() as usize).clamp(1, 8) } else { 1 };
    let mut layers = vec![layer.clone()];
    for _ in 1..copies {
        // A deep copy: through the host, into fresh device allocations.
        layers.push(layer.to_device(&Device::Cpu)?.to_device(device)?);
    }
    let mut rng = Rng::new(0xC0FFEE);
    let sets = if device.is_cuda() { 4 } else { 1 };
    let mut xs = Vec::with_capacity(sets);
    let mut dys = Vec::with_capacity(sets);
    for _ in 0..sets {
        let x: Vec<f32> = (0..shape.batch * shape.in_features).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let dy: Vec<f32> = (0..shape.batch * shape.out_features).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        xs.push(Tensor::from_f32(&x, &[shape.batch, shape.in_features], dtype, device)?);
        dys.push(Tensor::from_f32(&dy, &[shape.batch, shape.out_features], dtype, device)?);
    }
    let step = |i: usize| -> Result<()> {
        let (s, l) = (i % sets, &layers[i % copies]);
        match pass {
            KanPass::Forward => l.forward(&xs[s]).map(drop),
            KanPass::ForwardBackward => {
                l.forward(&xs[s])?;
                l.backward(&xs[s], &dys[s]).map(drop)
            }
        }
    };
    let (timing, peak) = match device {
        Device::Cuda(dev) => {
            for i in 0..copies.max(2) {
                step(i)?; // warm-up outside the peak measurement: module loads, cuBLAS handle
            }
            dev.synchronize()?;
            let (before, _) = dev.pool_usage()?;
            dev.reset_pool_peak()?;
            step(1)?;
            dev.synchronize()?;
            let (_, high) = dev.pool_usage()?;
            (time_cuda(dev, reps, step)?, Some(high.saturating_sub(before)))
        }
        Device::Cpu => (time_host(Repeats { warmup: 0, iters: reps.iters.min(3) }, step)?, None),
    };
    let path_name = match device {
        Device::Cuda(_) => match layer.resolved_forward_path(shape.batch) {
            KanForwardPath::Direct => " direct",
            KanForwardPath::DirectTf32x3 => " tf32x3",
            _ => " gemm",
        },
        Device::Cpu => "",
    };
    let nb = shape.grid_size + shape.order;
    let (rows, inf, outf) = (shape.batch as f64, shape.in_features as f64, shape.out_features as f64);
    let gemm = 2.0 * rows * outf * inf * (nb as f64 + 1.0);
    let params = outf * inf * (nb as f64 + 2.0);
    let es = dtype.size_in_bytes() as f64;
    let (flops, bytes) = match pass {
        KanPass::Forward => (gemm, es * (rows * inf + params + rows * outf)),
        KanPass::ForwardBackward => (3.0 * gemm, es * (2.0 * rows * inf + 2.0 * params + 2.0 * rows * outf)),
    };
    let op = match pass {
        KanPass::Forward => "kan_linear forward",
        KanPass::ForwardBackward => "kan_linear fwd+bwd",
    };
    Ok(BenchRow {
        op: format!("{op}{path_name}"),
        dtype,
        shape: format!(
            "{}x{}->{} G={}{}",
            shape.batch,
            shape.in_features,
            shape.out_features,
            shape.grid_size,
            if tf32 { " tf32" } else { "" }
        ),
        device: device.to_string(),
        timing,
        bytes,
        flops,
        copy_gbs: None,
        target_us: kan_target_us(shape, pass, dtype, tf32),
        peak_extra_bytes: peak,
    })
}

/// `bench kan`: forward and forward+backward at every shape in bf16, f32 and (full table)
/// TF32, then the direct forwards forced where they cover the layer (full table, GPU). On
/// the CPU the shapes shrink to 16x64->64: the f64 reference is far too slow for them.
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let (device, reps, short) = (ctx.device, ctx.reps, ctx.short);
    let mut rows = Vec::new();
    for &shape in KAN_SHAPES {
        let shape =
            if device.is_cuda() { shape } else { KanShape { batch: 16, in_features: 64, out_features: 64, ..shape } };
        for pass in [KanPass::Forward, KanPass::ForwardBackward] {
            for (dtype, tf32) in [(DType::BF16, false), (DType::F32, false), (DType::F32, true)] {
                if (short || !device.is_cuda()) && tf32 {
                    continue;
                }
                rows.push(bench_kan(device, pass, dtype, tf32, KanForwardPath::Auto, shape, reps)?);
            }
        }
        if device.is_cuda() && !short && shape.grid_size + shape.order <= 8 {
            for (dtype, path) in [
                (DType::BF16, KanForwardPath::Direct),
                (DType::F32, KanForwardPath::Direct),
                (DType::F32, KanForwardPath::DirectTf32x3),
            ] {
                rows.push(bench_kan(device, KanPass::Forward, dtype, false, path, shape, reps)?);
            }
        }
    }
    Ok(rows)
}
