//! Shared by the criterion benches: one benchmark per bench row of `hybrid-kernels bench`,
//! each sample timed by the row's own measurement (CUDA events around the launches on a GPU,
//! inputs rotated beyond L2; the host clock on the CPU), reported to criterion as the median
//! launch time times the iterations it asked for.

use criterion::{BenchmarkGroup, Throughput};
use hybrid_kernels::bench::{BenchRow, Repeats};
use hybrid_kernels::{Device, Result};
use std::time::Duration;

/// The GPU when there is one, else the CPU (saying so once).
pub fn device() -> Device {
    let (device, why) = Device::cuda_or_cpu();
    if let Some(why) = why {
        eprintln!("no GPU ({why}): benchmarking the CPU reference at small shapes");
    }
    device
}

/// Adds benchmark `name` to `group`: `row(reps)` runs one bench row with the repetitions
/// criterion asks for. The row's bytes become criterion's throughput.
pub fn bench_row(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut row: impl FnMut(Repeats) -> Result<BenchRow>,
) {
    let probe = row(Repeats { warmup: 0, iters: 1 }).expect("benchmark run");
    group.throughput(Throughput::Bytes(probe.bytes as u64));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let r = row(Repeats { warmup: 2, iters: iters as usize }).expect("benchmark run");
            Duration::from_secs_f64(r.timing.median_us * 1e-6 * iters as f64)
        })
    });
}
