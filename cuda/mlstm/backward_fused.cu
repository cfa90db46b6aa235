// The mLSTM's fused backward (bf16 / f16, head dims up to 256): the forward's recomputation
// recording the per-step stats, and the dq / dk / dv passes on the fused structure.
#include "fused_forward.cuh"

namespace hk_mlstm {

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
HK_PARAMS_LAYOUT(FusedPassParams, 14);

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

// The fused forward recording the backward's per-step stats (m, d, den), by head-dimension
// class as forward_fused.cu's.
#define HK_MLSTM_FWD_FUSED_STATS(NAME, T, DQK, BLOCKS)                                                               \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::fused::Cfg<DQK>::THREADS, BLOCKS)                      \
        NAME##_stats(const T* q, const T* k, const T* v, const float* ig, const float* fg, const float* c0,          \
                     const float* n0, const float* m0, T* h, float* c_out, float* n_out, float* m_out,               \
                     float* stats, hk_mlstm::FusedParams p) {                                                     \
        hk_mlstm::mlstm_fwd_fused<T, DQK, true>(q, k, v, ig, fg, c0, n0, m0, h, c_out, n_out, m_out, stats, p);    \
    }

HK_MLSTM_FWD_FUSED_STATS(mlstm_fwd_fused_bf16_k64, __nv_bfloat16, 64, 2)
HK_MLSTM_FWD_FUSED_STATS(mlstm_fwd_fused_bf16_k128, __nv_bfloat16, 128, 2)
HK_MLSTM_FWD_FUSED_STATS(mlstm_fwd_fused_bf16_k256, __nv_bfloat16, 256, 1)
HK_MLSTM_FWD_FUSED_STATS(mlstm_fwd_fused_f16_k64, __half, 64, 2)
HK_MLSTM_FWD_FUSED_STATS(mlstm_fwd_fused_f16_k128, __half, 128, 2)
HK_MLSTM_FWD_FUSED_STATS(mlstm_fwd_fused_f16_k256, __half, 256, 1)

// The backward's fused passes by the class of the X / Y width (dqk or dhv), with (EXTRA: the dq
// and dk passes) or without (dv) an extra column.
#define HK_MLSTM_PASS_FUSED(NAME, T, DX, EXTRA, BLOCKS)                                                                \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::fused::Cfg<DX>::THREADS, BLOCKS)                        \
        NAME(const T* x, const T* y, const T* z, const float* ig, const float* fg, const float* m_fwd,                 \
             const float* d_fwd, const float* extra, const float* init_c, const float* init_n,                       \
             const float* init_m, T* out, float* final_c, float* final_n, const float* final_log,                      \
             hk_mlstm::FusedPassParams p) {                                                                            \
        hk_mlstm::mlstm_pass_fused<T, DX, EXTRA>(x, y, z, ig, fg, m_fwd, d_fwd, extra, init_c, init_n, init_m, out,  \
                                                 final_c, final_n, final_log, p);                                    \
    }

#define HK_MLSTM_PASS_FUSED_CLASSES(DT, T)                                         \
    HK_MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k64, T, 64, false, 2)              \
    HK_MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k128, T, 128, false, 2)            \
    HK_MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k256, T, 256, false, 1)            \
    HK_MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k64_extra, T, 64, true, 2)         \
    HK_MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k128_extra, T, 128, true, 2)       \
    HK_MLSTM_PASS_FUSED(mlstm_pass_fused_##DT##_k256_extra, T, 256, true, 1)

HK_MLSTM_PASS_FUSED_CLASSES(bf16, __nv_bfloat16)
HK_MLSTM_PASS_FUSED_CLASSES(f16, __half)
