//! The causal conv1d's f64 reference: the analytic backward against finite differences, its
//! state semantics (the initial / final state split a sequence exactly, resets separate
//! packed sequences, the decoding update reproduces the conv), and the API's typed errors.
//! CPU only, run in CI.

use hybrid_kernels::check::{decode_against_conv, ConvCase, Rng};
use hybrid_kernels::ops::causal_conv1d::{
    causal_conv1d, causal_conv1d_backward, causal_conv1d_update, cpu, ConvInputs, SequenceResets,
};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

/// `sum(out * dout) + sum(final * dfinal)` of the reference.
fn loss(p: &cpu::Conv64, dout: &[f64], dfinal: &[f64]) -> f64 {
    let f = cpu::forward(p);
    f.out.iter().zip(dout).map(|(a, b)| a * b).sum::<f64>()
        + f.final_state.iter().zip(dfinal).map(|(a, b)| a * b).sum::<f64>()
}

/// Central differences of `loss` in every element that `field` selects, against `analytic`.
fn check_fd(
    name: &str,
    p: &cpu::Conv64,
    dout: &[f64],
    dfinal: &[f64],
    field: fn(&mut cpu::Conv64) -> &mut Vec<f64>,
    analytic: &[f64],
) {
    let h = 1e-6;
    let mut q = p.clone();
    let n = field(&mut q).len();
    assert_eq!(n, analytic.len(), "{name}");
    for (i, &want) in analytic.iter().enumerate() {
        let v = field(&mut q)[i];
        field(&mut q)[i] = v + h;
        let up = loss(&q, dout, dfinal);
        field(&mut q)[i] = v - h;
        let down = loss(&q, dout, dfinal);
        field(&mut q)[i] = v;
        let fd = (up - down) / (2.0 * h);
        let tol = 1e-6 * (1.0 + fd.abs());
        assert!((fd - want).abs() <= tol, "{name}[{i}]: finite difference {fd} vs analytic {want}");
    }
}

fn case(batch: usize, dim: usize, len: usize, width: usize, flags: u32) -> ConvCase {
    ConvCase::from_option_bits(batch, dim, len, width, flags, DType::F32)
}

fn random(n: usize, rng: &mut Rng) -> Vec<f64> {
    (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reference_backward_matches_finite_differences(
        seed in any::<u64>(),
        len in prop_oneof![Just(1usize), Just(2), 1usize..12],
        width in 2usize..=4,
        flags in 0u32..32,
    ) {
        let c = case(2, 3, len, width, flags);
        let mut rng = Rng::new(seed);
        let p = c.tensors(&mut rng).unwrap().inputs().to_f64().unwrap();
        let dout = random(p.x.len(), &mut rng);
        let dfinal = random(2 * 3 * (width - 1), &mut rng);
        let g = cpu::backward(&p, &dout, Some(&dfinal));
        check_fd("dx", &p, &dout, &dfinal, |q| &mut q.x, &g.dx);
        check_fd("dweight", &p, &dout, &dfinal, |q| &mut q.weight, &g.dweight);
        if let Some(db) = &g.dbias {
            check_fd("dbias", &p, &dout, &dfinal, |q| q.bias.as_mut().unwrap(), db);
        }
        if let Some(dh) = &g.dinitial_state {
            check_fd("dinitial_state", &p, &dout, &dfinal, |q| q.initial_state.as_mut().unwrap(), dh);
        }
    }

    /// Convolving x[..s] then x[s..] from the first part's final state is the whole conv,
    /// also when the first part is shorter than the state.
    #[test]
    fn a_sequence_splits_at_any_step(seed in any::<u64>(), len in 2usize..12, split_at in 1usize..11, width in 2usize..=4, flags in 0u32..8) {
        let split_at = split_at.min(len - 1);
        let c = case(2, 3, len, width, flags & 0b111); // bias, SiLU, initial state
        let p = c.tensors(&mut Rng::new(seed)).unwrap().inputs().to_f64().unwrap();
        let whole = cpu::forward(&p);
        let cut = |v: &[f64], from: usize, to: usize| -> Vec<f64> {
            v.chunks(len).flat_map(|r| r[from..to].to_vec()).collect()
        };
        let first = cpu::Conv64 { len: split_at, x: cut(&p.x, 0, split_at), ..p.clone() };
        let f1 = cpu::forward(&first);
        let second = cpu::Conv64 { len: len - split_at, x: cut(&p.x, split_at, len), initial_state: Some(f1.final_state.clone()), ..p.clone() };
        let f2 = cpu::forward(&second);
        let joined: Vec<f64> = f1.out.chunks(split_at).zip(f2.out.chunks(len - split_at)).flat_map(|(a, b)| [a, b].concat()).collect();
        prop_assert!(joined.iter().zip(&whole.out).all(|(a, b)| (a - b).abs() < 1e-12));
        prop_assert!(f2.final_state.iter().zip(&whole.final_state).all(|(a, b)| (a - b).abs() < 1e-12));
    }
}

/// A packed row with resets is the conv of each sequence on its own (the first keeps the
/// initial state, later ones start from zeros), and its final state is the last sequence's.
#[test]
fn resets_separate_packed_sequences() {
    for width in 2..=4 {
        for (l0, l1) in [(5usize, 7usize), (1, 4), (6, 1), (2, 2)] {
            let len = l0 + l1;
            let c = case(1, 3, len, width, 0b111);
            let mut p = c.tensors(&mut Rng::new(width as u64 * 100 + l0 as u64)).unwrap().inputs().to_f64().unwrap();
            p.resets = Some(SequenceResets::from_cu_seqlens(&[0, l0, len]).unwrap().flags().to_vec());
            let packed = cpu::forward(&p);
            let part = |from: usize, to: usize, init: Option<Vec<f64>>| {
                let x = p.x.chunks(len).flat_map(|r| r[from..to].to_vec()).collect();
                cpu::forward(&cpu::Conv64 { len: to - from, x, initial_state: init, resets: None, ..p.clone() })
            };
            let a = part(0, l0, p.initial_state.clone());
            let b = part(l0, len, None);
            let joined: Vec<f64> = a.out.chunks(l0).zip(b.out.chunks(l1)).flat_map(|(x, y)| [x, y].concat()).collect();
            assert!(joined.iter().zip(&packed.out).all(|(u, v)| (u - v).abs() < 1e-12), "width {width} {l0}+{l1}");
            assert!(
                b.final_state.iter().zip(&packed.final_state).all(|(u, v)| (u - v).abs() < 1e-12),
                "final state, width {width} {l0}+{l1}"
            );
        }
    }
}

#[test]
fn the_cpu_backend_runs_the_reference() {
    let c = ConvCase { dtype: DType::BF16, ..case(2, 5, 9, 4, 0b11111) };
    let errs = c.run(3, &Device::Cpu).unwrap();
    for (name, e) in errs {
        // The CPU backend rounds the f64 reference once: at most half a bf16 ulp.
        assert!(e <= 2f64.powi(-8), "{name}: {e:e}");
    }
}

#[test]
fn decoding_reproduces_the_conv_on_the_cpu() {
    for width in 2..=4 {
        let c = case(2, 3, 11, width, 0b111);
        for (tokens, state_len) in [(1, width - 1), (3, width - 1), (1, 6), (4, 5), (20, width - 1)] {
            let (out, last) = decode_against_conv(&c, 5, &Device::Cpu, tokens, state_len).unwrap();
            assert!(out < 1e-7 && last == 0.0, "width {width} tokens {tokens} state {state_len}: {out:e} {last:e}");
        }
    }
}

#[test]
fn empty_sequences_keep_the_initial_state() {
    let c = case(2, 3, 0, 3, 0b100);
    let t = c.tensors(&mut Rng::new(1)).unwrap();
    let f = causal_conv1d(&t.inputs()).unwrap();
    assert_eq!(f.out.shape(), &[2, 3, 0]);
    assert_eq!(f.final_state.to_f32_vec().unwrap(), t.initial_state.as_ref().unwrap().to_f32_vec().unwrap());
    let dout = Tensor::full(0.0, &[2, 3, 0], DType::F32, &Device::Cpu).unwrap();
    let dfinal = Tensor::full(1.0, &[2, 3, 2], DType::F32, &Device::Cpu).unwrap();
    let g = causal_conv1d_backward(&t.inputs(), &dout, Some(&dfinal)).unwrap();
    assert_eq!(g.dinitial_state.unwrap().to_f32_vec().unwrap(), vec![1.0; 12]);
    assert_eq!(g.dweight.to_f32_vec().unwrap(), vec![0.0; 9]);
}

fn invalid_arg(e: Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } | Error::DTypeMismatch { arg, .. } | Error::DeviceMismatch { arg, .. } => {
            arg
        }
        e => panic!("unexpected error {e}"),
    }
}

#[test]
fn bad_inputs_get_typed_errors_naming_the_argument() {
    let dev = Device::Cpu;
    let z = |shape: &[usize], dtype| Tensor::full(0.0, shape, dtype, &dev).unwrap();
    let x = z(&[2, 3, 5], DType::BF16);
    let w = z(&[3, 4], DType::F32);
    let ok = ConvInputs::new(&x, &w);
    assert!(causal_conv1d(&ok).is_ok());
    let err = |i: ConvInputs| invalid_arg(causal_conv1d(&i).unwrap_err());
    assert_eq!(err(ConvInputs::new(&z(&[2, 3], DType::BF16), &w)), "x");
    for bad in [z(&[3, 5], DType::F32), z(&[3, 1], DType::F32), z(&[4, 4], DType::F32), z(&[3, 4], DType::BF16)] {
        assert_eq!(err(ConvInputs::new(&x, &bad)), "weight");
    }
    let bias = z(&[2], DType::F32);
    assert_eq!(err(ConvInputs { bias: Some(&bias), ..ok }), "bias");
    let bias16 = z(&[3], DType::BF16);
    assert_eq!(err(ConvInputs { bias: Some(&bias16), ..ok }), "bias");
    let init = z(&[2, 3, 2], DType::BF16);
    assert_eq!(err(ConvInputs { initial_state: Some(&init), ..ok }), "initial_state");
    let init32 = z(&[2, 3, 3], DType::F32);
    assert_eq!(err(ConvInputs { initial_state: Some(&init32), ..ok }), "initial_state");
    let r = SequenceResets::from_flags(2, 4, &[false; 8]).unwrap();
    assert_eq!(err(ConvInputs { resets: Some(&r), ..ok }), "resets");
    let bad_dout = z(&[2, 3, 4], DType::BF16);
    assert_eq!(invalid_arg(causal_conv1d_backward(&ok, &bad_dout, None).unwrap_err()), "dout");
    let dout = z(&[2, 3, 5], DType::BF16);
    let bad_final = z(&[2, 3, 3], DType::F32);
    assert_eq!(invalid_arg(causal_conv1d_backward(&ok, &dout, Some(&bad_final)).unwrap_err()), "dfinal_state");

    let xt = z(&[2, 3], DType::BF16);
    let mut short = z(&[2, 3, 2], DType::BF16);
    assert_eq!(invalid_arg(causal_conv1d_update(&mut short, &xt, &w, None, true).unwrap_err()), "state");
    let mut st32 = z(&[2, 3, 3], DType::F32);
    assert_eq!(invalid_arg(causal_conv1d_update(&mut st32, &xt, &w, None, true).unwrap_err()), "state");
    let mut st = z(&[2, 3, 3], DType::BF16);
    assert_eq!(invalid_arg(causal_conv1d_update(&mut st, &z(&[2], DType::BF16), &w, None, true).unwrap_err()), "x");
    assert_eq!(invalid_arg(causal_conv1d_update(&mut st, &xt, &w, Some(&bias), true).unwrap_err()), "bias");
    assert!(causal_conv1d_update(&mut st, &xt, &w, None, true).is_ok());
}
