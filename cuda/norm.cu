// RMSNorm, LayerNorm and group norm over the last dimension, with the residual add of Mamba's
// blocks fused in front (mamba-ssm's layer_norm_fn / rms_norm_fn with residual_in_fp32):
//   z = x + residual (f32; z = x without a residual),  per group of `dim` elements:
//   LayerNorm: mean = sum z / dim, rstd = 1 / sqrt(sum (z - mean)^2 / dim + eps)
//   RMSNorm:   mean = 0,           rstd = 1 / sqrt(sum z^2 / dim + eps)
//   y = (z - mean) rstd w + b.
// A row holds `groups` groups (xLSTM's multi-head norm: a group per head) and the weight spans
// the row, so group g of every row uses w[g dim .. (g + 1) dim].
//
// Forward: a block per group-row (grid-stride), the block's threads each holding up to VPT = 4
// vectors of VEC elements in registers (16-byte loads and stores), so z is read once and each
// thread has four loads in flight (one per thread left a 768-wide bf16 row at half the copy
// bandwidth); rows past 512 x 4 vectors stream their remainder through L1/L2 a second time. Statistics are two-pass about the
// mean (not E[z^2] - mean^2), so a large mean does not cancel the variance.
//
// Backward, with xh = (z - mean) rstd and g = dy w:
//   dz = rstd (g - mean_c(g) - xh mean_c(g xh)) + dresidual   (mean_c(g) dropped for RMSNorm)
//   dw[c] = sum over rows of dy xh,  db[c] = sum over rows of dy.
// dw and db are summed without float atomics: a one-wave grid of blocks, each adding its rows
// into registers (or, past the cached columns, into its own row of an f32 partial buffer),
// then norm_reduce_partials sums the blocks' rows in a fixed order (segments of rows in
// parallel, then the segments): repeated calls on the same device agree bit for bit.
#include "common.cuh"

namespace hk_norm {

// Forward flags (NormParams::flags).
constexpr uint32_t RMS = 1;           // RMSNorm (no mean); else LayerNorm
constexpr uint32_t BIAS = 2;          // forward: add b; backward: write the bias gradient
constexpr uint32_t RESIDUAL = 4;      // forward: z = x + residual; backward: dz += dresidual
constexpr uint32_t RESIDUAL_OUT = 8;  // forward: write z (f32); backward: write dz (f32)

constexpr int MAX_THREADS = 512;

struct NormParams {
    uint32_t rows;    // group-rows: the product of x's leading dimensions times `groups`
    uint32_t dim;     // elements per group
    uint32_t groups;  // groups per row of x (the weight has groups * dim elements)
    uint32_t flags;
    float eps;
    uint32_t blocks;  // backward: the grid (rows of the partial buffer)
};
HK_PARAMS_LAYOUT(NormParams, 6);

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

// N consecutive elements at p (aligned to their size: the host checks dim % N == 0) as f32.
template <int N, typename T>
__device__ __forceinline__ void load(const T* __restrict__ p, float (&o)[N]) {
    const Pack<T, N> k = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) o[i] = hk::to_f32(k.v[i]);
}

template <int N, typename T>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&o)[N]) {
    Pack<T, N> k;
#pragma unroll
    for (int i = 0; i < N; ++i) k.v[i] = hk::from_f32<T>(o[i]);
    *reinterpret_cast<Pack<T, N>*>(p) = k;
}

__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
        v.x += __shfl_xor_sync(0xffffffffu, v.x, m);
        v.y += __shfl_xor_sync(0xffffffffu, v.y, m);
    }
    return v;
}

// The sum of v over the block (a multiple of 32 threads), returned to every thread, in a
// fixed order. `scratch`: 32 float2 of shared memory.
__device__ __forceinline__ float2 block_sum(float2 v, float2* scratch) {
    v = warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // scratch may still be read by the previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < int(blockDim.x / 32) ? scratch[lane] : make_float2(0.f, 0.f);
    return warp_sum(v);
}

// z = x (+ residual) for the VEC elements of vector `i` of group-row base.
template <typename T, int VEC>
__device__ __forceinline__ void load_z(const T* __restrict__ x, const float* __restrict__ residual, size_t at,
                                       bool has_residual, float (&z)[VEC]) {
    load<VEC>(x + at, z);
    if (has_residual) {
        float r[VEC];
        load<VEC>(residual + at, r);
#pragma unroll
        for (int e = 0; e < VEC; ++e) z[e] += r[e];
    }
}

template <typename T, int VEC, int VPT>
__device__ __forceinline__ void forward(const T* __restrict__ x, const float* __restrict__ residual,
                                        const float* __restrict__ w, const float* __restrict__ b, T* __restrict__ y,
                                        float* __restrict__ z_out, float* __restrict__ mean_out,
                                        float* __restrict__ rstd_out, const NormParams p) {
    __shared__ float2 scratch[32];
    const uint32_t nvec = p.dim / VEC, t = threadIdx.x, stride = blockDim.x;
    const bool rms = p.flags & RMS, has_bias = p.flags & BIAS, has_residual = p.flags & RESIDUAL,
               write_z = p.flags & RESIDUAL_OUT;
    const float inv_dim = 1.f / float(p.dim);
    for (uint32_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const size_t base = size_t(r) * p.dim;
        const size_t wbase = size_t(r % p.groups) * p.dim;
        float z[VPT][VEC];
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const uint32_t i = t + k * stride;
            if (i < nvec) {
                load_z<T, VEC>(x, residual, base + size_t(i) * VEC, has_residual, z[k]);
#pragma unroll
                for (int e = 0; e < VEC; ++e) sum += z[k][e];
            }
        }
        for (uint32_t i = t + VPT * stride; i < nvec; i += stride) {
            float v[VEC];
            load_z<T, VEC>(x, residual, base + size_t(i) * VEC, has_residual, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) sum += v[e];
        }
        const float mean = rms ? 0.f : block_sum(make_float2(sum, 0.f), scratch).x * inv_dim;
        float sq = 0.f;
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            if (t + k * stride < nvec) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) sq = fmaf(z[k][e] - mean, z[k][e] - mean, sq);
            }
        }
        for (uint32_t i = t + VPT * stride; i < nvec; i += stride) {
            float v[VEC];
            load_z<T, VEC>(x, residual, base + size_t(i) * VEC, has_residual, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) sq = fmaf(v[e] - mean, v[e] - mean, sq);
        }
        const float rstd = rsqrtf(block_sum(make_float2(sq, 0.f), scratch).x * inv_dim + p.eps);
        // y for vector i from its z; writes z too when asked.
        auto emit = [&](uint32_t i, float (&v)[VEC]) {
            const size_t at = base + size_t(i) * VEC;
            if (write_z) store<VEC>(z_out + at, v);
            float wv[VEC], bv[VEC];
            load<VEC>(w + wbase + size_t(i) * VEC, wv);
            if (has_bias) load<VEC>(b + wbase + size_t(i) * VEC, bv);
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[e] = (v[e] - mean) * rstd * wv[e] + (has_bias ? bv[e] : 0.f);
            store<VEC>(y + at, v);
        };
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            if (t + k * stride < nvec) emit(t + k * stride, z[k]);
        }
        for (uint32_t i = t + VPT * stride; i < nvec; i += stride) {
            float v[VEC];
            load_z<T, VEC>(x, residual, base + size_t(i) * VEC, has_residual, v);
            emit(i, v);
        }
        if (t == 0) {
            rstd_out[r] = rstd;
            if (!rms) mean_out[r] = mean;
        }
    }
}

// The backward of `forward` from the normalised input z (x, or the f32 sum it wrote): dx (and
// dz in f32 with RESIDUAL_OUT), and each block's partial dw (and db) row. Partial rows:
// `blocks` of `groups * dim` floats for dw, then as many for db when BIAS.
template <typename T, typename Z, int VEC, int VPT>
__device__ __forceinline__ void backward(const Z* __restrict__ z, const float* __restrict__ w,
                                         const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                         const T* __restrict__ dy, const float* __restrict__ dresidual,
                                         T* __restrict__ dx, float* __restrict__ dz_out, float* __restrict__ partial,
                                         const NormParams p) {
    __shared__ float2 scratch[32];
    const uint32_t nvec = p.dim / VEC, t = threadIdx.x, stride = blockDim.x;
    const bool rms = p.flags & RMS, want_db = p.flags & BIAS, has_dres = p.flags & RESIDUAL,
               write_dz = p.flags & RESIDUAL_OUT;
    const float inv_dim = 1.f / float(p.dim);
    const size_t width = size_t(p.groups) * p.dim;
    float* pw = partial + size_t(blockIdx.x) * width;
    float* pb = partial + (size_t(p.blocks) + blockIdx.x) * width;
    // Columns past the cached ones accumulate in the block's own partial row (no races):
    // zeroed first. The block's rows all belong to groups blockIdx.x mod groups, ... so every
    // group's columns are visited; the cached ones are written at the end.
    for (uint32_t g = 0; g < p.groups; ++g) {
        for (uint32_t i = t + VPT * stride; i < nvec; i += stride) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                pw[g * size_t(p.dim) + size_t(i) * VEC + e] = 0.f;
                if (want_db) pb[g * size_t(p.dim) + size_t(i) * VEC + e] = 0.f;
            }
        }
    }
    // Cached columns' sums per group would need groups x VPT x VEC registers: with groups > 1
    // they go straight to the partial row as well (zeroed here), which the block owns.
    const bool cache_sums = p.groups == 1;
    if (!cache_sums) {
        for (uint32_t g = 0; g < p.groups; ++g) {
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                const uint32_t i = t + k * stride;
                if (i < nvec) {
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        pw[g * size_t(p.dim) + size_t(i) * VEC + e] = 0.f;
                        if (want_db) pb[g * size_t(p.dim) + size_t(i) * VEC + e] = 0.f;
                    }
                }
            }
        }
    }
    float sw[VPT][VEC], sb[VPT][VEC];
#pragma unroll
    for (int k = 0; k < VPT; ++k)
#pragma unroll
        for (int e = 0; e < VEC; ++e) sw[k][e] = sb[k][e] = 0.f;

    for (uint32_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const size_t base = size_t(r) * p.dim;
        const size_t wbase = size_t(r % p.groups) * p.dim;
        const float mean = rms ? 0.f : mean_in[r], rstd = rstd_in[r];
        // The cached vectors stay as loaded (16-bit values packed: half the registers of
        // f32), and xh, g are recomputed from them for dx.
        Pack<Z, VEC> zc[VPT];
        Pack<T, VEC> dc[VPT];
        float2 acc = make_float2(0.f, 0.f);  // (sum g xh, sum g)
        // xh and g = dy w of vector i from its raw z and dy.
        auto prepare = [&](uint32_t i, const Pack<Z, VEC>& zp, const Pack<T, VEC>& dp, float (&xv)[VEC],
                           float (&gv)[VEC], float (&dv)[VEC]) {
            float wv[VEC];
            load<VEC>(w + wbase + size_t(i) * VEC, wv);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                xv[e] = (hk::to_f32(zp.v[e]) - mean) * rstd;
                dv[e] = hk::to_f32(dp.v[e]);
                gv[e] = dv[e] * wv[e];
            }
        };
        // Adds vector i's terms to the row sums and to the column sums (registers for cached
        // vector k, else the block's partial row).
        auto terms = [&](uint32_t i, const Pack<Z, VEC>& zp, const Pack<T, VEC>& dp, bool cached, int k) {
            float xv[VEC], gv[VEC], dv[VEC];
            prepare(i, zp, dp, xv, gv, dv);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                acc.x = fmaf(gv[e], xv[e], acc.x);
                acc.y += gv[e];
            }
            if (cached && cache_sums) {
#pragma unroll
                for (int kk = 0; kk < VPT; ++kk) {
                    if (kk == k) {
#pragma unroll
                        for (int e = 0; e < VEC; ++e) {
                            sw[kk][e] = fmaf(dv[e], xv[e], sw[kk][e]);
                            sb[kk][e] += dv[e];
                        }
                    }
                }
            } else {
                float* cw = pw + wbase + size_t(i) * VEC;
                float* cb = pb + wbase + size_t(i) * VEC;
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    cw[e] = fmaf(dv[e], xv[e], cw[e]);
                    if (want_db) cb[e] += dv[e];
                }
            }
        };
        auto raw = [&](uint32_t i, Pack<Z, VEC>& zp, Pack<T, VEC>& dp) {
            zp = *reinterpret_cast<const Pack<Z, VEC>*>(z + base + size_t(i) * VEC);
            dp = *reinterpret_cast<const Pack<T, VEC>*>(dy + base + size_t(i) * VEC);
        };
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            if (t + k * stride < nvec) raw(t + k * stride, zc[k], dc[k]);
        }
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            if (t + k * stride < nvec) terms(t + k * stride, zc[k], dc[k], true, k);
        }
        for (uint32_t i = t + VPT * stride; i < nvec; i += stride) {
            Pack<Z, VEC> zp;
            Pack<T, VEC> dp;
            raw(i, zp, dp);
            terms(i, zp, dp, false, 0);
        }
        const float2 s = block_sum(acc, scratch);
        const float mean_gxh = s.x * inv_dim, mean_g = rms ? 0.f : s.y * inv_dim;
        auto emit = [&](uint32_t i, const Pack<Z, VEC>& zp, const Pack<T, VEC>& dp) {
            float xv[VEC], gv[VEC], dv[VEC];
            prepare(i, zp, dp, xv, gv, dv);
            const size_t at = base + size_t(i) * VEC;
            float d[VEC], dr[VEC];
            if (has_dres) load<VEC>(dresidual + at, dr);
#pragma unroll
            for (int e = 0; e < VEC; ++e) d[e] = rstd * (gv[e] - mean_g - xv[e] * mean_gxh) + (has_dres ? dr[e] : 0.f);
            store<VEC>(dx + at, d);
            if (write_dz) store<VEC>(dz_out + at, d);
        };
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            if (t + k * stride < nvec) emit(t + k * stride, zc[k], dc[k]);
        }
        for (uint32_t i = t + VPT * stride; i < nvec; i += stride) {
            // Read again (these columns were not kept); the sums are not added twice.
            Pack<Z, VEC> zp;
            Pack<T, VEC> dp;
            raw(i, zp, dp);
            emit(i, zp, dp);
        }
    }
    if (cache_sums) {
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const uint32_t i = t + k * stride;
            if (i < nvec) {
                store<VEC>(pw + size_t(i) * VEC, sw[k]);
                if (want_db) store<VEC>(pb + size_t(i) * VEC, sb[k]);
            }
        }
    }
}

}  // namespace hk_norm

// Kernels per element type T, vector width VEC (16 bytes of T, or 1 when dim is not a
// multiple) and cached vectors per thread VPT: norm_fwd_<T>_v<VEC>_p<VPT>; the backward from a
// normalised input in T (x) or in f32 (the residual sum): norm_bwd_<T>_v<VEC>_p<VPT>[_zf32].
#define HK_NORM_FWD(SUFFIX, T, VEC, VPT)                                                                          \
    extern "C" __global__ void __launch_bounds__(hk_norm::MAX_THREADS) norm_fwd_##SUFFIX##_v##VEC##_p##VPT(      \
        const T* __restrict__ x, const float* __restrict__ residual, const float* __restrict__ w,                \
        const float* __restrict__ b, T* __restrict__ y, float* __restrict__ z_out, float* __restrict__ mean_out, \
        float* __restrict__ rstd_out, hk_norm::NormParams p) {                                                  \
        hk_norm::forward<T, VEC, VPT>(x, residual, w, b, y, z_out, mean_out, rstd_out, p);                      \
    }

#define HK_NORM_BWD(NAME, T, Z, VEC, VPT)                                                                         \
    extern "C" __global__ void __launch_bounds__(hk_norm::MAX_THREADS) NAME(                                    \
        const Z* __restrict__ z, const float* __restrict__ w, const float* __restrict__ mean_in,                 \
        const float* __restrict__ rstd_in, const T* __restrict__ dy, const float* __restrict__ dresidual,        \
        T* __restrict__ dx, float* __restrict__ dz_out, float* __restrict__ partial, hk_norm::NormParams p) {     \
        hk_norm::backward<T, Z, VEC, VPT>(z, w, mean_in, rstd_in, dy, dresidual, dx, dz_out, partial, p);        \
    }

#define HK_NORM_TYPE(SUFFIX, T, VEC)                           \
    HK_NORM_FWD(SUFFIX, T, VEC, 4)                             \
    HK_NORM_FWD(SUFFIX, T, 1, 4)                               \
    HK_NORM_BWD(norm_bwd_##SUFFIX##_v##VEC##_p2, T, T, VEC, 2) \
    HK_NORM_BWD(norm_bwd_##SUFFIX##_v1_p4, T, T, 1, 4)

HK_NORM_TYPE(f32, float, 4)
HK_NORM_TYPE(bf16, __nv_bfloat16, 8)
HK_NORM_TYPE(f16, __half, 8)
// The backward of the fused residual add: z is the f32 sum, dy and dx in the model's type.
HK_NORM_BWD(norm_bwd_bf16_v8_p2_zf32, __nv_bfloat16, float, 8, 2)
HK_NORM_BWD(norm_bwd_bf16_v1_p4_zf32, __nv_bfloat16, float, 1, 4)
HK_NORM_BWD(norm_bwd_f16_v8_p2_zf32, __half, float, 8, 2)
HK_NORM_BWD(norm_bwd_f16_v1_p4_zf32, __half, float, 1, 4)

// Column sums of row segments, in a fixed order: for half h (blockIdx.z: 0 the weight's rows,
// 1 the bias's) and segment s (blockIdx.y) of `seg_len` rows of `in` (halves x rows x cols),
// (h == 0 ? out_w : out_b)[s * cols + c] = sum of its rows, each warp row (threadIdx.y) adding
// every 8th row in order, then the 8 warp rows in order. Two launches reduce the backward's
// partial rows: segments of rows into `segments` rows, then those into dweight and dbias. Block
// (32, 8), grid (ceil(cols / 32), segments, halves).
extern "C" __global__ void __launch_bounds__(256)
    norm_reduce_partials(const float* __restrict__ in, float* __restrict__ out_w, float* __restrict__ out_b,
                         uint32_t cols, uint32_t rows, uint32_t seg_len) {
    __shared__ float sums[8][33];
    const uint32_t c = blockIdx.x * 32 + threadIdx.x;
    const size_t base = size_t(blockIdx.z) * rows * size_t(cols);
    const uint32_t first = blockIdx.y * seg_len;
    const uint32_t last = first + seg_len < rows ? first + seg_len : rows;
    float s = 0.f;
    if (c < cols) {
        for (uint32_t b = first + threadIdx.y; b < last; b += 8) s += in[base + size_t(b) * cols + c];
    }
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float total = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) total += sums[k][threadIdx.x];
        (blockIdx.z == 0 ? out_w : out_b)[size_t(blockIdx.y) * cols + c] = total;
    }
}
