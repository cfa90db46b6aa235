//! The mLSTM's f64 references: the recurrent and the parallel form agree, the analytic
//! backward (both normaliser modes) against finite differences, a sequence split through the
//! state equals the whole, decoding reproduces the sequence pass, and the API's typed
//! errors. CPU only, run in CI.

use hybrid_kernels::check::{decode_against_mlstm, MlstmCase, Rng};
use hybrid_kernels::ops::mlstm::{
    cpu, mlstm, mlstm_backward, mlstm_for_backward, mlstm_step, MlstmInputs, MlstmState, NormalizerGrad,
};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

fn random(n: usize, lo: f64, hi: f64, rng: &mut Rng) -> Vec<f64> {
    (0..n).map(|_| rng.uniform(lo, hi)).collect()
}

/// A problem in f64 with gates from the given ranges.
fn problem(
    heads: usize,
    len: usize,
    dqk: usize,
    dhv: usize,
    init: bool,
    gates: [(f64, f64); 2],
    seed: u64,
) -> cpu::Mlstm64 {
    let mut rng = Rng::new(seed);
    let initial = init.then(|| cpu::State64 {
        c: random(heads * dqk * dhv, -1.0, 1.0, &mut rng),
        n: random(heads * dqk, -1.0, 1.0, &mut rng),
        m: random(heads, -2.0, 2.0, &mut rng),
    });
    cpu::Mlstm64 {
        heads,
        len,
        dqk,
        dhv,
        q: random(heads * len * dqk, -1.0, 1.0, &mut rng),
        k: random(heads * len * dqk, -1.0, 1.0, &mut rng),
        v: random(heads * len * dhv, -1.0, 1.0, &mut rng),
        i: random(heads * len, gates[0].0, gates[0].1, &mut rng),
        f: random(heads * len, gates[1].0, gates[1].1, &mut rng),
        initial,
        eps: 1e-6,
    }
}

const NORMAL: [(f64, f64); 2] = [(-3.0, 3.0), (-2.0, 6.0)];
const EXTREME: [(f64, f64); 2] = [(5.0, 30.0), (-30.0, -5.0)];

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The loss the backward differentiates, from a forward's results.
fn loss(f: &cpu::Forward64, dh: &[f64], dfinal: Option<&cpu::State64>, with_m: bool) -> f64 {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut l = dot(&f.h, dh);
    if let Some(d) = dfinal {
        l += dot(&f.final_state.c, &d.c) + dot(&f.final_state.n, &d.n);
        if with_m {
            l += dot(&f.final_state.m, &d.m);
        }
    }
    l
}

/// Central differences of the loss in every input against the analytic gradients.
/// `dh` is drawn from ±`dh_scale`.
fn check_fd(p: &cpu::Mlstm64, dfinal: Option<&cpu::State64>, mode: NormalizerGrad, seed: u64, dh_scale: f64) {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let dh = random(p.heads * p.len * p.dhv, -dh_scale, dh_scale, &mut rng);
    let g = cpu::backward(p, &dh, dfinal, mode);
    // Constant mode differentiates the forward with every m[t] and denominator frozen.
    let (m_fix, d_fix) = cpu::normalizers(p);
    let eval = |q: &cpu::Mlstm64| match mode {
        NormalizerGrad::Exact => loss(&cpu::forward_recurrent(q), &dh, dfinal, true),
        NormalizerGrad::Constant => loss(&cpu::forward_constant_normalizer(q, &m_fix, &d_fix), &dh, dfinal, false),
    };
    type Field = fn(&mut cpu::Mlstm64) -> &mut Vec<f64>;
    let mut fields: Vec<(&str, Field, &[f64])> = vec![
        ("q", |p| &mut p.q, &g.dq),
        ("k", |p| &mut p.k, &g.dk),
        ("v", |p| &mut p.v, &g.dv),
        ("i", |p| &mut p.i, &g.di),
        ("f", |p| &mut p.f, &g.df),
    ];
    let gi = g.dinitial.as_ref();
    if let Some(gi) = gi {
        fields.push(("c0", |p| &mut p.initial.as_mut().unwrap().c, &gi.c));
        fields.push(("n0", |p| &mut p.initial.as_mut().unwrap().n, &gi.n));
        fields.push(("m0", |p| &mut p.initial.as_mut().unwrap().m, &gi.m));
    }
    let h = 1e-6;
    for (name, field, analytic) in fields {
        let mut q = p.clone();
        assert_eq!(field(&mut q).len(), analytic.len(), "{name}");
        for (e, &want) in analytic.iter().enumerate() {
            let x = field(&mut q)[e];
            field(&mut q)[e] = x + h;
            let up = eval(&q);
            field(&mut q)[e] = x - h;
            let down = eval(&q);
            field(&mut q)[e] = x;
            let fd = (up - down) / (2.0 * h);
            let tol = 2e-6 * (1.0 + fd.abs());
            assert!((fd - want).abs() <= tol, "{mode:?} d{name}[{e}]: finite difference {fd} vs analytic {want}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn recurrent_and_parallel_forms_agree(
        seed in any::<u64>(),
        heads in 1usize..3,
        len in prop_oneof![Just(1usize), 1usize..40],
        dqk in 1usize..6,
        dhv in 1usize..6,
        init in any::<bool>(),
        extreme in any::<bool>(),
    ) {
        let p = problem(heads, len, dqk, dhv, init, if extreme { EXTREME } else { NORMAL }, seed);
        let (r, par) = (cpu::forward_recurrent(&p), cpu::forward_parallel(&p));
        prop_assert!(max_rel(&par.h, &r.h) < 1e-10, "h {}", max_rel(&par.h, &r.h));
        prop_assert!(max_rel(&par.final_state.c, &r.final_state.c) < 1e-10);
        prop_assert!(max_rel(&par.final_state.n, &r.final_state.n) < 1e-10);
        prop_assert!(max_rel(&par.final_state.m, &r.final_state.m) < 1e-12);
    }

    #[test]
    fn reference_backward_matches_finite_differences(
        seed in any::<u64>(),
        len in prop_oneof![Just(1usize), 1usize..9],
        dqk in 1usize..4,
        dhv in 1usize..4,
        init in any::<bool>(),
        with_dfinal in any::<bool>(),
        exact in any::<bool>(),
    ) {
        let p = problem(2, len, dqk, dhv, init, NORMAL, seed);
        let mut rng = Rng::new(seed.wrapping_add(7));
        let dfinal = with_dfinal.then(|| cpu::State64 {
            c: random(2 * dqk * dhv, -1.0, 1.0, &mut rng),
            n: random(2 * dqk, -1.0, 1.0, &mut rng),
            m: random(2, -1.0, 1.0, &mut rng),
        });
        let mode = if exact { NormalizerGrad::Exact } else { NormalizerGrad::Constant };
        check_fd(&p, dfinal.as_ref(), mode, seed, 1.0);
    }
}

/// The exp(-m) side of the denominator's max and the eps term: small q . n and large m make
/// the max-state gradient matter; the exact backward still matches finite differences.
#[test]
fn exact_backward_covers_the_lower_bound_and_eps() {
    for seed in 0..6 {
        // Input gates near 14 make eps * exp(m) comparable to |q . n|. Tiny q makes |q . n|
        // fall under exp(-m) (the lower-bound side); dh grows to keep the loss of order one.
        let mut p = problem(1, 6, 2, 3, seed % 2 == 0, [(12.0, 16.0), (-1.0, 3.0)], seed);
        let mut dh_scale = 1.0;
        if seed >= 3 {
            p.q.iter_mut().for_each(|x| *x *= 1e-4);
            p.i.iter_mut().for_each(|x| *x -= 12.0);
            dh_scale = 1e4;
        }
        check_fd(&p, None, NormalizerGrad::Exact, seed, dh_scale);
    }
}

/// Running the first part of a sequence, then the rest from its final state, gives the
/// same outputs and state as one pass.
#[test]
fn a_sequence_splits_through_the_state() {
    for (seed, split) in [(1u64, 1usize), (2, 5), (3, 17), (4, 29)] {
        let p = problem(2, 30, 4, 3, seed % 2 == 0, NORMAL, seed);
        let whole = cpu::forward_recurrent(&p);
        let cut = |x: &[f64], d: usize, from: usize, to: usize| -> Vec<f64> {
            (0..p.heads).flat_map(|hd| x[(hd * p.len + from) * d..(hd * p.len + to) * d].to_vec()).collect()
        };
        let part = |from: usize, to: usize, initial: Option<cpu::State64>| cpu::Mlstm64 {
            len: to - from,
            q: cut(&p.q, p.dqk, from, to),
            k: cut(&p.k, p.dqk, from, to),
            v: cut(&p.v, p.dhv, from, to),
            i: cut(&p.i, 1, from, to),
            f: cut(&p.f, 1, from, to),
            initial,
            ..p.clone()
        };
        let first = cpu::forward_parallel(&part(0, split, p.initial.clone()));
        let second = cpu::forward_parallel(&part(split, p.len, Some(first.final_state.clone())));
        let joined: Vec<f64> = (0..p.heads)
            .flat_map(|hd| {
                let a = &first.h[hd * split * p.dhv..(hd + 1) * split * p.dhv];
                let r = p.len - split;
                let b = &second.h[hd * r * p.dhv..(hd + 1) * r * p.dhv];
                a.iter().chain(b).copied().collect::<Vec<_>>()
            })
            .collect();
        assert!(max_rel(&joined, &whole.h) < 1e-10, "split {split}");
        assert!(max_rel(&second.final_state.c, &whole.final_state.c) < 1e-10);
        assert!(max_rel(&second.final_state.m, &whole.final_state.m) < 1e-12);
    }
}

/// The public API on the CPU: decoding token by token reproduces the sequence pass, and
/// the CPU backward answers in every dtype.
#[test]
fn cpu_decoding_reproduces_the_sequence() {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for init in [false, true] {
            let case = MlstmCase { with_init: init, ..MlstmCase::new(2, 2, 9, 5, 3, dtype) };
            let errs = decode_against_mlstm(&case, 11, &Device::Cpu).unwrap();
            // Both sides round only their outputs (h to the element type, states to f32).
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            assert!(errs.iter().all(|&e| e <= tol), "{dtype} init {init}: {errs:?}");
        }
    }
}

#[test]
fn typed_errors_name_the_argument() {
    let dev = Device::Cpu;
    let t = |shape: &[usize], dtype: DType| Tensor::full(0.5, shape, dtype, &dev).unwrap();
    let (q, k, v) = (t(&[1, 2, 5, 4], DType::F32), t(&[1, 2, 5, 4], DType::F32), t(&[1, 2, 5, 3], DType::F32));
    let (i, f) = (t(&[1, 2, 5], DType::F32), t(&[1, 2, 5], DType::F32));
    let arg = |e: Error| match e {
        Error::InvalidArgument { arg, .. } | Error::DTypeMismatch { arg, .. } | Error::DeviceMismatch { arg, .. } => {
            arg
        }
        other => panic!("unexpected {other}"),
    };
    let ok = MlstmInputs::new(&q, &k, &v, &i, &f);
    assert!(mlstm(&ok).is_ok());
    let bad_v = t(&[1, 2, 4, 3], DType::F32);
    assert_eq!(arg(mlstm(&MlstmInputs { v: &bad_v, ..ok }).unwrap_err()), "v");
    let bad_k = t(&[1, 2, 5, 4], DType::BF16);
    assert_eq!(arg(mlstm(&MlstmInputs { k: &bad_k, ..ok }).unwrap_err()), "k");
    let bad_i = t(&[1, 2, 5], DType::BF16);
    assert_eq!(arg(mlstm(&MlstmInputs { i: &bad_i, ..ok }).unwrap_err()), "i");
    let bad_f = t(&[1, 2, 6], DType::F32);
    assert_eq!(arg(mlstm(&MlstmInputs { f: &bad_f, ..ok }).unwrap_err()), "f");
    assert_eq!(arg(mlstm(&MlstmInputs { eps: f32::NAN, ..ok }).unwrap_err()), "eps");
    assert_eq!(arg(mlstm(&MlstmInputs { chunk: Some(48), ..ok }).unwrap_err()), "chunk");
    let zero_d = t(&[1, 2, 5, 0], DType::F32);
    assert_eq!(arg(mlstm(&MlstmInputs { q: &zero_d, k: &zero_d, ..ok }).unwrap_err()), "q, v");
    let mut bad_state = MlstmState::zeros(1, 2, 4, 3, &dev).unwrap();
    bad_state.n = t(&[1, 2, 3], DType::F32);
    assert_eq!(arg(mlstm(&MlstmInputs { initial: Some(&bad_state), ..ok }).unwrap_err()), "initial.n");
    let dh = t(&[1, 2, 5, 3], DType::BF16);
    assert_eq!(arg(mlstm_backward(&ok, &dh, None, NormalizerGrad::Exact, None).unwrap_err()), "dh");
    let mut bad_final = MlstmState::zeros(1, 2, 4, 3, &dev).unwrap();
    bad_final.m = t(&[2, 1], DType::F32);
    let dh = t(&[1, 2, 5, 3], DType::F32);
    assert_eq!(arg(mlstm_backward(&ok, &dh, Some(&bad_final), NormalizerGrad::Exact, None).unwrap_err()), "dfinal.m");
    // A saved forward of other inputs (here one step longer) is refused by name.
    let (q6, v6, g6) = (t(&[1, 2, 6, 4], DType::F32), t(&[1, 2, 6, 3], DType::F32), t(&[1, 2, 6], DType::F32));
    let other = mlstm_for_backward(&MlstmInputs::new(&q6, &q6, &v6, &g6, &g6)).unwrap();
    assert!(!other.has_stats());
    assert_eq!(arg(mlstm_backward(&ok, &dh, None, NormalizerGrad::Exact, Some(&other)).unwrap_err()), "saved.output.h");
    // ... and so is one taken with another eps or without the initial state.
    let saved = mlstm_for_backward(&MlstmInputs { eps: 1e-3, ..ok }).unwrap();
    assert_eq!(arg(mlstm_backward(&ok, &dh, None, NormalizerGrad::Exact, Some(&saved)).unwrap_err()), "saved");
    let init = MlstmState::zeros(1, 2, 4, 3, &dev).unwrap();
    let saved = mlstm_for_backward(&ok).unwrap();
    let with_init = MlstmInputs { initial: Some(&init), ..ok };
    assert_eq!(arg(mlstm_backward(&with_init, &dh, None, NormalizerGrad::Exact, Some(&saved)).unwrap_err()), "saved");
    assert!(mlstm_backward(&ok, &dh, None, NormalizerGrad::Exact, Some(&saved)).is_ok());
    let mut state = MlstmState::zeros(1, 2, 4, 3, &dev).unwrap();
    let (q1, k1, v1) = (t(&[1, 2, 4], DType::F32), t(&[1, 2, 4], DType::F32), t(&[1, 2, 3], DType::F32));
    let (i1, f1) = (t(&[1, 2], DType::F32), t(&[1, 2], DType::F32));
    assert!(mlstm_step(&mut state, &q1, &k1, &v1, &i1, &f1, 1e-6).is_ok());
    let bad_v1 = t(&[1, 2, 3], DType::F16);
    assert_eq!(arg(mlstm_step(&mut state, &q1, &k1, &bad_v1, &i1, &f1, 1e-6).unwrap_err()), "v");
    let mut small = MlstmState::zeros(1, 2, 3, 3, &dev).unwrap();
    assert_eq!(arg(mlstm_step(&mut small, &q1, &k1, &v1, &i1, &f1, 1e-6).unwrap_err()), "state.c");
    // A zero-length sequence returns the initial state untouched.
    let empty = t(&[1, 2, 0, 4], DType::F32);
    let (ev, ei) = (t(&[1, 2, 0, 3], DType::F32), t(&[1, 2, 0], DType::F32));
    let init = MlstmState::zeros(1, 2, 4, 3, &dev).unwrap();
    let out = mlstm(&MlstmInputs { initial: Some(&init), ..MlstmInputs::new(&empty, &empty, &ev, &ei, &ei) }).unwrap();
    assert_eq!(out.h.shape(), &[1, 2, 0, 3]);
    assert_eq!(out.final_state.c.to_f32_vec().unwrap(), init.c.to_f32_vec().unwrap());
}
