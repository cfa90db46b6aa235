//! The fused cross-entropy: values against PyTorch's formula, ignore index, soft-cap and typed
//! errors through the public API (CPU, in CI); on the GPU every output against the f64
//! reference over odd and LM-sized vocabularies with NaN-poisoned outputs, and repeatability.

mod common;

use hybrid_kernels::ops::cross_entropy::check::{cross_entropy_tolerance, CrossEntropyCase};
use hybrid_kernels::ops::cross_entropy::{cross_entropy, cross_entropy_fused, CrossEntropyOptions};
use hybrid_kernels::{DType, Device, Error, Tensor, TokenIds};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

#[test]
fn cross_entropy_matches_the_formula() {
    // Row 0: logits (1, 2, 3), target 2: loss = log(e + e^2 + e^3) - 3. Row 1 ignored.
    let logits = Tensor::from_f32(&[1.0, 2.0, 3.0, 5.0, 0.0, 0.0], &[2, 3], DType::F32, &CPU).unwrap();
    let targets = TokenIds::new(&[2, -100], &[2], &CPU).unwrap();
    let o = cross_entropy(&logits, &targets, CrossEntropyOptions::default()).unwrap();
    let want = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0;
    let losses = o.losses.to_f64_vec().unwrap();
    assert!((losses[0] - want).abs() < 1e-6 && losses[1] == 0.0, "{losses:?}");
    assert!((f64::from(o.mean_loss().unwrap()) - want).abs() < 1e-6);
    assert_eq!((o.valid, o.correct().unwrap()), (1, 1));
    // The fused pass: softmax - onehot for the valid row, zeros for the ignored one.
    let mut g = logits.clone();
    cross_entropy_fused(&mut g, &targets, CrossEntropyOptions::default()).unwrap();
    let g = g.to_f64_vec().unwrap();
    let z = 1f64.exp() + 2f64.exp() + 3f64.exp();
    for (i, want) in [1f64.exp() / z, 2f64.exp() / z, 3f64.exp() / z - 1.0, 0.0, 0.0, 0.0].iter().enumerate() {
        assert!((g[i] - want).abs() < 1e-6, "dlogits[{i}] = {} vs {want}", g[i]);
    }
}

#[test]
fn cross_entropy_errors_are_typed() {
    let logits = Tensor::full(0.0, &[2, 4], DType::BF16, &CPU).unwrap();
    let opts = CrossEntropyOptions::default();
    let t = |ids: &[i32]| TokenIds::new(ids, &[ids.len()], &CPU).unwrap();
    assert!(matches!(cross_entropy(&logits, &t(&[0, 4]), opts), Err(Error::InvalidArgument { arg: "targets", .. })));
    assert!(matches!(cross_entropy(&logits, &t(&[0, -1]), opts), Err(Error::InvalidArgument { arg: "targets", .. })));
    let no_ignore = CrossEntropyOptions { ignore_index: None, ..opts };
    assert!(matches!(
        cross_entropy(&logits, &t(&[0, -100]), no_ignore),
        Err(Error::InvalidArgument { arg: "targets", .. })
    ));
    assert!(matches!(cross_entropy(&logits, &t(&[0]), opts), Err(Error::InvalidArgument { arg: "targets", .. })));
    for cap in [0.0, -1.0, f32::NAN] {
        let o = CrossEntropyOptions { softcap: Some(cap), ..opts };
        assert!(matches!(cross_entropy(&logits, &t(&[0, 1]), o), Err(Error::InvalidArgument { arg: "softcap", .. })));
    }
    let o = CrossEntropyOptions { grad_scale: f32::INFINITY, ..opts };
    assert!(matches!(cross_entropy(&logits, &t(&[0, 1]), o), Err(Error::InvalidArgument { arg: "grad_scale", .. })));
    let scalar = Tensor::full(0.0, &[], DType::F32, &CPU).unwrap();
    assert!(matches!(cross_entropy(&scalar, &t(&[]), opts), Err(Error::InvalidArgument { arg: "logits", .. })));
    assert!(matches!(TokenIds::new(&[1, 2], &[3], &CPU), Err(Error::InvalidArgument { arg: "ids", .. })));
    // All targets ignored: mean 0, gradient 0.
    let mut g = logits.clone();
    let o = cross_entropy_fused(&mut g, &t(&[-100, -100]), opts).unwrap();
    assert_eq!((o.mean_loss().unwrap(), o.valid), (0.0, 0));
    assert!(g.to_f64_vec().unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn the_cpu_path_passes_its_own_check_cases() {
    for dtype in DType::ALL {
        for (rows, vocab, softcap) in [(6, 9, None), (5, 40, Some(3.0))] {
            let case = CrossEntropyCase { rows, vocab, dtype, spread: 6.0, softcap };
            let err = case.run(11, &CPU).unwrap();
            assert!(err <= cross_entropy_tolerance(dtype), "{case:?}: {err:e}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(32), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn cross_entropy_gpu_matches_cpu_reference(
        rows in prop_oneof![Just(1usize), Just(7), Just(33), 1usize..70],
        vocab in prop_oneof![Just(1usize), Just(7), Just(33), Just(1025), Just(50304), Just(50257), Just(100_000), 1usize..3000],
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
        spread in prop_oneof![Just(1.0f64), Just(10.0), Just(40.0)],
        softcap in prop_oneof![Just(None), Just(Some(30.0f32)), Just(Some(2.0f32))],
        seed in any::<u64>(),
    ) {
        let Some(gpu) = common::gpu("cross_entropy_gpu_matches_cpu_reference") else { return Ok(()) };
        let case = CrossEntropyCase { rows, vocab, dtype, spread, softcap };
        let err = case.run(seed, &gpu).unwrap();
        prop_assert!(err <= cross_entropy_tolerance(dtype), "{case:?}: {err:e}");
    }
}

#[test]
fn cross_entropy_gpu_is_bitwise_repeatable() {
    let Some(gpu) = common::gpu("cross_entropy_gpu_is_bitwise_repeatable") else { return };
    let (rows, vocab) = (3000, 50304);
    let x: Vec<f32> = (0..rows * vocab).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
    let ids: Vec<i32> = (0..rows).map(|r| ((r * 104_729) % vocab) as i32).collect();
    let logits = Tensor::from_f32(&x, &[rows, vocab], DType::BF16, &gpu).unwrap();
    let targets = TokenIds::new(&ids, &[rows], &gpu).unwrap();
    let run = || {
        let mut g = logits.clone();
        let o = cross_entropy_fused(&mut g, &targets, CrossEntropyOptions::default()).unwrap();
        (o.totals.to_f64_vec().unwrap(), g.to_f64_vec().unwrap())
    };
    let first = run();
    for _ in 0..3 {
        assert_eq!(first, run());
    }
}
