// mLSTM kernels' shared device code: the parameter structs the host mirrors, the tile
// helpers of the chunked kernels and the fused kernels' tile, gate and state machinery.
// One file per pass includes it: forward_chunked.cu, forward_fused.cu (inference), step.cu
// (decoding), backward.cu and backward_fused.cu (training), each its own module, so that an
// inference-only user never loads the backward's PTX. fused_forward.cuh holds the fused
// forward, which the fused backward's recomputation instantiates with per-step stats.
//
// mLSTM with exponential input gate (mlstm_kernels' mLSTMexp; the math is in
// src/ops/mlstm/cpu.rs), chunkwise: one block owns one head and one tile of value columns
// and walks the sequence chunk by chunk, its slice of the state C (dqk x tv, f32) resident
// in shared memory. Per chunk of L steps:
//   S = Q K^T                         (tensor cores for bf16/f16)
//   P[t,s] = S[t,s] / sqrt(dqk) * exp(b[t] - b[s] + i[s] - m[t])    (s <= t)
//   H = exp(b[t] + m_prev - m[t]) / sqrt(dqk) * Q C  +  P V
//   h = H / (max(|den|, exp(-m)) + eps), den the same with n in place of C and ones for V
//   C = exp(b[L] + m_prev - m[L]) C + (K * exp(b[L] - b[s] + i[s] - m[L]))^T V
// with b the in-chunk cumulative sum of logsigmoid(f) and m the exact running max state of
// the recurrence (a prefix max), so the outputs equal the step-by-step ones. Only chunk
// boundaries hold a state; nothing is stored for the backward, which recomputes.
#pragma once

#include <mma.h>

#include <type_traits>

#include "../common.cuh"

namespace hk_mlstm {

// Mirrors MlstmParams in src/ops/mlstm/cuda.rs.
struct MlstmParams {
    uint32_t heads;    // batch * num_heads
    uint32_t len;
    uint32_t dqk;
    uint32_t dhv;
    uint32_t dqk_pad;  // dqk rounded up to 16
    uint32_t tv;       // value columns per block, a multiple of 16
    uint32_t has_init;
    float eps;
    float scale;  // 1 / sqrt(dqk)
};
HK_PARAMS_LAYOUT(MlstmParams, 9);

constexpr int THREADS = 512;
constexpr int WARPS = THREADS / 32;

__device__ __forceinline__ float logsigmoid(float x) { return fminf(x, 0.f) - log1pf(expf(-fabsf(x))); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// Row padding of shared tiles: 16 bytes, which keeps wmma's alignment rules and moves
// consecutive rows to different banks.
template <typename T>
__host__ __device__ constexpr int skew() {
    return 16 / int(sizeof(T));
}

// One warp: out (16 x 16 f32, row-major) = (accumulate ? acc_scale * out : 0) + A B, A
// 16 x 16*ksteps starting at `a`, B 16*ksteps x 16 starting at `b`; A_COL / B_COL say the
// operand is stored column-major (element (r, c) at [c * ld + r]).
template <typename T, bool A_COL, bool B_COL>
__device__ __forceinline__ void warp_tile(float* out, int ldo, const T* a, int lda, const T* b, int ldb, int ksteps,
                                          bool accumulate, float acc_scale) {
    if constexpr (std::is_same_v<T, float>) {
        // No f32 tensor-core path that keeps f32 accuracy: FMA, each lane 8 outputs of one row.
        const int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 8;
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = accumulate ? acc_scale * out[r * ldo + c0 + j] : 0.f;
        for (int kk = 0; kk < ksteps * 16; ++kk) {
            const float av = A_COL ? a[kk * lda + r] : a[r * lda + kk];
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] = fmaf(av, B_COL ? b[(c0 + j) * ldb + kk] : b[kk * ldb + c0 + j], acc[j]);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) out[r * ldo + c0 + j] = acc[j];
    } else {
        using namespace nvcuda;
        using LA = std::conditional_t<A_COL, wmma::col_major, wmma::row_major>;
        using LB = std::conditional_t<B_COL, wmma::col_major, wmma::row_major>;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        if (accumulate) {
            wmma::load_matrix_sync(acc, out, ldo, wmma::mem_row_major);
#pragma unroll
            for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= acc_scale;
        } else {
            wmma::fill_fragment(acc, 0.f);
        }
        for (int kk = 0; kk < ksteps; ++kk) {
            wmma::load_matrix_sync(fa, A_COL ? a + kk * 16 * lda : a + kk * 16, lda);
            wmma::load_matrix_sync(fb, B_COL ? b + kk * 16 : b + kk * 16 * ldb, ldb);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(out, acc, ldo, wmma::mem_row_major);
    }
}

// Bump allocator over dynamic shared memory, 128-byte aligned pieces (wmma needs 32). The
// host computes the same total (smem_bytes in cuda.rs); a mismatch traps instead of
// overrunning.
struct Carve {
    unsigned char* base;
    uint32_t used;
    template <typename U>
    __device__ U* take(uint32_t count) {
        U* p = reinterpret_cast<U*>(base + used);
        used += (count * uint32_t(sizeof(U)) + 127u) & ~127u;
        return p;
    }
};

__device__ __forceinline__ uint32_t dynamic_smem_size() {
    uint32_t r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// rows x cols (cols <= pad) of a row-major global matrix with row stride `stride` into a
// shared tile of row stride `ld`, zeros outside `valid_rows` x `valid_cols` and up to pad.
// 16-byte pieces when every row starts 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* __restrict__ src, size_t stride, int rows, int pad,
                                          int valid_rows, int valid_cols, bool vec_ok) {
    constexpr int VEC = 16 / int(sizeof(T));
    // Rows by warp, columns by lane: no index division in the hot loops.
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (vec_ok) {
        for (int r = warp; r < rows; r += WARPS) {
            for (int c = lane * VEC; c < pad; c += 32 * VEC) {
                uint4 val = make_uint4(0, 0, 0, 0);
                if (r < valid_rows && c < valid_cols) val = *reinterpret_cast<const uint4*>(src + r * stride + c);
                *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
            }
        }
    } else {
        for (int r = warp; r < rows; r += WARPS) {
            for (int c = lane; c < pad; c += 32) {
                dst[r * ld + c] = (r < valid_rows && c < valid_cols) ? src[r * stride + c] : hk::from_f32<T>(0.f);
            }
        }
    }
}

// The warp scan of a chunk's gates shared by mlstm_fwd and mlstm_pass. m follows
// m[t] = max(lf[t] + m[t-1], k[t]), a max-plus recurrence whose steps compose as (a1, c1) then
// (a2, c2) = (a1 + a2, max(c1 + a2, c2)). Lane `lane` holds steps lane*PER .. lane*PER + PER - 1:
// bl / cl the compositions from its first step to each of its own, ra / rc their totals. This
// scans the lanes' totals; on return bl holds each step's b (cumulative over the chunk), ml its
// m from m_prev, and every lane has b and m of the chunk's last step in bL, mL. In f64 (see
// mlstm_fwd).
template <int L, int PER>
__device__ __forceinline__ void scan_chunk_gates(double (&bl)[PER], const double (&cl)[PER], double ra, double rc,
                                                 double m_prev, int lane, double (&ml)[PER], double& bL, double& mL) {
    double ta = ra, tc = rc;  // inclusive scan of the lanes' compositions
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const double ya = __shfl_up_sync(0xffffffffu, ta, off), yc = __shfl_up_sync(0xffffffffu, tc, off);
        if (lane >= off) {
            tc = fmax(yc + ta, tc);
            ta = ya + ta;
        }
    }
    double ea = __shfl_up_sync(0xffffffffu, ta, 1), ec = __shfl_up_sync(0xffffffffu, tc, 1);
    if (lane == 0) {
        ea = 0.0;
        ec = -INFINITY;
    }
#pragma unroll
    for (int e = 0; e < PER; ++e) {
        const double c = fmax(ec + bl[e], cl[e]);
        bl[e] += ea;
        ml[e] = fmax(m_prev + bl[e], c);
    }
    constexpr int LAST_LANE = (L - 1) / PER;
    bL = __shfl_sync(0xffffffffu, bl[PER - 1], LAST_LANE);
    mL = __shfl_sync(0xffffffffu, ml[PER - 1], LAST_LANE);
}

// ---------------------------------------------------------------------------------------
// Forward v2 for bf16 / f16 ("fused"): register-resident tiles on mma.sync m16n8k16. One
// block per (TV value columns, head) walks the sequence in chunks of 64 steps. Its warps
// split by role, so that the carried state never waits on the chunk's outputs:
//  - 4 output warps, warp w owning the chunk's rows 16w..16w+15: S = Q K^T, gated into P in
//    registers (the accumulator fragment of S is the A fragment of P V), then Q C_prev and
//    P [V | 1] into one accumulator. C's column TV holds n and V's column TV is ones, so the
//    same products give the denominator: its carried part q.n_prev from Q C_prev, its
//    in-chunk part (P's row sums) from P [V | 1].
//  - state warps, each owning SR rows of [C | n] in f32 registers for the whole sequence:
//    [C | n] = decay [C | n] + (K gated)^T [V | 1] per chunk, then its element-type copy in
//    shared memory, which the output warps' next Q C_prev reads. They also copy the next
//    chunk's Q, K, V by cp.async while the current one is processed, and the last of them
//    scans the next chunk's gates into shared memory (GateTile).
// Named barrier 1 lets the state warps overwrite the copy of C once the output warps have
// read it.
// Gates as in mlstm_fwd: m[t] = b[t] + w[t], w[t] = max(m_prev, max_{s<=t} u[s]) with
// u[s] = i[s] - b[s] and b the in-chunk cumulative logsigmoid(f) (f64 in the scan); the
// weight of key s in row t is exp(u[s] - w[t]) <= 1, the carried part's exp(m_prev - w[t]).
// TV = 64. 128 (one block of 12 warps per SM at D128, 16 rows of C per state warp, S and the
// gates not recomputed per value tile) measured 490 us against 460 us at B8 NH16 S4096 D128
// on an H100 (at an earlier version), as 12 warps per SM hide less latency than 16.

// Mirrors FusedParams in src/ops/mlstm/cuda.rs.
struct FusedParams {
    uint32_t heads;
    uint32_t len;
    uint32_t dqk;
    uint32_t dhv;
    uint32_t has_init;
    uint32_t vec_in;   // q, k, v rows start 16-byte aligned and dqk, dhv are multiples of 8
    uint32_t vec_out;  // h rows likewise
    float eps;
    float scale;  // 1 / sqrt(dqk)
};
HK_PARAMS_LAYOUT(FusedParams, 9);

namespace fused {

constexpr int L = 64;   // steps per chunk
constexpr int TV = 64;  // value columns per block
constexpr int OUT_WARPS = L / 16;

// A chunk's gates, written by the scanning warp one chunk ahead (two of them, by chunk
// parity): per step t, u = i - b and w (see below), m = b + w, the carried part's weight
// exp(m_prev - w) times the score scale, and the key gate of the chunk's closing state
// exp(u - w_last); the state's decay exp(m_prev - w_last).
struct GateTile {
    float u[L], w[L], m[L], carried[L], key[L];
    float decay, pad[3];
};
// In the tile, u and w are in base 2 and u carries the score scale: the weight of key s in
// row t, times the scale, is 2^(u[s] - w[t]), one MUFU.EX2 per score.
constexpr double LOG2E = 1.4426950408889634;

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Row strides are odd multiples of 16 bytes, so the 8 rows of an ldmatrix land on 8
// different 16-byte bank groups.
template <int DQK>
struct Cfg {
    static constexpr int VX = TV + 8;  // [V | 1 | 0..] and [C | n | 0..]: one more n8 tile
    static constexpr int NT = TV / 8 + 1;
    static constexpr int SR = 32;  // rows of [C | n] per state warp
    static constexpr int MT = SR / 16;
    static constexpr int STATE_WARPS = DQK / SR;
    static constexpr int WARPS = OUT_WARPS + STATE_WARPS;
    // The warp that scans the next chunk's gates: the last output warp where the state warps'
    // path (tile copies, then the update) is the longer one, at DQK <= 128, and the last
    // state warp at 256, where the 4 output warps' products take longer (H100: the forward
    // at D128 385 -> 339 us with an output warp scanning, at D256 523 -> 638 us; DQK 64, with
    // two state warps issuing the copies, follows D128 untimed).
    static constexpr bool OUTPUT_WARP_SCANS = DQK <= 128;
    static constexpr int SCAN_WARP = OUTPUT_WARP_SCANS ? OUT_WARPS - 1 : WARPS - 1;
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int LDQ = DQK + 8;
    static constexpr int QK_TILE = L * LDQ;  // elements of one Q or K buffer
    static constexpr int V_TILE = L * VX;
    static constexpr int C_TILE = DQK * VX;
    // Q[2], K[2], V[2], C, then two GateTiles. Mirrors fused_smem_bytes in cuda.rs.
    static constexpr uint32_t SMEM = (4 * QK_TILE + 2 * V_TILE + C_TILE) * 2 + 2 * sizeof(GateTile);
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr)
                 : "memory");
}

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    // Not volatile: the compiler may interleave independent products.
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two values rounded to T in one 32-bit word, `lo` at the lower address.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    } else {
        const __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&v);
    }
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
    } else {
        return __half22float2(*reinterpret_cast<const __half2*>(&w));
    }
}

template <typename T>
__device__ __forceinline__ uint32_t scale2(uint32_t w, float2 g) {
    const float2 x = unpack2<T>(w);
    return pack2<T>(x.x * g.x, x.y * g.y);
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Named barrier 1 over the whole block: the output warps pass it once they have read the
// carried state's copy, the state warps before overwriting it. The output warps sync there
// too rather than only arrive: compute-sanitizer's racecheck reported the copy's reads and
// writes as racing with bar.arrive over 1024 chunks, and the state warps, with less work
// per chunk, are there first anyway.
// The roles reach every barrier from different code, so the barriers are the non-.aligned
// `barrier.sync` (bar.sync and __syncthreads are .aligned: every thread at the same
// instruction; synccheck reports the difference).
template <int THREADS>
__device__ __forceinline__ void state_copy_read() {
    asm volatile("barrier.sync 1, %0;" ::"n"(THREADS) : "memory");
}
template <int THREADS>
__device__ __forceinline__ void state_copy_wait() {
    asm volatile("barrier.sync 1, %0;" ::"n"(THREADS) : "memory");
}
// Barrier 0 over the whole block, reached by the two roles from different code.
__device__ __forceinline__ void block_sync() { asm volatile("barrier.sync 0;" ::: "memory"); }

// Rows [0, 64) x COLS of a row-major global matrix (row stride `stride`, negative where a
// backward pass walks the sequence from its end; `valid_rows` x
// `valid_cols` of it real) into a shared tile of row stride LD, zeros elsewhere, by the
// LOADERS threads numbered `tid`: 16-byte cp.async pieces (valid_cols a multiple of 8), or
// plain element copies when `vec` is false. The element-copy path is out of line: it is the
// rare case, and inlined it would double the loop's code.
template <typename T, int COLS, int LD, int LOADERS, typename Stride>
__device__ __noinline__ void load_rows_by_element(T* dst, const T* __restrict__ src, Stride stride, int valid_rows,
                                                  int valid_cols, int tid) {
    for (int e = tid; e < L * COLS; e += LOADERS) {
        const int r = e / COLS, c = e % COLS;
        dst[r * LD + c] = (r < valid_rows && c < valid_cols) ? src[r * stride + c] : hk::from_f32<T>(0.f);
    }
}

template <typename T, int COLS, int LD, int LOADERS, typename Stride>
__device__ __forceinline__ void load_rows(T* dst, const T* __restrict__ src, Stride stride, int valid_rows,
                                          int valid_cols, bool vec, int tid) {
    if (vec) {
        // A loader copies the same column of rows r0, r0 + ROW_STEP, ..: one pointer stepped
        // by ROW_STEP rows and immediate shared offsets. Indexing each piece afresh (a 64-bit
        // row times stride product per piece) cost ~15 integer instructions per cp.async on
        // the state warps, whose path is the longer one at DQK <= 128.
        constexpr int PIECES = COLS / 8;
        static_assert(LOADERS % PIECES == 0, "a loader keeps its column");
        constexpr int ROW_STEP = LOADERS / PIECES;
        const int r0 = tid / PIECES, c = (tid % PIECES) * 8;
        const bool col_ok = c < valid_cols;
        const T* from = src + r0 * static_cast<long long>(stride) + c;
        const long long step = ROW_STEP * static_cast<long long>(stride);
        const uint32_t to = smem_addr(dst + r0 * LD + c);
#pragma unroll
        for (int i = 0; i < L / ROW_STEP; ++i) {
            const bool ok = col_ok && r0 + i * ROW_STEP < valid_rows;
            cp_async16(to + i * ROW_STEP * LD * int(sizeof(T)), ok ? from : src, ok);
            from += step;
        }
    } else {
        load_rows_by_element<T, COLS, LD, LOADERS, Stride>(dst, src, stride, valid_rows, valid_cols, tid);
    }
}

// A chunk's gates in the scanning warp: lane l holds steps 2l and 2l + 1.
struct ChunkGates {
    double b[2];  // in-chunk cumulative logsigmoid(f)
    double u[2];  // i - b
    double w[2];  // max(m_prev, prefix max of u)
    double b_last, w_last;
};

__device__ __forceinline__ ChunkGates scan_gates(float lf0, float lf1, float i0, float i1, double m_prev) {
    const int lane = threadIdx.x & 31;
    ChunkGates g;
    const double pair = double(lf0) + double(lf1);
    double incl = pair;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
    }
    double excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = 0.0;
    g.b[0] = excl + double(lf0);
    g.b[1] = excl + pair;
    g.u[0] = double(i0) - g.b[0];
    g.u[1] = double(i1) - g.b[1];
    double mx = fmax(g.u[0], g.u[1]);
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, mx, off);
        if (lane >= off) mx = fmax(mx, y);
    }
    double mx_excl = __shfl_up_sync(0xffffffffu, mx, 1);
    if (lane == 0) mx_excl = -INFINITY;
    g.w[0] = fmax(m_prev, fmax(mx_excl, g.u[0]));
    g.w[1] = fmax(m_prev, fmax(mx_excl, fmax(g.u[0], g.u[1])));
    g.b_last = __shfl_sync(0xffffffffu, g.b[1], 31);
    g.w_last = __shfl_sync(0xffffffffu, g.w[1], 31);
    return g;
}

// This lane's ldmatrix.trans address in a tile of row stride VX ([V | 1] or [C | n]) whose
// 16-row blocks are B operands (k = rows, n = columns): lanes 0-15 name rows 0-15 of columns
// 0-7, lanes 16-31 rows 0-7 and 8-15 of columns 8-15.
template <typename T, int VX>
__device__ __forceinline__ uint32_t b_trans_addr(const T* tile) {
    const int lane = threadIdx.x & 31;
    return smem_addr(tile + ((lane & 7) + ((lane >> 3) & 1) * 8) * VX + (lane >> 4) * 8);
}

// acc (16 rows x NA n8 tiles) += a (16 x 16) times the 16 rows of the tile at b (from
// b_trans_addr): TV / 16 x4 loads, and with NA = TV / 8 + 1 one x2 for the last n8 tile
// (the forward's ones / n column and padding; the backward passes have none).
template <typename T, int NA>
__device__ __forceinline__ void mma_by_row_block(float (&acc)[NA][4], const uint32_t (&a)[4], uint32_t b) {
    static_assert(NA == TV / 8 || NA == TV / 8 + 1, "TV columns, with or without the extra n8 tile");
#pragma unroll
    for (int j = 0; j < TV / 16; ++j) {
        uint32_t f[4];
        ldsm_x4_trans(f, b + j * 32);
        mma<T>(acc[2 * j], a, f[0], f[1]);
        mma<T>(acc[2 * j + 1], a, f[2], f[3]);
    }
    if constexpr (NA > TV / 8) {
        uint32_t f[2];
        ldsm_x2_trans(f, b + TV * 2);
        mma<T>(acc[TV / 8], a, f[0], f[1]);
    }
}

// Every output warp runs the same code over all 8 key tiles, the ones past its diagonal
// masked: the last warp's work is the chunk's critical path either way, and one copy of the
// code instead of four (one per diagonal) keeps the loop in the instruction cache (Nsight
// Compute: 21% of stalls were instruction fetch with four).
// What the backward's recomputation records per step: m, the denominator
// d = max(|den|, exp(-m)) + eps and den (the chunked forward's stats rows 0-2), by the first
// value tile's blocks. h . dh is mlstm_bwd_prep_h's.
struct StatsOut {
    float* __restrict__ stats;
    size_t rows;   // heads * len: the stride of the stats rows
    size_t first;  // the chunk's first step among them
    int vt;        // the block's value tile
};

template <typename T, int DQK, bool STATS>
__device__ __forceinline__ void output_rows(const T* Qb, const T* Kb, const T* Vb, const T* Cs, const GateTile& gt,
                                            int W, T* __restrict__ h_rows, int valid, int tv_valid,
                                            const FusedParams& p, const StatsOut& so) {
    using C = Cfg<DQK>;
    constexpr int KT = L / 8;
    const int lane = threadIdx.x & 31, quad = lane & 3, r0 = lane >> 2;
    const float* u = gt.u;
    // S, then its gating into P (packed, half the registers), then Q C_prev into o: the
    // accumulators of S and o are never live together.
    const uint32_t q_addr = smem_addr(Qb + (16 * W + (lane & 15)) * C::LDQ + (lane >> 4) * 8);
    const uint32_t k_addr = smem_addr(Kb + ((lane & 7) + ((lane >> 4) << 3)) * C::LDQ + ((lane >> 3) & 1) * 8);
    float s[KT][4];
#pragma unroll
    for (int n = 0; n < KT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll 2
    for (int kk = 0; kk < DQK / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(a, q_addr + kk * 32);
#pragma unroll
        for (int j = 0; j < KT / 2; ++j) {
            uint32_t b[4];
            ldsm_x4(b, k_addr + j * 16 * C::LDQ * 2 + kk * 32);
            mma<T>(s[2 * j], a, b[0], b[1]);
            mma<T>(s[2 * j + 1], a, b[2], b[3]);
        }
    }

    const int t0 = 16 * W + r0, t1 = t0 + 8;
    const float w0f = gt.w[t0], w1f = gt.w[t1];
    uint32_t pa[KT / 2][4];
#pragma unroll
    for (int n = 0; n < KT; ++n) {
        const int c = n * 8 + 2 * quad;
        const float2 uc = *reinterpret_cast<const float2*>(u + c);
        float p00 = s[n][0] * ex2(uc.x - w0f), p01 = s[n][1] * ex2(uc.y - w0f);
        float p10 = s[n][2] * ex2(uc.x - w1f), p11 = s[n][3] * ex2(uc.y - w1f);
        // Keys after the row's step do not count.
        if (c > t0) p00 = 0.f;
        if (c + 1 > t0) p01 = 0.f;
        if (c > t1) p10 = 0.f;
        if (c + 1 > t1) p11 = 0.f;
        pa[n >> 1][(n & 1) * 2] = pack2<T>(p00, p01);
        pa[n >> 1][(n & 1) * 2 + 1] = pack2<T>(p10, p11);
    }

    constexpr int NT = C::NT, VX = C::VX;
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    const uint32_t c_addr = b_trans_addr<T, VX>(Cs);
#pragma unroll 2
    for (int kk = 0; kk < DQK / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(a, q_addr + kk * 32);
        mma_by_row_block<T>(o, a, c_addr + kk * 16 * VX * 2);
    }
    state_copy_read<C::THREADS>();
    const float carried0 = gt.carried[t0], carried1 = gt.carried[t1];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        o[n][0] *= carried0;
        o[n][1] *= carried0;
        o[n][2] *= carried1;
        o[n][3] *= carried1;
    }
    const uint32_t v_addr = b_trans_addr<T, VX>(Vb);
#pragma unroll
    for (int j = 0; j < KT / 2; ++j) mma_by_row_block<T>(o, pa[j], v_addr + j * 16 * VX * 2);

    // Column TV is the denominator; quad lane 0 holds it.
    const float den0 = __shfl_sync(0xffffffffu, o[NT - 1][0], lane & ~3);
    const float den1 = __shfl_sync(0xffffffffu, o[NT - 1][2], lane & ~3);
    const float d0 = fmaxf(fabsf(den0), expf(-gt.m[t0])) + p.eps;
    const float d1 = fmaxf(fabsf(den1), expf(-gt.m[t1])) + p.eps;
    const float inv0 = 1.f / d0, inv1 = 1.f / d1;
    if (STATS && so.vt == 0 && quad == 0) {
        float* st = so.stats + so.first;
        if (t0 < valid) st[t0] = gt.m[t0], st[so.rows + t0] = d0, st[2 * so.rows + t0] = den0;
        if (t1 < valid) st[t1] = gt.m[t1], st[so.rows + t1] = d1, st[2 * so.rows + t1] = den1;
    }
    T* stage = const_cast<T*>(Qb) + 16 * W * C::LDQ;
    __syncwarp();  // every lane's ldmatrix of these rows is done
#pragma unroll
    for (int n = 0; n < NT - 1; ++n) {
        const int c = n * 8 + 2 * quad;
        *reinterpret_cast<uint32_t*>(stage + r0 * C::LDQ + c) = pack2<T>(o[n][0] * inv0, o[n][1] * inv0);
        *reinterpret_cast<uint32_t*>(stage + (r0 + 8) * C::LDQ + c) = pack2<T>(o[n][2] * inv1, o[n][3] * inv1);
    }
    __syncwarp();
    const int rows = min(16, valid - 16 * W);
    if (p.vec_out) {
#pragma unroll
        for (int e = lane; e < 16 * (TV / 8); e += 32) {
            const int r = e / (TV / 8), c = (e % (TV / 8)) * 8;
            if (r < rows && c < tv_valid) {
                *reinterpret_cast<uint4*>(h_rows + size_t(16 * W + r) * p.dhv + c) =
                    *reinterpret_cast<const uint4*>(stage + r * C::LDQ + c);
            }
        }
    } else {
        for (int e = lane; e < 16 * TV; e += 32) {
            const int r = e / TV, c = e % TV;
            if (r < rows && c < tv_valid) h_rows[size_t(16 * W + r) * p.dhv + c] = stage[r * C::LDQ + c];
        }
    }
}

// State warp `sw` (rows SR sw .. SR sw + SR - 1 of [C | n]): c = decay c + (K gated)^T [V | 1].
// `kg` holds the chunk's key gates exp(u[s] - w_last).
template <typename T, int DQK, int NT>
__device__ __forceinline__ void update_state(float (&c)[Cfg<DQK>::MT][NT][4], const T* Kb, const T* Vb, const float* kg,
                                             float decay, int sw) {
    using C = Cfg<DQK>;
    constexpr int MT = C::MT, VX = C::VX;
    const int lane = threadIdx.x & 31, quad = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) c[mt][n][e] *= decay;
    const uint32_t k_addr =
        smem_addr(Kb + ((lane & 7) + (lane >> 4) * 8) * C::LDQ + C::SR * sw + ((lane >> 3) & 1) * 8);
    const uint32_t v_addr = b_trans_addr<T, VX>(Vb);
#pragma unroll
    for (int j = 0; j < L / 16; ++j) {
        const float2 g01 = *reinterpret_cast<const float2*>(kg + 16 * j + 2 * quad);
        const float2 g89 = *reinterpret_cast<const float2*>(kg + 16 * j + 8 + 2 * quad);
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            ldsm_x4_trans(a[mt], k_addr + j * 16 * C::LDQ * 2 + mt * 32);
            a[mt][0] = scale2<T>(a[mt][0], g01);
            a[mt][1] = scale2<T>(a[mt][1], g01);
            a[mt][2] = scale2<T>(a[mt][2], g89);
            a[mt][3] = scale2<T>(a[mt][3], g89);
        }
#pragma unroll
        for (int jj = 0; jj < TV / 16; ++jj) {
            uint32_t b[4];
            ldsm_x4_trans(b, v_addr + j * 16 * VX * 2 + jj * 32);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma<T>(c[mt][2 * jj], a[mt], b[0], b[1]);
                mma<T>(c[mt][2 * jj + 1], a[mt], b[2], b[3]);
            }
        }
        if constexpr (NT > TV / 8) {
            uint32_t b[2];
            ldsm_x2_trans(b, v_addr + j * 16 * VX * 2 + TV * 2);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) mma<T>(c[mt][NT - 1], a[mt], b[0], b[1]);
        }
    }
}

template <typename T, int DQK, int NT>
__device__ __forceinline__ void store_state_copy(T* Cs, const float (&c)[Cfg<DQK>::MT][NT][4], int sw) {
    using C = Cfg<DQK>;
    constexpr int VX = C::VX;
    const int lane = threadIdx.x & 31, quad = lane & 3, r0 = lane >> 2;
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt) {
        const int row = C::SR * sw + 16 * mt + r0;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int col = n * 8 + 2 * quad;
            *reinterpret_cast<uint32_t*>(Cs + row * VX + col) = pack2<T>(c[mt][n][0], c[mt][n][1]);
            *reinterpret_cast<uint32_t*>(Cs + (row + 8) * VX + col) = pack2<T>(c[mt][n][2], c[mt][n][3]);
        }
    }
}

}  // namespace fused

}  // namespace hk_mlstm
