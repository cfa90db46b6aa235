// KANLinear (efficient-kan semantics) as one GEMM:
//   y = A W_cat^T, A = [SiLU(x) | B(x)] (rows, in, 1 + nb), W_cat = [W_base | W_spline * scaler]
//   (out, in, 1 + nb).
// Forward: kan_features writes A (the B-spline tile machinery of bspline_device.cuh with a
// leading SiLU column), kan_fold_weights writes W_cat, then one cuBLAS GEMM with
// K = in (1 + nb). Backward: dW_cat = dy^T A, then dA = dy W_cat written over A (so the
// backward holds the one features buffer); kan_split_grads turns dW_cat into dW_base,
// dW_spline and dscaler; kan_input_grad turns dA into dx, recomputing the k + 1 non-zero
// basis derivatives of each row instead of storing them.
#include "bspline_device.cuh"

namespace hk_kan {

struct InputGradParams {
    uint32_t n_rows;       // batch * in_features
    uint32_t in_features;
    uint32_t n_knots;
    uint32_t order;
    uint32_t uniform;      // KnotGrid::is_uniform
};
HK_PARAMS_LAYOUT(InputGradParams, 5);

// d/dx x sigmoid(x) = sigmoid(x) (1 + x (1 - sigmoid(x)))
__device__ __forceinline__ float silu_grad(float x) {
    const float s = hk::sigmoid(x);
    return s * (1.f + x * (1.f - s));
}

// W_cat[oi, 0] = W_base[oi]; W_cat[oi, 1 + j] = W_spline[oi, j] * scaler[oi] (scaler: 1 when
// has_scaler is 0; the pointer is then not read). Index math in 32 bits when the output
// fits: a 64-bit division per element made the first version compute-bound.
template <typename T, typename Index>
__device__ __forceinline__ void fold_weights_indexed(const T* __restrict__ w_base, const T* __restrict__ w_spline,
                                                     const T* __restrict__ scaler, uint32_t has_scaler,
                                                     T* __restrict__ w_cat, Index n, uint32_t nb) {
    const Index cols = nb + 1;
    for (Index e = Index(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += Index(gridDim.x) * blockDim.x) {
        const Index oi = e / cols;
        const Index c = e - oi * cols;
        float v;
        if (c == 0) {
            v = hk::to_f32(w_base[oi]);
        } else {
            v = hk::to_f32(w_spline[oi * nb + (c - 1)]);
            if (has_scaler) v *= hk::to_f32(scaler[oi]);
        }
        w_cat[e] = hk::from_f32<T>(v);
    }
}

template <typename T>
__device__ __forceinline__ void fold_weights(const T* w_base, const T* w_spline, const T* scaler, uint32_t has_scaler,
                                             T* w_cat, uint32_t n_oi, uint32_t nb) {
    const uint64_t n = uint64_t(n_oi) * (nb + 1);
    if (n <= 0xffffffffull - 2ull * gridDim.x * blockDim.x) {
        fold_weights_indexed<T, uint32_t>(w_base, w_spline, scaler, has_scaler, w_cat, uint32_t(n), nb);
    } else {
        fold_weights_indexed<T, uint64_t>(w_base, w_spline, scaler, has_scaler, w_cat, n, nb);
    }
}

// From dW_cat (oi, 1 + nb): dW_base[oi] = dW_cat[oi, 0]; dW_spline[oi, j] = dW_cat[oi, 1 + j] *
// scaler[oi]; dscaler[oi] = sum_j dW_cat[oi, 1 + j] W_spline[oi, j] (f32 sum). One thread per oi.
template <typename T>
__device__ __forceinline__ void split_grads(const T* __restrict__ d_cat, const T* __restrict__ w_spline,
                                           const T* __restrict__ scaler, uint32_t has_scaler, T* __restrict__ d_base,
                                           T* __restrict__ d_spline, T* __restrict__ d_scaler, uint32_t n_oi, uint32_t nb) {
    for (uint32_t oi = blockIdx.x * blockDim.x + threadIdx.x; oi < n_oi; oi += gridDim.x * blockDim.x) {
        const T* g = d_cat + size_t(oi) * (nb + 1);
        d_base[oi] = g[0];
        const float s = has_scaler ? hk::to_f32(scaler[oi]) : 1.f;
        float acc = 0.f;
        for (uint32_t j = 0; j < nb; ++j) {
            const float gj = hk::to_f32(g[1 + j]);
            d_spline[size_t(oi) * nb + j] = hk::from_f32<T>(gj * s);
            acc = fmaf(gj, hk::to_f32(w_spline[size_t(oi) * nb + j]), acc);
        }
        if (has_scaler) d_scaler[oi] = hk::from_f32<T>(acc);
    }
}

// dx[row] = dA[row, 0] SiLU'(x) + sum_j dA[row, 1 + j] B'_j(x); only the k + 1 bases of the
// row's interval have non-zero derivatives, so only those entries of dA are read.
template <typename T, int K, bool Uniform>
__device__ __forceinline__ void input_grad_rows(const T* __restrict__ x, const float* __restrict__ grid,
                                                const T* __restrict__ d_features, T* __restrict__ dx,
                                                const InputGradParams& p) {
    const uint32_t n_bases = p.n_knots - 1u - uint32_t(K);
    for (uint32_t row = blockIdx.x * blockDim.x + threadIdx.x; row < p.n_rows; row += gridDim.x * blockDim.x) {
        const float xv = hk::to_f32(x[row]);
        const float* t = grid + size_t(row % p.in_features) * p.n_knots;
        const hk_bspline::RowResult<K> r = hk_bspline::evaluate_row<K, true, Uniform>(xv, t, int(p.n_knots));
        const T* da = d_features + size_t(row) * (n_bases + 1);
        float g = hk::to_f32(da[0]) * silu_grad(xv);
        if (r.kind == hk_bspline::ROW_NAN) {
            g = xv;
        } else if (r.kind == hk_bspline::ROW_BASES) {
            const T* db = da + 1;
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
__device__ __forceinline__ void input_grad(const T* x, const float* grid, const T* d_features, T* dx,
                                           const InputGradParams& p) {
    HK_WITH_ORDER(p.order, HK_WITH_GRID(p.uniform, input_grad_rows<T, K, U>(x, grid, d_features, dx, p)));
}

template <typename T>
__device__ __forceinline__ void features(const T* x, const float* grid, T* out, const hk_bspline::BsplineParams& p) {
    using hk_bspline::bspline_rows;
    __shared__ hk_bspline::Stage<T> stage;
    HK_WITH_ORDER(p.order, HK_WITH_GRID(p.uniform, bspline_rows<T, false, K, 1, U>(x, grid, out, p, stage)));
}

}  // namespace hk_kan

#define HK_KAN_KERNELS(SUFFIX, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256, 3) kan_features_##SUFFIX(                                     \
        const T* __restrict__ x, const float* __restrict__ grid, T* __restrict__ out, hk_bspline::BsplineParams p) { \
        hk_kan::features(x, grid, out, p);                                                                       \
    }                                                                                                            \
    extern "C" __global__ void kan_fold_weights_##SUFFIX(const T* __restrict__ w_base, const T* __restrict__ w_spline, \
                                                         const T* __restrict__ scaler, uint32_t has_scaler,       \
                                                         T* __restrict__ w_cat, uint32_t n_oi, uint32_t nb) {     \
        hk_kan::fold_weights(w_base, w_spline, scaler, has_scaler, w_cat, n_oi, nb);                             \
    }                                                                                                            \
    extern "C" __global__ void kan_split_grads_##SUFFIX(                                                         \
        const T* __restrict__ d_cat, const T* __restrict__ w_spline, const T* __restrict__ scaler,               \
        uint32_t has_scaler, T* __restrict__ d_base, T* __restrict__ d_spline, T* __restrict__ d_scaler,         \
        uint32_t n_oi, uint32_t nb) {                                                                            \
        hk_kan::split_grads(d_cat, w_spline, scaler, has_scaler, d_base, d_spline, d_scaler, n_oi, nb);          \
    }                                                                                                            \
    extern "C" __global__ void kan_input_grad_##SUFFIX(const T* __restrict__ x, const float* __restrict__ grid,    \
                                                       const T* __restrict__ d_features, T* __restrict__ dx,      \
                                                       hk_kan::InputGradParams p) {                               \
        hk_kan::input_grad(x, grid, d_features, dx, p);                                                          \
    }

HK_KAN_KERNELS(f32, float)
HK_KAN_KERNELS(bf16, __nv_bfloat16)
HK_KAN_KERNELS(f16, __half)
