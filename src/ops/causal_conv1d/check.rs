//! The causal conv1d's check cases: output, final state and every gradient against the f64
//! reference, and decoding against the conv.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::measure::{optional_error, relative_error_in, rounding_tolerance, tensor_error, CheckRow};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Tolerance of the causal conv1d's outputs and gradients ([`crate::measure::relative_error_in`]
/// against the f64 reference on the same rounded inputs). The kernels sum at most `width`
/// products per output in f32 (SiLU through `__expf`) and the weight gradient over batch x
/// len in a fixed tree (2e-5), and round each output once, allowed twice.
pub fn conv_tolerance(dtype: DType) -> f64 {
    rounding_tolerance(dtype, 2.0, 2e-5)
}

/// One random causal-conv1d problem.
#[derive(Clone, Debug)]
pub struct ConvCase {
    pub batch: usize,
    pub dim: usize,
    pub len: usize,
    pub width: usize,
    pub with_bias: bool,
    pub silu: bool,
    pub with_init: bool,
    pub with_resets: bool,
    pub with_dfinal: bool,
    /// Inputs are drawn from ±`scale` (large values drive SiLU into saturation).
    pub scale: f64,
    pub dtype: DType,
}

/// The tensors of a [`ConvCase`] on the host, owned.
#[derive(Clone, Debug)]
pub struct ConvTensors {
    pub x: Tensor,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub initial_state: Option<Tensor>,
    pub resets: Option<crate::ops::causal_conv1d::SequenceResets>,
    pub silu: bool,
}

impl ConvTensors {
    pub fn inputs(&self) -> crate::ops::causal_conv1d::ConvInputs<'_> {
        crate::ops::causal_conv1d::ConvInputs {
            bias: self.bias.as_ref(),
            initial_state: self.initial_state.as_ref(),
            resets: self.resets.as_ref(),
            silu: self.silu,
            ..crate::ops::causal_conv1d::ConvInputs::new(&self.x, &self.weight)
        }
    }

    pub fn to_device(&self, device: &Device) -> Result<ConvTensors> {
        let mv = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device)).transpose();
        Ok(ConvTensors {
            x: self.x.to_device(device)?,
            weight: self.weight.to_device(device)?,
            bias: mv(&self.bias)?,
            initial_state: mv(&self.initial_state)?,
            resets: self.resets.as_ref().map(|r| r.to_device(device)).transpose()?,
            silu: self.silu,
        })
    }
}

impl ConvCase {
    /// A case with its options from the bits of `flags`: 0 bias, 1 SiLU, 2 initial state,
    /// 3 resets, 4 a final-state gradient; inputs of order one.
    pub fn from_option_bits(batch: usize, dim: usize, len: usize, width: usize, flags: u32, dtype: DType) -> ConvCase {
        let bit = |i: u32| flags & (1 << i) != 0;
        ConvCase {
            batch,
            dim,
            len,
            width,
            with_bias: bit(0),
            silu: bit(1),
            with_init: bit(2),
            with_resets: bit(3),
            with_dfinal: bit(4),
            scale: 1.0,
            dtype,
        }
    }

    fn state_shape(&self) -> [usize; 3] {
        [self.batch, self.dim, self.width - 1]
    }

    /// Inputs on the host: x and the initial state in ±scale, weights in ±1/√width, bias
    /// in ±0.5, resets at ~6% of the steps.
    pub fn tensors(&self, rng: &mut Rng) -> Result<ConvTensors> {
        let dev = Device::Cpu;
        let mut gen = |n: usize, r: f64| -> Vec<f32> { (0..n).map(|_| rng.uniform(-r, r) as f32).collect() };
        let x = Tensor::from_f32(
            &gen(self.batch * self.dim * self.len, self.scale),
            &[self.batch, self.dim, self.len],
            self.dtype,
            &dev,
        )?;
        let wr = 1.0 / (self.width as f64).sqrt();
        let weight = Tensor::from_f32(&gen(self.dim * self.width, wr), &[self.dim, self.width], DType::F32, &dev)?;
        let bias =
            self.with_bias.then(|| Tensor::from_f32(&gen(self.dim, 0.5), &[self.dim], DType::F32, &dev)).transpose()?;
        let n_state = self.batch * self.dim * (self.width - 1);
        let initial_state = self
            .with_init
            .then(|| Tensor::from_f32(&gen(n_state, self.scale), &self.state_shape(), self.dtype, &dev))
            .transpose()?;
        let resets = if self.with_resets {
            let flags: Vec<bool> = (0..self.batch * self.len).map(|_| rng.below(16) == 0).collect();
            Some(crate::ops::causal_conv1d::SequenceResets::from_flags(self.batch, self.len, &flags)?)
        } else {
            None
        };
        Ok(ConvTensors { x, weight, bias, initial_state, resets, silu: self.silu })
    }

    /// Forward, final state and every gradient on `device` against the f64 reference:
    /// `(name, relative error)` per output.
    pub fn run(&self, seed: u64, device: &Device) -> Result<Vec<(&'static str, f64)>> {
        use crate::ops::causal_conv1d::{causal_conv1d, causal_conv1d_backward, cpu};
        let mut rng = Rng::new(seed);
        let host = self.tensors(&mut rng)?;
        let n = self.batch * self.dim * self.len;
        let dout = Tensor::from_f32(
            &(0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect::<Vec<_>>(),
            host.x.shape(),
            self.dtype,
            &Device::Cpu,
        )?;
        let dfinal = self
            .with_dfinal
            .then(|| {
                let v: Vec<f32> =
                    (0..self.batch * self.dim * (self.width - 1)).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
                Tensor::from_f32(&v, &self.state_shape(), self.dtype, &Device::Cpu)
            })
            .transpose()?;
        let p = host.inputs().to_f64()?;
        let f_ref = cpu::forward(&p);
        let g_ref =
            cpu::backward(&p, &dout.to_f64_vec()?, dfinal.as_ref().map(|t| t.to_f64_vec()).transpose()?.as_deref());

        let dev_t = host.to_device(device)?;
        let inputs = dev_t.inputs();
        let (dout_d, dfinal_d) = (dout.to_device(device)?, dfinal.as_ref().map(|t| t.to_device(device)).transpose()?);
        let out = causal_conv1d(&inputs)?;
        let g = causal_conv1d_backward(&inputs, &dout_d, dfinal_d.as_ref())?;
        let (err, opt) = (tensor_error, optional_error);
        Ok(vec![
            ("out", err(&out.out, &f_ref.out)?),
            ("final_state", err(&out.final_state, &f_ref.final_state)?),
            ("dx", err(&g.dx, &g_ref.dx)?),
            ("dweight", err(&g.dweight, &g_ref.dweight)?),
            ("dbias", opt(&g.dbias, &g_ref.dbias)?),
            ("dinitial_state", opt(&g.dinitial_state, &g_ref.dinitial_state)?),
        ])
    }
}

/// Decoding a [`ConvCase`] with `causal_conv1d_update`, `tokens_per_step` tokens at a time,
/// from its initial state padded on the left to `state_len` (>= width - 1), against one
/// `causal_conv1d` over the sequence, both on `device`: relative errors of the outputs (all
/// tokens) and of the final state (the state's last width - 1 values). Resets do not apply
/// to decoding (the case's are ignored).
pub fn decode_against_conv(
    case: &ConvCase,
    seed: u64,
    device: &Device,
    tokens_per_step: usize,
    state_len: usize,
) -> Result<(f64, f64)> {
    use crate::ops::causal_conv1d::{causal_conv1d, causal_conv1d_update};
    let case = ConvCase { with_resets: false, ..case.clone() };
    let host = case.tensors(&mut Rng::new(seed))?;
    let dev_t = host.to_device(device)?;
    let conv = causal_conv1d(&dev_t.inputs())?;
    let (rows, l, sl) = (case.batch * case.dim, case.len, case.width - 1);
    if state_len < sl || tokens_per_step == 0 {
        return Err(Error::invalid("state_len", format!(">= {sl}, and tokens_per_step >= 1"), state_len.to_string()));
    }
    let x = host.x.to_f32_vec()?;
    let init = host.initial_state.as_ref().map(Tensor::to_f32_vec).transpose()?;
    let mut state0 = vec![0.0f32; rows * state_len];
    if let Some(h) = &init {
        for r in 0..rows {
            state0[r * state_len + state_len - sl..][..sl].copy_from_slice(&h[r * sl..][..sl]);
        }
    }
    let mut state = Tensor::from_f32(&state0, &[case.batch, case.dim, state_len], case.dtype, device)?;
    let mut outs = vec![0.0f64; rows * l];
    let mut t0 = 0;
    while t0 < l {
        let tk = tokens_per_step.min(l - t0);
        let chunk: Vec<f32> = (0..rows * tk).map(|i| x[(i / tk) * l + t0 + i % tk]).collect();
        let shape: Vec<usize> =
            if tokens_per_step == 1 { vec![case.batch, case.dim] } else { vec![case.batch, case.dim, tk] };
        let xt = Tensor::from_f32(&chunk, &shape, case.dtype, device)?;
        let y = causal_conv1d_update(&mut state, &xt, &dev_t.weight, dev_t.bias.as_ref(), case.silu)?.to_f64_vec()?;
        for (i, v) in y.into_iter().enumerate() {
            outs[(i / tk) * l + t0 + i % tk] = v;
        }
        t0 += tk;
    }
    let st = state.to_f64_vec()?;
    let last: Vec<f64> = (0..rows).flat_map(|r| st[r * state_len + state_len - sl..][..sl].to_vec()).collect();
    let out_err = relative_error_in(&outs, &conv.out.to_f64_vec()?, case.dtype);
    Ok((out_err, relative_error_in(&last, &conv.final_state.to_f64_vec()?, conv.final_state.dtype())))
}

/// `check`'s causal-conv1d rows: output, final state and every gradient, then decoding with
/// `causal_conv1d_update` 7 tokens at a time against the conv (the worst of all) per dtype.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    // (batch, dim, len, width, option bits of ConvCase::from_option_bits)
    let cases: &[(usize, usize, usize, usize, u32)] =
        &[(1, 1, 1, 2, 0b11111), (2, 7, 33, 3, 0b10111), (3, 40, 1025, 4, 0b11111), (1, 33, 3000, 4, 0b00011)];
    let mut rows = Vec::new();
    for dtype in DType::ALL {
        let mut worst = 0.0f64;
        for &(batch, dim, len, width, flags) in cases {
            let case = ConvCase::from_option_bits(batch, dim, len, width, flags, dtype);
            worst = case.run(rng.next_u64(), device)?.into_iter().fold(worst, |w, (_, e)| w.max(e));
            let (out, last) = decode_against_conv(&case, rng.next_u64(), device, 7, width + 2)?;
            worst = worst.max(out).max(last);
        }
        let tolerance = conv_tolerance(dtype);
        rows.push(CheckRow { kernel: "causal_conv1d fwd+grads", dtype, cases: cases.len(), worst, tolerance });
    }
    Ok(rows)
}
