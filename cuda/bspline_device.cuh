// B-spline evaluation on the device, shared by the kernels that need bases of one input
// value: bspline.cu (bases and derivatives), kan.cu (the KAN layer's input gradient).
//
// A row is one input value x with its knot vector t (n_knots knots): find the interval s
// with t[s] <= x < t[s+1], then the k + 1 bases N_{s-k..s} that can be non-zero there
// (or their derivatives) by de Boor's triangular scheme, in registers.
#pragma once
#include "common.cuh"

namespace hk_bspline {

// What a lane found for its row.
enum RowKind : int { ROW_ZERO = 0, ROW_BASES = 1, ROW_NAN = 2 };

__device__ __forceinline__ float span_ratio(float num, float den) { return den > 0.f ? num / den : 0.f; }

// Largest s with t[s] <= x, for x in [t0, tl) = [t[0], t[n-1]); then t[s] <= x < t[s+1].
// First guess: the interval of a uniform grid (efficient-kan's grids are uniform, so this
// usually hits with two independent loads); otherwise binary search.
__device__ __forceinline__ int find_interval(const float* __restrict__ t, int n, float x, float t0, float tl) {
    int s = int(__fdividef(x - t0, tl - t0) * float(n - 1));
    s = min(max(s, 0), n - 2);
    if (__ldg(t + s) <= x && x < __ldg(t + s + 1)) return s;
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

// de Boor on a uniform grid (spacing h), in units of h: with u = (x - t[s]) / h, the left
// and right distances are u + j - 1 and j - u and every support of an order-(j-1) basis is
// j wide, so the triangle needs no knot loads and no divisions. n[r] = N_{s-L+r, L}(x).
template <int K, int L>
__device__ __forceinline__ void de_boor_uniform(float u, float (&n)[K + 1]) {
    n[0] = 1.f;
#pragma unroll
    for (int j = 1; j <= L; ++j) {
        const float inv_j = 1.f / float(j);
        float saved = 0.f;
#pragma unroll
        for (int r = 0; r < j; ++r) {
            const float temp = n[r] * inv_j;
            n[r] = fmaf(float(r + 1) - u, temp, saved);
            saved = (u + float(j - r - 1)) * temp;
        }
        n[j] = saved;
    }
}

// row_values on a uniform grid: d/dx N_{j,K} = (N_{j,K-1} - N_{j+1,K-1}) / h there.
template <int K, bool Derivative>
__device__ __forceinline__ void row_values_uniform(float u, float inv_h, float (&v)[K + 1]) {
    if constexpr (!Derivative) {
        de_boor_uniform<K, K>(u, v);
    } else if constexpr (K == 0) {
        v[0] = 0.f;
    } else {
        float lower[K + 1];  // lower[r] = N_{s-K+1+r, K-1}, r = 0..K-1
        de_boor_uniform<K, K - 1>(u, lower);
        float prev = 0.f;
#pragma unroll
        for (int r = 0; r <= K; ++r) {
            const float cur = r < K ? lower[r] : 0.f;
            v[r] = (prev - cur) * inv_h;
            prev = cur;
        }
    }
}

// What one lane knows about its row after the row phase.
template <int K>
struct RowResult {
    float prefix;  // SiLU(x), for rows written with a leading SiLU column
    int kind;      // RowKind
    int first;  // basis index of v[0]: s - K
    float v[K + 1];
};

template <int K>
__device__ __forceinline__ RowResult<K> zero_row() {
    RowResult<K> res;
    res.prefix = 0.f;
    res.kind = ROW_ZERO;
    res.first = 0;
#pragma unroll
    for (int r = 0; r <= K; ++r) res.v[r] = 0.f;
    return res;
}

template <int K, bool Derivative, bool Uniform>
__device__ __forceinline__ RowResult<K> evaluate_row(float xv, const float* __restrict__ t, int n_knots) {
    RowResult<K> res = zero_row<K>();
    if (xv != xv) {
        res.kind = ROW_NAN;
    } else if (xv >= __ldg(t) && xv < __ldg(t + n_knots - 1)) {
        const float t0 = __ldg(t), tl = __ldg(t + n_knots - 1);
        const int s = find_interval(t, n_knots, xv, t0, tl);
        if constexpr (Uniform) {
            // The interval comes from the knots themselves (find_interval), so x on a knot
            // lands exactly where the general path puts it; only the spans are taken as h.
            const float inv_h = float(n_knots - 1) / (tl - t0);
            const float u = fminf(fmaxf((xv - __ldg(t + s)) * inv_h, 0.f), 1.f);
            row_values_uniform<K, Derivative>(u, inv_h, res.v);
        } else {
            row_values<K, Derivative>(t, n_knots, s, xv, res.v);
        }
        res.kind = ROW_BASES;
        res.first = s - K;
    }
    return res;
}


constexpr int MAX_SPLINE_ORDER = 7;  // src/ops/bspline/mod.rs: MAX_SPLINE_ORDER

// Runs the statement(s) with `K` bound to the compile-time spline order equal to the
// run-time `order`, so each order gets its own fully unrolled instantiation. Orders above
// MAX_SPLINE_ORDER are rejected on the host and do nothing here.
#define HK_WITH_ORDER(order, ...)                          \
    switch (order) {                                       \
        case 0: { constexpr int K = 0; __VA_ARGS__; } break; \
        case 1: { constexpr int K = 1; __VA_ARGS__; } break; \
        case 2: { constexpr int K = 2; __VA_ARGS__; } break; \
        case 3: { constexpr int K = 3; __VA_ARGS__; } break; \
        case 4: { constexpr int K = 4; __VA_ARGS__; } break; \
        case 5: { constexpr int K = 5; __VA_ARGS__; } break; \
        case 6: { constexpr int K = 6; __VA_ARGS__; } break; \
        case 7: { constexpr int K = 7; __VA_ARGS__; } break; \
        default: break;                                    \
    }
static_assert(MAX_SPLINE_ORDER == 7, "extend HK_WITH_ORDER with the maximum order");

// Runs the statement(s) with `U` bound to whether the grid is uniform (the launch's
// `uniform` parameter), so the uniform and general row phases are separate instantiations.
#define HK_WITH_GRID(uniform, ...)                     \
    if (uniform) {                                     \
        constexpr bool U = true;                       \
        __VA_ARGS__;                                   \
    } else {                                           \
        constexpr bool U = false;                      \
        __VA_ARGS__;                                   \
    }

constexpr int WARPS_PER_BLOCK = 8;   // src/ops/bspline/cuda.rs: BLOCK_THREADS = 256
constexpr int ROWS_PER_WARP = 32;
constexpr int STAGE_ELEMENTS = 1024;   // per warp
constexpr int STAGED_MAX_BASES = 128;  // so that a slab holds at least 8 rows

struct BsplineParams {
    uint32_t n_rows;       // rows in this launch; n_rows * n_bases < 2^32 (the host splits larger work)
    uint32_t in_features;  // features per batch row
    uint32_t n_knots;      // knots per feature: G + 2k + 1
    uint32_t order;        // spline order k
    uint32_t uniform;      // 1: every feature's knots are uniformly spaced (KnotGrid::is_uniform)
};
HK_PARAMS_LAYOUT(BsplineParams, 5);

template <typename T>
struct __align__(16) Stage {
    // + one vector of slack: the slab starts at the same offset modulo 16 bytes as its
    // destination in global memory, so both sides of the copy are 16-byte aligned.
    T slab[WARPS_PER_BLOCK][STAGE_ELEMENTS + 16 / sizeof(T)];
};

// Value of column c of a row, from registers only (no run-time register indexing):
// with a prefix column, c = 0 is SiLU(x) and c = 1 + j basis j.
template <int K, int Prefix>
__device__ __forceinline__ float column_from(const RowResult<K>& row, int c) {
    if (Prefix == 1 && c == 0) return row.prefix;
    const int j = c - Prefix;
    if (row.kind == ROW_NAN) return __int_as_float(0x7fc00000);
    float v = 0.f;
#pragma unroll
    for (int a = 0; a <= K; ++a) v = (j == row.first + a) ? row.v[a] : v;
    return row.kind == ROW_BASES ? v : 0.f;
}

// Writes rows [row0, row0 + rows_here) of the warp, n_cols = Prefix + n_bases values each,
// through a shared-memory slab.
template <typename T, int K, int Prefix>
__device__ __forceinline__ void write_rows_staged(const RowResult<K>& row, int lane, uint32_t rows_here,
                                                  uint32_t n_bases, T* __restrict__ dst, T* __restrict__ slab) {
    constexpr int VEC = 16 / sizeof(T);
    const uint32_t n_cols = n_bases + Prefix;
    const uint32_t rows_per_slab = STAGE_ELEMENTS / n_cols;  // >= 7 by STAGED_MAX_BASES
    for (uint32_t g0 = 0; g0 < rows_here; g0 += rows_per_slab) {
        const uint32_t rows = min(rows_per_slab, rows_here - g0);
        const uint32_t count = rows * n_cols;
        T* out = dst + size_t(g0) * n_cols;
        const uint32_t shift = uint32_t((reinterpret_cast<uintptr_t>(out) / sizeof(T)) % VEC);
        // 1. zeros, 16 bytes per lane per step
        const uint32_t vectors = (shift + count + VEC - 1) / VEC;
        for (uint32_t q = lane; q < vectors; q += 32) reinterpret_cast<uint4*>(slab)[q] = make_uint4(0, 0, 0, 0);
        __syncwarp();
        // 2. each row's non-zero values (or NaNs)
        const uint32_t r = uint32_t(lane) - g0;
        if (uint32_t(lane) >= g0 && r < rows) {
            T* mine = slab + shift + r * n_cols;
            if (Prefix == 1) *mine++ = hk::from_f32<T>(row.prefix);
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
template <typename T, int K, int Prefix>
__device__ __forceinline__ void write_rows_broadcast(const RowResult<K>& row, int lane, uint32_t rows_here,
                                                     uint32_t n_bases, T* __restrict__ dst) {
    const uint32_t n_cols = n_bases + Prefix;
    for (uint32_t r = 0; r < rows_here; ++r) {
        RowResult<K> b;
        b.prefix = __shfl_sync(0xffffffffu, row.prefix, r);
        b.kind = __shfl_sync(0xffffffffu, row.kind, r);
        b.first = __shfl_sync(0xffffffffu, row.first, r);
#pragma unroll
        for (int a = 0; a <= K; ++a) b.v[a] = __shfl_sync(0xffffffffu, row.v[a], r);
        T* out = dst + size_t(r) * n_cols;
        for (uint32_t c = lane; c < n_cols; c += 32) out[c] = hk::from_f32<T>(column_from<K, Prefix>(b, int(c)));
    }
}

// The whole op for one order: warps take tiles of 32 rows (grid-stride), evaluate, write.
// Prefix = 1 writes SiLU(x) before each row's bases (the KAN layer's GEMM operand).
template <typename T, bool Derivative, int K, int Prefix, bool Uniform>
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
            const float xv = hk::to_f32(x[row]);
            res = evaluate_row<K, Derivative, Uniform>(xv, t, n_knots);
            if (Prefix == 1) res.prefix = hk::silu(xv);
        }
        const uint32_t rows_here = min(uint32_t(ROWS_PER_WARP), p.n_rows - row0);
        T* dst = out + size_t(row0) * (n_bases + Prefix);
        if (n_bases <= uint32_t(STAGED_MAX_BASES)) {
            write_rows_staged<T, K, Prefix>(res, lane, rows_here, n_bases, dst, stage.slab[warp]);
        } else {
            write_rows_broadcast<T, K, Prefix>(res, lane, rows_here, n_bases, dst);
        }
    }
}


}  // namespace hk_bspline
