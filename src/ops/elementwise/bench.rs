//! The elementwise ops' bench rows: the MLP hidden layer of a language model, 16384 tokens of
//! width 4 x 2048 (and 4 x 768 in the full table).

use super::{activation, activation_backward, add_into, gated, gated_backward, Activation};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::timing::{time_on, BenchContext, BenchRow, Repeats};

/// What a row times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementwiseBench {
    Activation(Activation),
    ActivationBackward(Activation),
    Gated(Activation),
    GatedBackward(Activation),
    /// f32 dst += src of the row's type.
    AddIntoF32,
}

impl ElementwiseBench {
    fn name(self) -> String {
        match self {
            ElementwiseBench::Activation(a) => a.as_str().to_string(),
            ElementwiseBench::ActivationBackward(a) => format!("{} backward", a.as_str()),
            ElementwiseBench::Gated(a) => format!("gated {}", a.as_str()),
            ElementwiseBench::GatedBackward(a) => format!("gated {} backward", a.as_str()),
            ElementwiseBench::AddIntoF32 => "add_into f32".into(),
        }
    }

    /// Bytes moved per element: tensors read and written, in the row's type (f32 dst: 8).
    fn bytes_per_element(self, es: f64) -> f64 {
        match self {
            ElementwiseBench::Activation(_) => 2.0 * es,
            ElementwiseBench::ActivationBackward(_) | ElementwiseBench::Gated(_) => 3.0 * es,
            ElementwiseBench::GatedBackward(_) => 5.0 * es,
            ElementwiseBench::AddIntoF32 => es + 8.0,
        }
    }
}

/// Times one op on `n` elements of `dtype`, inputs rotated over sets whose total exceeds L2.
pub fn bench_elementwise(
    device: &Device,
    which: ElementwiseBench,
    dtype: DType,
    n: usize,
    reps: Repeats,
    copy_gbs: Option<f64>,
) -> Result<BenchRow> {
    let mut rng = Rng::new(0xe1e);
    // Rotated sets only where one set would sit in L2 (50 MB on an H200).
    let sets = if device.is_cuda() && n * dtype.size_in_bytes() < (64 << 20) { 4 } else { 1 };
    let mut vector = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.uniform(-4.0, 4.0) as f32).collect() };
    let mut data = Vec::with_capacity(sets);
    for _ in 0..sets {
        let a = Tensor::from_f32(&vector(n), &[n], dtype, device)?;
        let b = Tensor::from_f32(&vector(n), &[n], dtype, device)?;
        let c = Tensor::from_f32(&vector(n), &[n], dtype, device)?;
        let acc = Tensor::from_f32(&vector(n), &[n], DType::F32, device)?;
        data.push((a, b, c, acc));
    }
    let mut step = |i: usize| -> Result<()> {
        let (a, b, c, acc) = &mut data[i % sets];
        match which {
            ElementwiseBench::Activation(act) => drop(activation(a, act)?),
            ElementwiseBench::ActivationBackward(act) => drop(activation_backward(a, b, act)?),
            ElementwiseBench::Gated(act) => drop(gated(a, b, act)?),
            ElementwiseBench::GatedBackward(act) => drop(gated_backward(a, b, c, act)?),
            ElementwiseBench::AddIntoF32 => add_into(acc, a)?,
        }
        Ok(())
    };
    let timing = time_on(device, reps, &mut step)?;
    let bytes = which.bytes_per_element(dtype.size_in_bytes() as f64) * n as f64;
    Ok(BenchRow::memory_bound(which.name(), dtype, format!("{n}"), device, timing, bytes, copy_gbs))
}

/// `bench elementwise`: SiLU, GELU (tanh) and SwiGLU forward and backward, and the add into
/// the f32 residual stream, in bf16 at 16384 x 8192 and 16384 x 3072 elements (64 rows on the
/// CPU); the short table only the first.
pub fn bench_rows(ctx: &BenchContext) -> Result<Vec<BenchRow>> {
    let tokens = if ctx.device.is_cuda() { 16384 } else { 64 };
    let widths: &[usize] = if ctx.short { &[8192] } else { &[8192, 3072] };
    let mut rows = Vec::new();
    for &width in widths {
        for which in [
            ElementwiseBench::Activation(Activation::Silu),
            ElementwiseBench::Activation(Activation::GeluTanh),
            ElementwiseBench::ActivationBackward(Activation::GeluTanh),
            ElementwiseBench::Gated(Activation::Silu),
            ElementwiseBench::GatedBackward(Activation::Silu),
            ElementwiseBench::AddIntoF32,
        ] {
            rows.push(bench_elementwise(ctx.device, which, DType::BF16, tokens * width, ctx.reps, ctx.copy_gbs)?);
        }
    }
    Ok(rows)
}
