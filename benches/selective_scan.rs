//! Selective-scan benchmarks: forward and backward at the shape (B8 D1536 L2048 N16;
//! B1 D16 L256 on the CPU) in bf16 and f32, and the decode step at batch 64. The full table,
//! with GB/s, targets and the other shapes, is `hybrid-kernels bench scan`.

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use hybrid_kernels::bench::{bench_scan, bench_scan_step, ScanPass, ScanShape, SCAN_SHAPES};
use hybrid_kernels::DType;

fn scan(c: &mut Criterion) {
    let device = common::device();
    let shape = if device.is_cuda() { SCAN_SHAPES[0] } else { ScanShape { batch: 1, dim: 16, len: 256, dstate: 16 } };
    let mut group = c.benchmark_group("selective_scan");
    group.sample_size(10);
    for pass in [ScanPass::Forward, ScanPass::Backward] {
        for dtype in [DType::BF16, DType::F32] {
            let name = format!("{pass:?}/{dtype}/B{}D{}L{}N{}", shape.batch, shape.dim, shape.len, shape.dstate);
            common::bench_row(&mut group, &name, |reps| bench_scan(&device, pass, dtype, shape, reps, None));
        }
    }
    common::bench_row(&mut group, "step/bf16/B64", |reps| bench_scan_step(&device, DType::BF16, 64, reps, None));
    group.finish();
}

criterion_group!(benches, scan);
criterion_main!(benches);
