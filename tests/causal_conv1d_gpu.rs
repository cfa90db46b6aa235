//! The causal conv1d on the GPU against the f64 reference: output, final state and every
//! gradient on random shapes (L = 1, odd sizes, many tiles), every width and dtype, with and
//! without bias, SiLU, initial state, resets and a final-state gradient; saturating inputs;
//! bitwise reproducibility of the backward; decoding with the rolling state reproduces the
//! conv. Skips without a GPU unless HYBRID_KERNELS_REQUIRE_GPU=1; HYBRID_KERNELS_POISON=1
//! NaN-fills every output first.

mod common;

use hybrid_kernels::check::{conv_tolerance, decode_against_conv, ConvCase, Rng};
use hybrid_kernels::ops::causal_conv1d::{causal_conv1d_backward, ConvGrads};
use hybrid_kernels::{DType, Tensor};
use proptest::prelude::*;

fn assert_within(case: &ConvCase, errs: &[(&'static str, f64)]) {
    let tol = conv_tolerance(case.dtype);
    for (n, e) in errs {
        assert!(*e <= tol, "{n}: relative error {e:e} > {tol:e} in {case:?}\nall: {errs:?}");
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn conv_gpu_matches_cpu_reference(
        seed in any::<u64>(),
        batch in prop_oneof![Just(1usize), 1usize..4],
        dim in prop_oneof![Just(1usize), Just(7), Just(33), 1usize..50],
        len in prop_oneof![Just(1usize), Just(2), Just(3), Just(7), Just(33), Just(1023), Just(1024), Just(1025), 1usize..300],
        width in 2usize..=4,
        flags in 0u32..32,
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
    ) {
        let Some(gpu) = common::gpu("conv_gpu_matches_cpu_reference") else { return Ok(()) };
        let case = ConvCase::from_option_bits(batch, dim, len, width, flags, dtype);
        assert_within(&case, &case.run(seed, &gpu).unwrap());
    }
}

#[test]
fn conv_over_many_tiles_with_resets() {
    let Some(gpu) = common::gpu("conv_over_many_tiles_with_resets") else { return };
    for (dtype, len) in [(DType::F32, 4097), (DType::BF16, 3001), (DType::F16, 2048)] {
        for width in 2..=4 {
            for flags in [0b10111, 0b11111] {
                let case = ConvCase::from_option_bits(2, 5, len, width, flags, dtype);
                assert_within(&case, &case.run(width as u64, &gpu).unwrap());
            }
        }
    }
}

/// Inputs of ±1000 (±60000 in f16 would overflow the sums): SiLU saturates to 0 and to x.
#[test]
fn conv_with_saturating_inputs() {
    let Some(gpu) = common::gpu("conv_with_saturating_inputs") else { return };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let case = ConvCase { scale: 1000.0, ..ConvCase::from_option_bits(2, 9, 300, 4, 0b11111, dtype) };
        assert_within(&case, &case.run(11, &gpu).unwrap());
    }
}

#[test]
fn conv_backward_is_bitwise_repeatable() {
    let Some(gpu) = common::gpu("conv_backward_is_bitwise_repeatable") else { return };
    let case = ConvCase::from_option_bits(4, 16, 5000, 4, 0b11111, DType::BF16);
    let mut rng = Rng::new(9);
    let t = case.tensors(&mut rng).unwrap().to_device(&gpu).unwrap();
    let n = 4 * 16 * 5000;
    let dout: Vec<f32> = (0..n).map(|_| rng.uniform(-1.0, 1.0) as f32).collect();
    let dout = Tensor::from_f32(&dout, &[4, 16, 5000], DType::BF16, &gpu).unwrap();
    let bits = |g: &ConvGrads| -> Vec<Vec<u32>> {
        let f = |t: &Tensor| t.to_f32_vec().unwrap().into_iter().map(f32::to_bits).collect();
        vec![f(&g.dx), f(&g.dweight), f(g.dbias.as_ref().unwrap()), f(g.dinitial_state.as_ref().unwrap())]
    };
    let first = bits(&causal_conv1d_backward(&t.inputs(), &dout, None).unwrap());
    for _ in 0..3 {
        assert!(bits(&causal_conv1d_backward(&t.inputs(), &dout, None).unwrap()) == first);
    }
}

#[test]
fn decoding_reproduces_the_conv() {
    let Some(gpu) = common::gpu("decoding_reproduces_the_conv") else { return };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for width in 2..=4 {
            let case = ConvCase::from_option_bits(3, 37, 40, width, 0b111, dtype);
            for (tokens, state_len) in [(1, width - 1), (5, width - 1), (1, 8), (3, 6), (64, width - 1)] {
                let (out, last) = decode_against_conv(&case, 2, &gpu, tokens, state_len).unwrap();
                // The same f32 arithmetic in the same order: equal up to SiLU's rounding.
                assert!(
                    out <= conv_tolerance(dtype) && last == 0.0,
                    "{dtype:?} width {width} tokens {tokens} state {state_len}: out {out:e} state {last:e}"
                );
            }
        }
    }
}
