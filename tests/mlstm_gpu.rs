//! The mLSTM on the GPU against the f64 recurrence: h and the final C, n, m on random shapes
//! (S = 1, S not a multiple of the chunk, odd head dims, dqk != dhv), every chunk size and
//! dtype, with and without an initial state; strongly negative forget and large input gates;
//! head dims up to 512; S = 65536 in bf16 without a NaN; decoding reproduces the sequence
//! pass. Skips without a GPU unless HYBRID_KERNELS_REQUIRE_GPU=1; HYBRID_KERNELS_POISON=1
//! NaN-fills every output first.

mod common;

use hybrid_kernels::check::{decode_against_mlstm, mlstm_tolerance, MlstmCase};
use hybrid_kernels::ops::mlstm::{mlstm, mlstm_backward, MlstmInputs, NormalizerGrad};
use hybrid_kernels::{DType, Device, Error, Tensor};
use proptest::prelude::*;

fn assert_within(case: &MlstmCase, errs: &[(&'static str, f64)]) {
    let tol = mlstm_tolerance(case.dtype);
    for (n, e) in errs {
        assert!(*e <= tol, "{n}: relative error {e:e} > {tol:e} in {case:?}\nall: {errs:?}");
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mlstm_gpu_matches_cpu_reference(
        seed in any::<u64>(),
        batch in 1usize..3,
        heads in 1usize..3,
        len in prop_oneof![Just(1usize), Just(7), Just(33), Just(64), Just(65), Just(130), 1usize..300],
        dqk in prop_oneof![Just(16usize), Just(33), Just(64), Just(100), Just(128), 1usize..80],
        dhv in prop_oneof![Just(16usize), Just(40), Just(64), Just(96), Just(128), 1usize..80],
        chunk in prop_oneof![Just(None), Just(Some(16usize)), Just(Some(32)), Just(Some(64)), Just(Some(128))],
        init in any::<bool>(),
        extreme in any::<bool>(),
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
    ) {
        let Some(gpu) = common::gpu("mlstm_gpu_matches_cpu_reference") else { return Ok(()) };
        let mut case = MlstmCase { with_init: init, chunk, ..MlstmCase::new(batch, heads, len, dqk, dhv, dtype) };
        if extreme {
            case = case.extreme_gates();
        }
        // A chunk of 128 in f32 with wide heads can exceed shared memory: a typed error, fine.
        match case.run_forward(seed, &gpu) {
            Ok(errs) => assert_within(&case, &errs),
            Err(Error::InvalidArgument { arg: "q", .. }) if chunk.is_some() => {}
            Err(e) => panic!("{e} in {case:?}"),
        }
    }
}

#[test]
fn mlstm_wide_heads() {
    let Some(gpu) = common::gpu("mlstm_wide_heads") else { return };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (dqk, dhv) in [(256, 256), (512, 512), (512, 64), (64, 512), (300, 200)] {
            let case = MlstmCase { with_init: true, ..MlstmCase::new(1, 2, 70, dqk, dhv, dtype) };
            assert_within(&case, &case.run_forward(dqk as u64, &gpu).unwrap());
        }
    }
}

/// Many chunks with the max state moving by tens per step, and the usual gates.
#[test]
fn mlstm_long_sequences() {
    let Some(gpu) = common::gpu("mlstm_long_sequences") else { return };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for extreme in [false, true] {
            let mut case = MlstmCase { with_init: true, ..MlstmCase::new(1, 2, 3001, 64, 48, dtype) };
            if extreme {
                case = case.extreme_gates();
            }
            assert_within(&case, &case.run_forward(3, &gpu).unwrap());
        }
    }
}

/// S = 65536 in bf16 with extreme gates: finite everywhere and within tolerance.
#[test]
fn mlstm_65536_steps_in_bf16() {
    let Some(gpu) = common::gpu("mlstm_65536_steps_in_bf16") else { return };
    for extreme in [false, true] {
        let mut case = MlstmCase::new(1, 1, 65536, 64, 64, DType::BF16);
        if extreme {
            case = case.extreme_gates();
        }
        assert_within(&case, &case.run_forward(5, &gpu).unwrap());
    }
}

#[test]
fn mlstm_decoding_reproduces_the_sequence() {
    let Some(gpu) = common::gpu("mlstm_decoding_reproduces_the_sequence") else { return };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (init, dqk, dhv) in [(false, 64, 64), (true, 33, 130), (true, 512, 16)] {
            let case = MlstmCase { with_init: init, ..MlstmCase::new(2, 3, 37, dqk, dhv, dtype) };
            let errs = decode_against_mlstm(&case, 7, &gpu).unwrap();
            // Both sides are f32 arithmetic; h is rounded to the element type by both, and
            // the sequence pass rounds P and C for its products in bf16 / f16.
            let tol = mlstm_tolerance(dtype);
            assert!(errs.iter().all(|&e| e <= tol), "{dtype} {dqk}x{dhv} init {init}: {errs:?}");
        }
    }
}

/// Decoding on the GPU against decoding on the CPU (the f64 step), from the same state.
#[test]
fn mlstm_step_matches_cpu_step() {
    let Some(gpu) = common::gpu("mlstm_step_matches_cpu_step") else { return };
    for dtype in [DType::F32, DType::BF16] {
        let case = MlstmCase { with_init: true, ..MlstmCase::new(4, 2, 5, 48, 72, dtype) };
        let cpu_errs = decode_against_mlstm(&case, 3, &Device::Cpu).unwrap();
        let gpu_errs = decode_against_mlstm(&case, 3, &gpu).unwrap();
        assert!(cpu_errs.iter().chain(&gpu_errs).all(|&e| e <= mlstm_tolerance(dtype)), "{cpu_errs:?} {gpu_errs:?}");
    }
}

#[test]
fn mlstm_gpu_backward_is_a_typed_error_until_it_has_a_kernel() {
    let Some(gpu) = common::gpu("mlstm_gpu_backward_is_a_typed_error_until_it_has_a_kernel") else { return };
    let t = |shape: &[usize]| Tensor::full(0.5, shape, DType::BF16, &gpu).unwrap();
    let g = |shape: &[usize]| Tensor::full(0.5, shape, DType::F32, &gpu).unwrap();
    let (q, v, i) = (t(&[1, 1, 8, 16]), t(&[1, 1, 8, 16]), g(&[1, 1, 8]));
    let inputs = MlstmInputs::new(&q, &q, &v, &i, &i);
    assert!(mlstm(&inputs).is_ok());
    match mlstm_backward(&inputs, &v, None, NormalizerGrad::Exact) {
        Err(Error::InvalidArgument { arg: "device", .. }) => {}
        other => panic!("{other:?}"),
    }
}
