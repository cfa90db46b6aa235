//! The norms: the formulas and finite differences through the public API, typed errors (CPU,
//! in CI); the GPU against the f64 reference on odd and model-sized shapes for every kind, with
//! bias, groups and the fused residual add, NaN-poisoned outputs; bitwise repeatability.

mod common;

use hybrid_kernels::ops::norm::check::{norm_tolerance, NormCase};
use hybrid_kernels::ops::norm::{
    add_norm, add_norm_backward, layer_norm, norm, norm_backward, rms_norm, Norm, NormKind, NormStats,
};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

fn t(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(values, shape, DType::F32, &CPU).unwrap()
}

fn v(t: &Tensor) -> Vec<f64> {
    t.to_f64_vec().unwrap()
}

#[test]
fn rms_and_layer_norm_match_their_formulas() {
    let (x, w, b) = (t(&[3.0, -4.0, 0.0, 1.0], &[2, 2]), t(&[2.0, 0.5], &[2]), t(&[0.25, -1.0], &[2]));
    let o = rms_norm(&x, &w, 1e-5).unwrap();
    let r0 = 1.0 / (12.5f64 + 1e-5).sqrt();
    let y = v(&o.y);
    assert!((y[0] - 3.0 * r0 * 2.0).abs() < 1e-6 && (y[1] + 4.0 * r0 * 0.5).abs() < 1e-6, "{y:?}");
    assert!(o.stats.mean.is_none());
    // LayerNorm of (3, -4): mean -0.5, variance 12.25.
    let o = layer_norm(&x, &w, Some(&b), 1e-5).unwrap();
    let s = 1.0 / (12.25f64 + 1e-5).sqrt();
    let y = v(&o.y);
    assert!((y[0] - (3.5 * s * 2.0 + 0.25)).abs() < 1e-6 && (y[1] - (-3.5 * s * 0.5 - 1.0)).abs() < 1e-6, "{y:?}");
    assert_eq!(v(o.stats.mean.as_ref().unwrap())[0], -0.5);
    // Two groups of one element: LayerNorm makes every group 0, so y is the bias.
    let o = norm(&x, &w, Some(&b), Norm::layer(1e-5).grouped(2)).unwrap();
    assert_eq!(v(&o.y), vec![0.25, -1.0, 0.25, -1.0]);
    assert_eq!(o.stats.rstd.shape(), &[2, 2]);
}

#[test]
fn add_norm_adds_the_residual_in_f32_and_its_gradients_are_derivatives() {
    let x = Tensor::from_f32(&[0.5, -1.25, 2.0, 0.75, 1.5, -0.5], &[2, 3], DType::BF16, &CPU).unwrap();
    let res = t(&[0.1, 0.2, -0.3, 1e-3, 2.0, 0.4], &[2, 3]);
    let (w, b) = (t(&[1.5, -0.5, 0.8], &[3]), t(&[0.1, 0.0, -0.2], &[3]));
    let spec = Norm::layer(1e-5);
    let o = add_norm(&x, Some(&res), &w, Some(&b), spec).unwrap();
    assert_eq!(o.residual.dtype(), DType::F32);
    let want: Vec<f64> = v(&x).iter().zip(v(&res)).map(|(a, b)| (a + b) as f32 as f64).collect();
    assert_eq!(v(&o.residual), want, "the sum is one f32 rounding of x + residual");
    // Finite differences of sum(y dy) + sum(z dres) in f32 through the public API.
    let dy = t(&[0.3, -0.7, 1.1, 0.2, 0.5, -0.4], &[2, 3]);
    let dres = t(&[0.05, 0.1, -0.2, 0.3, 0.0, 0.25], &[2, 3]);
    let loss = |r: &Tensor| {
        let x0 = Tensor::full(0.0, &[2, 3], DType::F32, &CPU).unwrap();
        let o = add_norm(&x0, Some(r), &w, Some(&b), spec).unwrap();
        let y: f64 = v(&o.y).iter().zip(v(&dy)).map(|(a, b)| a * b).sum();
        y + v(&o.residual).iter().zip(v(&dres)).map(|(a, b)| a * b).sum::<f64>()
    };
    let z = o.residual.clone();
    let x0 = Tensor::full(0.0, &[2, 3], DType::F32, &CPU).unwrap();
    let o32 = add_norm(&x0, Some(&z), &w, Some(&b), spec).unwrap();
    let g = add_norm_backward(&o32.residual, &w, Some(&b), &o32.stats, &dy, Some(&dres)).unwrap();
    assert_eq!(v(&g.dx), v(g.dresidual.as_ref().unwrap()));
    let zv = z.to_f32_vec().unwrap();
    for e in 0..6 {
        let (mut p, mut m) = (zv.clone(), zv.clone());
        p[e] += 1e-2;
        m[e] -= 1e-2;
        let fd = (loss(&t(&p, &[2, 3])) - loss(&t(&m, &[2, 3]))) / 2e-2;
        assert!((fd - v(&g.dx)[e]).abs() < 3e-3, "dz[{e}]: {fd} vs {}", v(&g.dx)[e]);
    }
    // dbias is the column sum of dy.
    for (got, want) in v(g.dbias.as_ref().unwrap()).iter().zip([0.5, -0.2, 0.7]) {
        assert!((got - want).abs() < 1e-6, "dbias {got} vs {want}");
    }
}

#[test]
fn norm_errors_are_typed() {
    let (x, w) = (t(&[1.0; 6], &[2, 3]), t(&[1.0; 3], &[3]));
    assert!(matches!(rms_norm(&x, &t(&[1.0; 2], &[2]), 1e-5), Err(Error::InvalidArgument { arg: "weight", .. })));
    for eps in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(rms_norm(&x, &w, eps), Err(Error::InvalidArgument { arg: "eps", .. })));
    }
    let scalar = Tensor::from_f32(&[1.0], &[], DType::F32, &CPU).unwrap();
    assert!(matches!(rms_norm(&scalar, &w, 1e-5), Err(Error::InvalidArgument { arg: "x", .. })));
    let half_w = Tensor::from_f32(&[1.0; 3], &[3], DType::BF16, &CPU).unwrap();
    assert!(matches!(rms_norm(&x, &half_w, 1e-5), Err(Error::DTypeMismatch { arg: "weight", .. })));
    assert!(matches!(
        layer_norm(&x, &w, Some(&t(&[0.0; 2], &[2])), 1e-5),
        Err(Error::InvalidArgument { arg: "bias", .. })
    ));
    assert!(matches!(norm(&x, &w, None, Norm::rms(1e-5).grouped(2)), Err(Error::InvalidArgument { arg: "x", .. })));
    assert!(matches!(
        norm(&x, &w, None, Norm::rms(1e-5).grouped(0)),
        Err(Error::InvalidArgument { arg: "groups", .. })
    ));
    let bf = Tensor::from_f32(&[1.0; 6], &[2, 3], DType::BF16, &CPU).unwrap();
    assert!(matches!(
        add_norm(&x, Some(&bf), &w, None, Norm::rms(1e-5)),
        Err(Error::DTypeMismatch { arg: "residual", .. })
    ));
    assert!(matches!(
        add_norm(&x, Some(&t(&[1.0; 3], &[1, 3])), &w, None, Norm::rms(1e-5)),
        Err(Error::InvalidArgument { arg: "residual", .. })
    ));
    let o = rms_norm(&x, &w, 1e-5).unwrap();
    assert!(matches!(
        norm_backward(&x, &w, None, &o.stats, &t(&[1.0; 3], &[3])),
        Err(Error::InvalidArgument { arg: "dy", .. })
    ));
    assert!(matches!(norm_backward(&x, &w, None, &o.stats, &bf), Err(Error::DTypeMismatch { arg: "dy", .. })));
    let wrong = NormStats { rstd: o.y.clone(), ..o.stats.clone() };
    assert!(matches!(norm_backward(&x, &w, None, &wrong, &x), Err(Error::InvalidArgument { arg: "rstd", .. })));
    let no_mean = NormStats { norm: Norm::layer(1e-5), ..o.stats.clone() };
    assert!(matches!(norm_backward(&x, &w, None, &no_mean, &x), Err(Error::InvalidArgument { arg: "stats", .. })));
    assert!(matches!(
        add_norm_backward(&bf, &w, None, &o.stats, &x, None),
        Err(Error::DTypeMismatch { arg: "residual", .. })
    ));
    // No rows: empty outputs, zero parameter gradients.
    let empty = t(&[], &[0, 3]);
    let o = layer_norm(&empty, &w, Some(&w), 1e-5).unwrap();
    let g = norm_backward(&empty, &w, Some(&w), &o.stats, &empty).unwrap();
    assert_eq!(v(&g.dweight), vec![0.0; 3]);
    assert_eq!(v(g.dbias.as_ref().unwrap()), vec![0.0; 3]);
}

#[test]
fn the_cpu_path_passes_its_own_check_cases() {
    for kind in [NormKind::Rms, NormKind::Layer] {
        for (rows, groups, dim, bias, residual) in
            [(3, 1, 5, true, false), (4, 2, 3, false, true), (1, 1, 1, true, true)]
        {
            for dtype in DType::ALL {
                let case = NormCase { rows, groups, dim, dtype, kind, bias, residual };
                let err = case.run(7, &CPU).unwrap();
                assert!(err <= norm_tolerance(dtype), "{case:?}: {err:e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(48), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn norm_gpu_matches_cpu_reference(
        rows in prop_oneof![Just(1usize), Just(7), Just(33), Just(1025), 1usize..300],
        groups in prop_oneof![Just(1usize), Just(1), Just(4), 1usize..6],
        dim in prop_oneof![Just(1usize), Just(7), Just(33), Just(768), Just(4100), Just(17000), 1usize..600],
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
        layer in any::<bool>(),
        bias in any::<bool>(),
        residual in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = common::gpu("norm_gpu_matches_cpu_reference") else { return Ok(()) };
        // Keep the CPU reference quick: at most ~2M elements.
        let rows = if rows * groups * dim > 2_000_000 { 2_000_000 / (groups * dim) } else { rows }.max(1);
        let kind = if layer { NormKind::Layer } else { NormKind::Rms };
        let case = NormCase { rows, groups, dim, dtype, kind, bias, residual };
        let err = case.run(seed, &gpu).unwrap();
        prop_assert!(err <= norm_tolerance(dtype), "{case:?}: {err:e}");
    }
}

#[test]
fn norm_gpu_gradients_are_bitwise_repeatable() {
    let Some(gpu) = common::gpu("norm_gpu_gradients_are_bitwise_repeatable") else { return };
    let n = 4096 * 768;
    let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let dy: Vec<f32> = (0..n).map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0).collect();
    let x = Tensor::from_f32(&x, &[4096, 768], DType::BF16, &gpu).unwrap();
    let dy = Tensor::from_f32(&dy, &[4096, 768], DType::BF16, &gpu).unwrap();
    let w = Tensor::full(1.0, &[768], DType::F32, &gpu).unwrap();
    let b = Tensor::full(0.5, &[768], DType::F32, &gpu).unwrap();
    let o = layer_norm(&x, &w, Some(&b), 1e-5).unwrap();
    let first = norm_backward(&x, &w, Some(&b), &o.stats, &dy).unwrap();
    for _ in 0..3 {
        let again = norm_backward(&x, &w, Some(&b), &o.stats, &dy).unwrap();
        assert_eq!(first.dweight.to_vec::<f32>().unwrap(), again.dweight.to_vec::<f32>().unwrap());
        assert_eq!(
            first.dbias.as_ref().unwrap().to_vec::<f32>().unwrap(),
            again.dbias.unwrap().to_vec::<f32>().unwrap()
        );
        assert_eq!(v(&first.dx), v(&again.dx));
    }
}
