// RMSNorm over the last dimension (mamba-ssm's rms_norm_ref semantics, statistics in f32):
//   rstd[r] = 1 / sqrt(mean_c x[r, c]^2 + eps),   y[r, c] = x[r, c] rstd[r] w[c].
// Forward: one block per row (grid-stride over rows), a block reduction of the sum of squares,
// then y; rstd is saved for the backward. Backward: with xh = x rstd and g = dy w,
//   dx = rstd (g - xh mean_c(g xh)),   dw[c] = sum_r dy[r, c] xh[r, c].
// dw is summed without float atomics: each block adds its rows into its own row of an f32
// partial buffer (it owns it, no races), then rms_norm_dweight sums the blocks' rows in a fixed
// order, so repeated calls agree bit for bit.
#include "common.cuh"

namespace hk_rms {

constexpr int THREADS = 256;

struct RmsParams {
    uint32_t rows;  // product of the leading dimensions of x
    uint32_t dim;   // the normalised (last) dimension
    float eps;
    uint32_t blocks;  // backward: the blocks of the launch (rows of the partial buffer)
};
HK_PARAMS_LAYOUT(RmsParams, 4);

// The sum of v over the block, returned to every thread (`scratch`: 32 floats of shared memory).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < THREADS / 32 ? scratch[lane] : 0.f;
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

template <typename T>
__device__ __forceinline__ void forward(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y,
                                        float* __restrict__ rstd, const RmsParams p) {
    __shared__ float scratch[32];
    for (uint32_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const T* xr = x + size_t(r) * p.dim;
        float ss = 0.f;
        for (uint32_t c = threadIdx.x; c < p.dim; c += THREADS) {
            const float v = hk::to_f32(xr[c]);
            ss = fmaf(v, v, ss);
        }
        const float s = rsqrtf(block_sum(ss, scratch) / float(p.dim) + p.eps);
        T* yr = y + size_t(r) * p.dim;
        for (uint32_t c = threadIdx.x; c < p.dim; c += THREADS) yr[c] = hk::from_f32<T>(hk::to_f32(xr[c]) * s * w[c]);
        if (threadIdx.x == 0) rstd[r] = s;
    }
}

template <typename T>
__device__ __forceinline__ void backward(const T* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ rstd, const T* __restrict__ dy, T* __restrict__ dx,
                                         float* __restrict__ partial, const RmsParams p) {
    __shared__ float scratch[32];
    float* mine = partial + size_t(blockIdx.x) * p.dim;
    for (uint32_t c = threadIdx.x; c < p.dim; c += THREADS) mine[c] = 0.f;
    for (uint32_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const T* xr = x + size_t(r) * p.dim;
        const T* dyr = dy + size_t(r) * p.dim;
        const float s = rstd[r];
        float dot = 0.f;  // sum_c g xh
        for (uint32_t c = threadIdx.x; c < p.dim; c += THREADS) {
            const float xh = hk::to_f32(xr[c]) * s, d = hk::to_f32(dyr[c]);
            dot = fmaf(d * w[c], xh, dot);
            mine[c] += d * xh;  // the same thread wrote mine[c] before: no barrier needed
        }
        const float mean = block_sum(dot, scratch) / float(p.dim);
        T* dxr = dx + size_t(r) * p.dim;
        for (uint32_t c = threadIdx.x; c < p.dim; c += THREADS) {
            const float xh = hk::to_f32(xr[c]) * s;
            dxr[c] = hk::from_f32<T>(s * (hk::to_f32(dyr[c]) * w[c] - xh * mean));
        }
    }
}

// dweight[c] = sum over the blocks' partial rows, in block order.
__device__ __forceinline__ void dweight(const float* __restrict__ partial, float* __restrict__ dw, const RmsParams p) {
    for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < p.dim; c += gridDim.x * blockDim.x) {
        float s = 0.f;
        for (uint32_t b = 0; b < p.blocks; ++b) s += partial[size_t(b) * p.dim + c];
        dw[c] = s;
    }
}

}  // namespace hk_rms

#define HK_RMS_KERNELS(SUFFIX, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(hk_rms::THREADS)                                               \
        rms_norm_fwd_##SUFFIX(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y,           \
                              float* __restrict__ rstd, hk_rms::RmsParams p) {                                   \
        hk_rms::forward<T>(x, w, y, rstd, p);                                                                   \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(hk_rms::THREADS) rms_norm_bwd_##SUFFIX(                        \
        const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ rstd,                   \
        const T* __restrict__ dy, T* __restrict__ dx, float* __restrict__ partial, hk_rms::RmsParams p) {        \
        hk_rms::backward<T>(x, w, rstd, dy, dx, partial, p);                                                    \
    }

HK_RMS_KERNELS(f32, float)
HK_RMS_KERNELS(bf16, __nv_bfloat16)
HK_RMS_KERNELS(f16, __half)

extern "C" __global__ void rms_norm_dweight_f32(const float* __restrict__ partial, float* __restrict__ dw,
                                                hk_rms::RmsParams p) {
    hk_rms::dweight(partial, dw, p);
}
