// Learnable per-channel B-spline activation (the "B-spline MLP" between MLP and KAN):
//   y[r, c] = sum_j coeff[c, j] B_j(x[r, c]) + w[c] SiLU(x[r, c])    (w optional)
// on channel c's knot vector. Forward and dx: one thread per element, from the k + 1 bases
// (or derivatives) that can be non-zero at x. Parameter gradients are sums over rows:
// spline_activation_param_partials sums a chunk of rows per (chunk, channel) into an f32
// buffer, spline_activation_param_reduce adds the chunks in a fixed order, so the result is
// bitwise reproducible (no float atomics).
#include "bspline_device.cuh"

namespace hk_act {

struct ActParams {
    uint32_t n_rows;      // rows of x (product of the leading dimensions)
    uint32_t channels;    // C: the last dimension of x
    uint32_t n_knots;
    uint32_t order;
    uint32_t has_base;    // w present
    uint32_t rows_per_chunk;  // param partials: rows summed per chunk
    uint32_t uniform;     // KnotGrid::is_uniform
    uint32_t shared_acc;  // param partials: (nb + 1) * blockDim.x floats of dynamic shared memory
};
HK_PARAMS_LAYOUT(ActParams, 8);

__device__ __forceinline__ float silu_grad(float x) {
    const float s = hk::sigmoid(x);
    return s * (1.f + x * (1.f - s));
}

// Forward (Derivative = false): y. Backward (true): dx = dy (sum_j c_j B'_j + w SiLU').
template <typename T, int K, bool Backward, bool Uniform>
__device__ __forceinline__ void elementwise(const T* __restrict__ x, const float* __restrict__ grid,
                                            const T* __restrict__ coeff, const T* __restrict__ w,
                                            const T* __restrict__ dy, T* __restrict__ out, const ActParams& p) {
    const uint32_t nb = p.n_knots - 1u - uint32_t(K);
    const uint64_t n = uint64_t(p.n_rows) * p.channels;
    for (uint64_t e = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += uint64_t(gridDim.x) * blockDim.x) {
        const uint32_t c = uint32_t(e % p.channels);
        const float xv = hk::to_f32(x[e]);
        const float* t = grid + size_t(c) * p.n_knots;
        const hk_bspline::RowResult<K> r = hk_bspline::evaluate_row<K, Backward, Uniform>(xv, t, int(p.n_knots));
        float v = 0.f;
        if (p.has_base) v = hk::to_f32(w[c]) * (Backward ? silu_grad(xv) : hk::silu(xv));
        if (r.kind == hk_bspline::ROW_NAN) {
            v = xv;
        } else if (r.kind == hk_bspline::ROW_BASES) {
            const T* cc = coeff + size_t(c) * nb;
#pragma unroll
            for (int a = 0; a <= K; ++a) {
                const int j = r.first + a;
                if (j >= 0 && uint32_t(j) < nb) v = fmaf(hk::to_f32(cc[j]), r.v[a], v);
            }
        }
        if (Backward) v *= hk::to_f32(dy[e]);
        out[e] = hk::from_f32<T>(v);
    }
}

// partial[chunk, c, j] = sum over the chunk's rows of dy B_j(x); partial[chunk, c, nb] the
// same for SiLU(x) (the base weight's gradient). One thread per (chunk, channel) owns its
// nb + 1 sums. They live in shared memory (acc[j * blockDim.x + thread], conflict-free) when
// the launch provides (nb + 1) * blockDim.x floats of it (p.shared_acc), else in the
// partial buffer itself; global read-modify-writes go to L2 each time and were the slow
// part of the first version.
template <typename T, int K, bool Uniform>
__device__ __forceinline__ void param_partials(const T* __restrict__ x, const float* __restrict__ grid,
                                               const T* __restrict__ dy, float* __restrict__ partial,
                                               const ActParams& p, uint32_t n_chunks) {
    extern __shared__ float shared_acc[];
    const uint32_t nb = p.n_knots - 1u - uint32_t(K);
    const uint32_t n = n_chunks * p.channels;
    // Every thread of the block runs the same number of iterations (no early exit), so the
    // shared slice of a thread is only ever touched by that thread.
    for (uint32_t e0 = blockIdx.x * blockDim.x; e0 < n; e0 += gridDim.x * blockDim.x) {
        const uint32_t e = e0 + threadIdx.x;
        if (e >= n) continue;
        const uint32_t chunk = e / p.channels, c = e % p.channels;
        float* acc = p.shared_acc ? shared_acc + threadIdx.x : partial + size_t(e) * (nb + 1);
        const uint32_t stride = p.shared_acc ? blockDim.x : 1u;
        for (uint32_t j = 0; j <= nb; ++j) acc[j * stride] = 0.f;
        const float* t = grid + size_t(c) * p.n_knots;
        const uint32_t r0 = chunk * p.rows_per_chunk, r1 = min(p.n_rows, r0 + p.rows_per_chunk);
        bool nan_row = false;
        float nan_value = 0.f;
        for (uint32_t row = r0; row < r1; ++row) {
            const size_t i = size_t(row) * p.channels + c;
            const float xv = hk::to_f32(x[i]);
            const float g = hk::to_f32(dy[i]);
            const hk_bspline::RowResult<K> r = hk_bspline::evaluate_row<K, false, Uniform>(xv, t, int(p.n_knots));
            if (r.kind == hk_bspline::ROW_NAN) {
                nan_row = true;
                nan_value = xv;
                continue;
            }
            if (r.kind == hk_bspline::ROW_BASES) {
#pragma unroll
                for (int a = 0; a <= K; ++a) {
                    const int j = r.first + a;
                    if (j >= 0 && uint32_t(j) < nb) acc[j * stride] = fmaf(g, r.v[a], acc[j * stride]);
                }
            }
            acc[nb * stride] = fmaf(g, hk::silu(xv), acc[nb * stride]);
        }
        // A NaN input poisons every sum of its channel, as in the reference.
        for (uint32_t j = 0; j <= nb; ++j) {
            const float v = nan_row ? nan_value : acc[j * stride];
            partial[size_t(e) * (nb + 1) + j] = v;
        }
    }
}

template <typename T>
__device__ __forceinline__ void forward_or_dx(const T* x, const float* grid, const T* coeff, const T* w, const T* dy,
                                              T* out, const ActParams& p, bool backward) {
    HK_WITH_ORDER(p.order, HK_WITH_GRID(p.uniform, if (backward) elementwise<T, K, true, U>(x, grid, coeff, w, dy, out, p);
                                                   else elementwise<T, K, false, U>(x, grid, coeff, w, dy, out, p)));
}

template <typename T>
__device__ __forceinline__ void partials(const T* x, const float* grid, const T* dy, float* partial,
                                         const ActParams& p, uint32_t n_chunks) {
    HK_WITH_ORDER(p.order, HK_WITH_GRID(p.uniform, param_partials<T, K, U>(x, grid, dy, partial, p, n_chunks)));
}

// d_coeff[c, j] = sum_chunk partial[chunk, c, j] (fixed order); d_w[c] likewise from column nb.
template <typename T>
__device__ __forceinline__ void reduce(const float* __restrict__ partial, T* __restrict__ d_coeff, T* __restrict__ d_w,
                                       uint32_t n_chunks, uint32_t channels, uint32_t nb, uint32_t has_base) {
    const uint32_t n = channels * (nb + 1);
    for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        float s = 0.f;
        for (uint32_t chunk = 0; chunk < n_chunks; ++chunk) s += partial[size_t(chunk) * n + e];
        const uint32_t c = e / (nb + 1), j = e % (nb + 1);
        if (j < nb) d_coeff[size_t(c) * nb + j] = hk::from_f32<T>(s);
        else if (has_base) d_w[c] = hk::from_f32<T>(s);
    }
}

}  // namespace hk_act

#define HK_ACT_KERNELS(SUFFIX, T)                                                                                  \
    extern "C" __global__ void spline_activation_forward_##SUFFIX(                                             \
        const T* __restrict__ x, const float* __restrict__ grid, const T* __restrict__ coeff,                  \
        const T* __restrict__ w, T* __restrict__ y, hk_act::ActParams p) {                                     \
        hk_act::forward_or_dx<T>(x, grid, coeff, w, nullptr, y, p, false);                                     \
    }                                                                                                           \
    extern "C" __global__ void spline_activation_dx_##SUFFIX(                                                  \
        const T* __restrict__ x, const float* __restrict__ grid, const T* __restrict__ coeff,                  \
        const T* __restrict__ w, const T* __restrict__ dy, T* __restrict__ dx, hk_act::ActParams p) {          \
        hk_act::forward_or_dx<T>(x, grid, coeff, w, dy, dx, p, true);                                          \
    }                                                                                                           \
    extern "C" __global__ void spline_activation_param_partials_##SUFFIX(                                      \
        const T* __restrict__ x, const float* __restrict__ grid, const T* __restrict__ dy,                     \
        float* __restrict__ partial, hk_act::ActParams p, uint32_t n_chunks) {                                 \
        hk_act::partials<T>(x, grid, dy, partial, p, n_chunks);                                                \
    }                                                                                                           \
    extern "C" __global__ void spline_activation_param_reduce_##SUFFIX(                                        \
        const float* __restrict__ partial, T* __restrict__ d_coeff, T* __restrict__ d_w, uint32_t n_chunks,    \
        uint32_t channels, uint32_t nb, uint32_t has_base) {                                                   \
        hk_act::reduce<T>(partial, d_coeff, d_w, n_chunks, channels, nb, has_base);                            \
    }

HK_ACT_KERNELS(f32, float)
HK_ACT_KERNELS(bf16, __nv_bfloat16)
HK_ACT_KERNELS(f16, __half)
