//! KANLinear benchmarks: forward and forward+backward at 4096x1024->1024, G = 5, k = 3 (16x64->64
//! on the CPU) in bf16 and f32 on the automatic forward path. The full table, with the TF32
//! and direct paths, is `hybrid-kernels bench kan`.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use hybrid_kernels::bench::{bench_kan, KanPass, KanShape, KAN_SHAPES};
use hybrid_kernels::ops::kan::KanForwardPath;
use hybrid_kernels::DType;

fn kan(c: &mut Criterion) {
    let device = common::device();
    let shape = if device.is_cuda() {
        KAN_SHAPES[0]
    } else {
        KanShape { batch: 16, in_features: 64, out_features: 64, ..KAN_SHAPES[0] }
    };
    let mut group = c.benchmark_group("kan_linear");
    group.sample_size(10);
    for pass in [KanPass::Forward, KanPass::ForwardBackward] {
        for dtype in [DType::BF16, DType::F32] {
            let name = format!("{pass:?}/{dtype}/{}x{}->{}", shape.batch, shape.in_features, shape.out_features);
            common::bench_row(&mut group, &name, |reps| {
                bench_kan(&device, pass, dtype, false, KanForwardPath::Auto, shape, reps)
            });
        }
    }
    group.finish();
}

criterion_group!(benches, kan);
criterion_main!(benches);
