//! RMSNorm: the f64 reference against finite differences and its typed errors (CPU, in CI);
//! the GPU against the reference on odd and model-sized shapes with NaN-poisoned outputs, and
//! the weight gradient's bitwise repeatability.

mod common;

use hybrid_kernels::ops::rms_norm::{check::rms_norm_tolerance, check::RmsNormCase, rms_norm, rms_norm_backward};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

fn t(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(values, shape, DType::F32, &CPU).unwrap()
}

#[test]
fn rms_norm_matches_the_formula_and_its_derivative() {
    let (x, w) = (t(&[3.0, -4.0, 0.0, 1.0], &[2, 2]), t(&[2.0, 0.5], &[2]));
    let o = rms_norm(&x, &w, 1e-5).unwrap();
    let r0 = 1.0 / (12.5f64 + 1e-5).sqrt();
    let y = o.y.to_f64_vec().unwrap();
    assert!((y[0] - 3.0 * r0 * 2.0).abs() < 1e-6 && (y[1] + 4.0 * r0 * 0.5).abs() < 1e-6, "{y:?}");
    // Finite differences of sum(y * dy) through the public API in f32 (x of order 1).
    let dy = t(&[0.3, -0.7, 1.1, 0.2], &[2, 2]);
    let g = rms_norm_backward(&x, &w, &o.rstd, &dy).unwrap();
    let loss = |x: &Tensor| {
        let y = rms_norm(x, &w, 1e-5).unwrap().y.to_f64_vec().unwrap();
        y.iter().zip(dy.to_f64_vec().unwrap()).map(|(a, b)| a * b).sum::<f64>()
    };
    let xv = x.to_f32_vec().unwrap();
    for e in 0..4 {
        let (mut p, mut m) = (xv.clone(), xv.clone());
        p[e] += 1e-2;
        m[e] -= 1e-2;
        let fd = (loss(&t(&p, &[2, 2])) - loss(&t(&m, &[2, 2]))) / 2e-2;
        let dx = g.dx.to_f64_vec().unwrap()[e];
        assert!((fd - dx).abs() < 2e-3, "dx[{e}]: {fd} vs {dx}");
    }
}

#[test]
fn rms_norm_errors_are_typed() {
    let (x, w) = (t(&[1.0; 6], &[2, 3]), t(&[1.0; 3], &[3]));
    assert!(matches!(rms_norm(&x, &t(&[1.0; 2], &[2]), 1e-5), Err(Error::InvalidArgument { arg: "weight", .. })));
    for eps in [0.0, -1.0, f32::NAN] {
        assert!(matches!(rms_norm(&x, &w, eps), Err(Error::InvalidArgument { arg: "eps", .. })));
    }
    let scalar = Tensor::from_f32(&[1.0], &[], DType::F32, &CPU).unwrap();
    assert!(matches!(rms_norm(&scalar, &w, 1e-5), Err(Error::InvalidArgument { arg: "x", .. })));
    let half_w = Tensor::from_f32(&[1.0; 3], &[3], DType::BF16, &CPU).unwrap();
    assert!(matches!(rms_norm(&x, &half_w, 1e-5), Err(Error::DTypeMismatch { arg: "weight", .. })));
    let o = rms_norm(&x, &w, 1e-5).unwrap();
    assert!(matches!(
        rms_norm_backward(&x, &w, &o.rstd, &t(&[1.0; 3], &[3])),
        Err(Error::InvalidArgument { arg: "dy", .. })
    ));
    assert!(matches!(rms_norm_backward(&x, &w, &o.y, &x), Err(Error::InvalidArgument { arg: "rstd", .. })));
    // No rows: empty outputs, a zero weight gradient.
    let empty = Tensor::from_f32(&[], &[0, 3], DType::F32, &CPU).unwrap();
    let o = rms_norm(&empty, &w, 1e-5).unwrap();
    let g = rms_norm_backward(&empty, &w, &o.rstd, &empty).unwrap();
    assert_eq!(g.dweight.to_f64_vec().unwrap(), vec![0.0; 3]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn rms_norm_gpu_matches_cpu_reference(
        rows in prop_oneof![Just(1usize), Just(7), Just(33), Just(1025), 1usize..300],
        dim in prop_oneof![Just(1usize), Just(7), Just(33), Just(768), Just(4100), 1usize..600],
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
        seed in any::<u64>(),
    ) {
        let Some(gpu) = common::gpu("rms_norm_gpu_matches_cpu_reference") else { return Ok(()) };
        let err = RmsNormCase { rows, dim, dtype }.run(seed, &gpu).unwrap();
        prop_assert!(err <= rms_norm_tolerance(dtype), "{rows}x{dim} {dtype}: {err:e}");
    }
}

#[test]
fn rms_norm_gpu_weight_gradient_is_bitwise_repeatable() {
    let Some(gpu) = common::gpu("rms_norm_gpu_weight_gradient_is_bitwise_repeatable") else { return };
    let n = 4096 * 768;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let dy: Vec<f32> = (0..n).map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0).collect();
    let x = Tensor::from_f32(&x, &[4096, 768], DType::BF16, &gpu).unwrap();
    let dy = Tensor::from_f32(&dy, &[4096, 768], DType::BF16, &gpu).unwrap();
    let w = Tensor::full(1.0, &[768], DType::F32, &gpu).unwrap();
    let o = rms_norm(&x, &w, 1e-5).unwrap();
    let first = rms_norm_backward(&x, &w, &o.rstd, &dy).unwrap();
    for _ in 0..3 {
        let again = rms_norm_backward(&x, &w, &o.rstd, &dy).unwrap();
        assert_eq!(first.dweight.to_vec::<f32>().unwrap(), again.dweight.to_vec::<f32>().unwrap());
        assert_eq!(first.dx.to_f64_vec().unwrap(), again.dx.to_f64_vec().unwrap());
    }
}
