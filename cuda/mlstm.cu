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
#include <mma.h>

#include <type_traits>

#include "common.cuh"

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

template <typename T, int L>
__device__ void mlstm_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const float* __restrict__ ig, const float* __restrict__ fg, const float* __restrict__ c0,
                          const float* __restrict__ n0, const float* __restrict__ m0, T* __restrict__ h,
                          float* __restrict__ c_out, float* __restrict__ n_out, float* __restrict__ m_out,
                          const T* __restrict__ dh, float* __restrict__ stats, const MlstmParams& p) {
    constexpr bool F32 = std::is_same_v<T, float>;
    constexpr int SK = skew<T>(), NT = L / 16, PER = (L + 31) / 32, VEC = 16 / int(sizeof(T));
    const int head = blockIdx.x, v0 = blockIdx.y * p.tv;
    const int dqk = p.dqk, dqkp = p.dqk_pad, tv = p.tv;
    const int tv_valid = min(tv, int(p.dhv) - v0);
    const int ldq = dqkp + SK, ldv = tv + SK, ldcf = tv + 4, ldct = tv + SK, lds = L + 4, ldp = L + SK, ldh = tv + 4;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    Carve carve{smem_raw, 0};
    T* Qs = carve.take<T>(L * ldq);
    T* Ks = carve.take<T>(L * ldq);
    T* Vs = carve.take<T>(L * ldv);
    float* Cf = carve.take<float>(dqkp * ldcf);
    T* Ct = F32 ? reinterpret_cast<T*>(Cf) : carve.take<T>(dqkp * ldct);
    float* Sf = carve.take<float>(L * lds);
    T* Pt = F32 ? reinterpret_cast<T*>(Sf) : carve.take<T>(L * ldp);
    float* Hf = carve.take<float>(L * ldh);
    float* nv = carve.take<float>(dqkp);
    double* bvec = carve.take<double>(L);
    float* mvec = carve.take<float>(L);
    float* ivec = carve.take<float>(L);
    float* abar = carve.take<float>(L);
    float* bbar = carve.take<float>(L);
    float* invd = carve.take<float>(L);
    double* scal = carve.take<double>(2);  // [0] m carried between chunks, [1] gbar
    if (carve.used > dynamic_smem_size()) __trap();
    const int ldcT = F32 ? ldcf : ldct, ldpT = F32 ? lds : ldp;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t row0 = size_t(head) * p.len;

    // The initial state (or zeros), f32 master and the element-type copy for the products.
    for (int e = threadIdx.x; e < dqkp * tv; e += THREADS) {
        const int a = e / tv, j = e % tv;
        const float val = (p.has_init && a < dqk && j < tv_valid) ? c0[(size_t(head) * dqk + a) * p.dhv + v0 + j] : 0.f;
        Cf[a * ldcf + j] = val;
        if constexpr (!F32) Ct[a * ldct + j] = hk::from_f32<T>(val);
    }
    for (int a = threadIdx.x; a < dqkp; a += THREADS) nv[a] = (p.has_init && a < dqk) ? n0[size_t(head) * dqk + a] : 0.f;
    if (threadIdx.x == 0) scal[0] = p.has_init ? m0[head] : 0.f;
    const bool vec_qk = (dqk % VEC) == 0, vec_v = (p.dhv % VEC) == 0;

    const int chunks = (int(p.len) + L - 1) / L;
    for (int ch = 0; ch < chunks; ++ch) {
        const int t0 = ch * L;
        const int valid = min(L, int(p.len) - t0);
        __syncthreads();  // the previous chunk is done with every buffer
        load_tile(Qs, ldq, q + (row0 + t0) * dqk, dqk, L, dqkp, valid, dqk, vec_qk);
        load_tile(Ks, ldq, k + (row0 + t0) * dqk, dqk, L, dqkp, valid, dqk, vec_qk);
        load_tile(Vs, ldv, v + (row0 + t0) * p.dhv + v0, p.dhv, L, tv, valid, tv_valid, vec_v);

        if (warp == 0) {
            // Gates. m follows m[t] = max(lf[t] + m[t-1], i[t]), a max-plus recurrence: each
            // step is x -> max(x + lf, i), and steps compose as (a1, c1) then (a2, c2) =
            // (a1 + a2, max(c1 + a2, c2)). A warp scan of these pairs gives every step's b (the
            // in-chunk cumulative logsigmoid(f), the pair's a) and m = max(m_prev + a, c).
            // The scan runs in f64 and b stays f64: the gating takes differences b[t] - b[s]
            // of sums that reach thousands when forget gates are strongly negative, where f32
            // would lose the weights' leading digits. It is a few dozen f64 operations per
            // step. Steps past the sequence: no decay, i = -inf, so they change nothing.
            const double m_prev = scal[0];
            double bl[PER], cl[PER];
            float gl[PER];
            double ra = 0.0, rc = -INFINITY;
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const int pos = lane * PER + e;
                float lf = 0.f, iv = -INFINITY;
                if (pos < valid) {
                    lf = logsigmoid(fg[row0 + t0 + pos]);
                    iv = ig[row0 + t0 + pos];
                }
                ra += lf;
                rc = fmax(rc + lf, double(iv));
                bl[e] = ra;
                cl[e] = rc;
                gl[e] = iv;
            }
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
            double ml[PER];
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const double c = fmax(ec + bl[e], cl[e]);
                bl[e] += ea;
                ml[e] = fmax(m_prev + bl[e], c);
            }
            constexpr int LAST_LANE = (L - 1) / PER;
            const double bL = __shfl_sync(0xffffffffu, bl[PER - 1], LAST_LANE);
            const double mL = __shfl_sync(0xffffffffu, ml[PER - 1], LAST_LANE);
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const int pos = lane * PER + e;
                if (pos < L) {
                    bvec[pos] = bl[e];
                    mvec[pos] = float(ml[e]);
                    ivec[pos] = gl[e];
                    abar[pos] = expf(float(bL - bl[e] + gl[e] - mL));
                    bbar[pos] = expf(float(bl[e] + m_prev - ml[e]));
                }
            }
            __syncwarp();
            if (lane == 0) {
                scal[1] = expf(float(bL + m_prev - mL));
                scal[0] = mL;
            }
        }
        __syncthreads();

        // S = Q K^T on and below the diagonal tiles; Hf = Q C.
        {
            const int s_tiles = NT * (NT + 1) / 2, h_tiles = NT * (tv / 16);
            for (int job = warp; job < s_tiles + h_tiles; job += WARPS) {
                if (job < s_tiles) {
                    int r = 0;
                    while ((r + 1) * (r + 2) / 2 <= job) ++r;
                    const int c = job - r * (r + 1) / 2;
                    warp_tile<T, false, true>(Sf + r * 16 * lds + c * 16, lds, Qs + r * 16 * ldq, ldq, Ks + c * 16 * ldq,
                                              ldq, dqkp / 16, false, 0.f);
                } else {
                    const int e = job - s_tiles, r = e / (tv / 16), c = e % (tv / 16);
                    warp_tile<T, false, false>(Hf + r * 16 * ldh + c * 16, ldh, Qs + r * 16 * ldq, ldq, Ct + c * 16, ldcT,
                                               dqkp / 16, false, 0.f);
                }
            }
        }
        __syncthreads();

        // Gate the scores, the denominators, and scale the inter-chunk part of H.
        for (int t = warp; t < L; t += WARPS) {
            float qn = 0.f;
            for (int a = lane; a < dqk; a += 32) qn = fmaf(hk::to_f32(Qs[t * ldq + a]), nv[a], qn);
            qn = warp_sum(qn);
            const double bt = bvec[t];
            const float mt = mvec[t];
            float rowsum = 0.f;
            for (int s = lane; s < L; s += 32) {
                float val = 0.f;
                if (s <= t) val = Sf[t * lds + s] * p.scale * __expf(float(bt - bvec[s]) + ivec[s] - mt);
                rowsum += val;
                Pt[t * ldpT + s] = hk::from_f32<T>(val);
            }
            rowsum = warp_sum(rowsum);
            const float inter = bbar[t] * p.scale;
            const float den = inter * qn + rowsum;
            const float d = fmaxf(fabsf(den), expf(-mt)) + p.eps;
            invd[t] = 1.f / d;
            if (stats != nullptr && blockIdx.y == 0 && lane == 0 && t < valid) {
                const size_t rows = size_t(p.heads) * p.len, g = row0 + t0 + t;
                stats[g] = mt;
                stats[rows + g] = d;
                stats[2 * rows + g] = den;
            }
            for (int j = lane; j < tv; j += 32) Hf[t * ldh + j] *= inter;
            // K's row t weighted by its share in the chunk's closing state (nothing above
            // reads K any more).
            const float w = abar[t];
            for (int a = lane; a < dqkp; a += 32) Ks[t * ldq + a] = hk::from_f32<T>(hk::to_f32(Ks[t * ldq + a]) * w);
        }
        __syncthreads();

        // H += P V (tiles on and below the diagonal of P); C = gbar C + Kbar^T V; n likewise.
        {
            const float gbar = float(scal[1]);
            const int h_tiles = NT * (tv / 16), c_tiles = (dqkp / 16) * (tv / 16);
            for (int job = warp; job < h_tiles + c_tiles; job += WARPS) {
                if (job < h_tiles) {
                    const int r = job / (tv / 16), c = job % (tv / 16);
                    warp_tile<T, false, false>(Hf + r * 16 * ldh + c * 16, ldh, Pt + r * 16 * ldpT, ldpT, Vs + c * 16, ldv,
                                               r + 1, true, 1.f);
                } else {
                    const int e = job - h_tiles, r = e / (tv / 16), c = e % (tv / 16);
                    warp_tile<T, true, false>(Cf + r * 16 * ldcf + c * 16, ldcf, Ks + r * 16, ldq, Vs + c * 16, ldv, NT,
                                              true, gbar);
                }
            }
            for (int a = threadIdx.x; a < dqkp; a += THREADS) {
                float acc = gbar * nv[a];
                for (int s = 0; s < L; ++s) acc += hk::to_f32(Ks[s * ldq + a]);
                nv[a] = acc;
            }
        }
        __syncthreads();

        for (int t = warp; t < valid; t += WARPS) {
            const float r = invd[t];
            T* out = h + (row0 + t0 + t) * p.dhv + v0;
            for (int j = lane; j < tv_valid; j += 32) out[j] = hk::from_f32<T>(Hf[t * ldh + j] * r);
            if (stats != nullptr) {
                // h . dh over this block's value columns, from h before its rounding.
                const T* g = dh + (row0 + t0 + t) * p.dhv + v0;
                float part = 0.f;
                for (int j = lane; j < tv_valid; j += 32) part = fmaf(Hf[t * ldh + j] * r, hk::to_f32(g[j]), part);
                part = warp_sum(part);
                if (lane == 0) stats[(3 + blockIdx.y) * size_t(p.heads) * p.len + row0 + t0 + t] = part;
            }
        }
        if constexpr (!F32) {
            for (int a = warp; a < dqkp; a += WARPS) {
                for (int j = lane; j < tv; j += 32) Ct[a * ldct + j] = hk::from_f32<T>(Cf[a * ldcf + j]);
            }
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < dqk * tv_valid; e += THREADS) {
        const int a = e / tv_valid, j = e % tv_valid;
        c_out[(size_t(head) * dqk + a) * p.dhv + v0 + j] = Cf[a * ldcf + j];
    }
    if (blockIdx.y == 0) {
        for (int a = threadIdx.x; a < dqk; a += THREADS) n_out[size_t(head) * dqk + a] = nv[a];
        if (threadIdx.x == 0) m_out[head] = float(scal[0]);
    }
}

// ---------------------------------------------------------------------------------------
// Backward. With delta[t] = (dh[t] / d[t], dn[t]) (dn[t] the denominator's gradient) and
// v'[s] = (v[s], 1), every gradient is a chunkwise gated linear attention like the forward
// (src/ops/mlstm/cpu.rs backward_head has the sums):
//   dq[t] = scale * sum_{s<=t} w(t,s) (delta[t] . v'[s]) k[s]      + the initial state's part
//   dk[s] = scale * sum_{t>=s} w(t,s) (v'[s] . delta[t]) q[t]      + the final state's part
//   dv[s] = scale * sum_{t>=s} w(t,s) (k[s] . q[t]) dh[t] / d[t]   + the final state's part
// with w(t,s) = exp(i[s] + b[t] - b[s] - m[t]). The operands hold d[t] * delta[t] =
// (dh[t], d[t] dn[t]), never dh / d, which overflows f16 where d is tiny; 1 / d[t] goes
// into the gating. dq runs forwards with the forward's gates, its row t weighted by 1 / d[t].
// dk and dv run backwards in time: step t's key gate is -m[t] - log d[t], the decay between
// pass rows u-1 and u is logsigmoid(f) of the later original step, the output row s is
// weighted by exp(i[s] + the pass's own max state) and the pass starts from the final
// state's gradient at -m_final. All three are `mlstm_pass`: out = X State + causal(X Y^T
// gated) Z, State = sum gated Y^T Z (for bf16 / f16 and head dims up to 256 the host runs
// `mlstm_pass_fused` instead, below, after the fused forward).

// Mirrors PassParams in src/ops/mlstm/cuda.rs.
struct PassParams {
    uint32_t heads;
    uint32_t len;
    uint32_t dx;      // columns of X and Y in memory
    uint32_t dx_pad;  // dx plus the extra column if any, rounded up to 16
    uint32_t dz;      // columns of Z and of the output in memory
    uint32_t tz;      // Z columns per block, a multiple of 16
    uint32_t reverse;
    uint32_t x_extra;  // column dx of X: 0 none, 1 extra[g], 2 ones
    uint32_t y_extra;  // the same for Y (and then state row dx)
    uint32_t has_init;
    uint32_t init_transposed;  // state[j][a] = init_c[a * dx + j] (row dx: init_n[a]), else
                               // state[a][j] = init_c[a * dz + j]
    float init_m_default;      // the max state before the first step without init_m
    float out_scale;           // outputs and the final state are multiplied by it
    float init_scale;          // the initial state is multiplied by it when loaded
};

// The loads of a pass's operand rows: pass row u of the chunk at t0 is memory row
// g = t0 + u forwards, len - 1 - t0 - u backwards.
__device__ __forceinline__ size_t pass_row(const PassParams& p, size_t head, int u) {
    return head * p.len + (p.reverse ? int(p.len) - 1 - u : u);
}

template <typename T>
__device__ __forceinline__ void load_pass_tile(T* dst, int ld, const T* __restrict__ src, int stride, int rows, int pad,
                                               int valid_rows, int valid_cols, int col0, bool vec_ok,
                                               const PassParams& p, size_t head, int t0) {
    constexpr int VEC = 16 / int(sizeof(T));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int r = warp; r < rows; r += WARPS) {
        const T* row = r < valid_rows ? src + pass_row(p, head, t0 + r) * size_t(stride) + col0 : nullptr;
        if (vec_ok) {
            for (int c = lane * VEC; c < pad; c += 32 * VEC) {
                uint4 val = make_uint4(0, 0, 0, 0);
                if (row != nullptr && c < valid_cols) val = *reinterpret_cast<const uint4*>(row + c);
                *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
            }
        } else {
            for (int c = lane; c < pad; c += 32) {
                dst[r * ld + c] = (row != nullptr && c < valid_cols) ? row[c] : hk::from_f32<T>(0.f);
            }
        }
    }
}

// After a tile's load: the extra column.
template <typename T>
__device__ __forceinline__ void set_extra_column(T* tile, int ld, uint32_t extra, int extra_col,
                                                 const float* __restrict__ extra_vals, int valid_rows,
                                                 const PassParams& p, size_t head, int t0) {
    if (extra == 0) return;
    for (int r = threadIdx.x; r < valid_rows; r += THREADS) {
        tile[r * ld + extra_col] = hk::from_f32<T>(extra == 1 ? extra_vals[pass_row(p, head, t0 + r)] : 1.f);
    }
}

template <typename T, int L>
__device__ void mlstm_pass(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ z,
                           const float* __restrict__ ig, const float* __restrict__ fg, const float* __restrict__ m_fwd,
                           const float* __restrict__ d_fwd, const float* __restrict__ extra_vals,
                           const float* __restrict__ init_c, const float* __restrict__ init_n,
                           const float* __restrict__ init_m, T* __restrict__ out, float* __restrict__ final_c,
                           float* __restrict__ final_n, const float* __restrict__ final_log, const PassParams& p) {
    constexpr bool F32 = std::is_same_v<T, float>;
    constexpr int SK = skew<T>(), NT = L / 16, PER = (L + 31) / 32, VEC = 16 / int(sizeof(T));
    const size_t head = blockIdx.x;
    const int z0 = blockIdx.y * p.tz;
    const int dx = p.dx, dxp = p.dx_pad, tz = p.tz;
    const int tz_valid = min(tz, int(p.dz) - z0);
    const int ldx = dxp + SK, ldz = tz + SK, ldcf = tz + 4, ldct = tz + SK, lds = L + 4, ldp = L + SK, ldo = tz + 4;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    Carve carve{smem_raw, 0};
    T* Xs = carve.take<T>(L * ldx);
    T* Ys = carve.take<T>(L * ldx);
    T* Zs = carve.take<T>(L * ldz);
    float* Cf = carve.take<float>(dxp * ldcf);
    T* Ct = F32 ? reinterpret_cast<T*>(Cf) : carve.take<T>(dxp * ldct);
    float* Sf = carve.take<float>(L * lds);
    T* Pt = F32 ? reinterpret_cast<T*>(Sf) : carve.take<T>(L * ldp);
    float* Of = carve.take<float>(L * ldo);
    double* bvec = carve.take<double>(L);
    float* mvec = carve.take<float>(L);
    float* kvec = carve.take<float>(L);
    float* abar = carve.take<float>(L);
    float* bbar = carve.take<float>(L);
    float* outw = carve.take<float>(L);
    double* scal = carve.take<double>(2);  // [0] the max state carried between chunks, [1] gbar
    if (carve.used > dynamic_smem_size()) __trap();
    const int ldcT = F32 ? ldcf : ldct, ldpT = F32 ? lds : ldp;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    for (int e = threadIdx.x; e < dxp * tz; e += THREADS) {
        const int r = e / tz, j = e % tz;
        float val = 0.f;
        if (p.has_init && j < tz_valid) {
            if (p.init_transposed) {
                const size_t a = head * p.dz + z0 + j;
                if (r < dx) val = init_c[a * dx + r];
                else if (r == dx && p.y_extra != 0) val = init_n[a];
            } else if (r < dx) {
                val = init_c[(head * dx + r) * p.dz + z0 + j];
            }
        }
        val *= p.init_scale;
        Cf[r * ldcf + j] = val;
        if constexpr (!F32) Ct[r * ldct + j] = hk::from_f32<T>(val);
    }
    if (threadIdx.x == 0) scal[0] = init_m != nullptr ? double(init_m[head]) : double(p.init_m_default);
    const bool vec_x = (dx % VEC) == 0, vec_z = (p.dz % VEC) == 0 && (z0 % VEC) == 0;

    const int chunks = (int(p.len) + L - 1) / L;
    for (int ch = 0; ch < chunks; ++ch) {
        const int t0 = ch * L;
        const int valid = min(L, int(p.len) - t0);
        __syncthreads();  // the previous chunk is done with every buffer
        load_pass_tile(Xs, ldx, x, dx, L, dxp, valid, dx, 0, vec_x, p, head, t0);
        load_pass_tile(Ys, ldx, y, dx, L, dxp, valid, dx, 0, vec_x, p, head, t0);
        load_pass_tile(Zs, ldz, z, int(p.dz), L, tz, valid, tz_valid, z0, vec_z, p, head, t0);
        __syncthreads();
        set_extra_column(Xs, ldx, p.x_extra, dx, extra_vals, valid, p, head, t0);
        set_extra_column(Ys, ldx, p.y_extra, dx, extra_vals, valid, p, head, t0);

        if (warp == 0) {
            // The forward's max-plus scan (see mlstm_fwd) over this pass's gates.
            const double m_prev = scal[0];
            double bl[PER], cl[PER];
            float gl[PER];
            double ra = 0.0, rc = -INFINITY;
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const int pos = lane * PER + e;
                float lf = 0.f, kg = -INFINITY;
                if (pos < valid) {
                    const size_t g = pass_row(p, head, t0 + pos);
                    if (p.reverse) {
                        lf = (t0 + pos > 0) ? logsigmoid(fg[g + 1]) : 0.f;
                        kg = -m_fwd[g] - logf(d_fwd[g]);
                    } else {
                        lf = logsigmoid(fg[g]);
                        kg = ig[g];
                    }
                }
                ra += lf;
                rc = fmax(rc + lf, double(kg));
                bl[e] = ra;
                cl[e] = rc;
                gl[e] = kg;
            }
            double ta = ra, tc = rc;
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
            double ml[PER];
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const double c = fmax(ec + bl[e], cl[e]);
                bl[e] += ea;
                ml[e] = fmax(m_prev + bl[e], c);
            }
            constexpr int LAST_LANE = (L - 1) / PER;
            const double bL = __shfl_sync(0xffffffffu, bl[PER - 1], LAST_LANE);
            const double mL = __shfl_sync(0xffffffffu, ml[PER - 1], LAST_LANE);
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const int pos = lane * PER + e;
                if (pos < L) {
                    bvec[pos] = bl[e];
                    mvec[pos] = float(ml[e]);
                    kvec[pos] = gl[e];
                    abar[pos] = expf(float(bL - bl[e] + gl[e] - mL));
                    bbar[pos] = expf(float(bl[e] + m_prev - ml[e]));
                    float w = p.out_scale;
                    if (pos < valid) {
                        const size_t g = pass_row(p, head, t0 + pos);
                        w = p.reverse ? w * expf(float(double(ig[g]) + ml[e])) : w / d_fwd[g];
                    }
                    outw[pos] = w;
                }
            }
            __syncwarp();
            if (lane == 0) {
                scal[1] = exp(bL + m_prev - mL);
                scal[0] = mL;
            }
        }
        __syncthreads();

        // S = X Y^T on and below the diagonal tiles; O = X State.
        {
            const int s_tiles = NT * (NT + 1) / 2, o_tiles = NT * (tz / 16);
            for (int job = warp; job < s_tiles + o_tiles; job += WARPS) {
                if (job < s_tiles) {
                    int r = 0;
                    while ((r + 1) * (r + 2) / 2 <= job) ++r;
                    const int c = job - r * (r + 1) / 2;
                    warp_tile<T, false, true>(Sf + r * 16 * lds + c * 16, lds, Xs + r * 16 * ldx, ldx, Ys + c * 16 * ldx,
                                              ldx, dxp / 16, false, 0.f);
                } else {
                    const int e = job - s_tiles, r = e / (tz / 16), c = e % (tz / 16);
                    warp_tile<T, false, false>(Of + r * 16 * ldo + c * 16, ldo, Xs + r * 16 * ldx, ldx, Ct + c * 16, ldcT,
                                               dxp / 16, false, 0.f);
                }
            }
        }
        __syncthreads();

        // Gate the scores, scale the carried part of O, weight Y's rows for the state.
        for (int t = warp; t < L; t += WARPS) {
            const double bt = bvec[t];
            const float mt = mvec[t];
            for (int s = lane; s < L; s += 32) {
                float val = 0.f;
                if (s <= t) val = Sf[t * lds + s] * __expf(float(bt - bvec[s]) + kvec[s] - mt);
                Pt[t * ldpT + s] = hk::from_f32<T>(val);
            }
            const float inter = bbar[t];
            for (int j = lane; j < tz; j += 32) Of[t * ldo + j] *= inter;
            const float w = abar[t];
            for (int a = lane; a < dxp; a += 32) Ys[t * ldx + a] = hk::from_f32<T>(hk::to_f32(Ys[t * ldx + a]) * w);
        }
        __syncthreads();

        // O += P Z; State = gbar State + Ybar^T Z.
        {
            const float gbar = float(scal[1]);
            const int o_tiles = NT * (tz / 16), c_tiles = (dxp / 16) * (tz / 16);
            for (int job = warp; job < o_tiles + c_tiles; job += WARPS) {
                if (job < o_tiles) {
                    const int r = job / (tz / 16), c = job % (tz / 16);
                    warp_tile<T, false, false>(Of + r * 16 * ldo + c * 16, ldo, Pt + r * 16 * ldpT, ldpT, Zs + c * 16, ldz,
                                               r + 1, true, 1.f);
                } else {
                    const int e = job - o_tiles, r = e / (tz / 16), c = e % (tz / 16);
                    warp_tile<T, true, false>(Cf + r * 16 * ldcf + c * 16, ldcf, Ys + r * 16, ldx, Zs + c * 16, ldz, NT,
                                              true, gbar);
                }
            }
        }
        __syncthreads();

        for (int t = warp; t < valid; t += WARPS) {
            const float w = outw[t];
            T* o = out + pass_row(p, head, t0 + t) * p.dz + z0;
            for (int j = lane; j < tz_valid; j += 32) o[j] = hk::from_f32<T>(Of[t * ldo + j] * w);
        }
        if constexpr (!F32) {
            for (int a = warp; a < dxp; a += WARPS) {
                for (int j = lane; j < tz; j += 32) Ct[a * ldct + j] = hk::from_f32<T>(Cf[a * ldcf + j]);
            }
        }
    }
    __syncthreads();
    if (final_c != nullptr && p.init_transposed) {
        const float w = p.out_scale * float(exp(double(final_log[head]) + scal[0]));
        for (int e = threadIdx.x; e < tz_valid * dx; e += THREADS) {
            const int j = e / dx, r = e % dx;
            final_c[(head * p.dz + z0 + j) * dx + r] = Cf[r * ldcf + j] * w;
        }
        if (p.y_extra != 0) {
            for (int j = threadIdx.x; j < tz_valid; j += THREADS) final_n[head * p.dz + z0 + j] = Cf[dx * ldcf + j] * w;
        }
    }
}

// The warp-per-row dot product kernels (mlstm_bwd_prep_h, mlstm_bwd_dots) move two
// (rows, dim) tensors and little else, so they run at the copy rate only with 16-byte loads
// and several rows per warp: `lanes` lanes (a power of two, at most 32) share a row and
// each warp takes 32 / lanes consecutive rows. Mirrors RowDotShape in cuda.rs, which picks
// them.
struct RowDotShape {
    uint32_t lanes;
    uint32_t vec;  // rows are whole 16-byte vectors (dim * sizeof(T) % 16 == 0)
};

template <typename T>
__device__ __forceinline__ float dot16(uint4 a, uint4 b) {
    constexpr int N = 16 / int(sizeof(T));
    const T* x = reinterpret_cast<const T*>(&a);
    const T* y = reinterpret_cast<const T*>(&b);
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < N; ++e) acc = fmaf(hk::to_f32(x[e]), hk::to_f32(y[e]), acc);
    return acc;
}

// The row this lane works on (all lanes of the warp return, valid or not, for the
// shuffles), and a[row] . b[row] on every lane of the row's group.
template <typename T>
__device__ __forceinline__ float row_dot(const T* __restrict__ a, const T* __restrict__ b, size_t rows, uint32_t dim,
                                         const RowDotShape& s, size_t& row) {
    const int lanes = int(s.lanes), lane = threadIdx.x & 31, sub = lane & (lanes - 1);
    const size_t warp = size_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
    row = warp * size_t(32 / lanes) + size_t(lane / lanes);
    float acc = 0.f;
    if (row < rows) {
        const T* ar = a + row * dim;
        const T* br = b + row * dim;
        if (s.vec) {
            const uint4* av = reinterpret_cast<const uint4*>(ar);
            const uint4* bv = reinterpret_cast<const uint4*>(br);
            const uint32_t nv = dim / uint32_t(16 / sizeof(T));
            for (uint32_t j = sub; j < nv; j += lanes) acc += dot16<T>(av[j], bv[j]);
        } else {
            for (uint32_t j = sub; j < dim; j += lanes) acc = fmaf(hk::to_f32(ar[j]), hk::to_f32(br[j]), acc);
        }
    }
    for (int off = lanes / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    return acc;
}

// Per step of the backward, from the forward's stats (m, d, den, h . dh per value tile):
// aux[0] = d dn (dn the denominator's gradient), aux[1] = r = q~ . dq~ (what the
// gate gradient needs from dq), aux[2] = the gradient into m[t] through the denominator's
// exp(-m) side. Per head: head_aux[0] = -m_final (where the reverse passes start),
// head_aux[1] = m0 + logsigmoid(f[0]) (the log weight of the initial state's gradient).
struct PrepParams {
    uint32_t heads;
    uint32_t len;
    uint32_t value_tiles;  // stats rows of h . dh (mlstm_bwd_prep)
    uint32_t exact;
    uint32_t dhv;          // h and dh row length (mlstm_bwd_prep_h)
    RowDotShape dots;      // mlstm_bwd_prep_h
};

constexpr int PREP_THREADS = 256;

// Step g's aux and head_aux entries from its m, d, den and h . dh.
__device__ __forceinline__ void prep_step(size_t g, float m, float d, float den, float hdh,
                                          const float* __restrict__ fg, const float* __restrict__ m0,
                                          float* __restrict__ aux, float* __restrict__ head_aux, const PrepParams& p) {
    const size_t rows = size_t(p.heads) * p.len;
    float dn = 0.f, dm = 0.f;
    if (p.exact) {
        const float dd = -hdh / d, floor_m = expf(-m);
        if (fabsf(den) >= floor_m) dn = den >= 0.f ? dd : -dd;
        else dm = -floor_m * dd;
    }
    aux[g] = d * dn;
    aux[rows + g] = hdh + den * dn;
    aux[2 * rows + g] = dm;
    const size_t head = g / p.len, t = g % p.len;
    if (t + 1 == p.len) head_aux[head] = -m;
    if (t == 0) head_aux[p.heads + head] = (m0 != nullptr ? m0[head] : 0.f) + logsigmoid(fg[g]);
}

// One thread per step, h . dh summed from the chunked forward's per-value-tile stats rows.
__device__ void mlstm_bwd_prep(const float* __restrict__ stats, const float* __restrict__ fg,
                               const float* __restrict__ m0, float* __restrict__ aux, float* __restrict__ head_aux,
                               const PrepParams& p) {
    const size_t rows = size_t(p.heads) * p.len;
    const size_t g = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (g >= rows) return;
    float hdh = 0.f;
    for (uint32_t v = 0; v < p.value_tiles; ++v) hdh += stats[(3 + v) * rows + g];
    prep_step(g, stats[g], stats[rows + g], stats[2 * rows + g], hdh, fg, m0, aux, head_aux, p);
}

// h . dh from the recomputed h (rounded to T) and dh, lanes per step as RowDotShape says:
// the fused forward records only m, d and den, as a dot product over dh's columns on its
// output warps cost more than the whole forward's time again (dh's loads on the critical
// path).
template <typename T>
__device__ void mlstm_bwd_prep_h(const float* __restrict__ stats, const T* __restrict__ h, const T* __restrict__ dh,
                                 const float* __restrict__ fg, const float* __restrict__ m0, float* __restrict__ aux,
                                 float* __restrict__ head_aux, const PrepParams& p) {
    const size_t rows = size_t(p.heads) * p.len;
    size_t g;
    const float hdh = row_dot<T>(h, dh, rows, p.dhv, p.dots, g);
    if (g < rows && (threadIdx.x & (p.dots.lanes - 1)) == 0)
        prep_step(g, stats[g], stats[rows + g], stats[2 * rows + g], hdh, fg, m0, aux, head_aux, p);
}

// c[t] = k[t] . dk[t], lanes per step as RowDotShape says (all heads at once; the per-head
// gate kernel below is sequential in time): di = c, db = r - c (in df until the gate
// kernel's scan), and r's share of the gradient into m.
struct DotParams {
    uint32_t rows;  // heads * len
    uint32_t dqk;
    RowDotShape dots;
};

template <typename T>
__device__ void mlstm_bwd_dots(const T* __restrict__ k, const T* __restrict__ dk, float* __restrict__ aux,
                               float* __restrict__ di, float* __restrict__ df, const DotParams& p) {
    const size_t rows = p.rows;
    size_t g;
    const float c = row_dot<T>(k, dk, rows, p.dqk, p.dots, g);
    if (g < rows && (threadIdx.x & (p.dots.lanes - 1)) == 0) {
        const float r = aux[rows + g];
        di[g] = c;
        df[g] = r - c;
        aux[2 * rows + g] -= r;
    }
}

// Gate gradients, one block per head, after mlstm_bwd_dots (di = c, df = db = r - c): dlf is
// db's reverse cumulative sum (plus <dfinal, final> at the last step), and
// in Exact mode the gradient into m[t] follows the branch the max took, back to m0. The
// reverse scans run per thread over a contiguous segment, joined by one thread.
struct GateParams {
    uint32_t heads;
    uint32_t len;
    uint32_t dqk;
    uint32_t dhv;
    uint32_t exact;
};

constexpr int GATE_THREADS = 256;

__device__ void mlstm_bwd_gates(const float* __restrict__ ig,
                                const float* __restrict__ fg, const float* __restrict__ stats,
                                float* __restrict__ aux, const float* __restrict__ c_fin,
                                const float* __restrict__ n_fin, const float* __restrict__ dc_fin,
                                const float* __restrict__ dn_fin, const float* __restrict__ dm_fin,
                                const float* __restrict__ c0, const float* __restrict__ n0,
                                const float* __restrict__ dc0, const float* __restrict__ dn0,
                                float* __restrict__ di, float* __restrict__ df, float* __restrict__ dm0,
                                const GateParams& p) {
    __shared__ float red[GATE_THREADS / 32][2];
    __shared__ float seg_sum[GATE_THREADS], seg_a[GATE_THREADS], seg_b[GATE_THREADS];
    __shared__ float in_sum[GATE_THREADS], in_carry[GATE_THREADS];
    __shared__ float carry0;
    const size_t head = blockIdx.x, rows = size_t(p.heads) * p.len, row0 = head * p.len;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int len = int(p.len), dqk = int(p.dqk);
    float* dmd = aux + 2 * rows;

    // <dfinal, final> and <dinitial, initial> (the initial state's weight's share of dm0).
    float fin = 0.f, ini = 0.f;
    const size_t cs = size_t(p.dqk) * p.dhv;
    if (dc_fin != nullptr) {
        for (size_t e = threadIdx.x; e < cs; e += GATE_THREADS) fin = fmaf(dc_fin[head * cs + e], c_fin[head * cs + e], fin);
        for (int a = threadIdx.x; a < dqk; a += GATE_THREADS) fin = fmaf(dn_fin[head * dqk + a], n_fin[head * dqk + a], fin);
    }
    if (dc0 != nullptr) {
        for (size_t e = threadIdx.x; e < cs; e += GATE_THREADS) ini = fmaf(dc0[head * cs + e], c0[head * cs + e], ini);
        for (int a = threadIdx.x; a < dqk; a += GATE_THREADS) ini = fmaf(dn0[head * dqk + a], n0[head * dqk + a], ini);
    }
    fin = warp_sum(fin);
    ini = warp_sum(ini);
    if (lane == 0) {
        red[warp][0] = fin;
        red[warp][1] = ini;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        fin = 0.f;
        ini = 0.f;
        for (int w = 0; w < GATE_THREADS / 32; ++w) {
            fin += red[w][0];
            ini += red[w][1];
        }
        red[0][1] = ini;
        if (len > 0) {
            df[row0 + len - 1] += fin;
            dmd[row0 + len - 1] -= fin;
            if (p.exact && dm_fin != nullptr) dmd[row0 + len - 1] += dm_fin[head];
        }
    }
    __syncthreads();

    // carry (the gradient into m[t-1] from m[t] onwards) = a (dmd + carry) with a = 1 where
    // m[t] = lf[t] + m[t-1] and 0 where m[t] = i[t]: per segment an affine map.
    const int seg = (len + GATE_THREADS - 1) / GATE_THREADS;
    const int lo = min(len, int(threadIdx.x) * seg), hi = min(len, lo + seg);
    float sum = 0.f, ma = 1.f, mb = 0.f;
    for (int t = hi - 1; t >= lo; --t) {
        const size_t g = row0 + t;
        sum += df[g];
        const float a = (p.exact && stats[g] != ig[g]) ? 1.f : 0.f;
        ma = a * ma;
        mb = a * (mb + dmd[g]);
    }
    seg_sum[threadIdx.x] = sum;
    seg_a[threadIdx.x] = ma;
    seg_b[threadIdx.x] = mb;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f, c = 0.f;
        for (int i = GATE_THREADS - 1; i >= 0; --i) {
            in_sum[i] = s;
            in_carry[i] = c;
            s += seg_sum[i];
            c = seg_a[i] * c + seg_b[i];
        }
        carry0 = c;
    }
    __syncthreads();
    float acc = in_sum[threadIdx.x], carry = in_carry[threadIdx.x];
    for (int t = hi - 1; t >= lo; --t) {
        const size_t g = row0 + t;
        acc += df[g];
        float dlf = acc;
        if (p.exact) {
            const float tot = dmd[g] + carry;
            if (stats[g] != ig[g]) {
                dlf += tot;
                carry = tot;
            } else {
                di[g] += tot;
                carry = 0.f;
            }
        }
        const float x = fg[g];
        df[g] = dlf / (1.f + expf(x));  // * sigmoid(-f)
    }
    if (threadIdx.x == 0 && dm0 != nullptr) dm0[head] = red[0][1] + (p.exact ? carry0 : 0.f);
}

// Mirrors StepParams in src/ops/mlstm/cuda.rs.
struct StepParams {
    uint32_t heads;
    uint32_t dqk;
    uint32_t dhv;
    float eps;
    float scale;
};

constexpr int STEP_THREADS = 128;

// One decoding step of one head per block: each thread owns value columns and walks the rows
// of C (coalesced across the block), updating them in place.
template <typename T>
__device__ void mlstm_step(float* __restrict__ c, float* __restrict__ n, float* __restrict__ m,
                           const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const float* __restrict__ ig, const float* __restrict__ fg, T* __restrict__ h,
                           const StepParams& p) {
    extern __shared__ __align__(16) float step_smem[];
    float* qs = step_smem;       // q / sqrt(dqk)
    float* ks = qs + p.dqk;      // k
    float* red = ks + p.dqk;     // STEP_THREADS / 32 partial sums
    const size_t head = blockIdx.x;
    const float lf = logsigmoid(fg[head]);
    const float m_old = m[head];
    const float m_new = fmaxf(lf + m_old, ig[head]);
    const float fa = expf(lf + m_old - m_new), ia = expf(ig[head] - m_new);
    float part = 0.f;
    for (int a = threadIdx.x; a < int(p.dqk); a += STEP_THREADS) {
        const float qa = hk::to_f32(q[head * p.dqk + a]) * p.scale, ka = hk::to_f32(k[head * p.dqk + a]);
        qs[a] = qa;
        ks[a] = ka;
        const float nn = fmaf(fa, n[head * p.dqk + a], ia * ka);
        n[head * p.dqk + a] = nn;
        part = fmaf(qa, nn, part);
    }
    part = warp_sum(part);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = part;
    __syncthreads();  // qs, ks, red ready; every thread has read m[head]
    float den = 0.f;
#pragma unroll
    for (int w = 0; w < STEP_THREADS / 32; ++w) den += red[w];
    const float inv_d = 1.f / (fmaxf(fabsf(den), expf(-m_new)) + p.eps);
    if (threadIdx.x == 0) m[head] = m_new;
    float* ch = c + head * p.dqk * p.dhv;
    for (int j = threadIdx.x; j < int(p.dhv); j += STEP_THREADS) {
        const float ivj = ia * hk::to_f32(v[head * p.dhv + j]);
        float acc = 0.f;
#pragma unroll 4
        for (int a = 0; a < int(p.dqk); ++a) {
            const float cc = fmaf(fa, ch[size_t(a) * p.dhv + j], ks[a] * ivj);
            ch[size_t(a) * p.dhv + j] = cc;
            acc = fmaf(qs[a], cc, acc);
        }
        h[head * p.dhv + j] = hk::from_f32<T>(acc * inv_d);
    }
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

template <typename T, int DQK, bool STATS>
__device__ void mlstm_fwd_fused(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const float* __restrict__ ig, const float* __restrict__ fg,
                                const float* __restrict__ c0, const float* __restrict__ n0,
                                const float* __restrict__ m0, T* __restrict__ h, float* __restrict__ c_out,
                                float* __restrict__ n_out, float* __restrict__ m_out, float* __restrict__ stats,
                                const FusedParams& p) {
    using namespace fused;
    using C = Cfg<DQK>;
    constexpr int VX = C::VX, MT = C::MT, NT = C::NT, SR = C::SR;
    const int v_tiles = (int(p.dhv) + TV - 1) / TV;
    const int head = blockIdx.x / v_tiles, vt = blockIdx.x % v_tiles, v0 = vt * TV;
    const int tv_valid = min(TV, int(p.dhv) - v0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, quad = lane & 3, r0 = lane >> 2;
    const int dqk = int(p.dqk), len = int(p.len);
    const size_t row0 = size_t(head) * p.len;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    if (C::SMEM > dynamic_smem_size()) __trap();
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qs + 2 * C::QK_TILE;
    T* Vs = Ks + 2 * C::QK_TILE;
    T* Cs = Vs + 2 * C::V_TILE;
    GateTile* gates = reinterpret_cast<GateTile*>(Cs + C::C_TILE);

    // V's columns 64..71 in both buffers: ones (row sums, n's update), then zeros. The copies
    // below write only columns 0..63.
    for (int e = threadIdx.x; e < 2 * L * 8; e += C::THREADS) {
        const int r = e >> 3, c = e & 7;
        Vs[r * VX + TV + c] = hk::from_f32<T>(c == 0 ? 1.f : 0.f);
    }
    // The state warps copy the tiles: the output warps are the chunk's critical path.
    const bool vec = p.vec_in != 0;
    constexpr int LOADERS = 32 * C::STATE_WARPS;
    const int loader = int(threadIdx.x) - 32 * OUT_WARPS;
    auto load_chunk = [&](int ch, int buf) {
        const int t0 = ch * L, rows = min(L, len - t0);
        load_rows<T, DQK, C::LDQ, LOADERS>(Qs + buf * C::QK_TILE, q + (row0 + t0) * dqk, size_t(dqk), rows, dqk, vec,
                                           loader);
        load_rows<T, DQK, C::LDQ, LOADERS>(Ks + buf * C::QK_TILE, k + (row0 + t0) * dqk, size_t(dqk), rows, dqk, vec,
                                           loader);
        load_rows<T, TV, VX, LOADERS>(Vs + buf * C::V_TILE, v + (row0 + t0) * p.dhv + v0, size_t(p.dhv), rows,
                                      tv_valid, vec, loader);
        cp_async_commit();
    };
    // The scanning warp (Cfg::SCAN_WARP, on the role with time to spare before barrier 1)
    // scans chunk ch + 1's gates while chunk ch is processed, into GateTile (ch + 1) & 1. It
    // fetches a chunk's f and i a chunk before it scans them, and touches them only then, so
    // that nothing waits for those loads (the last step's in place of steps past the end).
    const bool scanner = warp == C::SCAN_WARP;
    const double log_scale = log(double(p.scale));
    const int chunks = (len + L - 1) / L;
    float fv[2], iv[2];
    double m_prev = p.has_init ? double(m0[head]) : 0.0;
    auto fetch_gates = [&](int ch) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int t = min(ch * L + 2 * lane + e, len - 1);
            fv[e] = fg[row0 + t];
            iv[e] = ig[row0 + t];
        }
    };
    auto scan_chunk = [&](int ch) {
        // Past the end: no decay and i = -inf, which change nothing.
        const int t = ch * L + 2 * lane;
        const ChunkGates g = scan_gates(t < len ? logsigmoid(fv[0]) : 0.f, t + 1 < len ? logsigmoid(fv[1]) : 0.f,
                                        t < len ? iv[0] : -INFINITY, t + 1 < len ? iv[1] : -INFINITY, m_prev);
        if (ch + 1 < chunks) fetch_gates(ch + 1);
        GateTile& gt = gates[ch & 1];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int s = 2 * lane + e;
            gt.u[s] = float((g.u[e] + log_scale) * LOG2E);
            gt.w[s] = float(g.w[e] * LOG2E);
            gt.m[s] = float(g.b[e] + g.w[e]);
            gt.carried[s] = __expf(float(m_prev - g.w[e])) * p.scale;
            gt.key[s] = __expf(float(g.u[e] - g.w_last));
        }
        if (lane == 0) gt.decay = __expf(float(m_prev - g.w_last));
        m_prev = g.b_last + g.w_last;
    };
    if (scanner && chunks > 0) {
        fetch_gates(0);
        scan_chunk(0);
    }
    if (warp >= OUT_WARPS) load_chunk(0, 0);
    // Every chunk: the barrier after which its tiles, its gates and the carried state's copy
    // are in place, then (state warps) the next chunk's copies. The two roles run separate
    // loops so that neither holds the other's registers; both pass the same barriers.

    if (warp >= OUT_WARPS) {
        const int sw = warp - OUT_WARPS;
        float cst[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = SR * sw + 16 * mt + r0 + (e >> 1) * 8, col = n * 8 + 2 * quad + (e & 1);
                    float x = 0.f;
                    if (p.has_init && row < dqk) {
                        if (col < tv_valid) x = c0[(size_t(head) * dqk + row) * p.dhv + v0 + col];
                        else if (col == TV) x = n0[size_t(head) * dqk + row];
                    }
                    cst[mt][n][e] = x;
                }
        store_state_copy<T, DQK, NT>(Cs, cst, sw);
        for (int ch = 0; ch < chunks; ++ch) {
            cp_async_wait_all();
            block_sync();
            if (ch + 1 < chunks) load_chunk(ch + 1, (ch + 1) & 1);
            // Never taken where an output warp scans; left as a runtime test rather than an
            // `if constexpr`, which made ptxas spill more in the k128 passes (456 / 449 /
            // 397 us against 404 / 404 / 370 on the H100, before the tile-copy change).
            if (scanner && ch + 1 < chunks) scan_chunk(ch + 1);
            const int buf = ch & 1;
            const GateTile& gt = gates[buf];
            update_state<T, DQK, NT>(cst, Ks + buf * C::QK_TILE, Vs + buf * C::V_TILE, gt.key, gt.decay, sw);
            state_copy_wait<C::THREADS>();
            store_state_copy<T, DQK, NT>(Cs, cst, sw);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = SR * sw + 16 * mt + r0 + (e >> 1) * 8, col = n * 8 + 2 * quad + (e & 1);
                    if (row < dqk) {
                        if (col < tv_valid) c_out[(size_t(head) * dqk + row) * p.dhv + v0 + col] = cst[mt][n][e];
                        else if (col == TV && vt == 0) n_out[size_t(head) * dqk + row] = cst[mt][n][e];
                    }
                }
        if (scanner && vt == 0 && lane == 0) m_out[head] = float(m_prev);
    } else {
        for (int ch = 0; ch < chunks; ++ch) {
            block_sync();
            if constexpr (C::OUTPUT_WARP_SCANS) {
                if (scanner && ch + 1 < chunks) scan_chunk(ch + 1);
            }
            const int buf = ch & 1;
            const size_t first = row0 + size_t(ch) * L;
            const StatsOut so{stats, size_t(p.heads) * p.len, first, vt};
            output_rows<T, DQK, STATS>(Qs + buf * C::QK_TILE, Ks + buf * C::QK_TILE, Vs + buf * C::V_TILE, Cs,
                                       gates[buf], warp, h + first * p.dhv + v0, min(L, len - ch * L), tv_valid, p,
                                       so);
        }
        if constexpr (C::OUTPUT_WARP_SCANS) {
            if (scanner && vt == 0 && lane == 0) m_out[head] = float(m_prev);
        }
    }
}


// ---------------------------------------------------------------------------------------
// The backward's passes for bf16 / f16 on the fused forward's structure: per chunk of 64
// steps out = X State_prev + causal(X Y^T gated) Z, then State = decay State + (Y gated)^T Z,
// with mlstm_pass's operands, gates and row weights, but output warps and state warps in the
// fused forward's roles and the state in registers. One block per (TV columns of Z, head). X
// and Y are DX wide (zero-padded to the class), Z and the state have no extra column. An
// operand's extra column (x_extra / y_extra: d dn or ones) is not staged: its rank-one share
// xe[t] ye[s] is added to the scores in registers, and the state's extra row
// E = sum gated ye[s] Z[s] (n's role) is carried by the state warps in f32, a few columns per
// warp, and added to the output warps' X State_prev as xe[t] E_prev.

// Mirrors FusedPassParams in src/ops/mlstm/cuda.rs.
struct FusedPassParams {
    uint32_t heads;
    uint32_t len;
    uint32_t dx;  // columns of X and Y (up to the class)
    uint32_t dz;  // columns of Z and of the output
    uint32_t reverse;
    uint32_t x_extra;  // as PassParams
    uint32_t y_extra;
    uint32_t has_init;
    uint32_t init_transposed;  // as PassParams
    uint32_t vec_in;           // x, y, z rows start 16-byte aligned (dx and dz multiples of 8)
    uint32_t vec_out;          // out rows likewise (dz a multiple of 8)
    float init_m_default;
    float out_scale;
    float init_scale;
};

namespace fused {

// A pass chunk's gates (as GateTile, without the score scale): u and w in base 2, the carried
// part's weight exp(m_prev - w), the closing state's key gates exp(u - w_last), the extra
// column's values of X (xe) and Y (ye), each row's output weight, the decay, and the max state
// after the chunk (the final state's weight needs it in f64, as mlstm_pass).
struct PassGateTile {
    float u[L], w[L], carried[L], key[L], xe[L], ye[L], outw[L];
    double m_end;
    float decay, pad;
};

template <int DX>
struct PassCfg {
    using C = Cfg<DX>;
    static constexpr int NZ = TV / 8;  // n8 tiles of Z, of the state and of the output
    // The extra row: TV / STATE_WARPS columns per state warp, ELANES lanes per column.
    static constexpr int ECOLS = TV / C::STATE_WARPS;
    static constexpr int ELANES = 32 / ECOLS;
    // X[2], Y[2], Z[2], the state's copy, E's copy, two PassGateTiles. Mirrors
    // fused_pass_smem_bytes in cuda.rs.
    static constexpr uint32_t SMEM = (4 * C::QK_TILE + 2 * C::V_TILE + C::C_TILE) * 2 + TV * 4 + 2 * sizeof(PassGateTile);
};

template <typename T, int DX, bool EXTRA>
__device__ __forceinline__ void pass_rows(const T* Xb, const T* Yb, const T* Zb, const T* Cs, const float* Es,
                                          const PassGateTile& gt, int W, T* __restrict__ out_rows,
                                          long long out_stride, int valid, int tz_valid, bool vec_out) {
    using C = Cfg<DX>;
    constexpr int KT = L / 8, NZ = PassCfg<DX>::NZ, VX = C::VX;
    const int lane = threadIdx.x & 31, quad = lane & 3, r0 = lane >> 2;
    const uint32_t x_addr = smem_addr(Xb + (16 * W + (lane & 15)) * C::LDQ + (lane >> 4) * 8);
    const uint32_t y_addr = smem_addr(Yb + ((lane & 7) + ((lane >> 4) << 3)) * C::LDQ + ((lane >> 3) & 1) * 8);
    float s[KT][4];
#pragma unroll
    for (int n = 0; n < KT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll 2
    for (int kk = 0; kk < DX / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(a, x_addr + kk * 32);
#pragma unroll
        for (int j = 0; j < KT / 2; ++j) {
            uint32_t b[4];
            ldsm_x4(b, y_addr + j * 16 * C::LDQ * 2 + kk * 32);
            mma<T>(s[2 * j], a, b[0], b[1]);
            mma<T>(s[2 * j + 1], a, b[2], b[3]);
        }
    }

    const int t0 = 16 * W + r0, t1 = t0 + 8;
    const float w0f = gt.w[t0], w1f = gt.w[t1];
    const float xe0 = EXTRA ? gt.xe[t0] : 0.f, xe1 = EXTRA ? gt.xe[t1] : 0.f;
    uint32_t pa[KT / 2][4];
#pragma unroll
    for (int n = 0; n < KT; ++n) {
        const int c = n * 8 + 2 * quad;
        const float2 uc = *reinterpret_cast<const float2*>(gt.u + c);
        float s00 = s[n][0], s01 = s[n][1], s10 = s[n][2], s11 = s[n][3];
        if (EXTRA) {
            const float2 yc = *reinterpret_cast<const float2*>(gt.ye + c);
            s00 = fmaf(xe0, yc.x, s00);
            s01 = fmaf(xe0, yc.y, s01);
            s10 = fmaf(xe1, yc.x, s10);
            s11 = fmaf(xe1, yc.y, s11);
        }
        float p00 = s00 * ex2(uc.x - w0f), p01 = s01 * ex2(uc.y - w0f);
        float p10 = s10 * ex2(uc.x - w1f), p11 = s11 * ex2(uc.y - w1f);
        if (c > t0) p00 = 0.f;
        if (c + 1 > t0) p01 = 0.f;
        if (c > t1) p10 = 0.f;
        if (c + 1 > t1) p11 = 0.f;
        pa[n >> 1][(n & 1) * 2] = pack2<T>(p00, p01);
        pa[n >> 1][(n & 1) * 2 + 1] = pack2<T>(p10, p11);
    }

    float o[NZ][4];
#pragma unroll
    for (int n = 0; n < NZ; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    const uint32_t c_addr = b_trans_addr<T, VX>(Cs);
#pragma unroll 2
    for (int kk = 0; kk < DX / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(a, x_addr + kk * 32);
        mma_by_row_block<T>(o, a, c_addr + kk * 16 * VX * 2);
    }
    if (EXTRA) {
#pragma unroll
        for (int n = 0; n < NZ; ++n) {
            const float2 e = *reinterpret_cast<const float2*>(Es + n * 8 + 2 * quad);
            o[n][0] = fmaf(xe0, e.x, o[n][0]);
            o[n][1] = fmaf(xe0, e.y, o[n][1]);
            o[n][2] = fmaf(xe1, e.x, o[n][2]);
            o[n][3] = fmaf(xe1, e.y, o[n][3]);
        }
    }
    state_copy_read<C::THREADS>();
    const float carried0 = gt.carried[t0], carried1 = gt.carried[t1];
#pragma unroll
    for (int n = 0; n < NZ; ++n) {
        o[n][0] *= carried0;
        o[n][1] *= carried0;
        o[n][2] *= carried1;
        o[n][3] *= carried1;
    }
    const uint32_t z_addr = b_trans_addr<T, VX>(Zb);
#pragma unroll
    for (int j = 0; j < KT / 2; ++j) mma_by_row_block<T>(o, pa[j], z_addr + j * 16 * VX * 2);

    const float ow0 = gt.outw[t0], ow1 = gt.outw[t1];
    T* stage = const_cast<T*>(Xb) + 16 * W * C::LDQ;
    __syncwarp();  // every lane's ldmatrix of these rows is done
#pragma unroll
    for (int n = 0; n < NZ; ++n) {
        const int c = n * 8 + 2 * quad;
        *reinterpret_cast<uint32_t*>(stage + r0 * C::LDQ + c) = pack2<T>(o[n][0] * ow0, o[n][1] * ow0);
        *reinterpret_cast<uint32_t*>(stage + (r0 + 8) * C::LDQ + c) = pack2<T>(o[n][2] * ow1, o[n][3] * ow1);
    }
    __syncwarp();
    const int rows = min(16, valid - 16 * W);
    if (vec_out) {
#pragma unroll
        for (int e = lane; e < 16 * (TV / 8); e += 32) {
            const int r = e / (TV / 8), c = (e % (TV / 8)) * 8;
            if (r < rows && c < tz_valid) {
                *reinterpret_cast<uint4*>(out_rows + (16 * W + r) * out_stride + c) =
                    *reinterpret_cast<const uint4*>(stage + r * C::LDQ + c);
            }
        }
    } else {
        for (int e = lane; e < 16 * TV; e += 32) {
            const int r = e / TV, c = e % TV;
            if (r < rows && c < tz_valid) out_rows[(16 * W + r) * out_stride + c] = stage[r * C::LDQ + c];
        }
    }
}

}  // namespace fused

template <typename T, int DX, bool EXTRA>
__device__ void mlstm_pass_fused(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ z,
                                 const float* __restrict__ ig, const float* __restrict__ fg,
                                 const float* __restrict__ m_fwd, const float* __restrict__ d_fwd,
                                 const float* __restrict__ extra_vals, const float* __restrict__ init_c,
                                 const float* __restrict__ init_n, const float* __restrict__ init_m,
                                 T* __restrict__ out, float* __restrict__ final_c, float* __restrict__ final_n,
                                 const float* __restrict__ final_log, const FusedPassParams& p) {
    using namespace fused;
    using C = Cfg<DX>;
    using PC = PassCfg<DX>;
    constexpr int MT = C::MT, SR = C::SR, NZ = PC::NZ, ECOLS = PC::ECOLS, EROWS = L / PC::ELANES;
    const int z_tiles = (int(p.dz) + TV - 1) / TV;
    const int head = blockIdx.x / z_tiles, zt = blockIdx.x % z_tiles, z0 = zt * TV;
    const int tz_valid = min(TV, int(p.dz) - z0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, quad = lane & 3, r0 = lane >> 2;
    const int dx = int(p.dx), dz = int(p.dz), len = int(p.len);
    const size_t row0 = size_t(head) * p.len;
    // Pass row u is memory row row0 + u forwards, row0 + len - 1 - u backwards.
    auto mem_row = [&](int u) { return row0 + size_t(p.reverse ? len - 1 - u : u); };
    const long long dir = p.reverse ? -1 : 1;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    if (PC::SMEM > dynamic_smem_size()) __trap();
    T* Xs = reinterpret_cast<T*>(smem_raw);
    T* Ys = Xs + 2 * C::QK_TILE;
    T* Zs = Ys + 2 * C::QK_TILE;
    T* Cs = Zs + 2 * C::V_TILE;
    float* Es = reinterpret_cast<float*>(Cs + C::C_TILE);
    PassGateTile* gates = reinterpret_cast<PassGateTile*>(Es + TV);

    const bool vec = p.vec_in != 0;
    constexpr int LOADERS = 32 * C::STATE_WARPS;
    const int loader = int(threadIdx.x) - 32 * OUT_WARPS;
    auto load_chunk = [&](int ch, int buf) {
        const int t0 = ch * L, rows = min(L, len - t0);
        const size_t first = mem_row(t0);
        load_rows<T, DX, C::LDQ, LOADERS>(Xs + buf * C::QK_TILE, x + first * dx, dir * dx, rows, dx, vec, loader);
        load_rows<T, DX, C::LDQ, LOADERS>(Ys + buf * C::QK_TILE, y + first * dx, dir * dx, rows, dx, vec, loader);
        load_rows<T, TV, C::VX, LOADERS>(Zs + buf * C::V_TILE, z + first * dz + z0, dir * dz, rows, tz_valid, vec,
                                         loader);
        cp_async_commit();
    };
    // The scanning warp (Cfg::SCAN_WARP) scans chunk ch + 1's gates while chunk ch is
    // processed, from values fetched a chunk earlier, as in the forward.
    const bool scanner = warp == C::SCAN_WARP;
    const int chunks = (len + L - 1) / L;
    float fr[2], ir[2], mr[2], dr[2], er[2];
    double m_prev = init_m != nullptr ? double(init_m[head]) : double(p.init_m_default);
    auto fetch_gates = [&](int ch) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int pos = min(ch * L + 2 * lane + e, len - 1);
            const size_t g = mem_row(pos);
            // Backwards, the decay between pass rows pos - 1 and pos is the later step's.
            fr[e] = p.reverse ? (pos > 0 ? fg[g + 1] : 0.f) : fg[g];
            ir[e] = ig[g];
            mr[e] = p.reverse ? m_fwd[g] : 0.f;
            dr[e] = d_fwd[g];
            er[e] = (p.x_extra == 1 || p.y_extra == 1) ? extra_vals[g] : 0.f;
        }
    };
    auto scan_chunk = [&](int ch) {
        const int t = ch * L + 2 * lane;
        float lf[2], kg[2], xv[2], yv[2], ow[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const bool ok = t + e < len;
            // Past the end: no decay and a key gate of -inf, which change nothing.
            lf[e] = (ok && (!p.reverse || t + e > 0)) ? logsigmoid(fr[e]) : 0.f;
            kg[e] = ok ? (p.reverse ? -mr[e] - logf(dr[e]) : ir[e]) : -INFINITY;
            xv[e] = ok ? (p.x_extra == 1 ? er[e] : p.x_extra == 2 ? 1.f : 0.f) : 0.f;
            yv[e] = ok ? (p.y_extra == 1 ? er[e] : p.y_extra == 2 ? 1.f : 0.f) : 0.f;
            ow[e] = ir[e];
            if (!p.reverse) ow[e] = ok ? p.out_scale / dr[e] : 0.f;
        }
        const ChunkGates g = scan_gates(lf[0], lf[1], kg[0], kg[1], m_prev);
        PassGateTile& gt = gates[ch & 1];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int s = 2 * lane + e;
            gt.u[s] = float(g.u[e] * LOG2E);
            gt.w[s] = float(g.w[e] * LOG2E);
            gt.carried[s] = __expf(float(m_prev - g.w[e]));
            gt.key[s] = __expf(float(g.u[e] - g.w_last));
            gt.xe[s] = xv[e];
            gt.ye[s] = yv[e];
            // Backwards, row s is weighted by exp(i + the pass's own max state).
            gt.outw[s] = !p.reverse ? ow[e] : (t + e < len ? p.out_scale * expf(float(double(ow[e]) + g.b[e] + g.w[e])) : 0.f);
        }
        if (lane == 0) {
            gt.decay = __expf(float(m_prev - g.w_last));
            gt.m_end = g.b_last + g.w_last;
        }
        if (ch + 1 < chunks) fetch_gates(ch + 1);
        m_prev = g.b_last + g.w_last;
    };
    if (scanner && chunks > 0) {
        fetch_gates(0);
        scan_chunk(0);
    }
    if (warp >= OUT_WARPS && chunks > 0) load_chunk(0, 0);

    if (warp >= OUT_WARPS) {
        const int sw = warp - OUT_WARPS;
        float cst[MT][NZ][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int n = 0; n < NZ; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = SR * sw + 16 * mt + r0 + (e >> 1) * 8, col = n * 8 + 2 * quad + (e & 1);
                    float v = 0.f;
                    if (p.has_init && row < dx && col < tz_valid) {
                        v = p.init_transposed ? init_c[(size_t(head) * dz + z0 + col) * dx + row]
                                              : init_c[(size_t(head) * dx + row) * dz + z0 + col];
                    }
                    cst[mt][n][e] = v * p.init_scale;
                }
        // The extra row: lanes esub = 0 .. ELANES - 1 of column ecol each sum EROWS of the
        // chunk's steps; every one of them holds the total.
        const int ecol = sw * ECOLS + lane % ECOLS, esub = lane / ECOLS;
        float e_tot = 0.f;
        if (EXTRA && p.has_init && p.init_transposed && ecol < tz_valid)
            e_tot = init_n[size_t(head) * dz + z0 + ecol] * p.init_scale;
        store_state_copy<T, DX, NZ>(Cs, cst, sw);
        if (EXTRA && esub == 0) Es[ecol] = e_tot;
        for (int ch = 0; ch < chunks; ++ch) {
            cp_async_wait_all();
            block_sync();
            if (ch + 1 < chunks) load_chunk(ch + 1, (ch + 1) & 1);
            // Never taken where an output warp scans; left as a runtime test rather than an
            // `if constexpr`, which made ptxas spill more in the k128 passes (456 / 449 /
            // 397 us against 404 / 404 / 370 on the H100, before the tile-copy change).
            if (scanner && ch + 1 < chunks) scan_chunk(ch + 1);
            const int buf = ch & 1;
            const PassGateTile& gt = gates[buf];
            update_state<T, DX, NZ>(cst, Ys + buf * C::QK_TILE, Zs + buf * C::V_TILE, gt.key, gt.decay, sw);
            if (EXTRA) {
                const T* zc = Zs + buf * C::V_TILE + ecol;
                float part = 0.f;
#pragma unroll 4
                for (int i = 0; i < EROWS; ++i) {
                    const int st = esub * EROWS + i;
                    part = fmaf(gt.key[st] * gt.ye[st], hk::to_f32(zc[st * C::VX]), part);
                }
#pragma unroll
                for (int off = ECOLS; off < 32; off <<= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
                e_tot = fmaf(gt.decay, e_tot, part);
            }
            state_copy_wait<C::THREADS>();
            store_state_copy<T, DX, NZ>(Cs, cst, sw);
            if (EXTRA && esub == 0) Es[ecol] = e_tot;
        }
        if (final_c != nullptr && p.init_transposed && chunks > 0) {
            // The state's gradient at the pass's end, transposed: [C | E]^T scaled back.
            const float wf = p.out_scale * float(exp(double(final_log[head]) + gates[(chunks - 1) & 1].m_end));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int n = 0; n < NZ; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = SR * sw + 16 * mt + r0 + (e >> 1) * 8, col = n * 8 + 2 * quad + (e & 1);
                        if (row < dx && col < tz_valid)
                            final_c[(size_t(head) * dz + z0 + col) * dx + row] = cst[mt][n][e] * wf;
                    }
            if (EXTRA && esub == 0 && ecol < tz_valid && p.y_extra != 0)
                final_n[size_t(head) * dz + z0 + ecol] = e_tot * wf;
        }
    } else {
        for (int ch = 0; ch < chunks; ++ch) {
            block_sync();
            if constexpr (C::OUTPUT_WARP_SCANS) {
                if (scanner && ch + 1 < chunks) scan_chunk(ch + 1);
            }
            const int buf = ch & 1, t0 = ch * L;
            pass_rows<T, DX, EXTRA>(Xs + buf * C::QK_TILE, Ys + buf * C::QK_TILE, Zs + buf * C::V_TILE, Cs, Es,
                                    gates[buf], warp, out + mem_row(t0) * dz + z0, dir * dz, min(L, len - t0),
                                    tz_valid, p.vec_out != 0);
        }
    }
}

}  // namespace hk_mlstm

#define MLSTM_FWD(NAME, T, L)                                                                                         \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::THREADS)                                                     \
        NAME(const T* q, const T* k, const T* v, const float* ig, const float* fg, const float* c0, const float* n0,    \
             const float* m0, T* h, float* c_out, float* n_out, float* m_out, const T* dh, float* stats,                \
             hk_mlstm::MlstmParams p) {                                                                                \
        hk_mlstm::mlstm_fwd<T, L>(q, k, v, ig, fg, c0, n0, m0, h, c_out, n_out, m_out, dh, stats, p);                  \
    }

#define MLSTM_FWD_CHUNKS(DT, T)                \
    MLSTM_FWD(mlstm_fwd_##DT##_l16, T, 16)    \
    MLSTM_FWD(mlstm_fwd_##DT##_l32, T, 32)    \
    MLSTM_FWD(mlstm_fwd_##DT##_l64, T, 64)    \
    MLSTM_FWD(mlstm_fwd_##DT##_l128, T, 128)

MLSTM_FWD_CHUNKS(f32, float)
MLSTM_FWD_CHUNKS(bf16, __nv_bfloat16)
MLSTM_FWD_CHUNKS(f16, __half)

// The fused forward (bf16 / f16) by head-dimension class, 64 value columns per block: dqk up
// to 64 and 128 (two blocks per SM; shared memory allows it), 256 (one block).
#define MLSTM_FWD_FUSED(NAME, T, DQK, BLOCKS) \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::fused::Cfg<DQK>::THREADS, BLOCKS)                      \
        NAME(const T* q, const T* k, const T* v, const float* ig, const float* fg, const float* c0, const float* n0,    \
             const float* m0, T* h, float* c_out, float* n_out, float* m_out, hk_mlstm::FusedParams p) {               \
        hk_mlstm::mlstm_fwd_fused<T, DQK, false>(q, k, v, ig, fg, c0, n0, m0, h, c_out, n_out, m_out, nullptr, p); \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::fused::Cfg<DQK>::THREADS, BLOCKS)                      \
        NAME##_stats(const T* q, const T* k, const T* v, const float* ig, const float* fg, const float* c0,          \
                     const float* n0, const float* m0, T* h, float* c_out, float* n_out, float* m_out,               \
                     float* stats, hk_mlstm::FusedParams p) {                                                     \
        hk_mlstm::mlstm_fwd_fused<T, DQK, true>(q, k, v, ig, fg, c0, n0, m0, h, c_out, n_out, m_out, stats, p);    \
    }

MLSTM_FWD_FUSED(mlstm_fwd_fused_bf16_k64, __nv_bfloat16, 64, 2)
MLSTM_FWD_FUSED(mlstm_fwd_fused_bf16_k128, __nv_bfloat16, 128, 2)
MLSTM_FWD_FUSED(mlstm_fwd_fused_bf16_k256, __nv_bfloat16, 256, 1)
MLSTM_FWD_FUSED(mlstm_fwd_fused_f16_k64, __half, 64, 2)
MLSTM_FWD_FUSED(mlstm_fwd_fused_f16_k128, __half, 128, 2)
MLSTM_FWD_FUSED(mlstm_fwd_fused_f16_k256, __half, 256, 1)

// The backward's fused passes by the class of the X / Y width (dqk or dhv), with (EXTRA: the dq
// and dk passes) or without (dv) an extra column.
#define MLSTM_PASS_FUSED(NAME, T, DX, EXTRA, BLOCKS)                                                                \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::fused::Cfg<DX>::THREADS, BLOCKS)                        \
        NAME(const T* x, const T* y, const T* z, const float* ig, const float* fg, const float* m_fwd,                 \
             const float* d_fwd, const float* extra, const float* init_c, const float* init_n,                       \
             const float* init_m, T* out, float* final_c, float* final_n, const float* final_log,                      \
             hk_mlstm::FusedPassParams p) {                                                                            \
        hk_mlstm::mlstm_pass_fused<T, DX, EXTRA>(x, y, z, ig, fg, m_fwd, d_fwd, extra, init_c, init_n, init_m, out,  \
                                                 final_c, final_n, final_log, p);                                    \
    }

#define MLSTM_PASS_FUSED_CLASSES(DT, T)                                         \
    MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k64, T, 64, false, 2)              \
    MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k128, T, 128, false, 2)            \
    MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k256, T, 256, false, 1)            \
    MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k64_extra, T, 64, true, 2)         \
    MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k128_extra, T, 128, true, 2)       \
    MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k256_extra, T, 256, true, 1)

MLSTM_PASS_FUSED_CLASSES(bf16, __nv_bfloat16)
MLSTM_PASS_FUSED_CLASSES(f16, __half)

#define MLSTM_STEP(NAME, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::STEP_THREADS)                                               \
        NAME(float* c, float* n, float* m, const T* q, const T* k, const T* v, const float* ig, const float* fg, T* h, \
             hk_mlstm::StepParams p) {                                                                                 \
        hk_mlstm::mlstm_step<T>(c, n, m, q, k, v, ig, fg, h, p);                                                       \
    }

MLSTM_STEP(mlstm_step_f32, float)
MLSTM_STEP(mlstm_step_bf16, __nv_bfloat16)
MLSTM_STEP(mlstm_step_f16, __half)

// BOUNDS: chunks up to 32 ask for two blocks per SM (64 registers): bf16 at L = 32 otherwise
// took 100 registers and ran one block per SM. Longer chunks would spill under that bound.
#define MLSTM_PASS(NAME, T, L, BOUNDS)                                                                                \
    extern "C" __global__ void BOUNDS                                                                                   \
        NAME(const T* x, const T* y, const T* z, const float* ig, const float* fg, const float* m_fwd,                 \
             const float* d_fwd, const float* extra, const float* init_c, const float* init_n,                       \
             const float* init_m, T* out, float* final_c, float* final_n, const float* final_log,                      \
             hk_mlstm::PassParams p) {                                                                                 \
        hk_mlstm::mlstm_pass<T, L>(x, y, z, ig, fg, m_fwd, d_fwd, extra, init_c, init_n, init_m, out, final_c,        \
                                   final_n, final_log, p);                                                             \
    }

#define MLSTM_PASS_CHUNKS(DT, T)                                                        \
    MLSTM_PASS(mlstm_pass_##DT##_l16, T, 16, __launch_bounds__(hk_mlstm::THREADS, 2))    \
    MLSTM_PASS(mlstm_pass_##DT##_l32, T, 32, __launch_bounds__(hk_mlstm::THREADS, 2))    \
    MLSTM_PASS(mlstm_pass_##DT##_l64, T, 64, __launch_bounds__(hk_mlstm::THREADS))       \
    MLSTM_PASS(mlstm_pass_##DT##_l128, T, 128, __launch_bounds__(hk_mlstm::THREADS))

MLSTM_PASS_CHUNKS(f32, float)
MLSTM_PASS_CHUNKS(bf16, __nv_bfloat16)
MLSTM_PASS_CHUNKS(f16, __half)

extern "C" __global__ void __launch_bounds__(hk_mlstm::PREP_THREADS)
    mlstm_bwd_prep(const float* stats, const float* fg, const float* m0, float* aux, float* head_aux,
                   hk_mlstm::PrepParams p) {
    hk_mlstm::mlstm_bwd_prep(stats, fg, m0, aux, head_aux, p);
}

extern "C" __global__ void __launch_bounds__(hk_mlstm::GATE_THREADS)
    mlstm_bwd_gates(const float* ig, const float* fg, const float* stats, float* aux, const float* c_fin,
                    const float* n_fin, const float* dc_fin, const float* dn_fin, const float* dm_fin, const float* c0,
                    const float* n0, const float* dc0, const float* dn0, float* di, float* df, float* dm0,
                    hk_mlstm::GateParams p) {
    hk_mlstm::mlstm_bwd_gates(ig, fg, stats, aux, c_fin, n_fin, dc_fin, dn_fin, dm_fin, c0, n0, dc0, dn0, di, df, dm0, p);
}

#define MLSTM_ROW_DOTS(DT, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::PREP_THREADS)                                               \
        mlstm_bwd_prep_h_##DT(const float* stats, const T* h, const T* dh, const float* fg, const float* m0,           \
                              float* aux, float* head_aux, hk_mlstm::PrepParams p) {                                  \
        hk_mlstm::mlstm_bwd_prep_h<T>(stats, h, dh, fg, m0, aux, head_aux, p);                                        \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::PREP_THREADS)                                               \
        mlstm_bwd_dots_##DT(const T* k, const T* dk, float* aux, float* di, float* df, hk_mlstm::DotParams p) {       \
        hk_mlstm::mlstm_bwd_dots<T>(k, dk, aux, di, df, p);                                                           \
    }

MLSTM_ROW_DOTS(f32, float)
MLSTM_ROW_DOTS(bf16, __nv_bfloat16)
MLSTM_ROW_DOTS(f16, __half)
