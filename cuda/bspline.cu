// B-spline basis evaluation for KAN layers (efficient-kan `b_splines` semantics).
//
// Work is split by rows (one row = one (batch, feature) element of x). Each lane of a
// warp takes one row: it finds the knot interval s holding x (binary search), then
// evaluates only the k + 1 bases that can be non-zero there, N_{s-k..s}, with de Boor's
// triangular scheme (k(k+1)/2 updates, one division each). The warp's 32 rows own one
// contiguous stretch of 32 * n_bases outputs; the lanes hand their values over through
// warp-private shared memory and write that stretch together, consecutive lanes to
// consecutive addresses, so stores are coalesced whatever n_bases is.
//
// An earlier version (git history: one thread per output, the whole triangle per
// output) spent ~200 instructions per output and reached 11% of copy bandwidth.
//
// Conventions shared with the CPU reference (src/ops/bspline/cpu.rs):
//  - a zero-width knot span (repeated knots) contributes 0 instead of efficient-kan's 0/0;
//  - bases vanish outside [t_0, t_last), so ±inf give zeros;
//  - x = NaN gives NaN for every basis of that row.
#include "common.cuh"

// A named namespace, not an anonymous one: names with internal linkage are mangled with a
// per-compilation hash, which would make the committed PTX differ from build to build.
namespace hk_bspline {

constexpr int MAX_SPLINE_ORDER = 7;  // src/ops/bspline/mod.rs: MAX_SPLINE_ORDER
constexpr int WARPS_PER_BLOCK = 8;
constexpr int ROWS_PER_WARP = 32;

struct BsplineParams {
    uint32_t n_rows;       // rows in this launch; n_rows * n_bases < 2^32 (the host splits larger work)
    uint32_t in_features;  // features per batch row
    uint32_t n_knots;      // knots per feature: G + 2k + 1
    uint32_t order;        // spline order k
};

// What a lane found for its row.
enum RowKind : int { ROW_ZERO = 0, ROW_BASES = 1, ROW_NAN = 2 };

__device__ __forceinline__ float span_ratio(float num, float den) { return den > 0.f ? num / den : 0.f; }

// Largest s with t[s] <= x, for x in [t[0], t[n-1]); then t[s] <= x < t[s+1].
__device__ __forceinline__ int find_interval(const float* __restrict__ t, int n, float x) {
    int lo = 0, hi = n - 1;  // invariant: t[lo] <= x < t[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (__ldg(t + mid) <= x) lo = mid; else hi = mid;
    }
    return lo;
}

// Knot a of the feature, clamped into the array. Out-of-range knots only feed bases that
// do not exist (j < 0 or j >= n_bases), which are never written: a valid N_{j,d} depends
// only on knots of its own support [t_j, t_{j+d+1}].
__device__ __forceinline__ float knot(const float* __restrict__ t, int n, int a) {
    return __ldg(t + min(max(a, 0), n - 1));
}

// de Boor: n[r] = N_{s-L+r, L}(x) for r = 0..L, with t[s] <= x < t[s+1].
template <int K, int L>
__device__ __forceinline__ void de_boor(const float* __restrict__ t, int n_knots, int s, float x, float (&n)[K + 1]) {
    float left[K + 1], right[K + 1];
    n[0] = 1.f;
#pragma unroll
    for (int j = 1; j <= L; ++j) {
        left[j] = x - knot(t, n_knots, s + 1 - j);
        right[j] = knot(t, n_knots, s + j) - x;
        float saved = 0.f;
#pragma unroll
        for (int r = 0; r < j; ++r) {
            // right[r+1] + left[j-r] is the width of the support of N_{s-j+1+r, j-1}.
            const float temp = span_ratio(n[r], right[r + 1] + left[j - r]);
            n[r] = saved + right[r + 1] * temp;
            saved = left[j - r] * temp;
        }
        n[j] = saved;
    }
}

// The k + 1 values for bases s-K..s of one row: the bases themselves, or their derivatives
// d/dx N_{j,K} = K (N_{j,K-1} / (t_{j+K} - t_j) - N_{j+1,K-1} / (t_{j+K+1} - t_{j+1})).
template <int K, bool Derivative>
__device__ __forceinline__ void row_values(const float* __restrict__ t, int n_knots, int s, float x, float (&v)[K + 1]) {
    if constexpr (!Derivative) {
        de_boor<K, K>(t, n_knots, s, x, v);
    } else if constexpr (K == 0) {
        v[0] = 0.f;
    } else {
        float lower[K + 1];  // lower[r] = N_{s-K+1+r, K-1}, r = 0..K-1
        de_boor<K, K - 1>(t, n_knots, s, x, lower);
        float prev = 0.f;  // N_{j,K-1} / (t_{j+K} - t_j) for j = s-K: outside the window, 0
#pragma unroll
        for (int r = 0; r <= K; ++r) {
            // Output r is basis j = s-K+r; it needs A_j (prev) and A_{j+1}.
            const int j1 = s - K + r + 1;
            const float a1 = r < K ? span_ratio(lower[r], knot(t, n_knots, j1 + K) - knot(t, n_knots, j1)) : 0.f;
            v[r] = float(K) * (prev - a1);
            prev = a1;
        }
    }
}

// Per-warp hand-over of row results; declared once per kernel at the largest order.
struct RowExchange {
    float values[WARPS_PER_BLOCK][ROWS_PER_WARP][MAX_SPLINE_ORDER + 1];
    int first_basis[WARPS_PER_BLOCK][ROWS_PER_WARP];
    int row_kind[WARPS_PER_BLOCK][ROWS_PER_WARP];
};

template <typename T, bool Derivative, int K>
__device__ __forceinline__ void bspline_rows(const T* __restrict__ x, const float* __restrict__ grid,
                                             T* __restrict__ out, const BsplineParams& p, RowExchange& ex) {
    auto& values = ex.values;
    auto& first_basis = ex.first_basis;
    auto& row_kind = ex.row_kind;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t n_bases = p.n_knots - 1u - uint32_t(K);
    const int n_knots = int(p.n_knots);
    const uint32_t n_tiles = (p.n_rows + ROWS_PER_WARP - 1) / ROWS_PER_WARP;
    const uint32_t warps_total = gridDim.x * WARPS_PER_BLOCK;

    for (uint32_t tile = blockIdx.x * WARPS_PER_BLOCK + warp; tile < n_tiles; tile += warps_total) {
        const uint32_t row0 = tile * ROWS_PER_WARP;
        const uint32_t row = row0 + lane;
        int kind = ROW_ZERO, first = 0;
        if (row < p.n_rows) {
            const float xv = hk::to_f32(x[row]);
            const float* t = grid + size_t(row % p.in_features) * p.n_knots;
            if (xv != xv) {
                kind = ROW_NAN;
            } else if (xv >= __ldg(t) && xv < __ldg(t + n_knots - 1)) {
                const int s = find_interval(t, n_knots, xv);
                float v[K + 1];
                row_values<K, Derivative>(t, n_knots, s, xv, v);
#pragma unroll
                for (int r = 0; r <= K; ++r) values[warp][lane][r] = v[r];
                kind = ROW_BASES;
                first = s - K;
            }
        }
        first_basis[warp][lane] = first;
        row_kind[warp][lane] = kind;
        __syncwarp();

        // The warp writes outputs [row0 * n_bases, row_end * n_bases) together.
        const uint32_t rows_here = min(uint32_t(ROWS_PER_WARP), p.n_rows - row0);
        const uint32_t count = rows_here * n_bases;
        T* dst = out + size_t(row0) * n_bases;
        uint32_t r = lane / n_bases, j = lane % n_bases;  // (row, basis) of element e = lane
        for (uint32_t e = lane; e < count; e += 32) {
            const int kd = row_kind[warp][r];
            const int a = int(j) - first_basis[warp][r];
            float v = 0.f;
            if (kd == ROW_NAN) v = __int_as_float(0x7fc00000);
            else if (kd == ROW_BASES && a >= 0 && a <= K) v = values[warp][r][a];
            dst[e] = hk::from_f32<T>(v);
            j += 32;  // advance (r, j) by 32 elements without a division
            while (j >= n_bases) { j -= n_bases; ++r; }
        }
        __syncwarp();  // the next tile overwrites this warp's shared rows
    }
}

template <typename T, bool Derivative>
__device__ __forceinline__ void bspline_dispatch(const T* x, const float* grid, T* out, const BsplineParams& p) {
    __shared__ RowExchange ex;
    switch (p.order) {
        case 0: bspline_rows<T, Derivative, 0>(x, grid, out, p, ex); break;
        case 1: bspline_rows<T, Derivative, 1>(x, grid, out, p, ex); break;
        case 2: bspline_rows<T, Derivative, 2>(x, grid, out, p, ex); break;
        case 3: bspline_rows<T, Derivative, 3>(x, grid, out, p, ex); break;
        case 4: bspline_rows<T, Derivative, 4>(x, grid, out, p, ex); break;
        case 5: bspline_rows<T, Derivative, 5>(x, grid, out, p, ex); break;
        case 6: bspline_rows<T, Derivative, 6>(x, grid, out, p, ex); break;
        case 7: bspline_rows<T, Derivative, 7>(x, grid, out, p, ex); break;
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
