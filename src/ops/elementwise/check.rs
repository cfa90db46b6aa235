//! The elementwise ops' check cases: each output against the f64 reference on the same rounded
//! inputs, inputs spread over [-8, 8] (both tails of every activation) plus exact zeros. One
//! rounding into the element type of an f32 result a few ulp off: two roundings allowed, plus
//! 1e-6 for the f32 functions.

use super::{activation, activation_backward, add_into, cpu, gated, gated_backward, Activation};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::measure::{relative_error_in, rounding_tolerance, CheckRow};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The tolerance of every elementwise output in `dtype` (see the module notes).
pub fn elementwise_tolerance(dtype: DType) -> f64 {
    rounding_tolerance(dtype, 2.0, 1e-6)
}

fn inputs(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|i| if i % 17 == 0 { 0.0 } else { rng.uniform(-8.0, 8.0) as f32 }).collect()
}

/// The worst error of the activation, its backward, the gated product and its backward for
/// `act` on `n` elements of `dtype`.
pub fn activation_case(n: usize, dtype: DType, act: Activation, seed: u64, device: &Device) -> Result<f64> {
    let mut rng = Rng::new(seed);
    let shape = [n];
    let t = |v: &[f32]| Tensor::from_f32(v, &shape, dtype, device);
    let (x, up, dy) = (t(&inputs(&mut rng, n))?, t(&inputs(&mut rng, n))?, t(&inputs(&mut rng, n))?);
    let (x64, u64_, dy64) = (x.to_f64_vec()?, up.to_f64_vec()?, dy.to_f64_vec()?);
    let y_ref: Vec<f64> = x64.iter().map(|&v| cpu::act(act, v)).collect();
    let dx_ref: Vec<f64> = x64.iter().zip(&dy64).map(|(&v, d)| d * cpu::act_grad(act, v)).collect();
    let g_ref: Vec<f64> = x64.iter().zip(&u64_).map(|(&g, u)| cpu::act(act, g) * u).collect();
    let (dg_ref, du_ref) = cpu::gated_backward(&x64, &u64_, &dy64, act);
    let gg = gated_backward(&x, &up, &dy, act)?;
    Ok([
        relative_error_in(&activation(&x, act)?.to_f64_vec()?, &y_ref, dtype),
        relative_error_in(&activation_backward(&x, &dy, act)?.to_f64_vec()?, &dx_ref, dtype),
        relative_error_in(&gated(&x, &up, act)?.to_f64_vec()?, &g_ref, dtype),
        relative_error_in(&gg.dgate.to_f64_vec()?, &dg_ref, dtype),
        relative_error_in(&gg.dup.to_f64_vec()?, &du_ref, dtype),
    ]
    .into_iter()
    .fold(0.0, f64::max))
}

/// The error of `dst += src` with dst in `dst_type` and src in `src_type`.
pub fn add_case(n: usize, dst_type: DType, src_type: DType, seed: u64, device: &Device) -> Result<f64> {
    let mut rng = Rng::new(seed);
    let mut dst = Tensor::from_f32(&inputs(&mut rng, n), &[n], dst_type, device)?;
    let src = Tensor::from_f32(&inputs(&mut rng, n), &[n], src_type, device)?;
    let want: Vec<f64> = dst.to_f64_vec()?.iter().zip(src.to_f64_vec()?).map(|(a, b)| a + b).collect();
    add_into(&mut dst, &src)?;
    Ok(relative_error_in(&dst.to_f64_vec()?, &want, dst_type))
}

/// `check`'s elementwise rows: every activation (forward, backward, gated, gated backward) and
/// the add per dtype, at lengths 1, 7, 33, 1025 and 100003 (vectors and remainders).
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    let lengths = [1usize, 7, 33, 1025, 100_003];
    let mut rows = Vec::new();
    for act in Activation::ALL {
        let kernel = match act {
            Activation::Silu => "silu, swiglu fwd+grads",
            Activation::GeluTanh => "gelu_tanh, geglu fwd+grads",
            Activation::GeluErf => "gelu, geglu fwd+grads",
        };
        for dtype in DType::ALL {
            let mut worst = 0.0f64;
            for &n in &lengths {
                worst = worst.max(activation_case(n, dtype, act, rng.next_u64(), device)?);
            }
            rows.push(CheckRow { kernel, dtype, cases: lengths.len(), worst, tolerance: elementwise_tolerance(dtype) });
        }
    }
    for dtype in DType::ALL {
        let mut worst = 0.0f64;
        for &n in &lengths {
            worst = worst.max(add_case(n, dtype, dtype, rng.next_u64(), device)?);
            worst = worst.max(add_case(n, DType::F32, dtype, rng.next_u64(), device)?);
        }
        rows.push(CheckRow {
            kernel: "add_into (same, into f32)",
            dtype,
            cases: 2 * lengths.len(),
            worst,
            tolerance: elementwise_tolerance(dtype),
        });
    }
    Ok(rows)
}
