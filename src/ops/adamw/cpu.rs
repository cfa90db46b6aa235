//! f64 reference for AdamW, also its CPU backend.

use super::{AdamWConfig, AdamWParam, AdamWStep, ParamGroup};
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;

/// The clip factor of `clip_grad_norm_` for gradients of global norm `norm`.
pub fn clip_factor(max_norm: Option<f64>, norm: f64) -> f64 {
    max_norm.map_or(1.0, |m| (m / (norm + 1e-6)).min(1.0))
}

/// One element's update: `(w, m, v)` after a step with gradient `g` (already clipped).
#[allow(clippy::too_many_arguments)]
pub fn update(w: f64, g: f64, m: f64, v: f64, c: &AdamWConfig, step: u64, group: &ParamGroup) -> (f64, f64, f64) {
    let (b1, b2) = (f64::from(c.beta1), f64::from(c.beta2));
    let (lr, wd) = (f64::from(group.lr), f64::from(group.weight_decay));
    let bc1 = 1.0 - b1.powf(step as f64);
    let bc2 = 1.0 - b2.powf(step as f64);
    let m = b1 * m + (1.0 - b1) * g;
    let v = b2 * v + (1.0 - b2) * g * g;
    let w = w * (1.0 - lr * wd) - (lr / bc1) * m / (v.sqrt() / bc2.sqrt() + f64::from(c.eps));
    (w, m, v)
}

/// The step on host tensors: every result rounded once to f32; the copy rounded from the f32
/// weight (as the GPU writes it).
pub fn step(c: &AdamWConfig, step: u64, groups: &[ParamGroup], params: &mut [AdamWParam]) -> Result<AdamWStep> {
    let grads: Vec<Vec<f64>> = params.iter().map(|p| p.grad.to_f64_vec()).collect::<Result<_>>()?;
    let norm = grads.iter().flatten().map(|g| g * g).sum::<f64>().sqrt();
    let clip = clip_factor(c.max_grad_norm.map(f64::from), norm);
    for (p, g) in params.iter_mut().zip(&grads) {
        let (w, m, v) = (p.param.to_f64_vec()?, p.m.to_f64_vec()?, p.v.to_f64_vec()?);
        let n = w.len();
        let (mut w2, mut m2, mut v2) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let (a, b, d) = update(w[i], g[i] * clip, m[i], v[i], c, step, &groups[p.group]);
            w2.push(a);
            m2.push(b);
            v2.push(d);
        }
        let shape = p.param.shape().to_vec();
        *p.param = Tensor::from_f64_rounded(&w2, &shape, DType::F32)?;
        *p.m = Tensor::from_f64_rounded(&m2, &shape, DType::F32)?;
        *p.v = Tensor::from_f64_rounded(&v2, &shape, DType::F32)?;
        if let Some(copy) = p.copy.as_deref_mut() {
            *copy = Tensor::from_f64_rounded(&p.param.to_f64_vec()?, &shape, copy.dtype())?;
        }
        if c.zero_grad {
            *p.grad = Tensor::full(0.0, &shape, DType::F32, &crate::device::Device::Cpu)?;
        }
    }
    let grad_norm = match c.max_grad_norm {
        Some(_) => Some(Tensor::from_f64_rounded(&[norm], &[1], DType::F32)?),
        None => None,
    };
    Ok(AdamWStep { grad_norm })
}
