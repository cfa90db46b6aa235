// B-spline basis evaluation for KAN layers (efficient-kan `b_splines` semantics).
//
// Work is split by rows (one row = one (batch, feature) element of x); a warp takes 32
// consecutive rows, one per lane. A lane finds the knot interval s holding its x (binary
// search) and evaluates only the k + 1 bases that can be non-zero there, N_{s-k..s}, with
// de Boor's triangular scheme, keeping them in registers. The warp's rows own one
// contiguous stretch of outputs, mostly zeros, which it writes in one of two ways:
//  - n_bases <= STAGED_MAX_BASES: zero-fill a 16-byte-aligned slab of shared memory, drop
//    the k + 1 values of each row in, and copy the slab out with 16-byte loads and stores
//    (about one instruction per output element);
//  - larger rows: each row's values are broadcast from its lane with shuffles and the warp
//    writes the row, consecutive lanes to consecutive addresses.
//
// Earlier versions (see docs/performance.md): v1, one thread per output recomputing the
// whole triangle, 11% of copy bandwidth; v2, per-element store loop through shared memory,
// 35%, bound by instruction issue.
//
// Conventions shared with the CPU reference (src/ops/bspline/cpu.rs):
//  - a zero-width knot span (repeated knots) contributes 0 instead of efficient-kan's 0/0;
//  - bases vanish outside [t_0, t_last), so ±inf give zeros;
//  - x = NaN gives NaN for every basis of that row.
#include "bspline_device.cuh"

// A named namespace, not an anonymous one: names with internal linkage are mangled with a
// per-compilation hash, which would make the committed PTX differ from build to build.
namespace hk_bspline {

constexpr int MAX_SPLINE_ORDER = 7;  // src/ops/bspline/mod.rs: MAX_SPLINE_ORDER
constexpr int WARPS_PER_BLOCK = 8;   // src/ops/bspline/cuda.rs: BLOCK_THREADS = 256
constexpr int ROWS_PER_WARP = 32;
constexpr int STAGE_ELEMENTS = 1024;   // per warp
constexpr int STAGED_MAX_BASES = 128;  // so that a slab holds at least 8 rows

struct BsplineParams {
    uint32_t n_rows;       // rows in this launch; n_rows * n_bases < 2^32 (the host splits larger work)
    uint32_t in_features;  // features per batch row
    uint32_t n_knots;      // knots per feature: G + 2k + 1
    uint32_t order;        // spline order k
};

template <typename T>
struct __align__(16) Stage {
    // + one vector of slack: the slab starts at the same offset modulo 16 bytes as its
    // destination in global memory, so both sides of the copy are 16-byte aligned.
    T slab[WARPS_PER_BLOCK][STAGE_ELEMENTS + 16 / sizeof(T)];
};

// Value of basis j of a row, from registers only (no run-time register indexing).
template <int K>
__device__ __forceinline__ float basis_from(const RowResult<K>& row, int j) {
    if (row.kind == ROW_NAN) return __int_as_float(0x7fc00000);
    float v = 0.f;
#pragma unroll
    for (int a = 0; a <= K; ++a) v = (j == row.first + a) ? row.v[a] : v;
    return row.kind == ROW_BASES ? v : 0.f;
}

// Writes rows [row0, row0 + rows_here) of the warp through a shared-memory slab.
template <typename T, int K>
__device__ __forceinline__ void write_rows_staged(const RowResult<K>& row, int lane, uint32_t rows_here,
                                                  uint32_t n_bases, T* __restrict__ dst, T* __restrict__ slab) {
    constexpr int VEC = 16 / sizeof(T);
    const uint32_t rows_per_slab = STAGE_ELEMENTS / n_bases;  // >= 8 by STAGED_MAX_BASES
    for (uint32_t g0 = 0; g0 < rows_here; g0 += rows_per_slab) {
        const uint32_t rows = min(rows_per_slab, rows_here - g0);
        const uint32_t count = rows * n_bases;
        T* out = dst + size_t(g0) * n_bases;
        const uint32_t shift = uint32_t((reinterpret_cast<uintptr_t>(out) / sizeof(T)) % VEC);
        // 1. zeros, 16 bytes per lane per step
        const uint32_t vectors = (shift + count + VEC - 1) / VEC;
        for (uint32_t q = lane; q < vectors; q += 32) reinterpret_cast<uint4*>(slab)[q] = make_uint4(0, 0, 0, 0);
        __syncwarp();
        // 2. each row's non-zero values (or NaNs)
        const uint32_t r = uint32_t(lane) - g0;
        if (uint32_t(lane) >= g0 && r < rows) {
            T* mine = slab + shift + r * n_bases;
            if (row.kind == ROW_NAN) {
                for (uint32_t j = 0; j < n_bases; ++j) mine[j] = hk::from_f32<T>(__int_as_float(0x7fc00000));
            } else if (row.kind == ROW_BASES) {
#pragma unroll
                for (int a = 0; a <= K; ++a) {
                    const int j = row.first + a;
                    if (j >= 0 && uint32_t(j) < n_bases) mine[j] = hk::from_f32<T>(row.v[a]);
                }
            }
        }
        __syncwarp();
        // 3. copy out: scalar head up to 16-byte alignment, 16-byte body, scalar tail
        const uint32_t head = min(count, (VEC - shift) % VEC);
        if (uint32_t(lane) < head) out[lane] = slab[shift + lane];
        const uint32_t body = (count - head) / VEC;
        const uint4* src = reinterpret_cast<const uint4*>(slab + shift + head);
        uint4* to = reinterpret_cast<uint4*>(out + head);
        for (uint32_t q = lane; q < body; q += 32) to[q] = src[q];
        const uint32_t tail_start = head + body * VEC;
        if (tail_start + lane < count) out[tail_start + lane] = slab[shift + tail_start + lane];
        __syncwarp();  // the slab is refilled next
    }
}

// Writes the warp's rows one at a time: row data broadcast by shuffles, coalesced stores.
template <typename T, int K>
__device__ __forceinline__ void write_rows_broadcast(const RowResult<K>& row, int lane, uint32_t rows_here,
                                                     uint32_t n_bases, T* __restrict__ dst) {
    for (uint32_t r = 0; r < rows_here; ++r) {
        RowResult<K> b;
        b.kind = __shfl_sync(0xffffffffu, row.kind, r);
        b.first = __shfl_sync(0xffffffffu, row.first, r);
#pragma unroll
        for (int a = 0; a <= K; ++a) b.v[a] = __shfl_sync(0xffffffffu, row.v[a], r);
        T* out = dst + size_t(r) * n_bases;
        for (uint32_t j = lane; j < n_bases; j += 32) out[j] = hk::from_f32<T>(basis_from(b, int(j)));
    }
}

template <typename T, bool Derivative, int K>
__device__ __forceinline__ void bspline_rows(const T* __restrict__ x, const float* __restrict__ grid,
                                             T* __restrict__ out, const BsplineParams& p, Stage<T>& stage) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t n_bases = p.n_knots - 1u - uint32_t(K);
    const int n_knots = int(p.n_knots);
    const uint32_t n_tiles = (p.n_rows + ROWS_PER_WARP - 1) / ROWS_PER_WARP;
    const uint32_t warps_total = gridDim.x * WARPS_PER_BLOCK;

    for (uint32_t tile = blockIdx.x * WARPS_PER_BLOCK + warp; tile < n_tiles; tile += warps_total) {
        const uint32_t row0 = tile * ROWS_PER_WARP;
        const uint32_t row = row0 + lane;
        RowResult<K> res = zero_row<K>();  // lanes past the last row: nothing is written for them
        if (row < p.n_rows) {
            const float* t = grid + size_t(row % p.in_features) * p.n_knots;
            res = evaluate_row<K, Derivative>(hk::to_f32(x[row]), t, n_knots);
        }
        const uint32_t rows_here = min(uint32_t(ROWS_PER_WARP), p.n_rows - row0);
        T* dst = out + size_t(row0) * n_bases;
        if (n_bases <= uint32_t(STAGED_MAX_BASES)) {
            write_rows_staged<T, K>(res, lane, rows_here, n_bases, dst, stage.slab[warp]);
        } else {
            write_rows_broadcast<T, K>(res, lane, rows_here, n_bases, dst);
        }
    }
}

template <typename T, bool Derivative>
__device__ __forceinline__ void bspline_dispatch(const T* x, const float* grid, T* out, const BsplineParams& p) {
    __shared__ Stage<T> stage;
    switch (p.order) {
        case 0: bspline_rows<T, Derivative, 0>(x, grid, out, p, stage); break;
        case 1: bspline_rows<T, Derivative, 1>(x, grid, out, p, stage); break;
        case 2: bspline_rows<T, Derivative, 2>(x, grid, out, p, stage); break;
        case 3: bspline_rows<T, Derivative, 3>(x, grid, out, p, stage); break;
        case 4: bspline_rows<T, Derivative, 4>(x, grid, out, p, stage); break;
        case 5: bspline_rows<T, Derivative, 5>(x, grid, out, p, stage); break;
        case 6: bspline_rows<T, Derivative, 6>(x, grid, out, p, stage); break;
        case 7: bspline_rows<T, Derivative, 7>(x, grid, out, p, stage); break;
        default: break;  // rejected on the host: order <= MAX_SPLINE_ORDER
    }
    static_assert(MAX_SPLINE_ORDER == 7, "extend the switch with the maximum order");
}

}  // namespace hk_bspline

#define BSPLINE_KERNELS(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) bspline_basis_##SUFFIX(                      \
        const T* __restrict__ x, const float* __restrict__ grid, T* __restrict__ out,              \
        hk_bspline::BsplineParams p) {                                                                         \
        hk_bspline::bspline_dispatch<T, false>(x, grid, out, p);                                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) bspline_basis_derivative_##SUFFIX(           \
        const T* __restrict__ x, const float* __restrict__ grid, T* __restrict__ out,              \
        hk_bspline::BsplineParams p) {                                                                         \
        hk_bspline::bspline_dispatch<T, true>(x, grid, out, p);                                                \
    }

BSPLINE_KERNELS(f32, float)
BSPLINE_KERNELS(bf16, __nv_bfloat16)
BSPLINE_KERNELS(f16, __half)
