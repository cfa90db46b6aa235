//! KANLinear's check cases: forward and every gradient against the f64 reference, on
//! every forward path.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::measure::{rounding_tolerance, scaled_error, CheckRow};
use crate::ops::kan::KanForwardPath;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// The largest relative error of rounding an f32 operand to TF32 (10 stored mantissa bits,
/// 11 significant): 2^-11.
pub const TF32_UNIT_ROUNDOFF: f64 = 1.0 / 2048.0;

/// Tolerance of KANLinear's forward and gradients, measured by [`scaled_error`] against
/// the f64 reference (also used by the B-spline activation, which rounds alike). f32 runs
/// SGEMM-accurate (1e-5). bf16 and f16 round three chained values to the storage type
/// (SiLU(x) and the bases, the GEMM outputs, the intermediate gradients), each up to one
/// unit roundoff: three roundings, allowed twice. TF32 rounds both GEMM operands and the
/// intermediate features alike: six TF32 roundings.
pub fn kan_tolerance(dtype: DType, tf32: bool) -> f64 {
    if tf32 {
        6.0 * TF32_UNIT_ROUNDOFF + 1e-5
    } else {
        rounding_tolerance(dtype, 6.0, 1e-5)
    }
}

/// One random KANLinear case: forward and all gradients on `device` against the f64
/// reference, parameters and inputs rounded to `dtype` first so both see the same values.
#[derive(Clone, Debug)]
pub struct KanCase {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub grid_size: usize,
    pub order: usize,
    pub scaler: bool,
    pub dtype: DType,
    pub tf32: bool,
    /// The GPU forward pipeline (the backward is the same for all).
    pub path: KanForwardPath,
}

/// Relative errors of one [`KanCase`].
#[derive(Clone, Copy, Debug)]
pub struct KanErrors {
    pub y: f64,
    pub dx: f64,
    pub base_weight: f64,
    pub spline_weight: f64,
    pub spline_scaler: f64,
}

impl KanErrors {
    pub fn max(&self) -> f64 {
        [self.y, self.dx, self.base_weight, self.spline_weight, self.spline_scaler].into_iter().fold(0.0, f64::max)
    }

    pub fn named(&self) -> [(&'static str, f64); 5] {
        [
            ("y", self.y),
            ("dx", self.dx),
            ("dW_base", self.base_weight),
            ("dW_spline", self.spline_weight),
            ("dscaler", self.spline_scaler),
        ]
    }
}

impl KanCase {
    pub fn run(&self, seed: u64, device: &Device) -> Result<KanErrors> {
        use crate::ops::kan::{cpu, KanLinear, KanLinearConfig};
        let mut c = KanLinearConfig::new(self.in_features, self.out_features);
        c.grid_size = self.grid_size;
        c.spline_order = self.order;
        c.standalone_scale_spline = self.scaler;
        c.scale_noise = 1.0; // spline weights of order one, so the spline branch matters
        let layer_host = KanLinear::new(c, self.dtype, &Device::Cpu, seed)?;
        let mut layer = layer_host.to_device(device)?;
        layer.set_allow_tf32(self.tf32);
        layer.set_forward_path(self.path);
        let mut rng = Rng::new(seed ^ 0xABCD);
        // Mostly inside the grid, some far outside it.
        let x: Vec<f32> = (0..self.batch * self.in_features)
            .map(|_| if rng.below(10) == 0 { rng.uniform(-6.0, 6.0) } else { rng.uniform(-1.2, 1.2) } as f32)
            .collect();
        let dy: Vec<f32> = (0..self.batch * self.out_features).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let xt = Tensor::from_f32(&x, &[self.batch, self.in_features], self.dtype, device)?;
        let dyt = Tensor::from_f32(&dy, &[self.batch, self.out_features], self.dtype, device)?;
        let p = layer_host.params64()?;
        let (x64, dy64) = (xt.to_f64_vec()?, dyt.to_f64_vec()?);
        let y_ref = cpu::forward(&p, &x64);
        let y_mag = cpu::forward_magnitude(&p, &x64);
        let g_ref = cpu::backward(&p, &x64, &dy64);
        let g_mag = cpu::backward_magnitude(&p, &x64, &dy64);
        let y = layer.forward(&xt)?.to_f64_vec()?;
        let g = layer.backward(&xt, &dyt)?;
        let spline_scaler = match (&g.spline_scaler, &g_ref.spline_scaler, &g_mag.spline_scaler) {
            (Some(a), Some(b), Some(m)) => scaled_error(&a.to_f64_vec()?, b, m),
            (None, None, None) => 0.0,
            _ => f64::INFINITY,
        };
        Ok(KanErrors {
            y: scaled_error(&y, &y_ref, &y_mag),
            dx: scaled_error(&g.dx.to_f64_vec()?, &g_ref.dx, &g_mag.dx),
            base_weight: scaled_error(&g.base_weight.to_f64_vec()?, &g_ref.base_weight, &g_mag.base_weight),
            spline_weight: scaled_error(&g.spline_weight.to_f64_vec()?, &g_ref.spline_weight, &g_mag.spline_weight),
            spline_scaler,
        })
    }
}

/// `check`'s KANLinear rows: forward and every gradient (the worst of y, dx, dW_base,
/// dW_spline, dscaler) per dtype and forward path; TF32 and the direct paths on the GPU only.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    // (batch, in, out, G, k, scaler)
    let cases: &[(usize, usize, usize, usize, usize, bool)] = &[
        (1, 1, 1, 1, 1, false),
        (33, 7, 33, 5, 3, true),
        (65, 33, 17, 20, 2, true),
        (7, 12, 5, 100, 3, false),
        (130, 9, 129, 3, 1, true),
        (100, 50, 40, 13, 3, true),
    ];
    let mut rows = Vec::new();
    for (dtype, tf32, path) in [
        (DType::F32, false, KanForwardPath::Gemm),
        (DType::F32, true, KanForwardPath::Gemm),
        (DType::BF16, false, KanForwardPath::Gemm),
        (DType::F16, false, KanForwardPath::Gemm),
        (DType::F32, false, KanForwardPath::Direct),
        (DType::F32, false, KanForwardPath::DirectTf32x3),
        (DType::BF16, false, KanForwardPath::Direct),
        (DType::F16, false, KanForwardPath::Direct),
    ] {
        let direct = matches!(path, KanForwardPath::Direct | KanForwardPath::DirectTf32x3);
        if (tf32 || direct) && !device.is_cuda() {
            continue;
        }
        let (mut worst, mut n) = (0.0f64, 0);
        for &(batch, in_features, out_features, grid_size, order, scaler) in cases {
            // The direct forward covers orders 1..=3 with up to 8 bases.
            if direct && grid_size + order > 8 {
                continue;
            }
            let case = KanCase { batch, in_features, out_features, grid_size, order, scaler, dtype, tf32, path };
            worst = worst.max(case.run(rng.next_u64(), device)?.max());
            n += 1;
        }
        let kernel = match (tf32, path) {
            (true, _) => "kan_linear fwd+grads tf32",
            (false, KanForwardPath::Direct) => "kan_linear direct+grads",
            (false, KanForwardPath::DirectTf32x3) => "kan_linear tf32x3+grads",
            _ => "kan_linear fwd+grads",
        };
        rows.push(CheckRow { kernel, dtype, cases: n, worst, tolerance: kan_tolerance(dtype, tf32) });
    }
    Ok(rows)
}
