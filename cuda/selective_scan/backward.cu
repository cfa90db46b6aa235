// The selective scan's backward and its deterministic reductions. See selective_scan.cuh.
#include "selective_scan.cuh"

namespace hk_scan {

template <typename T, int SPT, int NT, bool GENERAL>
__device__ __forceinline__ void scan_backward(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
                              const T* __restrict__ Bv, const float* __restrict__ Bc, const T* __restrict__ Cv,
                              const float* __restrict__ Cc, const float* __restrict__ Dp, const T* __restrict__ z,
                              const float* __restrict__ bias, const uint8_t* __restrict__ resets,
                              const T* __restrict__ dout, const float* __restrict__ dlast,
                              const float* __restrict__ ckpt, T* __restrict__ du, T* __restrict__ ddelta,
                              T* __restrict__ dz, float* __restrict__ bc_partial, float* __restrict__ param_partial,
                              float* __restrict__ dh0, const ScanParams p) {
    constexpr int BLK = BLOCK;
    using L = Layout<SPT, NT, BLK>;
    constexpr int DW = 32 / NT;  // channels per warp
    constexpr int WARPS = BLOCK / 32;
    constexpr int V = 2 * SPT;   // dB and dC values per lane and step
    constexpr int TILE = Tiles<SPT, NT, BLK>::BWD;  // == the checkpoint interval
    constexpr int RS = TILE + 4;
    constexpr int n_sub = TILE / S;
    if (p.tile != uint32_t(TILE) || p.ckpt_interval != uint32_t(TILE)) __trap();
    const int tile = TILE;
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    float* sB = smem;
    float* sC = sB + tile * L::BS;
    float* sDt = sC + tile * L::BS;
    float* sU = sDt + L::DB * RS;
    float* sDy = sU + L::DB * RS;
    float* sSig = sDy + L::DB * RS;
    float* sZ = sSig + L::DB * RS;  // z; then du
    float* sY = sZ + L::DB * RS;    // y; then d(delta)
    float* sKeep = sY + L::DB * RS;
    float* sH = sKeep + tile;                // [sub][s][thread]: states at each piece start
    float* sW = sH + n_sub * SPT * BLOCK;    // [warp][r][which * NPAD + n]: per-warp dB / dC
    float* sAcc = sW + WARPS * S * 2 * L::NPAD;  // [which * NPAD + n][t]: per-block dB / dC

    const L lo(p);
    const int warp = threadIdx.x / 32;
    const int dlw = (threadIdx.x % 32) / NT;  // channel within the warp
    float a_nat[SPT], a2[SPT], bc[SPT], cc[SPT];
    load_state_params<SPT, NT, BLK>(lo, p, A, Bc, Cc, a_nat, a2, bc, cc);
    const size_t state_base = (size_t(lo.b) * p.dim + lo.d) * p.dstate + size_t(lo.j) * SPT;
    bool state_ok[SPT];
    float g_next[SPT], dA[SPT], dBc[SPT], dCc[SPT];
#pragma unroll
    for (int s = 0; s < SPT; ++s) {
        state_ok[s] = lo.valid && lo.j * SPT + s < int(p.dstate);
        g_next[s] = (state_ok[s] && p.has_dlast) ? dlast[state_base + s] : 0.f;
        dA[s] = dBc[s] = dCc[s] = 0.f;
    }
    float dD_acc = 0.f, dbias_acc = 0.f;
    const float dskip = (p.has_d && lo.valid) ? Dp[lo.d] : 0.f;
    const int len = int(p.len);
    const int blocks_per_group = (int(p.dim / p.groups) + L::DB - 1) / L::DB;
    const int blk = blockIdx.x % blocks_per_group;
    // Without GENERAL both B and C vary in time (the kernel entry picks GENERAL otherwise).
    const bool bc_var = !GENERAL || p.b_variable || p.c_variable;

    using Tile = BwdTile<T, SPT, NT, BLK, TILE>;
    T* raw = reinterpret_cast<T*>(sAcc + 2 * L::NPAD * RS);
    const float* sCk = Tile::checkpoint_slot(raw) + threadIdx.x * SPT;
    const bool vec = aligned16(u) && aligned16(delta) && aligned16(z) && aligned16(dout) && aligned16(Bv) &&
                     aligned16(Cv) && p.len % (16 / sizeof(T)) == 0;
    const bool vec_out = aligned16(du) && aligned16(ddelta) && aligned16(dz) && p.len % (16 / sizeof(T)) == 0;
    const float dbias = (p.has_bias && lo.valid) ? bias[lo.d] : 0.f;
    auto fetch = [&](int k) {
        const size_t cb = ((size_t(lo.b) * p.n_ckpt + k) * p.dim + (lo.valid ? lo.d : 0)) * p.dstate + size_t(lo.j) * SPT;
        Tile::fetch(lo, p, k * tile, vec, raw, u, delta, Bv, Cv, z, dout, resets, ckpt + cb);
    };
    fetch(int(p.n_ckpt) - 1);
    for (int k = int(p.n_ckpt) - 1; k >= 0; --k) {
        const int t0 = k * tile;
        cp_async_wait_all();
        __syncthreads();  // every thread's copies have landed; the previous interval is done
        Tile::template stage<RS>(lo, p, t0, dbias, raw, sB, sC, sDt, sU, sDy, sSig, sZ, sKeep);
        float h[SPT];
#pragma unroll
        for (int s = 0; s < SPT; ++s) h[s] = state_ok[s] ? sCk[s] : 0.f;
        __syncthreads();
        // The previous interval's inputs fly while this one is processed.
        if (k > 0) fetch(k - 1);
        // 1. States through the interval from its checkpoint: y for dz, and each piece's start.
        constexpr int R = 8;  // steps per y reduction, as in the forward: one group per piece
        static_assert(R == S, "each y group starts a piece");
#pragma unroll 1
        for (int tr = 0; tr < tile; tr += R) {
#pragma unroll
            for (int s = 0; s < SPT; ++s) sH[((tr / S) * SPT + s) * BLOCK + threadIdx.x] = h[s];
            advance_and_emit_y<SPT, NT, BLK, R, RS, GENERAL, false>(lo, tr, h, a2, bc, cc, sB, sC, sDt, sU, sKeep, sY);
        }
        __syncthreads();
        // 2. The gate, each lane its own steps of its channel as staged (D a register, dz
        //    written by vectors): dz, and dy = dout SiLU(z) in place of dout.
        if (p.has_z && lo.j < Tile::LANES) {
            const int kk = lo.dl * RS + lo.j * Tile::PE;
            float zz[Tile::PE], yv[Tile::PE], uv[Tile::PE], dy[Tile::PE], dzv[Tile::PE];
            load_shared<Tile::PE>(sZ + kk, zz);
            load_shared<Tile::PE>(sY + kk, yv);
            load_shared<Tile::PE>(sU + kk, uv);
            load_shared<Tile::PE>(sDy + kk, dy);
#pragma unroll
            for (int i = 0; i < Tile::PE; ++i) {
                const float sg = sigmoid(zz[i]);
                dzv[i] = dy[i] * fmaf(dskip, uv[i], yv[i]) * silu_grad(zz[i], sg);
                dy[i] *= zz[i] * sg;
            }
            store_shared<Tile::PE>(sDy + kk, dy);
            int avail;
            const size_t row = Tile::F::channel_row(lo, p, t0, avail);
            store_row<T, Tile::PE>(dz + row, dzv, avail, vec_out);
        }
        __syncthreads();
        // 3. The adjoint, piece by piece, backwards.
#pragma unroll 1
        for (int sub = n_sub - 1; sub >= 0; --sub) {
            float a_r[S][SPT], q_r[S][SPT];
#pragma unroll
            for (int s = 0; s < SPT; ++s) h[s] = sH[(sub * SPT + s) * BLOCK + threadIdx.x];
#pragma unroll
            for (int r = 0; r < S; ++r) {
                const int t = sub * S + r;
                const float dt = sDt[lo.dl * RS + t];
                const float dtu = dt * sU[lo.dl * RS + t];
                // A reset step starts from zero: selects rather than products with 0, so
                // nothing non-finite crosses a sequence boundary either way.
                const bool fresh = GENERAL && sKeep[t] == 0.f;
                float bv[SPT];
                load_shared<SPT>(sB + t * L::BS + lo.j * SPT, bv);
#pragma unroll
                for (int s = 0; s < SPT; ++s) {
                    a_r[r][s] = fresh ? 0.f : ex2(dt * a2[s]);
                    q_r[r][s] = fresh ? 0.f : a_r[r][s] * h[s];
                    h[s] = fmaf(dtu, GENERAL ? bv[s] + bc[s] : bv[s], q_r[r][s]);
                }
            }
            float du_p[S], dd_p[S];
#pragma unroll
            for (int r = S - 1; r >= 0; --r) {
                const int t = sub * S + r;
                const float dt = sDt[lo.dl * RS + t];
                const float uu = sU[lo.dl * RS + t];
                const float dy = sDy[lo.dl * RS + t];
                const float dtu = dt * uu;
                float bv[SPT], cv[SPT];
                load_shared<SPT>(sB + t * L::BS + lo.j * SPT, bv);
                load_shared<SPT>(sC + t * L::BS + lo.j * SPT, cv);
                const bool fresh = GENERAL && sKeep[t] == 0.f;
                float vals[V];
                float du_acc = 0.f, dd_acc = 0.f;
#pragma unroll
                for (int s = 0; s < SPT; ++s) {
                    const float bb = GENERAL ? bv[s] + bc[s] : bv[s];
                    const float g = fmaf(GENERAL ? cv[s] + cc[s] : cv[s], dy, g_next[s]);
                    const float hcur = fmaf(dtu, bb, q_r[r][s]);
                    vals[s] = g * dtu;         // dB
                    vals[SPT + s] = dy * hcur;  // dC
                    // d(dt) = sum_n g (B u + A a h_{t-1}) = u sum_n g B + sum_n A g q.
                    du_acc = fmaf(g, bb, du_acc);
                    const float gq = g * q_r[r][s];
                    dA[s] = fmaf(dt, gq, dA[s]);
                    dd_acc = fmaf(a_nat[s], gq, dd_acc);
                    g_next[s] = fresh ? 0.f : a_r[r][s] * g;
                }
                du_p[r] = du_acc * dt;
                dd_p[r] = fmaf(du_acc, uu, dd_acc);
                if (GENERAL) {
#pragma unroll
                    for (int s = 0; s < SPT; ++s) {
                        dBc[s] += vals[s];
                        dCc[s] += vals[SPT + s];
                    }
                }
                if (bc_var) {
                    transpose_reduce<V, DW, Log2<NT>::value>(vals, dlw);
                    using Own = ReduceOwner<V, DW>;
                    if (Own::owns(dlw)) {
#pragma unroll
                        for (int i = 0; i < Own::count; ++i) {
                            const int idx = Own::first(dlw) + i;
                            const int which = idx / SPT, n = lo.j * SPT + idx % SPT;
                            sW[(warp * S + r) * 2 * L::NPAD + which * L::NPAD + n] = vals[i];
                        }
                    }
                }
            }
            transpose_reduce<S, NT, 0>(du_p, lo.j);
            transpose_reduce<S, NT, 0>(dd_p, lo.j);
            using Own = ReduceOwner<S, NT>;
            if (Own::owns(lo.j)) {
#pragma unroll
                for (int i = 0; i < Own::count; ++i) {
                    const int t = sub * S + Own::first(lo.j) + i;
                    const int kk = lo.dl * RS + t;
                    const float dy = sDy[kk];
                    const float ddt = dd_p[i] * sSig[kk];
                    sZ[kk] = fmaf(dskip, dy, du_p[i]);  // du
                    sY[kk] = ddt;                       // d(delta)
                    dD_acc = fmaf(dy, sU[kk], dD_acc);
                    if (t0 + t < len) dbias_acc += ddt;  // padding steps carry a gradient into dt
                }
            }
            if (bc_var) {
                __syncthreads();
        #pragma unroll 2
        for (int e = threadIdx.x; e < S * 2 * L::NPAD; e += BLOCK) {
                    const int r = e / (2 * L::NPAD), c = e % (2 * L::NPAD);
                    float acc = 0.f;
#pragma unroll
                    for (int w = 0; w < WARPS; ++w) acc += sW[(w * S + r) * 2 * L::NPAD + c];
                    sAcc[c * RS + sub * S + r] = acc;
                }
                __syncthreads();
            }
        }
        __syncthreads();
        // 4. This interval's du and d(delta), each lane its own steps by vectors, and the
        //    per-block dB / dC partials, four steps a thread.
        if (lo.j < Tile::LANES) {
            const int kk = lo.dl * RS + lo.j * Tile::PE;
            float duv[Tile::PE], ddv[Tile::PE];
            load_shared<Tile::PE>(sZ + kk, duv);
            load_shared<Tile::PE>(sY + kk, ddv);
            int avail;
            const size_t row = Tile::F::channel_row(lo, p, t0, avail);
            store_row<T, Tile::PE>(du + row, duv, avail, vec_out);
            store_row<T, Tile::PE>(ddelta + row, ddv, avail, vec_out);
        }
        if (bc_var) {
            constexpr int QUADS = TILE / 4;
            const size_t block_rows = ((size_t(lo.b) * p.groups + lo.g) * blocks_per_group + blk) * 2 * p.dstate;
            for (int e = threadIdx.x; e < int(p.dstate) * QUADS; e += BLOCK) {
                const int n = e / QUADS, t = 4 * (e % QUADS);
                const int avail = len - t0 - t;
#pragma unroll
                for (int which = 0; which < 2; ++which) {
                    const float4 v = *reinterpret_cast<const float4*>(sAcc + (which * L::NPAD + n) * RS + t);
                    float* dst = bc_partial + (block_rows + size_t(which) * p.dstate + n) * p.len + t0 + t;
                    if (len % 4 == 0 && avail >= 4) {
                        *reinterpret_cast<float4*>(dst) = v;
                    } else {
                        if (avail > 0) dst[0] = v.x;
                        if (avail > 1) dst[1] = v.y;
                        if (avail > 2) dst[2] = v.z;
                        if (avail > 3) dst[3] = v.w;
                    }
                }
            }
        }
    }
    // Per-(b, d) partials: dA, constant dB, constant dC (n each), dD, dbias.
    const size_t pp = (size_t(lo.b) * p.dim + lo.d) * (3 * size_t(p.dstate) + 2);
#pragma unroll
    for (int s = 0; s < SPT; ++s) {
        if (state_ok[s]) {
            const int n = lo.j * SPT + s;
            param_partial[pp + n] = dA[s];
            param_partial[pp + p.dstate + n] = dBc[s];
            param_partial[pp + 2 * p.dstate + n] = dCc[s];
            if (p.has_h0) dh0[state_base + s] = g_next[s];
        }
    }
#pragma unroll
    for (int m = NT / 2; m >= 1; m >>= 1) {
        dD_acc += __shfl_xor_sync(0xffffffffu, dD_acc, m);
        dbias_acc += __shfl_xor_sync(0xffffffffu, dbias_acc, m);
    }
    if (lo.valid && lo.j == 0) {
        param_partial[pp + 3 * p.dstate] = dD_acc;
        param_partial[pp + 3 * p.dstate + 1] = dbias_acc;
    }
}


// dB / dC (time-varying) = sum of the per-block partials, in block order.
template <typename T>
__device__ void reduce_bc(const float* __restrict__ partial, T* __restrict__ db, T* __restrict__ dc,
                          const ScanParams p, uint32_t blocks_per_group) {
    const size_t per_which = size_t(p.dstate) * p.len;
    const size_t n = size_t(p.batch) * p.groups * per_which;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += size_t(gridDim.x) * blockDim.x) {
        const size_t bg = e / per_which, rest = e % per_which;
        float sb = 0.f, sc = 0.f;
        for (uint32_t k = 0; k < blocks_per_group; ++k) {
            const size_t base = ((bg * blocks_per_group + k) * 2) * per_which + rest;
            sb += partial[base];
            sc += partial[base + per_which];
        }
        if (p.b_variable) db[e] = hk::from_f32<T>(sb);
        if (p.c_variable) dc[e] = hk::from_f32<T>(sc);
    }
}

// Three blocks per SM (168 registers) fit the issue's grid in one wave; eight states per
}  // namespace hk_scan

#define HK_SCAN_BWD(T, SUFFIX, SPT, NT)                                                                           \
    extern "C" __global__ void __launch_bounds__(hk_scan::BLOCK, hk_scan::bwd_min_blocks(SPT))                   \
        selective_scan_bwd_##SUFFIX##_s##SPT##_l##NT(                                                             \
            const T* u, const T* delta, const float* A, const T* Bv, const float* Bc, const T* Cv, const float* Cc, \
            const float* Dp, const T* z, const float* bias, const uint8_t* resets, const T* dout,                   \
            const float* dlast, const float* ckpt, T* du, T* ddelta, T* dz, float* bc_partial,                     \
            float* param_partial, float* dh0, const ScanParams p) {                                                \
        if (p.has_resets || !p.b_variable || !p.c_variable)                                                       \
            hk_scan::scan_backward<T, SPT, NT, true>(u, delta, A, Bv, Bc, Cv, Cc, Dp, z, bias, resets, dout, dlast, \
                                                     ckpt, du, ddelta, dz, bc_partial, param_partial, dh0, p);     \
        else                                                                                                      \
            hk_scan::scan_backward<T, SPT, NT, false>(u, delta, A, Bv, Bc, Cv, Cc, Dp, z, bias, resets, dout,       \
                                                      dlast, ckpt, du, ddelta, dz, bc_partial, param_partial, dh0, \
                                                      p);                                                         \
    }

#define HK_SCAN_BWD_DTYPE(T, SUFFIX)                                                                           \
    HK_SCAN_LAYOUTS(HK_SCAN_BWD, T, SUFFIX)                                                                    \
    extern "C" __global__ void selective_scan_reduce_bc_##SUFFIX(const float* partial, T* db, T* dc,            \
                                                                 const ScanParams p, uint32_t blocks_per_group) { \
        hk_scan::reduce_bc<T>(partial, db, dc, p, blocks_per_group);                                           \
    }

HK_SCAN_BWD_DTYPE(float, f32)
HK_SCAN_BWD_DTYPE(__nv_bfloat16, bf16)
HK_SCAN_BWD_DTYPE(__half, f16)

// dA, constant dB / dC, dD, dbias = sums over the batch of the per-(b, d) partials, in batch
// order. A partial row holds dA (n), dB (n), dC (n), dD, dbias for one (b, d).
extern "C" __global__ void selective_scan_reduce_params(const float* partial, float* dA, float* dB, float* dC,
                                                        float* dD, float* dbias, const ScanParams p) {
    const size_t row = 3 * size_t(p.dstate) + 2;
    const size_t n = size_t(p.dim) * row;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += size_t(gridDim.x) * blockDim.x) {
        float acc = 0.f;
        for (uint32_t b = 0; b < p.batch; ++b) acc += partial[size_t(b) * n + e];
        const size_t d = e / row, c = e % row;
        if (c < p.dstate) {
            dA[d * p.dstate + c] = acc;
        } else if (c < 2 * size_t(p.dstate)) {
            if (!p.b_variable) dB[d * p.dstate + c - p.dstate] = acc;
        } else if (c < 3 * size_t(p.dstate)) {
            if (!p.c_variable) dC[d * p.dstate + c - 2 * p.dstate] = acc;
        } else if (c == 3 * size_t(p.dstate)) {
            if (p.has_d) dD[d] = acc;
        } else if (p.has_bias) {
            dbias[d] = acc;
        }
    }
}
