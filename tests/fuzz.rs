//! Property-based fuzzing of every public entry point on the CPU path: random shapes (0, 1,
//! small odd sizes, and dimensions near usize limits on zero-element tensors), element
//! types, options, out-of-range parameters and non-finite values. Each call must return
//! either Ok, with finite outputs whenever the inputs and parameters are finite and in
//! range, or a typed error; a panic, an abort or a hang fails the run.
//!
//! CI runs `FUZZ_CASES` (default 48) cases per property. A longer run:
//! `FUZZ_CASES=20000 cargo test --release --test fuzz`.

use hybrid_kernels::ops::bspline::{self, KnotGrid};
use hybrid_kernels::ops::causal_conv1d::{causal_conv1d, causal_conv1d_backward, causal_conv1d_update, ConvInputs};
use hybrid_kernels::ops::kan::{KanLinear, KanLinearConfig};
use hybrid_kernels::ops::mlstm::{mlstm, mlstm_backward, mlstm_step, MlstmInputs, MlstmState, NormalizerGrad};
use hybrid_kernels::ops::selective_scan::{selective_scan, selective_scan_backward, ScanInputs, SequenceResets};
use hybrid_kernels::ops::spline_activation::SplineActivation;
use hybrid_kernels::{DType, Device, Error, Result, Tensor};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

fn config() -> ProptestConfig {
    // Inputs that would succeed with gigabytes only make the run slow: a 64 MiB cap per
    // operation turns them into the typed out-of-memory error that larger ones get anyway.
    hybrid_kernels::memory::set_host_limit(64 << 20);
    let cases = std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// A dimension: mostly small (0, 1, odd), sometimes near the limits.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        12 => 0usize..9,
        2 => Just(33usize),
        1 => Just(1usize << 20),
        1 => Just(1usize << 31),
        1 => Just(1usize << 40),
        1 => Just(usize::MAX),
    ]
}

/// A parameter float: ordinary, extreme or non-finite.
fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => -2.0f64..2.0,
        1 => Just(0.0),
        1 => Just(1e300),
        1 => Just(-1e-300),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
    ]
}

/// A float that is mostly in `range`, sometimes anything [`float`] draws.
fn mostly(range: std::ops::Range<f64>) -> impl Strategy<Value = f64> {
    prop_oneof![4 => range, 1 => float()]
}

/// What a tensor's values are: finite in [-2, 2], or with a non-finite value or a huge one.
#[derive(Clone, Copy, Debug)]
enum Fill {
    Finite,
    NonFinite(f32),
}

fn fill() -> impl Strategy<Value = Fill> {
    prop_oneof![
        6 => Just(Fill::Finite),
        1 => Just(Fill::NonFinite(f32::NAN)),
        1 => Just(Fill::NonFinite(f32::INFINITY)),
        1 => Just(Fill::NonFinite(-3e38)),
    ]
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)]
}

/// A tensor of `shape`: when its element count is small, values from `seed`; when it is
/// large or overflows, one dimension is set to 0 so the tensor exists (with the other,
/// perhaps huge, dimensions kept).
fn tensor(shape: &[usize], dtype: DType, fill: Fill, seed: u64) -> Tensor {
    let mut shape = shape.to_vec();
    let fits = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_some_and(|n| n <= 4096);
    if !fits {
        if let Some(d) = shape.iter_mut().max() {
            *d = 0;
        }
    }
    let n = if shape.contains(&0) { 0 } else { shape.iter().product() };
    let mut rng = hybrid_kernels::rng::Rng::new(seed);
    let mut v: Vec<f32> = (0..n).map(|_| rng.uniform(-2.0, 2.0) as f32).collect();
    if let (Fill::NonFinite(bad), Some(first)) = (fill, v.first_mut()) {
        *first = bad;
    }
    Tensor::from_f32(&v, &shape, dtype, &CPU).unwrap()
}

fn is_finite_input(fill: Fill) -> bool {
    matches!(fill, Fill::Finite)
}

/// Ok outputs must be finite when `finite_in`; errors must be one of the typed kinds a
/// caller can act on.
fn verdict(name: &str, finite_in: bool, r: Result<Vec<Tensor>>) -> std::result::Result<(), TestCaseError> {
    match r {
        Ok(outs) => {
            if finite_in {
                for (i, t) in outs.iter().enumerate() {
                    let v = t.to_f64_vec().unwrap();
                    prop_assert!(v.iter().all(|x| x.is_finite()), "{name}: output {i} not finite for finite inputs");
                }
            }
            Ok(())
        }
        Err(e) => {
            let typed = matches!(
                e,
                Error::InvalidArgument { .. }
                    | Error::DTypeMismatch { .. }
                    | Error::DeviceMismatch { .. }
                    | Error::NonFinite { .. }
                    | Error::HostOutOfMemory { .. }
            );
            prop_assert!(typed, "{name}: unexpected error kind {e:?}");
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn bspline_entry_points(
        in_features in dim(), grid_size in dim(), order in 0usize..9, lead in dim(),
        lo in mostly(-2.0..2.0), width in mostly(0.1..4.0), dt in dtype(), fx in fill(), seed in any::<u64>(),
    ) {
        let grid = KnotGrid::uniform(in_features, grid_size, order, (lo as f32, (lo + width) as f32), &CPU);
        let Ok(grid) = grid else { return verdict("KnotGrid::uniform", true, grid.map(|_| vec![])) };
        let x = tensor(&[lead, in_features], dt, fx, seed);
        // Bases are bounded; a NaN input gives NaN bases by contract, infinities give zeros.
        let finite = is_finite_input(fx) || matches!(fx, Fill::NonFinite(v) if !v.is_nan());
        verdict("bspline_basis", finite, bspline::bspline_basis(&x, &grid).map(|t| vec![t]))?;
        // Derivatives reach 2k / h: past f16's 65504 on a fine grid, and then inf is the
        // correctly rounded value.
        let steepest = 2.0 * order as f64 * grid_size as f64 / width;
        let representable = steepest < dt.max_finite();
        verdict("bspline_basis_derivative", finite && representable, bspline::bspline_basis_derivative(&x, &grid).map(|t| vec![t]))?;
    }

    #[test]
    fn kan_entry_points(
        inf in dim(), outf in dim(), grid_size in dim(), order in 0usize..9,
        scales in proptest::array::uniform3(mostly(0.0..2.0)), eps in mostly(0.0..1.0), standalone in any::<bool>(),
        lead in 0usize..5, dt in dtype(), fx in fill(), margin in mostly(0.0..0.5), reg in mostly(0.0..1.0), seed in any::<u64>(),
    ) {
        let config = KanLinearConfig {
            grid_size,
            spline_order: order,
            scale_noise: scales[0],
            scale_base: scales[1],
            scale_spline: scales[2],
            standalone_scale_spline: standalone,
            grid_eps: eps,
            ..KanLinearConfig::new(inf, outf)
        };
        let layer = KanLinear::new(config, dt, &CPU, seed);
        let Ok(mut layer) = layer else { return verdict("KanLinear::new", true, layer.map(|_| vec![])) };
        let x = tensor(&[lead, inf], dt, fx, seed);
        let finite = is_finite_input(fx);
        verdict("KanLinear::forward", finite, layer.forward(&x).map(|y| vec![y]))?;
        let dy = tensor(&[lead, outf], dt, Fill::Finite, seed ^ 1);
        verdict("KanLinear::backward", finite, layer.backward(&x, &dy).map(|g| vec![g.dx, g.base_weight, g.spline_weight]))?;
        let loss = layer.regularization_loss(reg, 1.0);
        prop_assert!(loss.as_ref().map_or(true, |v| v.is_finite()), "regularization_loss {loss:?}");
        let updated = layer.update_grid(&x, margin);
        verdict("KanLinear::update_grid", true, updated.map(|_| vec![]))?;
        verdict("KanLinear::forward after update_grid", finite, layer.forward(&x).map(|y| vec![y]))?;
    }

    #[test]
    fn spline_activation_entry_points(
        channels in dim(), grid_size in dim(), order in 0usize..9, lo in mostly(-2.0..2.0), width in mostly(0.1..4.0),
        with_base in any::<bool>(), lead in 0usize..5, dt in dtype(), fx in fill(), seed in any::<u64>(),
    ) {
        let act = SplineActivation::new(channels, grid_size, order, (lo as f32, (lo + width) as f32), with_base, dt, &CPU);
        let Ok(act) = act else { return verdict("SplineActivation::new", true, act.map(|_| vec![])) };
        let x = tensor(&[lead, channels], dt, fx, seed);
        let finite = is_finite_input(fx);
        verdict("SplineActivation::forward", finite, act.forward(&x).map(|y| vec![y]))?;
        let dy = tensor(&[lead, channels], dt, Fill::Finite, seed ^ 1);
        verdict("SplineActivation::backward", finite, act.backward(&x, &dy).map(|g| vec![g.dx, g.coeff]))?;
    }

    #[test]
    fn selective_scan_entry_points(
        batch in dim(), d in dim(), dstate in dim(), len in dim(), groups in 1usize..3,
        variable in any::<bool>(), softplus in any::<bool>(), with_z in any::<bool>(), with_h0 in any::<bool>(),
        reset_every in 0usize..5, dt in dtype(), fx in fill(), seed in any::<u64>(),
    ) {
        let seq = [batch, d, len];
        let u = tensor(&seq, dt, fx, seed);
        // dt >= 0 as in Mamba (softplus, or a non-negative delta), so finite inputs keep the
        // state bounded (a negative dt with A < 0 grows it exponentially, past f16's range).
        let delta = tensor(&seq, dt, Fill::Finite, seed ^ 1);
        let delta = Tensor::from_f32(&delta.to_f32_vec().unwrap().iter().map(|v| v.abs()).collect::<Vec<_>>(), delta.shape(), dt, &CPU).unwrap();
        let [batch, d, len] = [u.shape()[0], u.shape()[1], u.shape()[2]];
        // A negative, as Mamba's -exp(A_log); B and C time-varying or constant.
        let a = tensor(&[d, dstate], DType::F32, Fill::Finite, seed ^ 2);
        let a = Tensor::from_f32(&a.to_f32_vec().unwrap().iter().map(|v| -v.abs()).collect::<Vec<_>>(), a.shape(), DType::F32, &CPU).unwrap();
        let bc_shape = if variable { vec![batch, groups, dstate, len] } else { vec![d, dstate] };
        let bc_dtype = if variable { dt } else { DType::F32 };
        let b = tensor(&bc_shape, bc_dtype, Fill::Finite, seed ^ 3);
        let c = tensor(&bc_shape, bc_dtype, Fill::Finite, seed ^ 4);
        let z = tensor(&seq, dt, Fill::Finite, seed ^ 5);
        let h0 = tensor(&[batch, d, a.shape()[1]], DType::F32, Fill::Finite, seed ^ 6);
        let starts: Vec<Vec<usize>> =
            (0..batch.min(64)).map(|_| if reset_every == 0 { vec![] } else { (0..len.min(64)).step_by(reset_every).collect() }).collect();
        let resets = SequenceResets::from_starts(len, &starts);
        let inputs = ScanInputs {
            z: with_z.then_some(&z),
            h0: with_h0.then_some(&h0),
            delta_softplus: softplus,
            resets: resets.as_ref().ok(),
            ..ScanInputs::new(&u, &delta, &a, &b, &c)
        };
        let finite = is_finite_input(fx);
        verdict("selective_scan", finite, selective_scan(&inputs).map(|o| vec![o.out, o.last_state]))?;
        let dout = tensor(u.shape(), dt, Fill::Finite, seed ^ 7);
        verdict("selective_scan_backward", finite, selective_scan_backward(&inputs, &dout, None, None).map(|g| vec![g.du, g.ddelta, g.da, g.db, g.dc]))?;
    }

    #[test]
    fn causal_conv1d_entry_points(
        batch in dim(), d in dim(), len in dim(), width in 0usize..7, with_bias in any::<bool>(),
        silu in any::<bool>(), reset_every in 0usize..5, tokens in 0usize..4, dt in dtype(), fx in fill(), seed in any::<u64>(),
    ) {
        let x = tensor(&[batch, d, len], dt, fx, seed);
        let [batch, d, len] = [x.shape()[0], x.shape()[1], x.shape()[2]];
        let w = tensor(&[d, width], DType::F32, Fill::Finite, seed ^ 1);
        let bias = tensor(&[d], DType::F32, Fill::Finite, seed ^ 2);
        let starts: Vec<Vec<usize>> =
            (0..batch.min(64)).map(|_| if reset_every == 0 { vec![] } else { (0..len.min(64)).step_by(reset_every).collect() }).collect();
        let resets = SequenceResets::from_starts(len, &starts);
        let inputs = ConvInputs { bias: with_bias.then_some(&bias), silu, resets: resets.as_ref().ok(), ..ConvInputs::new(&x, &w) };
        let finite = is_finite_input(fx);
        verdict("causal_conv1d", finite, causal_conv1d(&inputs).map(|o| vec![o.out, o.final_state]))?;
        let dout = tensor(x.shape(), dt, Fill::Finite, seed ^ 3);
        verdict("causal_conv1d_backward", finite, causal_conv1d_backward(&inputs, &dout, None).map(|g| vec![g.dx, g.dweight]))?;
        let mut state = tensor(&[batch, d, width.saturating_sub(1)], dt, Fill::Finite, seed ^ 4);
        let step = tensor(&[batch, d, tokens], dt, fx, seed ^ 5);
        verdict("causal_conv1d_update", finite, causal_conv1d_update(&mut state, &step, &w, None, silu).map(|y| vec![y, state.clone()]))?;
    }

    #[test]
    fn mlstm_entry_points(
        batch in dim(), heads in dim(), len in dim(), dqk in dim(), dhv in dim(), eps in mostly(1e-6..1e-3),
        with_initial in any::<bool>(), constant in any::<bool>(), dt in dtype(), fx in fill(), seed in any::<u64>(),
    ) {
        let q = tensor(&[batch, heads, len, dqk], dt, fx, seed);
        let [batch, heads, len, dqk] = [q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]];
        let k = tensor(q.shape(), dt, Fill::Finite, seed ^ 1);
        let v = tensor(&[batch, heads, len, dhv], dt, Fill::Finite, seed ^ 2);
        let dhv = v.shape()[3];
        let i = tensor(&[batch, heads, len], DType::F32, Fill::Finite, seed ^ 3);
        let f = tensor(&[batch, heads, len], DType::F32, Fill::Finite, seed ^ 4);
        let initial = MlstmState::zeros(batch, heads, dqk, dhv, &CPU).ok();
        let inputs = MlstmInputs {
            eps: eps as f32,
            initial: if with_initial { initial.as_ref() } else { None },
            ..MlstmInputs::new(&q, &k, &v, &i, &f)
        };
        let finite = is_finite_input(fx);
        verdict("mlstm", finite, mlstm(&inputs).map(|o| vec![o.h, o.final_state.c]))?;
        let dh = tensor(&[batch, heads, len, dhv], dt, Fill::Finite, seed ^ 5);
        let mode = if constant { NormalizerGrad::Constant } else { NormalizerGrad::Exact };
        verdict("mlstm_backward", finite, mlstm_backward(&inputs, &dh, None, mode, None).map(|g| vec![g.dq, g.dk, g.dv, g.di, g.df]))?;
        if let Some(mut state) = initial {
            let (q1, k1) = (tensor(&[batch, heads, dqk], dt, fx, seed ^ 6), tensor(&[batch, heads, dqk], dt, Fill::Finite, seed ^ 7));
            let v1 = tensor(&[batch, heads, dhv], dt, Fill::Finite, seed ^ 8);
            let g1 = tensor(&[batch, heads], DType::F32, Fill::Finite, seed ^ 9);
            verdict("mlstm_step", finite, mlstm_step(&mut state, &q1, &k1, &v1, &g1, &g1, eps as f32).map(|h| vec![h]))?;
        }
    }

    #[test]
    fn norm_entry_points(lead in dim(), width in dim(), groups in 1usize..4, eps in mostly(1e-6..1e-3), dt in dtype(), fx in fill(), layer in any::<bool>(), seed in any::<u64>()) {
        use hybrid_kernels::ops::norm::{add_norm, add_norm_backward, norm, norm_backward, Norm};
        let x = tensor(&[lead, width], dt, fx, seed);
        let w = tensor(&[x.shape()[1]], DType::F32, Fill::Finite, seed ^ 1);
        let b = tensor(&[x.shape()[1]], DType::F32, Fill::Finite, seed ^ 3);
        let r = tensor(x.shape(), DType::F32, Fill::Finite, seed ^ 4);
        let finite = is_finite_input(fx);
        let spec = if layer { Norm::layer(eps as f32) } else { Norm::rms(eps as f32) }.grouped(groups);
        let o = norm(&x, &w, Some(&b), spec);
        if let Ok(o) = &o {
            let dy = tensor(x.shape(), dt, Fill::Finite, seed ^ 2);
            verdict("norm_backward", finite, norm_backward(&x, &w, Some(&b), &o.stats, &dy).map(|g| vec![g.dx, g.dweight]))?;
        }
        verdict("norm", finite, o.map(|o| vec![o.y, o.stats.rstd]))?;
        let o = add_norm(&x, Some(&r), &w, None, spec);
        if let Ok(o) = &o {
            let dy = tensor(x.shape(), dt, Fill::Finite, seed ^ 2);
            verdict("add_norm_backward", finite, add_norm_backward(&o.residual, &w, None, &o.stats, &dy, Some(&r)).map(|g| vec![g.dx, g.dweight]))?;
        }
        verdict("add_norm", finite, o.map(|o| vec![o.y, o.residual]))?;
    }

    #[test]
    fn elementwise_entry_points(lead in dim(), width in dim(), dt in dtype(), dt2 in dtype(), fx in fill(), act in 0usize..3, seed in any::<u64>()) {
        use hybrid_kernels::ops::elementwise::{activation, activation_backward, add_into, gated, gated_backward, Activation};
        let act = Activation::ALL[act];
        let x = tensor(&[lead, width], dt, fx, seed);
        let up = tensor(x.shape(), dt, Fill::Finite, seed ^ 1);
        let finite = is_finite_input(fx);
        verdict("activation", finite, activation(&x, act).map(|y| vec![y]))?;
        verdict("activation_backward", finite, activation_backward(&x, &up, act).map(|y| vec![y]))?;
        verdict("gated", finite, gated(&x, &up, act).map(|y| vec![y]))?;
        verdict("gated_backward", finite, gated_backward(&x, &up, &up, act).map(|g| vec![g.dgate, g.dup]))?;
        let mut dst = tensor(x.shape(), dt2, Fill::Finite, seed ^ 2);
        // Finite sums can overflow a 16-bit dst: only the error kind is checked for those.
        let fits = dt2 == DType::F32 && finite;
        verdict("add_into", fits, add_into(&mut dst, &x).map(|()| vec![dst.clone()]))?;
    }

    #[test]
    fn cross_entropy_entry_points(lead in dim(), vocab in dim(), dt in dtype(), fx in fill(), cap in proptest::option::of(mostly(0.5..50.0)), ids in proptest::collection::vec(-200i32..300, 0..40), seed in any::<u64>()) {
        use hybrid_kernels::ops::cross_entropy::{cross_entropy, cross_entropy_fused, CrossEntropyOptions};
        use hybrid_kernels::TokenIds;
        let logits = tensor(&[lead, vocab], dt, fx, seed);
        let rows = logits.shape()[0];
        if rows > 4096 {
            // A zero vocabulary beside a huge row count: the ids cannot be built (they are real).
            return Ok(());
        }
        let ids: Vec<i32> = (0..rows).map(|r| ids.get(r).copied().unwrap_or(0)).collect();
        let Ok(targets) = TokenIds::new(&ids, &[rows], &CPU) else { return Ok(()) };
        let opts = CrossEntropyOptions { softcap: cap.map(|c| c as f32), ..Default::default() };
        let finite = is_finite_input(fx);
        verdict("cross_entropy", finite, cross_entropy(&logits, &targets, opts).map(|o| vec![o.losses, o.totals]))?;
        let mut g = logits.clone();
        let r = cross_entropy_fused(&mut g, &targets, opts).map(|o| vec![o.losses, o.totals]);
        let ok = r.is_ok();
        verdict("cross_entropy_fused", finite, r)?;
        if ok {
            verdict("cross_entropy_fused dlogits", finite, Ok(vec![g]))?;
        }
    }

    #[test]
    fn embedding_entry_points(vocab in dim(), width in dim(), dt in dtype(), fx in fill(), ids in proptest::collection::vec(-3i32..40, 0..40), seed in any::<u64>()) {
        use hybrid_kernels::ops::embedding::{embedding, embedding_backward};
        use hybrid_kernels::TokenIds;
        let table = tensor(&[vocab, width], dt, fx, seed);
        let ids = TokenIds::new(&ids, &[ids.len()], &CPU).unwrap();
        let finite = is_finite_input(fx);
        verdict("embedding", finite, embedding(&table, &ids).map(|o| vec![o]))?;
        let dout = tensor(&[ids.len(), table.shape()[1]], dt, Fill::Finite, seed ^ 1);
        if let Ok(mut dtable) = Tensor::full(0.0, table.shape(), DType::F32, &CPU) {
            let r = embedding_backward(&mut dtable, &ids, &dout).map(|()| vec![dtable.clone()]);
            verdict("embedding_backward", true, r)?;
        }
    }

    #[test]
    fn adamw_entry_points(n in dim(), fx in fill(), lr in mostly(0.0..0.1), wd in mostly(0.0..0.2), b2 in mostly(0.9..0.999), clip in proptest::option::of(mostly(0.1..10.0)), step in 0u64..4, seed in any::<u64>()) {
        use hybrid_kernels::ops::adamw::{adamw_step, AdamWConfig, AdamWParam, ParamGroup};
        let mut p = tensor(&[n], DType::F32, Fill::Finite, seed);
        let mut g = tensor(p.shape(), DType::F32, fx, seed ^ 1);
        let mut m = tensor(p.shape(), DType::F32, Fill::Finite, seed ^ 2);
        let mut v = tensor(p.shape(), DType::F32, Fill::Finite, seed ^ 3).to_f32_vec().map(|v| v.iter().map(|x| x.abs()).collect::<Vec<_>>()).map(|v| Tensor::from_f32(&v, p.shape(), DType::F32, &CPU).unwrap()).unwrap();
        let mut copy = Tensor::full(0.0, p.shape(), DType::BF16, &CPU).unwrap();
        let groups = [ParamGroup { lr: lr as f32, weight_decay: wd as f32 }];
        let c = AdamWConfig { beta2: b2 as f32, max_grad_norm: clip.map(|c| c as f32), ..Default::default() };
        let mut params = [AdamWParam { param: &mut p, grad: &mut g, m: &mut m, v: &mut v, copy: Some(&mut copy), group: 0 }];
        let r = adamw_step(&c, step, &groups, &mut params).map(|_| vec![]);
        verdict("adamw_step", is_finite_input(fx), r)?;
    }

    #[test]
    fn tensor_and_reset_constructors(shape in proptest::collection::vec(dim(), 0..4), len in dim(), cu in proptest::collection::vec(dim(), 0..4)) {
        // Sizes that fit in memory but are large would only make the run slow: skipped.
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if !n.is_some_and(|n| n > 4096 && n < 1 << 36) {
            verdict("Tensor::full", true, Tensor::full(0.5, &shape, DType::BF16, &CPU).map(|t| vec![t]))?;
        }
        if !(4096..1 << 36).contains(&len) {
            verdict("SequenceResets::from_starts", true, SequenceResets::from_starts(len, &[vec![0]]).map(|_| vec![]))?;
        }
        let mut cu = cu;
        cu.sort();
        cu.insert(0, 0);
        if !(4096..1 << 36).contains(cu.last().unwrap()) {
            verdict("SequenceResets::from_cu_seqlens", true, SequenceResets::from_cu_seqlens(&cu).map(|_| vec![]))?;
        }
    }
}
