//! mLSTM benchmarks: the forward and the training step (forward for backward, then backward)
//! at B8 NH16 S4096 D128 in bf16 (B1 NH2 S64 D16 in f32 on the CPU), and the decode step at
//! batch 64. The full table is `hybrid-kernels bench mlstm`.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use hybrid_kernels::bench::{bench_mlstm, bench_mlstm_fwd_bwd, bench_mlstm_step, MlstmShape};
use hybrid_kernels::DType;

fn mlstm(c: &mut Criterion) {
    let device = common::device();
    let (shape, dtype) = if device.is_cuda() {
        (MlstmShape::D128, DType::BF16)
    } else {
        (MlstmShape { batch: 1, heads: 2, len: 64, head_dim: 16 }, DType::F32)
    };
    let dims = format!("B{}NH{}S{}D{}", shape.batch, shape.heads, shape.len, shape.head_dim);
    let mut group = c.benchmark_group("mlstm");
    group.sample_size(10);
    common::bench_row(&mut group, &format!("forward/{dtype}/{dims}"), |reps| {
        bench_mlstm(&device, dtype, shape, None, reps, None)
    });
    common::bench_row(&mut group, &format!("train_step/{dtype}/{dims}"), |reps| {
        bench_mlstm_fwd_bwd(&device, dtype, shape, reps, None)
    });
    common::bench_row(&mut group, "step/bf16/B64", |reps| bench_mlstm_step(&device, DType::BF16, 64, reps, None));
    group.finish();
}

criterion_group!(benches, mlstm);
criterion_main!(benches);
