// The mLSTM's chunked forward (every dtype and chunk; the backward's recomputation for f32,
// wider heads and other chunks records its stats with it). See mlstm.cuh.
#include "mlstm.cuh"

namespace hk_mlstm {

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
            double ml[PER], bL, mL;
            scan_chunk_gates<L, PER>(bl, cl, ra, rc, m_prev, lane, ml, bL, mL);
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

}  // namespace hk_mlstm

#define HK_MLSTM_FWD(NAME, T, L)                                                                                         \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::THREADS)                                                     \
        NAME(const T* q, const T* k, const T* v, const float* ig, const float* fg, const float* c0, const float* n0,    \
             const float* m0, T* h, float* c_out, float* n_out, float* m_out, const T* dh, float* stats,                \
             hk_mlstm::MlstmParams p) {                                                                                \
        hk_mlstm::mlstm_fwd<T, L>(q, k, v, ig, fg, c0, n0, m0, h, c_out, n_out, m_out, dh, stats, p);                  \
    }

#define HK_MLSTM_FWD_CHUNKS(DT, T)                \
    HK_MLSTM_FWD(mlstm_fwd_##DT##_l16, T, 16)    \
    HK_MLSTM_FWD(mlstm_fwd_##DT##_l32, T, 32)    \
    HK_MLSTM_FWD(mlstm_fwd_##DT##_l64, T, 64)    \
    HK_MLSTM_FWD(mlstm_fwd_##DT##_l128, T, 128)

HK_MLSTM_FWD_CHUNKS(f32, float)
HK_MLSTM_FWD_CHUNKS(bf16, __nv_bfloat16)
HK_MLSTM_FWD_CHUNKS(f16, __half)
