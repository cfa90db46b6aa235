//! The elementwise ops: formulas and derivatives through the public API, typed errors (CPU, in
//! CI); the GPU against the f64 reference at odd lengths (vectors and remainders) with
//! NaN-poisoned outputs.

mod common;

use hybrid_kernels::ops::elementwise::check::{activation_case, add_case, elementwise_tolerance};
use hybrid_kernels::ops::elementwise::{activation, activation_backward, add_into, gated, gated_backward, Activation};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

fn t(values: &[f32], dtype: DType) -> Tensor {
    Tensor::from_f32(values, &[values.len()], dtype, &CPU).unwrap()
}

#[test]
fn activations_match_torch_values() {
    // torch.nn.functional.{silu, gelu(approximate="tanh"), gelu} at 1.0 and -2.0, in f64.
    let x = t(&[1.0, -2.0], DType::F32);
    let cases = [
        (Activation::Silu, [0.731_058_578_630_004_9, -0.238_405_844_044_234]),
        (Activation::GeluTanh, [0.841_191_990_607_477_1, -0.045_402_305_978_542_16]),
        (Activation::GeluErf, [0.841_344_746_068_542_9, -0.045_500_263_896_358_42]),
    ];
    for (act, want) in cases {
        let y = activation(&x, act).unwrap().to_f64_vec().unwrap();
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{act:?}: {g} vs {w}");
        }
    }
    // The gated product and its gradients by finite differences through the public API.
    let (g, u, dy) =
        (t(&[0.7, -1.3, 2.2], DType::F32), t(&[1.5, 0.4, -0.8], DType::F32), t(&[0.3, -0.9, 0.6], DType::F32));
    for act in Activation::ALL {
        let gg = gated_backward(&g, &u, &dy, act).unwrap();
        let loss = |g: &Tensor, u: &Tensor| -> f64 {
            let y = gated(g, u, act).unwrap().to_f64_vec().unwrap();
            y.iter().zip(dy.to_f64_vec().unwrap()).map(|(a, b)| a * b).sum()
        };
        let gv = g.to_f32_vec().unwrap();
        let uv = u.to_f32_vec().unwrap();
        for e in 0..3 {
            let bump = |v: &[f32], h: f32| {
                let mut w = v.to_vec();
                w[e] += h;
                t(&w, DType::F32)
            };
            let fd_g = (loss(&bump(&gv, 1e-2), &u) - loss(&bump(&gv, -1e-2), &u)) / 2e-2;
            let fd_u = (loss(&g, &bump(&uv, 1e-2)) - loss(&g, &bump(&uv, -1e-2))) / 2e-2;
            let (dg, du) = (gg.dgate.to_f64_vec().unwrap()[e], gg.dup.to_f64_vec().unwrap()[e]);
            assert!((fd_g - dg).abs() < 2e-3, "{act:?} dgate[{e}]: {fd_g} vs {dg}");
            assert!((fd_u - du).abs() < 2e-3, "{act:?} dup[{e}]: {fd_u} vs {du}");
        }
        let dx = activation_backward(&g, &dy, act).unwrap().to_f64_vec().unwrap();
        let direct = gated(&g, &t(&[1.0; 3], DType::F32), act).unwrap();
        assert_eq!(direct.to_f64_vec().unwrap(), activation(&g, act).unwrap().to_f64_vec().unwrap());
        assert!(dx.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn add_into_accumulates_in_dst_type() {
    let mut acc = t(&[1.0, 2.0, 3.0], DType::F32);
    add_into(&mut acc, &t(&[0.5, -1.0, 1e-3], DType::BF16)).unwrap();
    let want = [1.5, 1.0, 3.0 + f64::from(half::bf16::from_f32(1e-3).to_f32())];
    for (g, w) in acc.to_f64_vec().unwrap().iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
}

#[test]
fn elementwise_errors_are_typed() {
    let (a, b) = (t(&[1.0; 4], DType::F32), t(&[1.0; 3], DType::F32));
    assert!(matches!(gated(&a, &b, Activation::Silu), Err(Error::InvalidArgument { arg: "up", .. })));
    let half = t(&[1.0; 4], DType::BF16);
    assert!(matches!(gated(&a, &half, Activation::Silu), Err(Error::DTypeMismatch { arg: "up", .. })));
    assert!(matches!(activation_backward(&a, &b, Activation::GeluErf), Err(Error::InvalidArgument { arg: "dy", .. })));
    assert!(matches!(gated_backward(&a, &a, &half, Activation::Silu), Err(Error::DTypeMismatch { arg: "dy", .. })));
    let mut h = half.clone();
    assert!(matches!(add_into(&mut h, &a), Err(Error::DTypeMismatch { arg: "src", .. })));
    assert!(matches!("relu".parse::<Activation>(), Err(Error::InvalidArgument { arg: "act", .. })));
    let empty = t(&[], DType::BF16);
    assert_eq!(activation(&empty, Activation::Silu).unwrap().elem_count(), 0);
}

#[test]
fn the_cpu_path_passes_its_own_check_cases() {
    for act in Activation::ALL {
        for dtype in DType::ALL {
            let err = activation_case(33, dtype, act, 5, &CPU).unwrap();
            assert!(err <= elementwise_tolerance(dtype), "{act:?} {dtype}: {err:e}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(32), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn elementwise_gpu_matches_cpu_reference(
        n in prop_oneof![Just(0usize), Just(1), Just(7), Just(33), Just(1025), Just(100_003), 1usize..5000],
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
        act in prop_oneof![Just(Activation::Silu), Just(Activation::GeluTanh), Just(Activation::GeluErf)],
        into_f32 in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = common::gpu("elementwise_gpu_matches_cpu_reference") else { return Ok(()) };
        let err = activation_case(n, dtype, act, seed, &gpu).unwrap();
        prop_assert!(err <= elementwise_tolerance(dtype), "{n} {dtype} {act:?}: {err:e}");
        let dst = if into_f32 { DType::F32 } else { dtype };
        let err = add_case(n, dst, dtype, seed ^ 1, &gpu).unwrap();
        prop_assert!(err <= elementwise_tolerance(dst), "add {n} {dst} += {dtype}: {err:e}");
    }
}
