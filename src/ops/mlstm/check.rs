//! The mLSTM's check cases: h and the final state against the f64 recurrence, every
//! gradient against the f64 backward (allowing for the problem's conditioning), and
//! decoding token by token against the sequence pass.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::measure::{relative_error, rounding_tolerance, scaled_error, tensor_error, CheckRow};
use crate::ops::mlstm::NormalizerGrad;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Tolerance of the mLSTM's h ([`scaled_error`] against the f64 recurrence on the same
/// rounded inputs, scaled by [`crate::ops::mlstm::cpu::h_magnitude`]) and final states
/// ([`crate::measure::relative_error_in`]). f32: FMA sums over a chunk and the head
/// dimension, gates through `__expf` (2e-5). bf16 / f16: the tensor-core products take P
/// (the gated scores) and the carried C rounded to the element type, two roundings beyond
/// the output's: three, allowed five.
pub fn mlstm_tolerance(dtype: DType) -> f64 {
    rounding_tolerance(dtype, 5.0, 2e-5)
}

/// Tolerance of the mLSTM gradients (the error of each against the f64 reference backward
/// on the same rounded inputs, see [`MlstmCase::run_backward`]). f32: as the forward, over
/// three recomputing passes and the gate sums (1e-4). bf16 / f16: each pass rounds dh / d,
/// its gated scores and carried state to the element type for the tensor cores, and the gate
/// gradients read the rounded dk, so about three times the forward's: sixteen roundings.
pub fn mlstm_grad_tolerance(dtype: DType) -> f64 {
    rounding_tolerance(dtype, 16.0, 1e-4)
}

/// One random mLSTM problem.
#[derive(Clone, Debug)]
pub struct MlstmCase {
    pub batch: usize,
    pub heads: usize,
    pub len: usize,
    pub dqk: usize,
    pub dhv: usize,
    pub with_init: bool,
    pub with_dfinal: bool,
    /// Input gate preactivations are drawn from this range, forget gates from `f_range`.
    pub i_range: (f64, f64),
    pub f_range: (f64, f64),
    /// q, k, v are drawn from ±`scale`.
    pub scale: f64,
    pub chunk: Option<usize>,
    pub dtype: DType,
    /// The backward takes the saved forward of [`crate::ops::mlstm::mlstm_for_backward`]
    /// instead of recomputing it.
    pub saved_forward: bool,
}

/// The tensors of an [`MlstmCase`], owned.
#[derive(Clone, Debug)]
pub struct MlstmTensors {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub i: Tensor,
    pub f: Tensor,
    pub initial: Option<crate::ops::mlstm::MlstmState>,
    pub chunk: Option<usize>,
}

impl MlstmTensors {
    pub fn inputs(&self) -> crate::ops::mlstm::MlstmInputs<'_> {
        crate::ops::mlstm::MlstmInputs {
            initial: self.initial.as_ref(),
            chunk: self.chunk,
            ..crate::ops::mlstm::MlstmInputs::new(&self.q, &self.k, &self.v, &self.i, &self.f)
        }
    }

    pub fn to_device(&self, device: &Device) -> Result<MlstmTensors> {
        Ok(MlstmTensors {
            q: self.q.to_device(device)?,
            k: self.k.to_device(device)?,
            v: self.v.to_device(device)?,
            i: self.i.to_device(device)?,
            f: self.f.to_device(device)?,
            initial: self.initial.as_ref().map(|s| s.to_device(device)).transpose()?,
            chunk: self.chunk,
        })
    }
}

impl MlstmCase {
    /// Gates as xLSTM's layers see them early in training: i in [-3, 3], f in [-2, 6].
    pub fn new(batch: usize, heads: usize, len: usize, dqk: usize, dhv: usize, dtype: DType) -> MlstmCase {
        MlstmCase {
            batch,
            heads,
            len,
            dqk,
            dhv,
            with_init: false,
            with_dfinal: false,
            i_range: (-3.0, 3.0),
            f_range: (-2.0, 6.0),
            scale: 1.0,
            chunk: None,
            dtype,
            saved_forward: false,
        }
    }

    /// Strongly negative forget gates and large input gates: the max state moves by tens
    /// every step.
    pub fn extreme_gates(self) -> MlstmCase {
        MlstmCase { i_range: (5.0, 30.0), f_range: (-30.0, -5.0), ..self }
    }

    /// [`MlstmCase::extreme_gates`] when `extreme`, else the case as it is.
    pub fn with_extreme_gates(self, extreme: bool) -> MlstmCase {
        if extreme {
            self.extreme_gates()
        } else {
            self
        }
    }

    /// For gradient checks: extreme gates when `extreme`, except in f16, which keeps the
    /// normal gates: the extreme gates' gradients (~1 / d, d down to exp(-30)) leave its range.
    pub fn with_extreme_gates_for_grads(self, extreme: bool) -> MlstmCase {
        let representable = self.dtype != DType::F16;
        self.with_extreme_gates(extreme && representable)
    }

    fn state_dims(&self) -> (usize, usize, usize, usize) {
        (self.batch, self.heads, self.dqk, self.dhv)
    }

    fn random_state(&self, rng: &mut Rng, m_range: (f64, f64)) -> Result<crate::ops::mlstm::MlstmState> {
        let (b, h, dk, dv) = self.state_dims();
        let mut gen = |n: usize, lo: f64, hi: f64| -> Vec<f32> { (0..n).map(|_| rng.uniform(lo, hi) as f32).collect() };
        let dev = Device::Cpu;
        Ok(crate::ops::mlstm::MlstmState {
            c: Tensor::from_f32(&gen(b * h * dk * dv, -1.0, 1.0), &[b, h, dk, dv], DType::F32, &dev)?,
            n: Tensor::from_f32(&gen(b * h * dk, -1.0, 1.0), &[b, h, dk], DType::F32, &dev)?,
            m: Tensor::from_f32(&gen(b * h, m_range.0, m_range.1), &[b, h], DType::F32, &dev)?,
        })
    }

    /// Inputs on the host.
    pub fn tensors(&self, rng: &mut Rng) -> Result<MlstmTensors> {
        let dev = Device::Cpu;
        let (b, h, l) = (self.batch, self.heads, self.len);
        let mut gen = |n: usize, lo: f64, hi: f64| -> Vec<f32> { (0..n).map(|_| rng.uniform(lo, hi) as f32).collect() };
        let s = self.scale;
        let q = Tensor::from_f32(&gen(b * h * l * self.dqk, -s, s), &[b, h, l, self.dqk], self.dtype, &dev)?;
        let k = Tensor::from_f32(&gen(b * h * l * self.dqk, -s, s), &[b, h, l, self.dqk], self.dtype, &dev)?;
        let v = Tensor::from_f32(&gen(b * h * l * self.dhv, -s, s), &[b, h, l, self.dhv], self.dtype, &dev)?;
        let i = Tensor::from_f32(&gen(b * h * l, self.i_range.0, self.i_range.1), &[b, h, l], DType::F32, &dev)?;
        let f = Tensor::from_f32(&gen(b * h * l, self.f_range.0, self.f_range.1), &[b, h, l], DType::F32, &dev)?;
        let initial = self.with_init.then(|| self.random_state(rng, (-2.0, 2.0))).transpose()?;
        Ok(MlstmTensors { q, k, v, i, f, initial, chunk: self.chunk })
    }

    /// The forward on `device` against the f64 recurrence: `(name, error)` of h
    /// ([`scaled_error`] against [`crate::ops::mlstm::cpu::h_magnitude`]) and the final C, n
    /// and m ([`relative_error`]).
    pub fn run_forward(&self, seed: u64, device: &Device) -> Result<Vec<(&'static str, f64)>> {
        use crate::ops::mlstm::{cpu, mlstm};
        let host = self.tensors(&mut Rng::new(seed))?;
        let p = host.inputs().to_f64()?;
        let r = cpu::forward_recurrent(&p);
        let dev_t = host.to_device(device)?;
        let out = mlstm(&dev_t.inputs())?;
        Ok(vec![
            ("h", scaled_error(&out.h.to_f64_vec()?, &r.h, &cpu::h_magnitude(&p))),
            ("final.c", tensor_error(&out.final_state.c, &r.final_state.c)?),
            ("final.n", tensor_error(&out.final_state.n, &r.final_state.n)?),
            ("final.m", tensor_error(&out.final_state.m, &r.final_state.m)?),
        ])
    }

    /// Every gradient on `device` against the f64 reference backward: `(name, error,
    /// conditioning)`. The error is [`relative_error`] for dv and the initial C and n, and
    /// [`scaled_error`] for dq, dk, di, df and the initial m against the sizes of the terms
    /// they sum (see the body); conditioning is [`mlstm_grad_conditioning`] of that gradient.
    pub fn run_backward(
        &self,
        seed: u64,
        device: &Device,
        mode: crate::ops::mlstm::NormalizerGrad,
    ) -> Result<Vec<(&'static str, f64, f64)>> {
        use crate::ops::mlstm::{cpu, mlstm_backward, mlstm_for_backward};
        let mut rng = Rng::new(seed);
        let host = self.tensors(&mut rng)?;
        let (b, h, l) = (self.batch, self.heads, self.len);
        let dh_v: Vec<f32> = (0..b * h * l * self.dhv).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
        let dh = Tensor::from_f32(&dh_v, &[b, h, l, self.dhv], self.dtype, &Device::Cpu)?;
        let dfinal = self.with_dfinal.then(|| self.random_state(&mut rng, (-1.0, 1.0))).transpose()?;
        let p = host.inputs().to_f64()?;
        let dfinal64 = dfinal
            .as_ref()
            .map(|s| -> Result<cpu::State64> {
                Ok(cpu::State64 { c: s.c.to_f64_vec()?, n: s.n.to_f64_vec()?, m: s.m.to_f64_vec()? })
            })
            .transpose()?;
        let g_ref = cpu::backward(&p, &dh.to_f64_vec()?, dfinal64.as_ref(), mode);
        let dev_t = host.to_device(device)?;
        let dfinal_d = dfinal.as_ref().map(|s| s.to_device(device)).transpose()?;
        let saved = self.saved_forward.then(|| mlstm_for_backward(&dev_t.inputs())).transpose()?;
        let g = mlstm_backward(&dev_t.inputs(), &dh.to_device(device)?, dfinal_d.as_ref(), mode, saved.as_ref())?;
        let (gi, ri) = (g.dinitial.as_ref(), g_ref.dinitial.as_ref());
        let state_err = |pick: fn(&crate::ops::mlstm::MlstmState) -> &Tensor,
                         pick64: fn(&cpu::State64) -> &Vec<f64>| {
            match (gi, ri) {
                // The reference as f32 holds it: a state that decayed below f32's range (the
                // initial state's weight after steps of extreme forget gates) is 0 there.
                (Some(a), Some(b)) => {
                    tensor_error(pick(a), &pick64(b).iter().map(|&x| f64::from(x as f32)).collect::<Vec<_>>())
                }
                (None, None) => Ok(0.0),
                _ => Ok(f64::INFINITY),
            }
        };
        let dh64 = dh.to_f64_vec()?;
        let cond = mlstm_grad_conditioning(&p, &dh64, dfinal64.as_ref(), mode, &g_ref);
        // The sizes of the terms each gradient sums, for [`scaled_error`]. Exact mode adds
        // the denominator's share (through dn, and m) to the numerator's (the Constant
        // gradient), and the two cancel where h hardly depends on the scale of q~ . n (one
        // step from a zero state: dq is exactly eps-small): |numerator's| + |denominator's|.
        // di = c (+ Exact's share through m), c = k . dk a sum over dqk: sum |k dk|. df sums
        // r[u] - c[u] over u >= t (r = q . dq), nearly equal terms: their sizes' reverse sum,
        // times sigmoid(-f). r and c take dq's and dk's own term sizes, not |dq| and |dk|:
        // in Exact mode the reference dq, dk are themselves cancelling sums (eps-small for
        // one step), while a kernel forms r from terms (h . dh, den . dn) that do not cancel.
        let g_num = match mode {
            crate::ops::mlstm::NormalizerGrad::Exact => {
                cpu::backward(&p, &dh64, dfinal64.as_ref(), crate::ops::mlstm::NormalizerGrad::Constant)
            }
            crate::ops::mlstm::NormalizerGrad::Constant => g_ref.clone(),
        };
        let split = |all: &[f64], num: &[f64]| -> Vec<f64> {
            all.iter().zip(num).map(|(a, n)| n.abs() + (a - n).abs()).collect()
        };
        let dqk = self.dqk;
        let abs_dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| (a * b).abs()).sum::<f64>();
        let (dq_size, dk_size) = (split(&g_ref.dq, &g_num.dq), split(&g_ref.dk, &g_num.dk));
        let mut df_size = split(&g_ref.df, &g_num.df);
        let mut di_size: Vec<f64> = g_ref.di.iter().zip(&g_num.di).map(|(a, n)| (a - n).abs()).collect();
        for hd in 0..b * h {
            let mut acc = 0.0;
            for t in (0..l).rev() {
                let row = hd * l + t;
                let span = row * dqk..(row + 1) * dqk;
                let (rs, cs) =
                    (abs_dot(&p.q[span.clone()], &dq_size[span.clone()]), abs_dot(&p.k[span.clone()], &dk_size[span]));
                acc += rs + cs;
                df_size[row] += acc * cpu::sigmoid(-p.f[row]);
                di_size[row] += cs;
            }
        }
        let scaled =
            |t: &Tensor, r: &[f64], size: &[f64]| -> Result<f64> { Ok(scaled_error(&t.to_f64_vec()?, r, size)) };
        // dm0 is <dC0, C0> + <dn0, n0> (plus, in Exact mode, the max state's chain): a sum of
        // dqk (dhv + 1) signed terms that can cancel to a small fraction of their sizes, where
        // a relative error says nothing. Against the sizes of those terms (dC0's and dn0's own
        // term sizes, as for dq) and of the rest.
        let dm0_err = match (gi, ri, p.initial.as_ref(), g_num.dinitial.as_ref()) {
            (Some(a), Some(r), Some(init), Some(num)) => {
                let (dc_size, dn_size) = (split(&r.c, &num.c), split(&r.n, &num.n));
                let (cs, ns) = (dqk * self.dhv, dqk);
                let size: Vec<f64> = (0..b * h)
                    .map(|hd| {
                        let (c, n) = (hd * cs..(hd + 1) * cs, hd * ns..(hd + 1) * ns);
                        let dots = r.c[c.clone()].iter().zip(&init.c[c.clone()]).map(|(x, y)| x * y).sum::<f64>()
                            + r.n[n.clone()].iter().zip(&init.n[n.clone()]).map(|(x, y)| x * y).sum::<f64>();
                        abs_dot(&dc_size[c.clone()], &init.c[c])
                            + abs_dot(&dn_size[n.clone()], &init.n[n])
                            + (r.m[hd] - dots).abs()
                    })
                    .collect();
                // As f32 holds them, like the other state gradients (an initial state decayed
                // below f32's range has no gradient there).
                let f32_round = |v: &[f64]| v.iter().map(|&x| f64::from(x as f32)).collect::<Vec<_>>();
                scaled(&a.m, &f32_round(&r.m), &f32_round(&size))?
            }
            (None, None, ..) => 0.0,
            _ => f64::INFINITY,
        };
        let errs = vec![
            ("dq", scaled(&g.dq, &g_ref.dq, &dq_size)?),
            ("dk", scaled(&g.dk, &g_ref.dk, &dk_size)?),
            ("dv", tensor_error(&g.dv, &g_ref.dv)?),
            ("di", scaled(&g.di, &g_ref.di, &di_size)?),
            ("df", scaled(&g.df, &g_ref.df, &df_size)?),
            ("dinitial.c", state_err(|s| &s.c, |s| &s.c)?),
            ("dinitial.n", state_err(|s| &s.n, |s| &s.n)?),
            ("dinitial.m", dm0_err),
        ];
        Ok(errs.into_iter().zip(cond).map(|((n, e), (_, c))| (n, e, c)).collect())
    }
}

/// The relative perturbation [`mlstm_grad_conditioning`] applies.
const CONDITIONING_STEP: f64 = 1e-7;

/// How much the mLSTM gradients amplify relative perturbations of the inputs, per gradient
/// (dq, dk, dv, di, df, dinitial.c, .n, .m): the relative change of the f64 reference
/// backward when every input (q, k, v, i, f, dh, the states) moves by a random ±1e-7 of
/// itself, over 1e-7, divided by 8 (what well-conditioned problems measure, a few input
/// terms per output) and at least 1. Rounding inside a kernel moves its inputs' products
/// by as much, so a gradient's error grows with this factor: where the denominator's terms
/// cancel (d small, h and its gradients large), or where a gradient is a difference of
/// nearly equal terms (dq when h hardly depends on q's length; df of a single step), plain
/// relative error against the tiny or sensitive reference says nothing about the kernel.
/// The GPU tests allow [`mlstm_grad_tolerance`] times this.
pub fn mlstm_grad_conditioning(
    p: &crate::ops::mlstm::cpu::Mlstm64,
    dh: &[f64],
    dfinal: Option<&crate::ops::mlstm::cpu::State64>,
    mode: crate::ops::mlstm::NormalizerGrad,
    reference: &crate::ops::mlstm::cpu::Grads64,
) -> Vec<(&'static str, f64)> {
    use crate::ops::mlstm::cpu;
    let mut rng = Rng::new(0x5eed_c0de);
    let mut nudge = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .map(|x| x * (1.0 + CONDITIONING_STEP * if rng.uniform(-1.0, 1.0) < 0.0 { -1.0 } else { 1.0 }))
            .collect()
    };
    let mut state = |s: &cpu::State64| cpu::State64 { c: nudge(&s.c), n: nudge(&s.n), m: nudge(&s.m) };
    let initial = p.initial.as_ref().map(&mut state);
    let dfinal_p = dfinal.map(&mut state);
    let pp = cpu::Mlstm64 {
        q: nudge(&p.q),
        k: nudge(&p.k),
        v: nudge(&p.v),
        i: nudge(&p.i),
        f: nudge(&p.f),
        initial,
        ..p.clone()
    };
    let g = cpu::backward(&pp, &nudge(dh), dfinal_p.as_ref(), mode);
    let amp = |a: &[f64], b: &[f64]| (relative_error(a, b) / CONDITIONING_STEP / 8.0).max(1.0);
    let st = |pick: fn(&cpu::State64) -> &Vec<f64>| match (&g.dinitial, &reference.dinitial) {
        (Some(a), Some(b)) => amp(pick(a), pick(b)),
        _ => 1.0,
    };
    vec![
        ("dq", amp(&g.dq, &reference.dq)),
        ("dk", amp(&g.dk, &reference.dk)),
        ("dv", amp(&g.dv, &reference.dv)),
        ("di", amp(&g.di, &reference.di)),
        ("df", amp(&g.df, &reference.df)),
        ("dinitial.c", st(|s| &s.c)),
        ("dinitial.n", st(|s| &s.n)),
        ("dinitial.m", st(|s| &s.m)),
    ]
}

/// Decoding an [`MlstmCase`] token by token with `mlstm_step` from its initial state
/// against one `mlstm` pass over the sequence, both on `device`: the error of h (all tokens;
/// [`scaled_error`] as in [`MlstmCase::run_forward`]) and the relative errors of the final
/// C, n and m.
pub fn decode_against_mlstm(case: &MlstmCase, seed: u64, device: &Device) -> Result<[f64; 4]> {
    use crate::ops::mlstm::{mlstm, mlstm_step, MlstmState};
    let host = case.tensors(&mut Rng::new(seed))?;
    let dev_t = host.to_device(device)?;
    let seq = mlstm(&dev_t.inputs())?;
    let (b, h, l, dk, dv) = (case.batch, case.heads, case.len, case.dqk, case.dhv);
    let mut state = match &dev_t.initial {
        Some(s) => s.clone(),
        None => MlstmState::zeros(b, h, dk, dv, device)?,
    };
    let (q, k, v) = (host.q.to_f32_vec()?, host.k.to_f32_vec()?, host.v.to_f32_vec()?);
    let (ig, fg) = (host.i.to_f32_vec()?, host.f.to_f32_vec()?);
    let mut outs = vec![0.0f64; b * h * l * dv];
    let pick = |x: &[f32], t: usize, d: usize| -> Vec<f32> {
        (0..b * h).flat_map(|hd| x[(hd * l + t) * d..(hd * l + t + 1) * d].to_vec()).collect()
    };
    for t in 0..l {
        let qt = Tensor::from_f32(&pick(&q, t, dk), &[b, h, dk], case.dtype, device)?;
        let kt = Tensor::from_f32(&pick(&k, t, dk), &[b, h, dk], case.dtype, device)?;
        let vt = Tensor::from_f32(&pick(&v, t, dv), &[b, h, dv], case.dtype, device)?;
        let it = Tensor::from_f32(&pick(&ig, t, 1), &[b, h], DType::F32, device)?;
        let ft = Tensor::from_f32(&pick(&fg, t, 1), &[b, h], DType::F32, device)?;
        let y = mlstm_step(&mut state, &qt, &kt, &vt, &it, &ft, crate::ops::mlstm::DEFAULT_EPS)?.to_f64_vec()?;
        for hd in 0..b * h {
            outs[(hd * l + t) * dv..(hd * l + t + 1) * dv].copy_from_slice(&y[hd * dv..(hd + 1) * dv]);
        }
    }
    let magnitude = crate::ops::mlstm::cpu::h_magnitude(&host.inputs().to_f64()?);
    Ok([
        scaled_error(&outs, &seq.h.to_f64_vec()?, &magnitude),
        tensor_error(&state.c, &seq.final_state.c.to_f64_vec()?)?,
        tensor_error(&state.n, &seq.final_state.n.to_f64_vec()?)?,
        tensor_error(&state.m, &seq.final_state.m.to_f64_vec()?)?,
    ])
}

/// `check`'s mLSTM rows: the forward and decoding against the f64 recurrence, then every
/// gradient against the f64 backward, per dtype.
pub fn check_rows(device: &Device, rng: &mut Rng) -> Result<Vec<CheckRow>> {
    // (batch, heads, len, dqk, dhv, initial state, extreme gates, chunk)
    type ForwardCase = (usize, usize, usize, usize, usize, bool, bool, Option<usize>);
    let forward_cases: &[ForwardCase] = &[
        (1, 1, 1, 16, 16, true, false, None),
        (2, 3, 65, 33, 40, false, false, Some(32)),
        (1, 2, 300, 128, 128, true, true, None),
        (1, 1, 200, 256, 96, true, false, Some(16)),
        (2, 2, 130, 64, 64, false, false, Some(128)),
    ];
    // (batch, heads, len, dqk, dhv, initial state, final-state gradient, extreme, chunk, exact)
    type GradCase = (usize, usize, usize, usize, usize, bool, bool, bool, Option<usize>, bool);
    let grad_cases: &[GradCase] = &[
        (1, 1, 1, 16, 16, true, true, false, None, true),
        (2, 2, 65, 33, 40, false, true, false, Some(16), true),
        (1, 2, 130, 64, 64, true, false, false, Some(64), false),
        (1, 2, 100, 128, 128, true, true, true, None, true),
        (1, 1, 70, 200, 96, true, true, false, Some(32), true),
    ];
    let mut rows = Vec::new();
    for dtype in DType::ALL {
        let mut worst = 0.0f64;
        for &(batch, heads, len, dqk, dhv, init, extreme, chunk) in forward_cases {
            let case = MlstmCase { with_init: init, chunk, ..MlstmCase::new(batch, heads, len, dqk, dhv, dtype) }
                .with_extreme_gates(extreme);
            worst = case.run_forward(rng.next_u64(), device)?.into_iter().fold(worst, |w, (_, e)| w.max(e));
            if len <= 70 {
                worst = decode_against_mlstm(&case, rng.next_u64(), device)?.into_iter().fold(worst, f64::max);
            }
        }
        let (cases, tolerance) = (forward_cases.len(), mlstm_tolerance(dtype));
        rows.push(CheckRow { kernel: "mlstm fwd+decode", dtype, cases, worst, tolerance });
    }
    // The worst error over its allowance (mlstm_grad_tolerance times the problem's
    // conditioning), shown as error / conditioning.
    for dtype in DType::ALL {
        let mut worst = 0.0f64;
        for (n, &(batch, heads, len, dqk, dhv, init, dfinal, extreme, chunk, exact)) in grad_cases.iter().enumerate() {
            // Every other case from the saved training forward, the others recomputing it.
            let case = MlstmCase {
                with_init: init,
                with_dfinal: dfinal,
                chunk,
                saved_forward: n % 2 == 1,
                ..MlstmCase::new(batch, heads, len, dqk, dhv, dtype)
            }
            .with_extreme_gates_for_grads(extreme);
            let mode = if exact { NormalizerGrad::Exact } else { NormalizerGrad::Constant };
            worst =
                case.run_backward(rng.next_u64(), device, mode)?.into_iter().fold(worst, |w, (_, e, c)| w.max(e / c));
        }
        let (cases, tolerance) = (grad_cases.len(), mlstm_grad_tolerance(dtype));
        rows.push(CheckRow { kernel: "mlstm grads (err/cond)", dtype, cases, worst, tolerance });
    }
    Ok(rows)
}
