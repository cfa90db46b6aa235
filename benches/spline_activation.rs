//! B-spline activation benchmarks: forward and forward+backward on 4096 rows x 1024 channels,
//! G = 5, k = 3 (64 x 256 on the CPU), in bf16 and f32. The same rows, with GB/s, are in
//! `hybrid-kernels bench activation`.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use hybrid_kernels::bench::bench_activation;
use hybrid_kernels::DType;

fn activation(c: &mut Criterion) {
    let device = common::device();
    let (rows, channels) = if device.is_cuda() { (4096, 1024) } else { (64, 256) };
    let mut group = c.benchmark_group("spline_activation");
    group.sample_size(10);
    for backward in [false, true] {
        for dtype in [DType::BF16, DType::F32] {
            let pass = if backward { "forward_backward" } else { "forward" };
            let name = format!("{pass}/{dtype}/{rows}x{channels}");
            common::bench_row(&mut group, &name, |reps| {
                bench_activation(&device, backward, dtype, rows, channels, 5, 3, reps, None)
            });
        }
    }
    group.finish();
}

criterion_group!(benches, activation);
criterion_main!(benches);
