// KANLinear forward without the GEMM operands, for small batches and f32:
//   y[r, o] = sum_i SiLU(x[r, i]) W_base[o, i] + scaler[o, i] sum_{a<=k} B_{s-k+a}(x[r, i]) W_spline[o, i, s-k+a]
// Of the G + k bases of a (row, feature) only the k + 1 of its interval s are non-zero, so
// this kernel does k + 2 FMAs per (row, feature, output) where the dense GEMM does G + k + 1,
// and it reads the weights as they are: no folded W_cat (36 MB in f32 at 1000 x 1000, G = 5,
// written and read again) and no features buffer.
//
// Work split: a block owns 64 rows (8 warps x 8 rows, the rows of a warp are warp-uniform)
// and 128 outputs (4 per lane), and one range of features (split-K over gridDim.z). Per
// chunk of 4 features it evaluates the rows' compact bases (SiLU, s - k, k + 1 values) into
// shared memory, and stages the chunk's weights there transposed ([feature][basis][output])
// with coalesced loads. The global loads of chunk c + 1 (weights, scalers, x) are issued
// into registers before chunk c is computed and stored to shared memory after it: the
// first version loaded and stored one word at a time and waited out a memory latency per
// word, 10x slower than this. Each lane then keeps the weights of its 4 outputs
// for one feature in registers and, per row, jumps on the warp-uniform s - k to a case
// whose k + 1 FMA columns are compile-time register indices (registers cannot be indexed
// at run time). Partial sums of the splits go to an f32 buffer that kan_sparse_reduce adds
// in a fixed order (no atomics: bitwise reproducible).
#include "bspline_device.cuh"

namespace hk_kan_sparse {

constexpr int WARPS = 8;
constexpr int ROWS_PER_WARP = 8;
constexpr int BLOCK_ROWS = WARPS * ROWS_PER_WARP;  // src/ops/kan/sparse.rs: BLOCK_ROWS
constexpr int OUTS_PER_LANE = 4;
constexpr int BLOCK_OUTS = 32 * OUTS_PER_LANE;     // src/ops/kan/sparse.rs: BLOCK_OUTS
constexpr int CHUNK = 4;                           // features per shared-memory stage
constexpr int MAX_ORDER = 3;                       // src/ops/kan/sparse.rs: MAX_ORDER
constexpr int NO_BASES = 1 << 20;                  // "first" of a row outside the grid

struct SparseParams {
    uint32_t rows;
    uint32_t in_features;
    uint32_t out_features;
    uint32_t n_knots;
    uint32_t order;
    uint32_t uniform;
    uint32_t has_scaler;
    uint32_t features_per_split;  // a multiple of CHUNK
};

template <int K, int NBMAX>
struct Smem {
    float row[CHUNK][BLOCK_ROWS][K + 3];  // SiLU, first (int bits), k + 1 bases
    // [.][0] = W_base, [.][1 + j] = W_spline. Rows padded by one word: the staging stores of
    // a warp walk (feature, basis) for one output, which would otherwise all hit one bank.
    float w[CHUNK][NBMAX + 1][BLOCK_OUTS + 1];
    float scaler[CHUNK][BLOCK_OUTS];
};

// One chunk's global loads, held in registers between issue and store.
template <typename T, int NBMAX>
struct Prefetch {
    static constexpr int W_PER_THREAD = (BLOCK_OUTS * CHUNK * (NBMAX + 1) + 255) / 256;
    static constexpr int S_PER_THREAD = BLOCK_OUTS * CHUNK / 256;
    T w[W_PER_THREAD];
    T scaler[S_PER_THREAD];
    T x;
};

// Exact floor(a / b) for a < 2^20 and b < 2^10 (a float reciprocal is far cheaper than an
// integer division; the +0.5 keeps exact multiples away from the rounding edge).
__device__ __forceinline__ uint32_t small_div(uint32_t a, float inv_b) {
    return uint32_t(__float2int_rz((float(a) + 0.5f) * inv_b));
}

// The k + 1 FMAs of one row for a window starting at basis F - K (compile time): columns
// outside 0..NBMAX-1 are bases that do not exist (their weights are not loaded).
template <int K, int NBMAX, int F>
__device__ __forceinline__ void window(float (&acc)[OUTS_PER_LANE], const float (&v)[K + 1],
                                       const float (&w)[OUTS_PER_LANE][NBMAX + 1]) {
#pragma unroll
    for (int a = 0; a <= K; ++a) {
        const int j = F - K + a;
        if (j >= 0 && j < NBMAX) {
#pragma unroll
            for (int q = 0; q < OUTS_PER_LANE; ++q) acc[q] = fmaf(v[a], w[q][1 + j], acc[q]);
        }
    }
}

#define HK_WINDOW_CASE(F)                                                     \
    case F:                                                                   \
        if constexpr (F < NBMAX + K) window<K, NBMAX, F>(acc[b], v, w);       \
        break;

// Where staged word e of a chunk comes from: output ol, feature il, column c (0 = W_base).
struct StageSlot {
    uint32_t ol, il, c;
};

__device__ __forceinline__ StageSlot stage_slot(uint32_t e, uint32_t nb, float inv_run, float inv_cols) {
    const uint32_t run = CHUNK * (nb + 1);
    StageSlot s;
    s.ol = small_div(e, inv_run);
    const uint32_t k = e - s.ol * run;
    s.il = small_div(k, inv_cols);
    s.c = k - s.il * (nb + 1);
    return s;
}

template <typename T, int NBMAX>
__device__ __forceinline__ void issue_loads(Prefetch<T, NBMAX>& pf, const T* __restrict__ x,
                                            const T* __restrict__ w_base, const T* __restrict__ w_spline,
                                            const T* __restrict__ scaler, const SparseParams& p, uint32_t ic,
                                            uint32_t n_i, uint32_t o0, uint32_t outs_here, uint32_t r0, uint32_t nb,
                                            float inv_run, float inv_cols) {
    const T zero = hk::from_f32<T>(0.f);
#pragma unroll
    for (int j = 0; j < Prefetch<T, NBMAX>::W_PER_THREAD; ++j) {
        const uint32_t e = threadIdx.x + 256u * j;
        const StageSlot s = stage_slot(e, nb, inv_run, inv_cols);
        const size_t oi = size_t(o0 + s.ol) * p.in_features + ic + s.il;
        const bool valid = s.ol < outs_here && s.il < n_i;
        pf.w[j] = !valid ? zero : (s.c == 0 ? w_base[oi] : w_spline[oi * nb + (s.c - 1)]);
    }
#pragma unroll
    for (int j = 0; j < Prefetch<T, NBMAX>::S_PER_THREAD; ++j) {
        const uint32_t e = threadIdx.x + 256u * j;
        const uint32_t ol = e / CHUNK, il = e % CHUNK;
        const bool valid = p.has_scaler && ol < outs_here && il < n_i;
        pf.scaler[j] = valid ? scaler[size_t(o0 + ol) * p.in_features + ic + il] : hk::from_f32<T>(1.f);
    }
    const uint32_t il = threadIdx.x / BLOCK_ROWS, row = r0 + threadIdx.x % BLOCK_ROWS;
    pf.x = (il < n_i && row < p.rows) ? x[size_t(row) * p.in_features + ic + il] : zero;
}

template <typename T, int K, int NBMAX, bool Uniform>
__device__ __forceinline__ void forward(const T* __restrict__ x, const float* __restrict__ grid,
                                        const T* __restrict__ w_base, const T* __restrict__ w_spline,
                                        const T* __restrict__ scaler, float* __restrict__ partial,
                                        const SparseParams& p, Smem<K, NBMAX>& sm) {
    static_assert(NBMAX + K <= 24, "extend the window cases");
    static_assert(CHUNK * BLOCK_ROWS == 256, "one (feature, row) of the chunk per thread");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t nb = p.n_knots - 1u - uint32_t(K);
    const uint32_t o0 = blockIdx.x * BLOCK_OUTS, r0 = blockIdx.y * BLOCK_ROWS;
    const uint32_t i_begin = blockIdx.z * p.features_per_split;
    const uint32_t i_end = min(p.in_features, i_begin + p.features_per_split);
    const uint32_t outs_here = min(uint32_t(BLOCK_OUTS), p.out_features - o0);
    const float inv_run = 1.f / float(CHUNK * (nb + 1)), inv_cols = 1.f / float(nb + 1);

    float acc[ROWS_PER_WARP][OUTS_PER_LANE];
#pragma unroll
    for (int b = 0; b < ROWS_PER_WARP; ++b)
#pragma unroll
        for (int q = 0; q < OUTS_PER_LANE; ++q) acc[b][q] = 0.f;

    Prefetch<T, NBMAX> pf;
    if (i_begin < i_end)
        issue_loads(pf, x, w_base, w_spline, scaler, p, i_begin, min(uint32_t(CHUNK), i_end - i_begin), o0,
                    outs_here, r0, nb, inv_run, inv_cols);
    for (uint32_t ic = i_begin; ic < i_end; ic += CHUNK) {
        const uint32_t n_i = min(uint32_t(CHUNK), i_end - ic);
        __syncthreads();  // the previous chunk has been consumed
        // 1. Store the prefetched weights (transposed) and scalers.
#pragma unroll
        for (int j = 0; j < Prefetch<T, NBMAX>::W_PER_THREAD; ++j) {
            const uint32_t e = threadIdx.x + 256u * j;
            const StageSlot s = stage_slot(e, nb, inv_run, inv_cols);
            if (s.ol < uint32_t(BLOCK_OUTS) && s.c <= uint32_t(NBMAX)) sm.w[s.il][s.c][s.ol] = hk::to_f32(pf.w[j]);
        }
#pragma unroll
        for (int j = 0; j < Prefetch<T, NBMAX>::S_PER_THREAD; ++j) {
            const uint32_t e = threadIdx.x + 256u * j;
            sm.scaler[e % CHUNK][e / CHUNK] = hk::to_f32(pf.scaler[j]);
        }
        // 2. Compact bases of this thread's (feature, row).
        {
            const uint32_t il = threadIdx.x / BLOCK_ROWS, rl = threadIdx.x % BLOCK_ROWS;
            float* dst = sm.row[il][rl];
            float silu = 0.f;
            int first = NO_BASES;
            hk_bspline::RowResult<K> res = hk_bspline::zero_row<K>();
            if (il < n_i && r0 + rl < p.rows) {
                const float xv = hk::to_f32(pf.x);
                res = hk_bspline::evaluate_row<K, false, Uniform>(xv, grid + size_t(ic + il) * p.n_knots,
                                                                  int(p.n_knots));
                silu = hk::silu(xv);  // NaN for x = NaN: the row's outputs become NaN
                if (res.kind == hk_bspline::ROW_BASES) first = res.first;
            }
            dst[0] = silu;
            dst[1] = __int_as_float(first);
#pragma unroll
            for (int a = 0; a <= K; ++a) dst[2 + a] = res.v[a];
        }
        __syncthreads();
        // 3. The next chunk's loads fly while this one is computed.
        if (ic + CHUNK < i_end)
            issue_loads(pf, x, w_base, w_spline, scaler, p, ic + CHUNK, min(uint32_t(CHUNK), i_end - ic - CHUNK),
                        o0, outs_here, r0, nb, inv_run, inv_cols);
        // 4. Rows x outputs for each feature of the chunk.
        for (uint32_t il = 0; il < n_i; ++il) {
            float w[OUTS_PER_LANE][NBMAX + 1];
#pragma unroll
            for (int q = 0; q < OUTS_PER_LANE; ++q) {
                const float sc = sm.scaler[il][lane + 32 * q];
                w[q][0] = sm.w[il][0][lane + 32 * q];
#pragma unroll
                for (int c = 1; c <= NBMAX; ++c)
                    w[q][c] = (uint32_t(c) <= nb) ? sm.w[il][c][lane + 32 * q] * sc : 0.f;
            }
#pragma unroll
            for (int b = 0; b < ROWS_PER_WARP; ++b) {
                const float* rw = sm.row[il][warp * ROWS_PER_WARP + b];
                const float silu = rw[0];
                const int first = __float_as_int(rw[1]);
                float v[K + 1];
#pragma unroll
                for (int a = 0; a <= K; ++a) v[a] = rw[2 + a];
#pragma unroll
                for (int q = 0; q < OUTS_PER_LANE; ++q) acc[b][q] = fmaf(silu, w[q][0], acc[b][q]);
                switch (first + K) {  // warp-uniform: every lane has the same row
                    HK_WINDOW_CASE(0) HK_WINDOW_CASE(1) HK_WINDOW_CASE(2) HK_WINDOW_CASE(3)
                    HK_WINDOW_CASE(4) HK_WINDOW_CASE(5) HK_WINDOW_CASE(6) HK_WINDOW_CASE(7)
                    HK_WINDOW_CASE(8) HK_WINDOW_CASE(9) HK_WINDOW_CASE(10) HK_WINDOW_CASE(11)
                    HK_WINDOW_CASE(12) HK_WINDOW_CASE(13) HK_WINDOW_CASE(14) HK_WINDOW_CASE(15)
                    HK_WINDOW_CASE(16) HK_WINDOW_CASE(17) HK_WINDOW_CASE(18) HK_WINDOW_CASE(19)
                    HK_WINDOW_CASE(20) HK_WINDOW_CASE(21) HK_WINDOW_CASE(22) HK_WINDOW_CASE(23)
                    default:
                        break;
                }
            }
        }
    }
    // 5. This split's partial sums.
    float* out = partial + size_t(blockIdx.z) * p.rows * p.out_features;
#pragma unroll
    for (int b = 0; b < ROWS_PER_WARP; ++b) {
        const uint32_t row = r0 + warp * ROWS_PER_WARP + b;
        if (row >= p.rows) continue;
#pragma unroll
        for (int q = 0; q < OUTS_PER_LANE; ++q) {
            const uint32_t ol = lane + 32 * q;
            if (ol < outs_here) out[size_t(row) * p.out_features + o0 + ol] = acc[b][q];
        }
    }
}

#undef HK_WINDOW_CASE

template <typename T, int NBMAX>
__device__ __forceinline__ void forward_dispatch(const T* x, const float* grid, const T* w_base, const T* w_spline,
                                                 const T* scaler, float* partial, const SparseParams& p) {
    // One buffer for every order: a __shared__ declaration per case would add up.
    __shared__ __align__(16) unsigned char raw[sizeof(Smem<MAX_ORDER, NBMAX>)];
    switch (p.order) {
#define HK_SPARSE_ORDER(KK)                                                                          \
    case KK: {                                                                                       \
        static_assert(sizeof(Smem<KK, NBMAX>) <= sizeof(Smem<MAX_ORDER, NBMAX>), "order buffer");     \
        auto& sm = *reinterpret_cast<Smem<KK, NBMAX>*>(raw);                                         \
        HK_WITH_GRID(p.uniform, forward<T, KK, NBMAX, U>(x, grid, w_base, w_spline, scaler, partial, p, sm)); \
    } break;
        HK_SPARSE_ORDER(1)
        HK_SPARSE_ORDER(2)
        HK_SPARSE_ORDER(3)
#undef HK_SPARSE_ORDER
        default:
            break;  // the host only launches orders 1..=MAX_ORDER
    }
}

// y[r, o] = sum_z partial[z, r, o], in split order.
template <typename T>
__device__ __forceinline__ void reduce(const float* __restrict__ partial, T* __restrict__ y, uint32_t n,
                                       uint32_t splits) {
    for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        float s = 0.f;
        for (uint32_t z = 0; z < splits; ++z) s += partial[size_t(z) * n + e];
        y[e] = hk::from_f32<T>(s);
    }
}

}  // namespace hk_kan_sparse

#define KAN_SPARSE_KERNELS(SUFFIX, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 1) kan_sparse_forward_nb8_##SUFFIX(                       \
        const T* __restrict__ x, const float* __restrict__ grid, const T* __restrict__ w_base,               \
        const T* __restrict__ w_spline, const T* __restrict__ scaler, float* __restrict__ partial,           \
        hk_kan_sparse::SparseParams p) {                                                                     \
        hk_kan_sparse::forward_dispatch<T, 8>(x, grid, w_base, w_spline, scaler, partial, p);                \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 1) kan_sparse_forward_nb16_##SUFFIX(                      \
        const T* __restrict__ x, const float* __restrict__ grid, const T* __restrict__ w_base,               \
        const T* __restrict__ w_spline, const T* __restrict__ scaler, float* __restrict__ partial,           \
        hk_kan_sparse::SparseParams p) {                                                                     \
        hk_kan_sparse::forward_dispatch<T, 16>(x, grid, w_base, w_spline, scaler, partial, p);               \
    }                                                                                                        \
    extern "C" __global__ void kan_sparse_reduce_##SUFFIX(const float* __restrict__ partial, T* __restrict__ y, \
                                                          uint32_t n, uint32_t splits) {                     \
        hk_kan_sparse::reduce<T>(partial, y, n, splits);                                                     \
    }

KAN_SPARSE_KERNELS(f32, float)
KAN_SPARSE_KERNELS(bf16, __nv_bfloat16)
KAN_SPARSE_KERNELS(f16, __half)
