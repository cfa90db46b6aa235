//! Causal conv1d benchmarks: forward and backward at the scan's shape (B8 D1536 L2048, width
//! 4, bias, SiLU; B1 D16 L256 on the CPU) in bf16 and f32, and the decode update at batch 64.
//! The full table is `hybrid-kernels bench conv`.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use hybrid_kernels::bench::{bench_conv, bench_conv_step, ConvPass};
use hybrid_kernels::DType;

fn conv(c: &mut Criterion) {
    let device = common::device();
    let shape = if device.is_cuda() { (8, 1536, 2048) } else { (1, 16, 256) };
    let mut group = c.benchmark_group("causal_conv1d");
    group.sample_size(10);
    for pass in [ConvPass::Forward, ConvPass::Backward] {
        for dtype in [DType::BF16, DType::F32] {
            let name = format!("{pass:?}/{dtype}/B{}D{}L{}", shape.0, shape.1, shape.2);
            common::bench_row(&mut group, &name, |reps| bench_conv(&device, pass, dtype, shape, reps, None));
        }
    }
    common::bench_row(&mut group, "update/bf16/B64", |reps| bench_conv_step(&device, DType::BF16, 64, reps, None));
    group.finish();
}

criterion_group!(benches, conv);
criterion_main!(benches);
