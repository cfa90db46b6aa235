//! GPU against the f64 CPU reference. Skips (printing why) without a GPU; fails instead
//! when HYBRID_KERNELS_REQUIRE_GPU=1. Every case draws fresh inputs and NaN-poisons the
//! output before the launch (hybrid_kernels::check::BasisCase).

mod common;

use hybrid_kernels::check::{tolerance, BasisCase, GridLayout, Rng};
use hybrid_kernels::ops::bspline::{self, BasisKind, KnotGrid};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

/// Odd sizes the brief names, plus random ones.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(7), Just(33), Just(1025), 1usize..300]
}

fn layout() -> impl Strategy<Value = GridLayout> {
    prop_oneof![Just(GridLayout::Uniform), Just(GridLayout::NonUniform), Just(GridLayout::Repeated)]
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)]
}

fn kind() -> impl Strategy<Value = BasisKind> {
    prop_oneof![Just(BasisKind::Value), Just(BasisKind::Derivative)]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gpu_matches_cpu_reference(
        seed in any::<u64>(), batch in size(), in_features in size(),
        grid_size in prop_oneof![1usize..25, Just(100), Just(300)], order in 0usize..=5,
        layout in layout(), dtype in dtype(), kind in kind(),
    ) {
        let Some(gpu) = common::gpu("gpu_matches_cpu_reference") else { return Ok(()) };
        // Keep each case under ~300k rows and ~20M outputs so the f64 reference stays quick.
        let batch = batch.min((300_000 / in_features).max(1)).min((20_000_000 / (in_features * (grid_size + order))).max(1));
        let case = BasisCase { batch, in_features, grid_size, order, layout, dtype, kind };
        let err = case.run(&mut Rng::new(seed), &gpu).unwrap();
        prop_assert!(err <= tolerance(kind, dtype), "{case:?}: relative error {err:e} > {:e}", tolerance(kind, dtype));
    }
}

#[test]
fn every_order_up_to_the_maximum() {
    let Some(gpu) = common::gpu("every_order_up_to_the_maximum") else { return };
    let mut rng = Rng::from_time();
    for order in 0..=bspline::MAX_SPLINE_ORDER {
        for kind in [BasisKind::Value, BasisKind::Derivative] {
            let case = BasisCase {
                batch: 65,
                in_features: 31,
                grid_size: 9,
                order,
                layout: GridLayout::NonUniform,
                dtype: DType::F32,
                kind,
            };
            let err = case.run(&mut rng, &gpu).unwrap();
            assert!(err <= tolerance(kind, DType::F32), "order {order} {kind:?}: {err:e}");
        }
    }
}

#[test]
fn special_values_agree_with_cpu() {
    let Some(gpu) = common::gpu("special_values_agree_with_cpu") else { return };
    let grid = KnotGrid::uniform(1, 5, 3, (-1.0, 1.0), &Device::Cpu).unwrap();
    let t = grid.knots().to_f32_vec().unwrap();
    let mut xs: Vec<f32> =
        vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, 0.0, -0.0, f32::MIN_POSITIVE];
    xs.extend(&t); // every knot exactly, including the last (outside)
    xs.extend(t.iter().map(|k| k.next_down_approx()));
    for dtype in [DType::F32, DType::BF16] {
        let x_cpu = Tensor::from_f32(&xs, &[xs.len(), 1], dtype, &Device::Cpu).unwrap();
        for kind in [BasisKind::Value, BasisKind::Derivative] {
            let run = |d: &Device| {
                let x = x_cpu.to_device(d).unwrap();
                let g = grid.to_device(d).unwrap();
                match kind {
                    BasisKind::Value => bspline::bspline_basis(&x, &g),
                    BasisKind::Derivative => bspline::bspline_basis_derivative(&x, &g),
                }
                .unwrap()
                .to_f64_vec()
                .unwrap()
            };
            let (g, c) = (run(&gpu), run(&Device::Cpu));
            let err = hybrid_kernels::check::relative_error(&g, &c);
            assert!(err <= tolerance(kind, dtype), "{dtype} {kind:?}: {err:e}\ngpu {g:?}\ncpu {c:?}");
        }
    }
}

trait NextDown {
    fn next_down_approx(self) -> f32;
}
impl NextDown for f32 {
    /// The largest f32 below self (finite, non-zero inputs).
    fn next_down_approx(self) -> f32 {
        let b = self.to_bits();
        f32::from_bits(if self > 0.0 { b - 1 } else { b + 1 })
    }
}

#[test]
fn repeated_launches_are_bitwise_identical() {
    let Some(gpu) = common::gpu("repeated_launches_are_bitwise_identical") else { return };
    let grid = KnotGrid::uniform(257, 5, 3, (-2.0, 2.0), &gpu).unwrap();
    let mut rng = Rng::from_time();
    let x: Vec<f32> = (0..513 * 257).map(|_| rng.uniform(-2.5, 2.5) as f32).collect();
    let xt = Tensor::from_vec(x, &[513, 257], &gpu).unwrap();
    let first = bspline::bspline_basis_derivative(&xt, &grid).unwrap().to_vec::<f32>().unwrap();
    for _ in 0..5 {
        let again = bspline::bspline_basis_derivative(&xt, &grid).unwrap().to_vec::<f32>().unwrap();
        assert!(first.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn large_batch_matches_cpu() {
    let Some(gpu) = common::gpu("large_batch_matches_cpu") else { return };
    // 4096 x 1024 x 8 outputs (134 MB in f32): many blocks per SM through the grid-stride loop.
    let case = BasisCase {
        batch: 4096,
        in_features: 1024,
        grid_size: 5,
        order: 3,
        layout: GridLayout::Uniform,
        dtype: DType::F32,
        kind: BasisKind::Value,
    };
    let err = case.run(&mut Rng::from_time(), &gpu).unwrap();
    assert!(err <= tolerance(BasisKind::Value, DType::F32), "{err:e}");
}

#[test]
fn empty_batch_and_leading_dims() {
    let Some(gpu) = common::gpu("empty_batch_and_leading_dims") else { return };
    let grid = KnotGrid::uniform(3, 4, 2, (-1.0, 1.0), &gpu).unwrap();
    let empty = Tensor::from_f32(&[], &[0, 3], DType::BF16, &gpu).unwrap();
    let out = bspline::bspline_basis(&empty, &grid).unwrap();
    assert_eq!(out.shape(), &[0, 3, 6]);
    assert!(out.to_vec::<half::bf16>().unwrap().is_empty());
    let x = Tensor::from_f32(&[0.25; 30], &[2, 5, 3], DType::F32, &gpu).unwrap();
    let g = bspline::bspline_basis(&x, &grid).unwrap();
    let c =
        bspline::bspline_basis(&x.to_device(&Device::Cpu).unwrap(), &grid.to_device(&Device::Cpu).unwrap()).unwrap();
    assert_eq!(g.shape(), &[2, 5, 3, 6]);
    assert!(hybrid_kernels::check::relative_error(&g.to_f64_vec().unwrap(), &c.to_f64_vec().unwrap()) <= 1e-6);
}

#[test]
fn mixing_devices_is_a_typed_error() {
    let Some(gpu) = common::gpu("mixing_devices_is_a_typed_error") else { return };
    let grid_cpu = KnotGrid::uniform(3, 4, 2, (-1.0, 1.0), &Device::Cpu).unwrap();
    let x_gpu = Tensor::full(0.0, &[2, 3], DType::F32, &gpu).unwrap();
    assert!(matches!(bspline::bspline_basis(&x_gpu, &grid_cpu), Err(Error::DeviceMismatch { arg: "grid", .. })));
    let grid_gpu = grid_cpu.to_device(&gpu).unwrap();
    let mut out_cpu = Tensor::full(0.0, &[2, 3, 6], DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        bspline::bspline_basis_into(&x_gpu, &grid_gpu, &mut out_cpu),
        Err(Error::DeviceMismatch { arg: "out", .. })
    ));
    assert!(matches!(Device::cuda(4096), Err(Error::NoDevice { ordinal: 4096, .. })));
}
