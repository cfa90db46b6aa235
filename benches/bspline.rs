//! B-spline basis benchmarks. On a GPU each sample is timed with CUDA events around the
//! launches (criterion's `iter_custom`), inputs rotated beyond L2; without a GPU the CPU
//! reference is timed at a small shape and the GPU benches are skipped with a message.
//! The same cases, with GB/s and % of copy bandwidth, are in `hybrid-kernels bench`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hybrid_kernels::bench::{bench_basis, BasisShape, Repeats, BASIS_SHAPES};
use hybrid_kernels::ops::bspline::BasisKind;
use hybrid_kernels::{DType, Device};
use std::time::Duration;

fn basis(c: &mut Criterion) {
    let (device, why) = Device::cuda_or_cpu();
    if let Some(why) = why {
        eprintln!("no GPU ({why}): benchmarking the CPU reference only");
    }
    let mut group = c.benchmark_group("bspline");
    group.sample_size(20);
    for &shape in BASIS_SHAPES {
        let shape = if device.is_cuda() { shape } else { BasisShape { batch: 16, ..shape } };
        for kind in [BasisKind::Value, BasisKind::Derivative] {
            for dtype in [DType::F32, DType::BF16] {
                let name = format!(
                    "{kind:?}/{dtype}/{}x{}/G{}k{}",
                    shape.batch, shape.in_features, shape.grid_size, shape.order
                );
                let bytes =
                    (shape.batch * shape.in_features * (1 + shape.grid_size + shape.order) * dtype.size_in_bytes())
                        as u64;
                group.throughput(Throughput::Bytes(bytes));
                group.bench_function(name, |b| {
                    b.iter_custom(|iters| {
                        let reps = Repeats { warmup: 2, iters: iters as usize };
                        let row = bench_basis(&device, kind, dtype, shape, reps, None).expect("benchmark run");
                        // Median launch time x iterations: criterion wants a total.
                        Duration::from_secs_f64(row.timing.median_us * 1e-6 * iters as f64)
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, basis);
criterion_main!(benches);
