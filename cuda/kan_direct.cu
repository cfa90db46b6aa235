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

// Programmatic dependent launch. In the compute_90 build (cuda/sm90-variants.txt) the host
// launches the tf32x3 products and the reduction with programmatic stream serialization:
// each may start while the kernel before it in the stream still runs, once every block of
// that kernel has allowed it (or exited). Until griddepcontrol.wait returns (the previous
// kernel has completed and its writes are visible) a kernel reads only the layer's
// parameters, which no kernel of the forward writes, and writes only shared memory. Both
// compile to nothing for compute_80, where launches are plainly stream-ordered.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

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
HK_PARAMS_LAYOUT(DirectParams, 8);

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

// y[r, o] = sum_z partial[z, r, o], in split order. Eight loads are issued before their
// adds: one at a time, each add waited out an L2 round trip.
template <typename T>
__device__ __forceinline__ void reduce(const float* __restrict__ partial, T* __restrict__ y, uint32_t n,
                                       uint32_t splits) {
    constexpr uint32_t LOADS = 8;
    wait_for_previous_grid();  // partial is the products kernel's output
    for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        float s = 0.f;
        uint32_t z = 0;
        for (; z + LOADS <= splits; z += LOADS) {
            float v[LOADS];
#pragma unroll
            for (uint32_t u = 0; u < LOADS; ++u) v[u] = partial[size_t(z + u) * n + e];
#pragma unroll
            for (uint32_t u = 0; u < LOADS; ++u) s += v[u];
        }
        for (; z < splits; ++z) s += partial[size_t(z) * n + e];
        y[e] = hk::from_f32<T>(s);
    }
}

}  // namespace hk_kan_direct

#define HK_KAN_DIRECT_KERNELS(SUFFIX, T)                                                                        \
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

HK_KAN_DIRECT_KERNELS(f32, float)
HK_KAN_DIRECT_KERNELS(bf16, __nv_bfloat16)
HK_KAN_DIRECT_KERNELS(f16, __half)

// ---------------------------------------------------------------------------------------
// The direct forward on tensor cores, f32 only (kan_direct_tf32x3_features_f32, then
// kan_direct_tf32x3_forward_f32, then kan_direct_reduce_f32).
//
// The FMA kernel above spends more issue slots on staging and shared-memory reads than on
// its FMAs (Nsight Compute: FMA pipe 23% busy), and 100 x 1000 -> 1000 at G = 5 is 1.8
// GFLOP, about 30 us even at the f32 FMA peak. Here the products run as mma.sync m16n8k8
// TF32. TF32 keeps 10 mantissa bits, so each f32 operand is split as hi = x with the low 13
// mantissa bits cleared and lo = x - hi (exact), and a·b is taken as hi·lo + lo·hi + hi·hi;
// the tensor core reads lo's top 10 bits, so what is dropped stays near 2^-20 of |a·b|:
// f32 accuracy (1e-5 scaled error, check::kan_tolerance) at three tensor-core products.
//
// 1. The features kernel writes the A operand once for every output tile, in stage tiles
//    (below), one thread per (row, feature).
// 2. Block: 128 rows x 64 outputs, one range of features (split-K over gridDim.z, partial
//    sums to the same f32 buffer and kan_direct_reduce as the FMA kernel: fixed order).
//    Stage: 8 features, K = 8 (nb + 1) columns, a whole number of k8 steps for every nb.
//    A[row][k] and B[output][k] sit in shared memory with a row stride of K + 4 words, which
//    makes every fragment load conflict-free (the stride is 4 mod 8, so the 8 rows of a
//    fragment land 4 banks apart). A arrives by 16-byte cp.async from L2; B (the weights,
//    from DRAM) by 4-byte cp.async into two buffers, the next stage's while this one is
//    multiplied. The scaler is applied as B fragments are read.
//    Warps: WARPS_M along the rows (MT m16 tiles each) x 2 along the outputs (32 each: four
//    n8 tiles). An m16 tile wholly past the last row is skipped (warp-uniform).
namespace hk_kan_mma {

constexpr int WARPS_M = 2;                   // warps along the rows
constexpr int WARPS_N = 2;                   // warps along the outputs
constexpr int THREADS = 32 * WARPS_M * WARPS_N;  // src/ops/kan/direct.rs: MMA_THREADS
constexpr int BM = 128;    // src/ops/kan/direct.rs: MMA_BLOCK_ROWS
constexpr int BN = 64;     // src/ops/kan/direct.rs: MMA_BLOCK_OUTS
constexpr int MT = BM / WARPS_M / 16;        // m16 tiles per warp
constexpr int OUTS_PER_WARP = BN / (THREADS / 32);  // outputs whose weights a warp copies
static_assert(BN / WARPS_N == 32, "four n8 tiles per warp");
constexpr int FEATS = 8;   // src/ops/kan/direct.rs: MMA_STAGE_FEATURES
constexpr int NBMAX = 8;   // src/ops/kan/direct.rs: MAX_BASES
constexpr int W_PER_LANE = (FEATS * NBMAX + 31) / 32;  // W_spline words per (lane, output)

// Words of one operand row: K = FEATS (nb + 1) plus the 4-word pad. src/ops/kan/direct.rs: mma_smem_bytes.
__device__ __forceinline__ int row_stride(int nb) { return FEATS * (nb + 1) + 4; }

// hi keeps the top 10 mantissa bits (truncated: one logic op, where cvt.rna.tf32.f32 is a
// multi-instruction sequence), lo = x - hi is exact, and the tensor core reads lo's top 10
// bits in turn: |a·b - (hi·hi + hi·lo + lo·hi)| stays below about 2^-20 |a·b|.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
    hi = __float_as_uint(x) & 0xffffe000u;
    lo = __float_as_uint(x - __uint_as_float(hi));
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    // Not volatile: the compiler may interleave independent products.
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct Layout {
    int nb, stride;
    uint32_t o0, r0, outs_here, rows_live;
    int wdst[W_PER_LANE];  // where this lane's W_spline words go in a B row: (1 + j) * 8 + feature
};

// Scalers sit beside B as [output][feature] with a 12-word row: the fragment reads of a warp
// (8 outputs x 4 features) then hit 32 different banks.
constexpr int SC_STRIDE = 12;

// 4-byte asynchronous copy global -> shared; `valid` false writes a zero and reads nothing.
__device__ __forceinline__ void copy_async(float* dst, const float* src, bool valid) {
    const uint32_t d = uint32_t(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(d), "l"(src), "r"(valid ? 4 : 0) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void copy_async_wait_previous() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

__device__ __forceinline__ void copy_async16(float* dst, const float* src, bool valid) {
    const uint32_t d = uint32_t(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}

// A stage's B side (W_base, raw W_spline, scalers) is a plain copy, so it travels by
// cp.async into one of two buffers while the other is multiplied. B[output][k] has
// k = c * 8 + feature (c = 0: W_base, 1 + j: W_spline's basis j); each warp copies
// OUTS_PER_WARP outputs, each as its 8 nb contiguous W_spline words, and (output, feature) =
// (tid / 8 + THREADS / 8 j, tid % 8) for W_base and the scaler. The copies are word by word: the
// k order differs from the weights' memory order (f nb + j). A version that kept the memory
// order, to copy 16-byte chunks, needed the scalers per fragment word from shared memory
// and ran slower (docs/performance.md).
__device__ __forceinline__ void copy_b_stage(const Layout& L, float* __restrict__ b_s, float* __restrict__ sc_s,
                                             const float* __restrict__ w_base, const float* __restrict__ w_spline,
                                             const float* __restrict__ scaler, const hk_kan_direct::DirectParams& p,
                                             uint32_t f0, uint32_t n_f) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const uint32_t fl = tid % FEATS;
#pragma unroll
    for (int j = 0; j < BN * FEATS / THREADS; ++j) {
        const uint32_t ol = tid / FEATS + (THREADS / FEATS) * j;
        const bool valid = ol < L.outs_here && fl < n_f;
        const size_t oi = valid ? size_t(L.o0 + ol) * p.in_features + f0 + fl : 0;
        copy_async(b_s + ol * L.stride + fl, w_base + oi, valid);
        if (p.has_scaler) copy_async(sc_s + ol * SC_STRIDE + fl, scaler + oi, valid);
    }
    const uint32_t words = uint32_t(L.nb) * n_f;  // a partial last stage has fewer features
#pragma unroll
    for (int q = 0; q < OUTS_PER_WARP; ++q) {
        const uint32_t ol = OUTS_PER_WARP * warp + q;
        const bool out_ok = ol < L.outs_here;
        const size_t base = out_ok ? (size_t(L.o0 + ol) * p.in_features + f0) * L.nb : 0;
        float* row = b_s + ol * L.stride;
#pragma unroll
        for (int u = 0; u < W_PER_LANE; ++u) {
            const uint32_t c = lane + 32 * u;
            if (c < uint32_t(L.nb * FEATS)) {
                const bool valid = out_ok && c < words;
                copy_async(row + L.wdst[u], w_spline + (valid ? base + c : 0), valid);
            }
        }
    }
}

// The A operand, written once by kan_direct_tf32x3_features_f32 for all output tiles:
// stage s (features 8 s .. 8 s + 7) of row r is K8 = 8 (nb + 1) words at
// a_tiles[(s * rows_pad + r) * K8], word c * 8 + feature with c = 0 for SiLU(x) and 1 + j for
// B_j(x): dense, zeros outside the row's k + 1 bases, and zeros for rows past the end (up to
// rows_pad, a multiple of 16) and features past the end. A block's stage is then up to BM x K8
// contiguous words, copied with 16-byte cp.async. With k ordered this way the scaler of a B
// fragment word depends only on (output, feature), so it is applied when the fragment is read
// (k8 steps 1..nb), not stored per word.
template <int K, bool Uniform>
__device__ __forceinline__ void features(const float* __restrict__ x, const float* __restrict__ grid,
                                         float* __restrict__ a_tiles, const hk_kan_direct::DirectParams& p,
                                         uint32_t rows_pad) {
    hk_kan_direct::allow_next_grid();  // the products kernel waits for this grid before reading A
    const int nb = int(p.n_knots) - 1 - K, k8 = FEATS * (nb + 1);
    const uint32_t stages = (p.in_features + FEATS - 1) / FEATS;
    const size_t total = size_t(stages) * rows_pad * FEATS;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += size_t(gridDim.x) * blockDim.x) {
        const uint32_t fl = uint32_t(e % FEATS);
        const size_t sr = e / FEATS;  // stage * rows_pad + row
        const uint32_t row = uint32_t(sr % rows_pad), f = uint32_t(sr / rows_pad) * FEATS + fl;
        float silu = 0.f;
        hk_bspline::RowResult<K> res = hk_bspline::zero_row<K>();
        if (row < p.rows && f < p.in_features) {
            const float xv = x[size_t(row) * p.in_features + f];
            res = hk_bspline::evaluate_row<K, false, Uniform>(xv, grid + size_t(f) * p.n_knots, int(p.n_knots));
            silu = hk::silu(xv);  // NaN for x = NaN: the row's outputs become NaN
        }
        float* dst = a_tiles + sr * k8 + fl;
        dst[0] = silu;
        for (int b = 0; b < nb; ++b) dst[(1 + b) * FEATS] = 0.f;
        if (res.kind == hk_bspline::ROW_BASES) {
            // Same thread, program order: the k + 1 bases overwrite their zeros.
#pragma unroll
            for (int a = 0; a <= K; ++a) {
                const int b = res.first + a;
                if (b >= 0 && b < nb) dst[(1 + b) * FEATS] = res.v[a];
            }
        }
    }
}


// This block's BM x K8 words of stage s into A[row][k] (row stride L.stride), in 16-byte
// chunks. Rows of dead m16 tiles (from L.rows_live on) are zero-filled, not read: the
// features kernel writes (and the host allocates) rows up to a multiple of 16, not of BM.
__device__ __forceinline__ void copy_a_stage(const Layout& L, float* __restrict__ a_s,
                                             const float* __restrict__ a_tiles, uint32_t rows_pad, uint32_t s) {
    const int chunks_per_row = 2 * (L.nb + 1);
    const float inv = 1.f / float(chunks_per_row);
    const float* src = a_tiles + (size_t(s) * rows_pad + L.r0) * (4 * chunks_per_row);
    for (uint32_t e = threadIdx.x; e < uint32_t(BM * chunks_per_row); e += THREADS) {
        const uint32_t row = hk_kan_direct::small_div(e, inv), col = e - row * chunks_per_row;
        const bool live_row = row < L.rows_live;
        copy_async16(a_s + row * L.stride + 4 * col, live_row ? src + 4 * e : src, live_row);
    }
}

// Four 8 x 4-word matrices from shared memory, one per group of 8 lanes (each lane names one
// row): lane l receives word l % 4 of row l / 4 of each, which is the m16n8k8 TF32 fragment
// layout. One instruction where four 4-byte loads were.
__device__ __forceinline__ void load_matrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// One k8 step of the warp's tile: fragments by ldmatrix (a_row, b_row: this lane's row
// address for m16 tile 0 and n8 tiles 0-1 at the step's first column), split, and the three
// products. Small products first, with independent accumulators between two products into
// the same one.
template <bool Scaled, int LIVE>
__device__ __forceinline__ void k_step(float (&acc)[MT][4][4], uint32_t a_row, uint32_t b_row,
                                       uint32_t tile16_bytes, const float (&sc)[4][2]) {
    uint32_t ahi[LIVE][4], alo[LIVE][4];
#pragma unroll
    for (int mt = 0; mt < LIVE; ++mt) {
        uint32_t r[4];
        load_matrix_x4(r, a_row + mt * tile16_bytes);
#pragma unroll
        for (int e = 0; e < 4; ++e) split_tf32(__uint_as_float(r[e]), ahi[mt][e], alo[mt][e]);
    }
    uint32_t bhi[4][2], blo[4][2];
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
        uint32_t r[4];  // n8 tile 2 pair: k 0-3, k 4-7; tile 2 pair + 1: k 0-3, k 4-7
        load_matrix_x4(r, b_row + pair * tile16_bytes);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int nt = 2 * pair + e / 2, h = e % 2;
            const float v = __uint_as_float(r[e]);
            split_tf32(Scaled ? v * sc[nt][h] : v, bhi[nt][h], blo[nt][h]);
        }
    }
#pragma unroll
    for (int mt = 0; mt < LIVE; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_tf32(acc[mt][nt], alo[mt], bhi[nt][0], bhi[nt][1]);
#pragma unroll
    for (int mt = 0; mt < LIVE; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_tf32(acc[mt][nt], ahi[mt], blo[nt][0], blo[nt][1]);
#pragma unroll
    for (int mt = 0; mt < LIVE; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) mma_tf32(acc[mt][nt], ahi[mt], bhi[nt][0], bhi[nt][1]);
}

// One stage's k8 steps for a warp whose first LIVE m16 tiles hold rows: step 0 holds
// SiLU x W_base (no scaler), steps 1..nb the bases x W_spline. LIVE is a template argument
// so that the products of dead tiles are not branched around: mma.sync under a condition
// cost a WARPSYNC and a branch per tile and step, a third of the loop's instructions.
template <int LIVE>
__device__ __forceinline__ void stage_products(float (&acc)[MT][4][4], uint32_t a_row, uint32_t b_row,
                                               uint32_t tile16_bytes, int nb, const float (&sc)[4][2]) {
    k_step<false, LIVE>(acc, a_row, b_row, tile16_bytes, sc);
#pragma unroll 2
    for (int kk = 1; kk <= nb; ++kk) k_step<true, LIVE>(acc, a_row + kk * 32, b_row + kk * 32, tile16_bytes, sc);
}

__device__ __forceinline__ void forward(const float* __restrict__ a_tiles, uint32_t rows_pad,
                                        const float* __restrict__ w_base, const float* __restrict__ w_spline,
                                        const float* __restrict__ scaler, float* __restrict__ partial,
                                        const hk_kan_direct::DirectParams& p, float* smem) {
    hk_kan_direct::allow_next_grid();  // the reduction waits for this grid before reading partial
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t = lane % 4, wm = warp % WARPS_M, wn = warp / WARPS_M;
    Layout L;
    L.nb = int(p.n_knots) - 1 - int(p.order);
    L.stride = row_stride(L.nb);
    L.o0 = blockIdx.x * BN;
    L.r0 = blockIdx.y * BM;
    L.outs_here = min(uint32_t(BN), p.out_features - L.o0);
    L.rows_live = min(uint32_t(BM), (p.rows - L.r0 + 15) / 16 * 16);
#pragma unroll
    for (int u = 0; u < W_PER_LANE; ++u) {
        // Word c of an output's run is (feature c / nb, basis c % nb); the map is the same in
        // every stage, so it is worked out once.
        const int c = lane + 32 * u, f = c / L.nb;
        L.wdst[u] = (1 + c - f * L.nb) * FEATS + f;
    }
    // [A: BM rows][B, scalers: buffer 0][B, scalers: buffer 1]
    const int b_words = BN * L.stride + BN * SC_STRIDE;
    float* a_s = smem;
    float* b_buf = a_s + BM * L.stride;
    if (!p.has_scaler)
        for (int e = tid; e < 2 * BN * SC_STRIDE; e += THREADS)
            b_buf[(e / (BN * SC_STRIDE)) * b_words + BN * L.stride + e % (BN * SC_STRIDE)] = 1.f;
    const uint32_t f_begin = blockIdx.z * p.features_per_split;
    const uint32_t f_end = min(p.in_features, f_begin + p.features_per_split);
    // m16 tiles of this warp that hold at least one row: a prefix of its MT.
    const int first_row = int(L.r0) + wm * MT * 16;
    const int live = max(0, min(MT, (int(p.rows) - first_row + 15) / 16));

    float acc[MT][4][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    if (f_begin < f_end) {
        copy_b_stage(L, b_buf, b_buf + BN * L.stride, w_base, w_spline, scaler, p, f_begin,
                     min(uint32_t(FEATS), f_end - f_begin));
    }
    copy_async_commit();
    // Above: scalers and the first weight stage (parameters); below: A, the features
    // kernel's output.
    hk_kan_direct::wait_for_previous_grid();
    int buf = 0;
    for (uint32_t f0 = f_begin; f0 < f_end; f0 += FEATS, buf ^= 1) {
        __syncthreads();  // the previous stage has been multiplied: A and the other B buffer are free
        copy_a_stage(L, a_s, a_tiles, rows_pad, f0 / FEATS);
        copy_async_commit();
        if (f0 + FEATS < f_end) {
            float* nb_s = b_buf + (buf ^ 1) * b_words;
            copy_b_stage(L, nb_s, nb_s + BN * L.stride, w_base, w_spline, scaler, p, f0 + FEATS,
                         min(uint32_t(FEATS), f_end - f0 - FEATS));
        }
        copy_async_commit();  // possibly empty: the wait below leaves only the next B in flight
        copy_async_wait_previous();
        __syncthreads();
        const float* b_s = b_buf + buf * b_words;
        const float* sc_s = b_s + BN * L.stride;
        float sc[4][2];
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const float* r = sc_s + (wn * 32 + nt * 8 + g) * SC_STRIDE + t;
            sc[nt][0] = r[0];
            sc[nt][1] = r[4];
        }
        // ldmatrix rows: lanes 8 q .. 8 q + 7 name the rows of matrix q. A: q = 0, 1 rows 0-7,
        // 8-15 at column 0, q = 2, 3 the same at column 4. B: q = 0, 1 outputs 0-7 at columns
        // 0 and 4, q = 2, 3 outputs 8-15.
        const int q = lane / 8;
        const uint32_t a_row = uint32_t(__cvta_generic_to_shared(
            a_s + (wm * MT * 16 + lane % 8 + 8 * (q % 2)) * L.stride + 4 * (q / 2)));
        const uint32_t b_row = uint32_t(__cvta_generic_to_shared(
            b_s + (wn * 32 + lane % 8 + 8 * (q / 2)) * L.stride + 4 * (q % 2)));
        const uint32_t tile16_bytes = 16u * uint32_t(L.stride) * 4u;
        static_assert(MT == 4, "one case per live tile count");
        switch (live) {
            case 4: stage_products<4>(acc, a_row, b_row, tile16_bytes, L.nb, sc); break;
            case 3: stage_products<3>(acc, a_row, b_row, tile16_bytes, L.nb, sc); break;
            case 2: stage_products<2>(acc, a_row, b_row, tile16_bytes, L.nb, sc); break;
            case 1: stage_products<1>(acc, a_row, b_row, tile16_bytes, L.nb, sc); break;
            default: break;  // no rows in this warp's tiles
        }
    }
    float* out = partial + size_t(blockIdx.z) * p.rows * p.out_features;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const uint32_t row = L.r0 + (wm * MT + mt) * 16 + g + 8 * (e / 2);
                const uint32_t ol = wn * 32 + nt * 8 + 2 * t + (e % 2);
                if (row < p.rows && ol < L.outs_here) out[size_t(row) * p.out_features + L.o0 + ol] = acc[mt][nt][e];
            }
}

}  // namespace hk_kan_mma

// Dynamic shared memory: BM row_stride(nb) + 2 BN (row_stride(nb) + SC_STRIDE) floats, set by the host.
extern "C" __global__ void __launch_bounds__(hk_kan_mma::THREADS, 2) kan_direct_tf32x3_forward_f32(
    const float* __restrict__ a_tiles, uint32_t rows_pad, const float* __restrict__ w_base,
    const float* __restrict__ w_spline, const float* __restrict__ scaler, float* __restrict__ partial,
    hk_kan_direct::DirectParams p) {
    extern __shared__ float4 hk_kan_mma_smem[];
    hk_kan_mma::forward(a_tiles, rows_pad, w_base, w_spline, scaler, partial, p,
                        reinterpret_cast<float*>(hk_kan_mma_smem));
}

extern "C" __global__ void kan_direct_tf32x3_features_f32(const float* __restrict__ x, const float* __restrict__ grid,
                                                          float* __restrict__ a_tiles, hk_kan_direct::DirectParams p,
                                                          uint32_t rows_pad) {
    switch (p.order) {
        case 1: HK_WITH_GRID(p.uniform, hk_kan_mma::features<1, U>(x, grid, a_tiles, p, rows_pad)); break;
        case 2: HK_WITH_GRID(p.uniform, hk_kan_mma::features<2, U>(x, grid, a_tiles, p, rows_pad)); break;
        case 3: HK_WITH_GRID(p.uniform, hk_kan_mma::features<3, U>(x, grid, a_tiles, p, rows_pad)); break;
        default: break;  // the host launches orders 1..=3 only (src/ops/kan/direct.rs: MAX_ORDER)
    }
}
