// The mLSTM's backward: the chunked dq / dk / dv passes (f32, wider heads, other chunks),
// the per-step dot products and gate gradients every backward path runs. See mlstm.cuh.
#include "mlstm.cuh"

namespace hk_mlstm {

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
HK_PARAMS_LAYOUT(PassParams, 14);

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
            double ml[PER], bL, mL;
            scan_chunk_gates<L, PER>(bl, cl, ra, rc, m_prev, lane, ml, bL, mL);
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
HK_PARAMS_LAYOUT(RowDotShape, 2);

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
HK_PARAMS_LAYOUT(PrepParams, 7);

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
HK_PARAMS_LAYOUT(DotParams, 4);

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
HK_PARAMS_LAYOUT(GateParams, 5);

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

}  // namespace hk_mlstm

// BOUNDS: chunks up to 32 ask for two blocks per SM (64 registers): bf16 at L = 32 otherwise
// took 100 registers and ran one block per SM. Longer chunks would spill under that bound.
#define HK_MLSTM_PASS(NAME, T, L, BOUNDS)                                                                                \
    extern "C" __global__ void BOUNDS                                                                                   \
        NAME(const T* x, const T* y, const T* z, const float* ig, const float* fg, const float* m_fwd,                 \
             const float* d_fwd, const float* extra, const float* init_c, const float* init_n,                       \
             const float* init_m, T* out, float* final_c, float* final_n, const float* final_log,                      \
             hk_mlstm::PassParams p) {                                                                                 \
        hk_mlstm::mlstm_pass<T, L>(x, y, z, ig, fg, m_fwd, d_fwd, extra, init_c, init_n, init_m, out, final_c,        \
                                   final_n, final_log, p);                                                             \
    }

#define HK_MLSTM_PASS_CHUNKS(DT, T)                                                        \
    HK_MLSTM_PASS(mlstm_pass_##DT##_l16, T, 16, __launch_bounds__(hk_mlstm::THREADS, 2))    \
    HK_MLSTM_PASS(mlstm_pass_##DT##_l32, T, 32, __launch_bounds__(hk_mlstm::THREADS, 2))    \
    HK_MLSTM_PASS(mlstm_pass_##DT##_l64, T, 64, __launch_bounds__(hk_mlstm::THREADS))       \
    HK_MLSTM_PASS(mlstm_pass_##DT##_l128, T, 128, __launch_bounds__(hk_mlstm::THREADS))

HK_MLSTM_PASS_CHUNKS(f32, float)
HK_MLSTM_PASS_CHUNKS(bf16, __nv_bfloat16)
HK_MLSTM_PASS_CHUNKS(f16, __half)

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

#define HK_MLSTM_ROW_DOTS(DT, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::PREP_THREADS)                                               \
        mlstm_bwd_prep_h_##DT(const float* stats, const T* h, const T* dh, const float* fg, const float* m0,           \
                              float* aux, float* head_aux, hk_mlstm::PrepParams p) {                                  \
        hk_mlstm::mlstm_bwd_prep_h<T>(stats, h, dh, fg, m0, aux, head_aux, p);                                        \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::PREP_THREADS)                                               \
        mlstm_bwd_dots_##DT(const T* k, const T* dk, float* aux, float* di, float* df, hk_mlstm::DotParams p) {       \
        hk_mlstm::mlstm_bwd_dots<T>(k, dk, aux, di, df, p);                                                           \
    }

HK_MLSTM_ROW_DOTS(f32, float)
HK_MLSTM_ROW_DOTS(bf16, __nv_bfloat16)
HK_MLSTM_ROW_DOTS(f16, __half)
