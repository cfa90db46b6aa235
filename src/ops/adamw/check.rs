//! AdamW's check cases: three steps over tensors of odd sizes (chunk remainders, elements past
//! the last full vector) in two groups, with clipping, zeroing and bf16/f16/f32 copies, against
//! the f64 step applied to the same f32 values each step. f32 results of a few operations: four
//! f32 roundings; the copies one more rounding in their type.

use super::{adamw_step, AdamWConfig, AdamWParam, ParamGroup};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::measure::{relative_error, relative_error_in, rounding_tolerance, CheckRow};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The tolerance of parameters, moments and the norm (f32), and of a copy in `dtype`.
pub fn adamw_tolerance(dtype: DType) -> f64 {
    rounding_tolerance(dtype, 2.0, 0.0).max(rounding_tolerance(DType::F32, 4.0, 1e-6))
}

/// One case: tensors of `sizes` elements, the copies in `copy`, `steps` steps.
#[derive(Clone, Debug)]
pub struct AdamWCase {
    pub sizes: Vec<usize>,
    pub copy: DType,
    pub clip: Option<f32>,
    pub zero_grad: bool,
    pub steps: u64,
}

struct State {
    w: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    copy: Tensor,
}

impl AdamWCase {
    /// The worst error on `device` over every step and output.
    pub fn run(&self, seed: u64, device: &Device) -> Result<f64> {
        let mut rng = Rng::new(seed);
        let groups = [ParamGroup { lr: 3e-3, weight_decay: 0.1 }, ParamGroup { lr: 1e-2, weight_decay: 0.0 }];
        let config = AdamWConfig { max_grad_norm: self.clip, zero_grad: self.zero_grad, ..Default::default() };
        let mut vec = |n: usize, s: f64| -> Vec<f32> { (0..n).map(|_| rng.uniform(-s, s) as f32).collect() };
        let mut gpu = Vec::new();
        let mut host = Vec::new();
        for &n in &self.sizes {
            let (w, g, m, v) = (vec(n, 1.0), vec(n, 0.5), vec(n, 0.01), vec(n, 1e-4));
            let v: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            let make = |d: &Device| -> Result<State> {
                let f = |x: &[f32]| Tensor::from_f32(x, &[n], DType::F32, d);
                Ok(State { w: f(&w)?, g: f(&g)?, m: f(&m)?, v: f(&v)?, copy: Tensor::full(0.0, &[n], self.copy, d)? })
            };
            gpu.push(make(device)?);
            host.push(make(&Device::Cpu)?);
        }
        let mut worst = 0.0f64;
        for step in 1..=self.steps {
            let norm_dev = run_step(&config, step, &groups, &mut gpu)?;
            // The reference starts each step from the device's f32 state (set at the end of the
            // previous step), so errors do not compound.
            let norm_ref = run_step(&config, step, &groups, &mut host)?;
            if let (Some(a), Some(b)) = (norm_dev, norm_ref) {
                worst = worst.max(relative_error(&a.to_f64_vec()?, &b.to_f64_vec()?));
            }
            for (d, h) in gpu.iter().zip(host.iter_mut()) {
                worst = worst.max(relative_error(&d.w.to_f64_vec()?, &h.w.to_f64_vec()?));
                worst = worst.max(relative_error(&d.m.to_f64_vec()?, &h.m.to_f64_vec()?));
                worst = worst.max(relative_error(&d.v.to_f64_vec()?, &h.v.to_f64_vec()?));
                worst = worst.max(relative_error_in(&d.copy.to_f64_vec()?, &h.copy.to_f64_vec()?, self.copy));
                worst = worst.max(relative_error(&d.g.to_f64_vec()?, &h.g.to_f64_vec()?));
                // The next step starts from the device's state (its gradient zeroed or kept).
                *h = State {
                    w: d.w.to_device(&Device::Cpu)?,
                    g: d.g.to_device(&Device::Cpu)?,
                    m: d.m.to_device(&Device::Cpu)?,
                    v: d.v.to_device(&Device::Cpu)?,
                    copy: d.copy.to_device(&Device::Cpu)?,
                };
            }
        }
        Ok(worst)
    }
}

fn run_step(c: &AdamWConfig, step: u64, groups: &[ParamGroup], states: &mut [State]) -> Result<Option<Tensor>> {
    let mut params: Vec<AdamWParam> = states
        .iter_mut()
        .enumerate()
        .map(|(i, s)| AdamWParam {
            param: &mut s.w,
            grad: &mut s.g,
            m: &mut s.m,
            v: &mut s.v,
            copy: Some(&mut s.copy),
            group: i % 2,
        })
        .collect();
    Ok(adamw_step(c, step, groups, &mut params)?.grad_norm)
}

/// `check`'s AdamW rows: per copy type, odd sizes across chunk boundaries, clipping that bites
/// and zeroing.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    for copy in DType::ALL {
        let cases = [
            AdamWCase { sizes: vec![1, 7, 4096, 4097, 33, 100_003], copy, clip: Some(1.0), zero_grad: true, steps: 3 },
            AdamWCase { sizes: vec![5, 8191, 12_288], copy, clip: None, zero_grad: false, steps: 2 },
        ];
        let mut worst = 0.0f64;
        for case in &cases {
            worst = worst.max(case.run(rng.next_u64(), device)?);
        }
        rows.push(CheckRow {
            kernel: "adamw clip+step+copy",
            dtype: copy,
            cases: cases.len(),
            worst,
            tolerance: adamw_tolerance(copy),
        });
    }
    Ok(rows)
}
