// KANLinear (efficient-kan semantics) pieces around the two cuBLAS GEMMs:
//   y = SiLU(x) W_base^T + B(x)_flat (W_spline * scaler)^T
// Forward: kan_silu (the base branch's input), the bspline.cu basis kernel, kan_scale_spline
// (W_spline * scaler, flattened), then the GEMMs. Backward: the GEMMs give dW_base,
// d(W_spline * scaler), d SiLU(x) and dB (written over the basis buffer, so the backward
// holds one basis-sized buffer); kan_spline_weight_grads splits d(W_spline * scaler) into
// dW_spline and dscaler; kan_input_grad turns d SiLU(x) and dB into dx, recomputing the
// k + 1 non-zero basis derivatives of each row instead of storing them.
#include "bspline_device.cuh"

namespace hk_kan {

constexpr int MAX_SPLINE_ORDER = 7;  // src/ops/bspline/mod.rs: MAX_SPLINE_ORDER

struct InputGradParams {
    uint32_t n_rows;       // batch * in_features
    uint32_t in_features;
    uint32_t n_knots;
    uint32_t order;
};

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// d/dx x sigmoid(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))
__device__ __forceinline__ float silu_grad(float x) {
    const float s = sigmoid(x);
    return s * (1.f + x * (1.f - s));
}

template <typename T>
__device__ __forceinline__ void silu(const T* __restrict__ x, T* __restrict__ out, uint64_t n) {
    for (uint64_t e = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += uint64_t(gridDim.x) * blockDim.x) {
        const float v = hk::to_f32(x[e]);
        out[e] = hk::from_f32<T>(v * sigmoid(v));
    }
}

// out[oi * nb + j] = w[oi * nb + j] * scaler[oi]
template <typename T>
__device__ __forceinline__ void scale_spline(const T* __restrict__ w, const T* __restrict__ scaler, T* __restrict__ out,
                                             uint64_t n, uint32_t nb) {
    for (uint64_t e = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += uint64_t(gridDim.x) * blockDim.x) {
        out[e] = hk::from_f32<T>(hk::to_f32(w[e]) * hk::to_f32(scaler[e / nb]));
    }
}

// For each (o, i): dW[j] = dS[j] * scaler, dscaler = sum_j dS[j] * W[j], where dS is the
// gradient of the scaled weights W * scaler. One thread per (o, i), f32 sum over j.
template <typename T>
__device__ __forceinline__ void spline_weight_grads(const T* __restrict__ d_scaled, const T* __restrict__ w,
                                                    const T* __restrict__ scaler, T* __restrict__ d_w,
                                                    T* __restrict__ d_scaler, uint32_t n_oi, uint32_t nb) {
    for (uint32_t oi = blockIdx.x * blockDim.x + threadIdx.x; oi < n_oi; oi += gridDim.x * blockDim.x) {
        const float s = hk::to_f32(scaler[oi]);
        const size_t base = size_t(oi) * nb;
        float acc = 0.f;
        for (uint32_t j = 0; j < nb; ++j) {
            const float g = hk::to_f32(d_scaled[base + j]);
            d_w[base + j] = hk::from_f32<T>(g * s);
            acc = fmaf(g, hk::to_f32(w[base + j]), acc);
        }
        d_scaler[oi] = hk::from_f32<T>(acc);
    }
}

// dx[row] = dsilu[row] * SiLU'(x) + sum_j dB[row, j] * B'_j(x); only the k + 1 bases of
// the row's interval have non-zero derivatives, so only those entries of dB are read.
template <typename T, int K>
__device__ __forceinline__ void input_grad_rows(const T* __restrict__ x, const float* __restrict__ grid,
                                                const T* __restrict__ d_silu, const T* __restrict__ d_bases,
                                                T* __restrict__ dx, const InputGradParams& p) {
    const uint32_t n_bases = p.n_knots - 1u - uint32_t(K);
    for (uint32_t row = blockIdx.x * blockDim.x + threadIdx.x; row < p.n_rows; row += gridDim.x * blockDim.x) {
        const float xv = hk::to_f32(x[row]);
        const float* t = grid + size_t(row % p.in_features) * p.n_knots;
        const hk_bspline::RowResult<K> r = hk_bspline::evaluate_row<K, true>(xv, t, int(p.n_knots));
        float g = hk::to_f32(d_silu[row]) * silu_grad(xv);
        if (r.kind == hk_bspline::ROW_NAN) {
            g = xv;
        } else if (r.kind == hk_bspline::ROW_BASES) {
            const T* db = d_bases + size_t(row) * n_bases;
#pragma unroll
            for (int a = 0; a <= K; ++a) {
                const int j = r.first + a;
                if (j >= 0 && uint32_t(j) < n_bases) g = fmaf(hk::to_f32(db[j]), r.v[a], g);
            }
        }
        dx[row] = hk::from_f32<T>(g);
    }
}

template <typename T>
__device__ __forceinline__ void input_grad(const T* x, const float* grid, const T* d_silu, const T* d_bases, T* dx,
                                           const InputGradParams& p) {
    switch (p.order) {
        case 0: input_grad_rows<T, 0>(x, grid, d_silu, d_bases, dx, p); break;
        case 1: input_grad_rows<T, 1>(x, grid, d_silu, d_bases, dx, p); break;
        case 2: input_grad_rows<T, 2>(x, grid, d_silu, d_bases, dx, p); break;
        case 3: input_grad_rows<T, 3>(x, grid, d_silu, d_bases, dx, p); break;
        case 4: input_grad_rows<T, 4>(x, grid, d_silu, d_bases, dx, p); break;
        case 5: input_grad_rows<T, 5>(x, grid, d_silu, d_bases, dx, p); break;
        case 6: input_grad_rows<T, 6>(x, grid, d_silu, d_bases, dx, p); break;
        case 7: input_grad_rows<T, 7>(x, grid, d_silu, d_bases, dx, p); break;
        default: break;  // rejected on the host
    }
    static_assert(MAX_SPLINE_ORDER == 7, "extend the switch with the maximum order");
}

}  // namespace hk_kan

#define KAN_KERNELS(SUFFIX, T)                                                                                  \
    extern "C" __global__ void kan_silu_##SUFFIX(const T* __restrict__ x, T* __restrict__ out, uint64_t n) {     \
        hk_kan::silu(x, out, n);                                                                                \
    }                                                                                                           \
    extern "C" __global__ void kan_scale_spline_##SUFFIX(const T* __restrict__ w, const T* __restrict__ scaler,  \
                                                         T* __restrict__ out, uint64_t n, uint32_t nb) {        \
        hk_kan::scale_spline(w, scaler, out, n, nb);                                                            \
    }                                                                                                           \
    extern "C" __global__ void kan_spline_weight_grads_##SUFFIX(                                                \
        const T* __restrict__ d_scaled, const T* __restrict__ w, const T* __restrict__ scaler,                  \
        T* __restrict__ d_w, T* __restrict__ d_scaler, uint32_t n_oi, uint32_t nb) {                            \
        hk_kan::spline_weight_grads(d_scaled, w, scaler, d_w, d_scaler, n_oi, nb);                              \
    }                                                                                                           \
    extern "C" __global__ void kan_input_grad_##SUFFIX(const T* __restrict__ x, const float* __restrict__ grid,   \
                                                       const T* __restrict__ d_silu, const T* __restrict__ d_bases, \
                                                       T* __restrict__ dx, hk_kan::InputGradParams p) {          \
        hk_kan::input_grad(x, grid, d_silu, d_bases, dx, p);                                                    \
    }

KAN_KERNELS(f32, float)
KAN_KERNELS(bf16, __nv_bfloat16)
KAN_KERNELS(f16, __half)
