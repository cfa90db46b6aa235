// The fused forward (bf16 / f16) of the mLSTM, mlstm.cuh's fused machinery put together:
// instantiated without stats by forward_fused.cu and with the backward's per-step stats by
// backward_fused.cu.
#pragma once

#include "mlstm.cuh"

namespace hk_mlstm {

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

}  // namespace hk_mlstm
