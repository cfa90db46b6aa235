//! KANLinear on the GPU against the f64 CPU reference: forward and every gradient, on
//! random shapes (odd sizes), grid sizes {1, 3, 5, 20, 100}, orders 1..=3, with and without
//! the scaler, inputs inside and outside the grid, f32 / TF32 / bf16 / f16. Skips without
//! a GPU unless HYBRID_KERNELS_REQUIRE_GPU=1. Run with HYBRID_KERNELS_POISON=1 to NaN-fill
//! every output allocation first (the bundle does).

mod common;

use hybrid_kernels::check::{kan_tolerance, relative_error, KanCase, KanErrors, Rng};
use hybrid_kernels::ops::kan::{KanForwardPath, KanLinear, KanLinearConfig};
use hybrid_kernels::Error;
use hybrid_kernels::{DType, Tensor};
use proptest::prelude::*;

fn assert_within(case: &KanCase, errs: KanErrors) {
    let tol = kan_tolerance(case.dtype, case.tf32);
    for (n, e) in errs.named() {
        assert!(e <= tol, "{n}: relative error {e:e} > {tol:e} in {case:?}");
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn kan_gpu_matches_cpu_reference(
        seed in any::<u64>(),
        batch in prop_oneof![Just(1usize), Just(7), Just(33), Just(65), Just(130), 1usize..80],
        inf in prop_oneof![Just(1usize), Just(7), Just(33), 1usize..40],
        outf in prop_oneof![Just(1usize), Just(7), Just(33), Just(129), 1usize..40],
        g in prop_oneof![Just(1usize), Just(3), Just(5), Just(20), Just(100)],
        k in 1usize..=3,
        scaler in any::<bool>(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
        tf32 in any::<bool>(),
        path in prop_oneof![Just(KanForwardPath::Auto), Just(KanForwardPath::Gemm), Just(KanForwardPath::Direct), Just(KanForwardPath::DirectTf32x3)],
    ) {
        let Some(gpu) = common::gpu("kan_gpu_matches_cpu_reference") else { return Ok(()) };
        // The direct forward covers up to 8 bases (kan_direct_refuses_what_it_does_not_cover).
        // DirectTf32x3 is f32 only.
        let direct = matches!(path, KanForwardPath::Direct | KanForwardPath::DirectTf32x3);
        let path = if (direct && g + k > 8) || (path == KanForwardPath::DirectTf32x3 && dtype != DType::F32) { KanForwardPath::Gemm } else { path };
        let case = KanCase { batch, in_features: inf, out_features: outf, grid_size: g, order: k, scaler, dtype, tf32: tf32 && dtype == DType::F32, path };
        assert_within(&case, case.run(seed, &gpu).unwrap());
    }
}

#[test]
fn kan_at_a_layer_sized_shape() {
    let Some(gpu) = common::gpu("kan_at_a_layer_sized_shape") else { return };
    for dtype in [DType::F32, DType::BF16] {
        for path in [KanForwardPath::Gemm, KanForwardPath::Direct, KanForwardPath::DirectTf32x3] {
            if path == KanForwardPath::DirectTf32x3 && dtype != DType::F32 {
                continue;
            }
            let case = KanCase {
                batch: 257,
                in_features: 128,
                out_features: 96,
                grid_size: 5,
                order: 3,
                scaler: true,
                dtype,
                tf32: false,
                path,
            };
            assert_within(&case, case.run(77, &gpu).unwrap());
        }
    }
}

#[test]
fn kan_direct_refuses_what_it_does_not_cover() {
    let Some(gpu) = common::gpu("kan_direct_refuses_what_it_does_not_cover") else { return };
    for (g, k) in [(20, 3), (6, 3), (5, 0), (3, 4)] {
        let mut c = KanLinearConfig::new(4, 3);
        c.grid_size = g;
        c.spline_order = k;
        let mut layer = KanLinear::new(c, DType::F32, &gpu, 1).unwrap();
        let x = Tensor::from_vec(vec![0.25f32; 8], &[2, 4], &gpu).unwrap();
        assert_eq!(layer.resolved_forward_path(2), KanForwardPath::Gemm, "G = {g}, k = {k}");
        let auto = layer.forward(&x).unwrap();
        for path in [KanForwardPath::Direct, KanForwardPath::DirectTf32x3] {
            layer.set_forward_path(path);
            match layer.forward(&x) {
                Err(Error::InvalidArgument { arg: "forward_path", .. }) => {}
                other => panic!("G = {g}, k = {k}, {path:?}: expected an invalid forward_path error, got {other:?}"),
            }
        }
        layer.set_forward_path(KanForwardPath::Gemm);
        assert_eq!(layer.forward(&x).unwrap().to_vec::<f32>().unwrap(), auto.to_vec::<f32>().unwrap());
    }
}

/// The tensor-core forward beyond one wave of blocks: 17 x 20 = 340 tiles of 128 rows x 64
/// outputs (more than the 2 x 132 resident on an H100), one split, a partial 9-feature last
/// stage, and a partial last row tile.
#[test]
fn kan_tf32x3_beyond_one_wave() {
    let Some(gpu) = common::gpu("kan_tf32x3_beyond_one_wave") else { return };
    let case = KanCase {
        batch: 16 * 128 + 37,
        in_features: 9,
        out_features: 20 * 64,
        grid_size: 5,
        order: 3,
        scaler: true,
        dtype: DType::F32,
        tf32: false,
        path: KanForwardPath::DirectTf32x3,
    };
    assert_within(&case, case.run(78, &gpu).unwrap());
}

/// The direct forwards sum in a fixed order: repeated calls agree bit for bit.
#[test]
fn kan_direct_is_bitwise_repeatable() {
    let Some(gpu) = common::gpu("kan_direct_is_bitwise_repeatable") else { return };
    for path in [KanForwardPath::Direct, KanForwardPath::DirectTf32x3] {
        let mut layer = KanLinear::new(KanLinearConfig::new(300, 200), DType::F32, &gpu, 9).unwrap();
        layer.set_forward_path(path);
        let mut rng = Rng::new(10);
        let x: Vec<f32> = (0..100 * 300).map(|_| rng.uniform(-1.5, 1.5) as f32).collect();
        let x = Tensor::from_vec(x, &[100, 300], &gpu).unwrap();
        let first = layer.forward(&x).unwrap().to_vec::<f32>().unwrap();
        for _ in 0..3 {
            let again = layer.forward(&x).unwrap().to_vec::<f32>().unwrap();
            assert!(first.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "{path:?}");
        }
    }
}

/// `Auto` takes the tensor-core direct forward for covered f32 layers at small batches, and
/// the GEMM pipeline for TF32, half types and large batches.
#[test]
fn kan_auto_path_choice() {
    let Some(gpu) = common::gpu("kan_auto_path_choice") else { return };
    let mut layer = KanLinear::new(KanLinearConfig::new(16, 8), DType::F32, &gpu, 3).unwrap();
    assert_eq!(layer.resolved_forward_path(100), KanForwardPath::DirectTf32x3);
    assert_eq!(layer.resolved_forward_path(4097), KanForwardPath::Gemm);
    layer.set_allow_tf32(true);
    assert_eq!(layer.resolved_forward_path(100), KanForwardPath::Gemm);
    let half = KanLinear::new(KanLinearConfig::new(16, 8), DType::BF16, &gpu, 3).unwrap();
    assert_eq!(half.resolved_forward_path(100), KanForwardPath::Gemm);
}

/// The tensor-core direct forward is an f32 path: a bf16 layer that forces it gets a typed
/// error, not a silent fallback.
#[test]
fn kan_direct_tf32x3_refuses_half_layers() {
    let Some(gpu) = common::gpu("kan_direct_tf32x3_refuses_half_layers") else { return };
    for dtype in [DType::BF16, DType::F16] {
        let mut layer = KanLinear::new(KanLinearConfig::new(4, 3), dtype, &gpu, 1).unwrap();
        layer.set_forward_path(KanForwardPath::DirectTf32x3);
        let x = Tensor::from_f32(&[0.25f32; 8], &[2, 4], dtype, &gpu).unwrap();
        match layer.forward(&x) {
            Err(Error::InvalidArgument { arg: "forward_path", .. }) => {}
            other => panic!("{dtype}: expected an invalid forward_path error, got {other:?}"),
        }
    }
}

#[test]
fn kan_update_grid_on_gpu_preserves_output() {
    let Some(gpu) = common::gpu("kan_update_grid_on_gpu_preserves_output") else { return };
    let mut c = KanLinearConfig::new(8, 4);
    c.scale_noise = 1.0;
    let mut layer = KanLinear::new(c, DType::F32, &gpu, 3).unwrap();
    let mut rng = Rng::new(4);
    let x: Vec<f32> = (0..1024 * 8).map(|_| rng.uniform(-0.95, 0.95) as f32).collect();
    let x = Tensor::from_vec(x, &[1024, 8], &gpu).unwrap();
    let before = layer.forward(&x).unwrap().to_f64_vec().unwrap();
    layer.update_grid(&x, 0.01).unwrap();
    assert_eq!(layer.device(), gpu);
    let after = layer.forward(&x).unwrap().to_f64_vec().unwrap();
    assert!(relative_error(&after, &before) < 2e-2);
}
