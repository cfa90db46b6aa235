// KANLinear forward straight from the layer's parameters, for small batches:
//   y[r, o] = sum_i SiLU(x[r, i]) W_base[o, i] + scaler[o, i] sum_j B_j(x[r, i]) W_spline[o, i, j]
// The GEMM pipeline writes two operands first: features [SiLU | B] and the folded weights
// W_cat = [W_base | W_spline * scaler] (36 MB in f32 at 1000 x 1000, G = 5, written and
// then read again), then runs a GEMM whose M = batch is too small to fill the GPU. This
// kernel reads the weights where they are, once per 64 rows, and keeps everything else in
// shared memory and registers; FMAs on CUDA cores with f32 accumulation.
//
// Work split: a block owns 64 rows (8 warps x 8 rows; the rows of a warp are warp-uniform)
// and 128 outputs (4 per lane), and one range of features (split-K over gridDim.z, as many
// splits as fill one wave). Per chunk of 4 features:
//  - the weights of the chunk are staged transposed ([feature][column][output]) with
//    coalesced loads; the loads of chunk c + 1 (weights, scalers, x) are issued into
//    registers before chunk c is computed and stored after it (the first version waited out
//    one memory latency per staged word and was 10x slower);
//  - each (feature, row) gets SiLU(x) and its bases as a dense vector (zeros outside the
//    k + 1 of its interval), which the warp reads back with uniform 16-byte loads;
//  - a lane holds its 4 outputs' NBMAX + 1 = 9 scaled weights of the feature in registers
//    (zeros past G + k + 1) and does 9 x 4 FMAs per row.
// An earlier version skipped the zero bases with a switch on the row's interval (k + 2
// FMAs instead of G + k + 1). It ran 1.4x slower than these dense FMAs: its 8 unrolled rows
// x 11 cases of straight-line code jump to a different case on every row (an instruction
// cache miss per row is the likely cost; not measured).
// Partial sums of the splits go to an f32 buffer that kan_direct_reduce adds in a fixed
// order: no atomics, bitwise reproducible.
#include "bspline_device.cuh"

namespace hk_kan_direct {

constexpr int WARPS = 8;
constexpr int ROWS_PER_WARP = 8;
constexpr int BLOCK_ROWS = WARPS * ROWS_PER_WARP;  // src/ops/kan/direct.rs: BLOCK_ROWS
constexpr int OUTS_PER_LANE = 4;
constexpr int BLOCK_OUTS = 32 * OUTS_PER_LANE;     // src/ops/kan/direct.rs: BLOCK_OUTS
constexpr int CHUNK = 4;                           // features per shared-memory stage
constexpr int NO_BASES = 1 << 20;                  // "first" of a row outside the grid

struct DirectParams {
    uint32_t rows;
    uint32_t in_features;
    uint32_t out_features;
    uint32_t n_knots;
    uint32_t order;
    uint32_t uniform;
    uint32_t has_scaler;
    uint32_t features_per_split;  // a multiple of CHUNK
};

template <int NBMAX>
constexpr int ROW_VECS = (NBMAX + 1 + 3) / 4;

template <int NBMAX>
struct Smem {
    // SiLU, then the row's bases as a dense vector of NBMAX (zeros outside its window),
    // padded to whole float4s for uniform 16-byte loads.
    float4 row[CHUNK][BLOCK_ROWS][ROW_VECS<NBMAX>];
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
                                            const T* __restrict__ scaler, const DirectParams& p, uint32_t ic,
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
                                        const DirectParams& p, Smem<NBMAX>& sm) {
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
        // 2. SiLU and the dense basis vector of this thread's (feature, row).
        {
            const uint32_t il = threadIdx.x / BLOCK_ROWS, rl = threadIdx.x % BLOCK_ROWS;
            float silu = 0.f;
            hk_bspline::RowResult<K> res = hk_bspline::zero_row<K>();
            if (il < n_i && r0 + rl < p.rows) {
                const float xv = hk::to_f32(pf.x);
                res = hk_bspline::evaluate_row<K, false, Uniform>(xv, grid + size_t(ic + il) * p.n_knots,
                                                                  int(p.n_knots));
                silu = hk::silu(xv);  // NaN for x = NaN: the row's outputs become NaN
            }
            const int first = res.kind == hk_bspline::ROW_BASES ? res.first : NO_BASES;
            float dense[4 * ROW_VECS<NBMAX>];
            dense[0] = silu;
#pragma unroll
            for (int j = 0; j < 4 * ROW_VECS<NBMAX> - 1; ++j) {
                float v = 0.f;
#pragma unroll
                for (int a = 0; a <= K; ++a) v = (j == first + a) ? res.v[a] : v;
                dense[1 + j] = v;
            }
#pragma unroll
            for (int m = 0; m < ROW_VECS<NBMAX>; ++m)
                sm.row[il][rl][m] = make_float4(dense[4 * m], dense[4 * m + 1], dense[4 * m + 2], dense[4 * m + 3]);
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
                // Warp-uniform 16-byte loads: one shared-memory broadcast each.
                float coef[4 * ROW_VECS<NBMAX>];
#pragma unroll
                for (int m = 0; m < ROW_VECS<NBMAX>; ++m) {
                    const float4 c4 = sm.row[il][warp * ROWS_PER_WARP + b][m];
                    coef[4 * m] = c4.x;
                    coef[4 * m + 1] = c4.y;
                    coef[4 * m + 2] = c4.z;
                    coef[4 * m + 3] = c4.w;
                }
#pragma unroll
                for (int c = 0; c <= NBMAX; ++c)
#pragma unroll
                    for (int q = 0; q < OUTS_PER_LANE; ++q) acc[b][q] = fmaf(coef[c], w[q][c], acc[b][q]);
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

template <typename T, int NBMAX>
__device__ __forceinline__ void forward_dispatch(const T* x, const float* grid, const T* w_base, const T* w_spline,
                                                 const T* scaler, float* partial, const DirectParams& p) {
    // The layout does not depend on the order, so every order shares one buffer.
    __shared__ Smem<NBMAX> sm;
    switch (p.order) {
        case 1: HK_WITH_GRID(p.uniform, forward<T, 1, NBMAX, U>(x, grid, w_base, w_spline, scaler, partial, p, sm)); break;
        case 2: HK_WITH_GRID(p.uniform, forward<T, 2, NBMAX, U>(x, grid, w_base, w_spline, scaler, partial, p, sm)); break;
        case 3: HK_WITH_GRID(p.uniform, forward<T, 3, NBMAX, U>(x, grid, w_base, w_spline, scaler, partial, p, sm)); break;
        default: break;  // the host launches orders 1..=3 only (src/ops/kan/direct.rs: MAX_ORDER)
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

}  // namespace hk_kan_direct

#define KAN_DIRECT_KERNELS(SUFFIX, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 1) kan_direct_forward_##SUFFIX(                       \
        const T* __restrict__ x, const float* __restrict__ grid, const T* __restrict__ w_base,               \
        const T* __restrict__ w_spline, const T* __restrict__ scaler, float* __restrict__ partial,           \
        hk_kan_direct::DirectParams p) {                                                                     \
        hk_kan_direct::forward_dispatch<T, 8>(x, grid, w_base, w_spline, scaler, partial, p);                \
    }                                                                                                        \
    extern "C" __global__ void kan_direct_reduce_##SUFFIX(const float* __restrict__ partial, T* __restrict__ y, \
                                                          uint32_t n, uint32_t splits) {                     \
        hk_kan_direct::reduce<T>(partial, y, n, splits);                                                     \
    }

KAN_DIRECT_KERNELS(f32, float)
KAN_DIRECT_KERNELS(bf16, __nv_bfloat16)
KAN_DIRECT_KERNELS(f16, __half)
