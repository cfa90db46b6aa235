//! The embedding: the gather and the scatter-add through the public API, typed errors (CPU, in
//! CI); on the GPU both against the f64 reference with NaN-poisoned outputs, and the backward's
//! bitwise repeatability.

mod common;

use hybrid_kernels::ops::embedding::check::{EmbeddingCase, EMBEDDING_TOLERANCE};
use hybrid_kernels::ops::embedding::{embedding, embedding_backward};
use hybrid_kernels::{DType, Device, Error, Tensor, TokenIds};
use proptest::prelude::*;

const CPU: Device = Device::Cpu;

#[test]
fn embedding_gathers_and_accumulates() {
    let table = Tensor::from_f32(&[0.0, 1.0, 10.0, 11.0, 20.0, 21.0], &[3, 2], DType::BF16, &CPU).unwrap();
    let ids = TokenIds::new(&[2, 0, 2, 2], &[2, 2], &CPU).unwrap();
    let out = embedding(&table, &ids).unwrap();
    assert_eq!(out.shape(), &[2, 2, 2]);
    assert_eq!(out.to_f64_vec().unwrap(), vec![20.0, 21.0, 0.0, 1.0, 20.0, 21.0, 20.0, 21.0]);
    let mut dtable = Tensor::full(1.0, &[3, 2], DType::F32, &CPU).unwrap();
    let dout = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[2, 2, 2], DType::F32, &CPU).unwrap();
    embedding_backward(&mut dtable, &ids, &dout).unwrap();
    // id 0: 1 + (3, 4); id 1 untouched; id 2: 1 + (1 + 5 + 7, 2 + 6 + 8).
    assert_eq!(dtable.to_f64_vec().unwrap(), vec![4.0, 5.0, 1.0, 1.0, 14.0, 17.0]);
}

#[test]
fn embedding_errors_are_typed() {
    let table = Tensor::full(0.0, &[3, 2], DType::F32, &CPU).unwrap();
    let ids = |v: &[i32]| TokenIds::new(v, &[v.len()], &CPU).unwrap();
    assert!(matches!(embedding(&table, &ids(&[3])), Err(Error::InvalidArgument { arg: "ids", .. })));
    assert!(matches!(embedding(&table, &ids(&[-1])), Err(Error::InvalidArgument { arg: "ids", .. })));
    let flat = Tensor::full(0.0, &[6], DType::F32, &CPU).unwrap();
    assert!(matches!(embedding(&flat, &ids(&[0])), Err(Error::InvalidArgument { arg: "table", .. })));
    let mut half = Tensor::full(0.0, &[3, 2], DType::BF16, &CPU).unwrap();
    let dout = Tensor::full(0.0, &[1, 2], DType::F32, &CPU).unwrap();
    assert!(matches!(
        embedding_backward(&mut half, &ids(&[0]), &dout),
        Err(Error::DTypeMismatch { arg: "dtable", .. })
    ));
    let mut dtable = table.clone();
    assert!(matches!(
        embedding_backward(&mut dtable, &ids(&[0, 1]), &dout),
        Err(Error::InvalidArgument { arg: "dout", .. })
    ));
    assert_eq!(embedding(&table, &ids(&[])).unwrap().shape(), &[0, 2]);
}

#[test]
fn the_cpu_path_passes_its_own_check_cases() {
    for dtype in DType::ALL {
        let case = EmbeddingCase { tokens: 50, vocab: 20, distinct: 4, dim: 9, dtype };
        assert!(case.run(3, &CPU).unwrap() <= EMBEDDING_TOLERANCE);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(32), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn embedding_gpu_matches_cpu_reference(
        tokens in prop_oneof![Just(1usize), Just(7), Just(1025), 1usize..3000],
        vocab in prop_oneof![Just(1usize), Just(33), Just(50304), 1usize..2000],
        distinct in 1usize..64,
        dim in prop_oneof![Just(1usize), Just(7), Just(8), Just(33), Just(768), 1usize..300],
        dtype in prop_oneof![Just(DType::F32), Just(DType::BF16), Just(DType::F16)],
        seed in any::<u64>(),
    ) {
        let Some(gpu) = common::gpu("embedding_gpu_matches_cpu_reference") else { return Ok(()) };
        let case = EmbeddingCase { tokens, vocab, distinct, dim, dtype };
        let err = case.run(seed, &gpu).unwrap();
        prop_assert!(err <= EMBEDDING_TOLERANCE, "{case:?}: {err:e}");
    }
}

#[test]
fn embedding_gpu_backward_is_bitwise_repeatable() {
    let Some(gpu) = common::gpu("embedding_gpu_backward_is_bitwise_repeatable") else { return };
    let (tokens, vocab, dim) = (8192, 512, 768);
    let ids: Vec<i32> = (0..tokens).map(|r| ((r * 7919) % vocab) as i32).collect();
    let ids = TokenIds::new(&ids, &[tokens], &gpu).unwrap();
    let dout: Vec<f32> = (0..tokens * dim).map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0).collect();
    let dout = Tensor::from_f32(&dout, &[tokens, dim], DType::BF16, &gpu).unwrap();
    let run = || {
        let mut d = Tensor::full(0.0, &[vocab, dim], DType::F32, &gpu).unwrap();
        embedding_backward(&mut d, &ids, &dout).unwrap();
        d.to_vec::<f32>().unwrap()
    };
    let first = run();
    for _ in 0..3 {
        assert_eq!(first, run());
    }
}
