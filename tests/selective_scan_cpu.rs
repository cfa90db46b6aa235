//! The selective scan's f64 reference: the analytic backward against finite differences,
//! its state semantics (h0 / last state split a sequence exactly, resets separate packed
//! sequences), and the API's typed errors. CPU only, run in CI.

use hybrid_kernels::check::{Rng, ScanCase};
use hybrid_kernels::ops::selective_scan::{
    cpu, selective_scan, selective_scan_backward, ScanInputs, SequenceResets, MAX_DSTATE,
};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

fn case(batch: usize, dim: usize, dstate: usize, len: usize, groups: usize, flags: u32) -> ScanCase {
    ScanCase {
        checkpoints: true,
        a_max: 4.0,
        ..ScanCase::from_option_bits(batch, dim, dstate, len, groups, flags, DType::F32)
    }
}

/// `sum(out * dout) + sum(last * dlast)` of the reference.
fn loss(p: &cpu::Scan64, dout: &[f64], dlast: &[f64]) -> f64 {
    let f = cpu::forward(p);
    f.out.iter().zip(dout).map(|(a, b)| a * b).sum::<f64>()
        + f.last_state.iter().zip(dlast).map(|(a, b)| a * b).sum::<f64>()
}

/// Central differences of `loss` in every element that `field` selects, against `analytic`.
fn check_fd(
    name: &str,
    p: &cpu::Scan64,
    dout: &[f64],
    dlast: &[f64],
    analytic: &[f64],
    field: impl Fn(&mut cpu::Scan64) -> &mut Vec<f64>,
) -> Result<(), TestCaseError> {
    let h = 1e-6;
    let n = field(&mut p.clone()).len();
    prop_assert_eq!(n, analytic.len(), "{} length", name);
    for (e, &an) in analytic.iter().enumerate() {
        let (mut pp, mut pm) = (p.clone(), p.clone());
        field(&mut pp)[e] += h;
        field(&mut pm)[e] -= h;
        let fd = (loss(&pp, dout, dlast) - loss(&pm, dout, dlast)) / (2.0 * h);
        prop_assert!((an - fd).abs() <= 1e-6 * (1.0 + fd.abs()), "{}[{}]: analytic {} vs fd {}", name, e, an, fd);
    }
    Ok(())
}

fn param_vec(p: &mut cpu::Param64) -> &mut Vec<f64> {
    match p {
        cpu::Param64::Variable(v) | cpu::Param64::Constant(v) => v,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reference_backward_matches_finite_differences(
        seed in any::<u64>(), batch in 1usize..3, dpg in 1usize..3, groups in 1usize..3,
        dstate in 1usize..4, len in 1usize..7, flags in 0u32..512,
    ) {
        let c = case(batch, dpg * groups, dstate, len, groups, flags);
        let mut rng = Rng::new(seed);
        let t = c.tensors(&mut rng).unwrap();
        let p = t.inputs().to_f64().unwrap();
        let dout: Vec<f64> = (0..batch * c.dim * len).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let dlast: Vec<f64> = (0..batch * c.dim * dstate).map(|_| if c.with_dlast { rng.uniform(-1.0, 1.0) } else { 0.0 }).collect();
        let g = cpu::backward(&p, &dout, Some(&dlast));
        check_fd("du", &p, &dout, &dlast, &g.du, |p| &mut p.u)?;
        check_fd("ddelta", &p, &dout, &dlast, &g.ddelta, |p| &mut p.delta)?;
        check_fd("dA", &p, &dout, &dlast, &g.da, |p| &mut p.a)?;
        check_fd("dB", &p, &dout, &dlast, &g.db, |p| param_vec(&mut p.b))?;
        check_fd("dC", &p, &dout, &dlast, &g.dc, |p| param_vec(&mut p.c))?;
        if let Some(dd) = &g.dd { check_fd("dD", &p, &dout, &dlast, dd, |p| p.d.as_mut().unwrap())?; }
        if let Some(dz) = &g.dz { check_fd("dz", &p, &dout, &dlast, dz, |p| p.z.as_mut().unwrap())?; }
        if let Some(db) = &g.ddelta_bias { check_fd("ddelta_bias", &p, &dout, &dlast, db, |p| p.delta_bias.as_mut().unwrap())?; }
        if let Some(dh) = &g.dh0 { check_fd("dh0", &p, &dout, &dlast, dh, |p| p.h0.as_mut().unwrap())?; }
        prop_assert_eq!(g.dd.is_some(), c.with_d);
        prop_assert_eq!(g.dz.is_some(), c.with_z);
        prop_assert_eq!(g.dh0.is_some(), c.with_h0);
    }

    /// Scanning [0, split) then [split, len) from the first part's last state gives the
    /// whole scan: the initial state and the last state mean what they say.
    #[test]
    fn a_sequence_splits_at_any_step(seed in any::<u64>(), len in 2usize..12, split_at in 1usize..11, flags in 0u32..128) {
        let split = split_at.min(len - 1);
        let c = case(2, 3, 4, len, 1, flags | 1 << 6);
        let mut rng = Rng::new(seed);
        let p = c.tensors(&mut rng).unwrap().inputs().to_f64().unwrap();
        let whole = cpu::forward(&p);
        let part = |p: &cpu::Scan64, from: usize, to: usize, h0: Vec<f64>| {
            let mut q = p.clone();
            let cut = |v: &[f64], inner: usize| -> Vec<f64> {
                v.chunks(p.len * inner).flat_map(|row| row.chunks(p.len).flat_map(|r| r[from..to].to_vec()).collect::<Vec<_>>()).collect()
            };
            q.len = to - from;
            q.u = cut(&p.u, 1);
            q.delta = cut(&p.delta, 1);
            q.z = p.z.as_ref().map(|z| cut(z, 1));
            for bc in [&mut q.b, &mut q.c] {
                if let cpu::Param64::Variable(v) = bc { *v = cut(v, 1); }
            }
            q.h0 = Some(h0);
            cpu::forward(&q)
        };
        let first = part(&p, 0, split, p.h0.clone().unwrap());
        let second = part(&p, split, len, first.last_state.clone());
        prop_assert_eq!(&second.last_state, &whole.last_state);
        for row in 0..2 * 3 {
            let w = &whole.out[row * len..(row + 1) * len];
            let joined: Vec<f64> = first.out[row * split..(row + 1) * split].iter().chain(&second.out[row * (len - split)..(row + 1) * (len - split)]).copied().collect();
            prop_assert_eq!(w.to_vec(), joined);
        }
    }
}

/// Two sequences packed into one row with a reset give the same outputs as scanned apart.
#[test]
fn resets_separate_packed_sequences() {
    let (l0, l1) = (5usize, 7usize);
    let mut rng = Rng::new(11);
    let c = case(1, 2, 3, l0 + l1, 1, 0b1_0011_1100);
    let t = c.tensors(&mut rng).unwrap();
    let resets = SequenceResets::from_cu_seqlens(&[0, l0, l0 + l1]).unwrap();
    let packed = ScanInputs { resets: Some(&resets), h0: None, ..t.inputs() };
    let p = packed.to_f64().unwrap();
    let whole = cpu::forward(&p);
    for (from, to) in [(0, l0), (l0, l0 + l1)] {
        let mut q = p.clone();
        let cut = |v: &[f64]| -> Vec<f64> { v.chunks(p.len).flat_map(|r| r[from..to].to_vec()).collect() };
        q.len = to - from;
        q.u = cut(&p.u);
        q.delta = cut(&p.delta);
        q.z = p.z.as_ref().map(|z| cut(z));
        q.resets = None;
        for bc in [&mut q.b, &mut q.c] {
            if let cpu::Param64::Variable(v) = bc {
                *v = cut(v);
            }
        }
        let apart = cpu::forward(&q);
        for d in 0..2 {
            assert_eq!(&whole.out[d * p.len + from..d * p.len + to], &apart.out[d * q.len..(d + 1) * q.len]);
        }
    }
}

#[test]
fn the_cpu_backend_runs_the_reference() {
    let c = case(2, 4, 3, 9, 2, 0b1_1111_1100);
    let t = c.tensors(&mut Rng::new(5)).unwrap();
    let out = selective_scan(&t.inputs()).unwrap();
    let p = t.inputs().to_f64().unwrap();
    let f = cpu::forward(&p);
    assert_eq!(out.out.to_f64_vec().unwrap(), f.out.iter().map(|&v| v as f32 as f64).collect::<Vec<_>>());
    assert_eq!(out.last_state.shape(), &[2, 4, 3]);
    let dout = Tensor::full(1.0, &[2, 4, 9], DType::F32, &Device::Cpu).unwrap();
    let g = selective_scan_backward(&t.inputs(), &dout, None, None).unwrap();
    assert_eq!(g.db.shape(), &[2, 2, 3, 9]);
    assert_eq!(g.dh0.unwrap().shape(), &[2, 4, 3]);
}

#[test]
fn empty_sequences_keep_the_initial_state() {
    let c = case(2, 3, 4, 0, 1, 1 << 6);
    let t = c.tensors(&mut Rng::new(1)).unwrap();
    let out = selective_scan(&t.inputs()).unwrap();
    assert_eq!(out.out.shape(), &[2, 3, 0]);
    assert_eq!(out.last_state.to_f64_vec().unwrap(), t.h0.as_ref().unwrap().to_f64_vec().unwrap());
}

#[test]
fn bad_inputs_get_typed_errors_naming_the_argument() {
    let c = case(2, 4, 3, 5, 2, 0b0111_1100);
    let t = c.tensors(&mut Rng::new(3)).unwrap();
    let named = |r: hybrid_kernels::Result<_>| match r {
        Err(
            Error::InvalidArgument { arg, .. } | Error::DTypeMismatch { arg, .. } | Error::DeviceMismatch { arg, .. },
        ) => arg,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("accepted a bad input"),
    };
    let wrong = Tensor::full(0.0, &[2, 4, 6], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(named(selective_scan(&ScanInputs { delta: &wrong, ..t.inputs() }).map(drop)), "delta");
    let a_big = Tensor::full(-1.0, &[4, MAX_DSTATE + 1], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(named(selective_scan(&ScanInputs { a: &a_big, ..t.inputs() }).map(drop)), "A");
    let b3 = Tensor::full(0.0, &[2, 3, 3, 5], DType::F32, &Device::Cpu).unwrap(); // 3 groups do not divide 4
    assert_eq!(named(selective_scan(&ScanInputs { b: &b3, ..t.inputs() }).map(drop)), "B");
    let c1 = Tensor::full(0.0, &[2, 1, 3, 5], DType::F32, &Device::Cpu).unwrap(); // groups differ from B's
    assert_eq!(named(selective_scan(&ScanInputs { c: &c1, ..t.inputs() }).map(drop)), "C");
    let a16 = Tensor::full(-1.0, &[4, 3], DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(named(selective_scan(&ScanInputs { a: &a16, ..t.inputs() }).map(drop)), "A");
    let h0 = Tensor::full(0.0, &[2, 4, 2], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(named(selective_scan(&ScanInputs { h0: Some(&h0), ..t.inputs() }).map(drop)), "h0");
    let r = SequenceResets::from_flags(1, 5, &[false; 5]).unwrap();
    assert_eq!(named(selective_scan(&ScanInputs { resets: Some(&r), ..t.inputs() }).map(drop)), "resets");
    let dout = Tensor::full(0.0, &[2, 4, 5], DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(named(selective_scan_backward(&t.inputs(), &dout, None, None).map(drop)), "dout");
    assert!(SequenceResets::from_cu_seqlens(&[0, 3, 2]).is_err());
    assert!(SequenceResets::from_starts(4, &[vec![4]]).is_err());
    assert!(SequenceResets::from_flags(2, 3, &[true; 5]).is_err());
}

/// On the CPU backend the decode step is the reference at L = 1: stepping reproduces the scan.
#[test]
fn decode_step_reproduces_the_scan_on_the_cpu() {
    let c = ScanCase { checkpoints: false, ..case(2, 4, 3, 9, 2, 0b1_0111_1100) };
    let (out, state) = hybrid_kernels::check::decode_against_scan(&c, 4, &Device::Cpu).unwrap();
    assert!(out < 1e-6 && state < 1e-6, "outputs {out:e}, state {state:e}");
}

#[test]
fn decode_step_errors_name_the_argument() {
    use hybrid_kernels::ops::selective_scan::{selective_state_update, StepInputs};
    let f = |shape: &[usize]| Tensor::full(0.5, shape, DType::F32, &Device::Cpu).unwrap();
    let (x, a, b) = (f(&[2, 4]), f(&[4, 3]), f(&[2, 1, 3]));
    let mut state = f(&[2, 4, 3]);
    assert!(selective_state_update(&mut state, &StepInputs::new(&x, &x, &a, &b, &b)).is_ok());
    let mut wrong = f(&[2, 4, 2]);
    match selective_state_update(&mut wrong, &StepInputs::new(&x, &x, &a, &b, &b)) {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "state"),
        other => panic!("expected an error naming state, got {other:?}"),
    }
    let dt = f(&[2, 5]);
    match selective_state_update(&mut state, &StepInputs::new(&x, &dt, &a, &b, &b)) {
        Err(Error::InvalidArgument { arg, .. }) => assert_eq!(arg, "dt"),
        other => panic!("expected an error naming dt, got {other:?}"),
    }
}
