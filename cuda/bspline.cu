// B-spline basis evaluation for KAN layers (efficient-kan `b_splines` semantics).
//
// One thread per output element (row, j) where row = (batch, feature): consecutive
// threads write consecutive bases, so stores are coalesced whatever G + k is. Each
// thread evaluates only basis j: it needs the k + 2 knots t_j..t_{j+k+1}, and threads
// whose x lies outside [t_j, t_{j+k+1}) write zero without arithmetic. The spline
// order is a template parameter so the Cox–de Boor triangle stays in registers.
//
// Conventions shared with the CPU reference (src/ops/bspline/cpu.rs):
//  - same operation order as efficient-kan: ((x - t_a) / (t_{a+d} - t_a)) * N_a + ...;
//  - a zero-width span (repeated knots) contributes 0 instead of efficient-kan's 0/0;
//  - x = NaN gives NaN for every basis of that (batch, feature); ±inf lie outside the grid.
#include "common.cuh"

namespace {

constexpr int MAX_SPLINE_ORDER = 7;  // src/ops/bspline/mod.rs: MAX_SPLINE_ORDER

struct BsplineParams {
    uint32_t n_elements;   // rows * n_bases in this launch (< 2^32; the host splits larger work)
    uint32_t in_features;  // features per batch row
    uint32_t n_knots;      // knots per feature: G + 2k + 1
    uint32_t order;        // spline order k
};

__device__ __forceinline__ float span_ratio(float num, float den) { return den > 0.f ? num / den : 0.f; }

// Lowers the order-0 indicators of knots t[0..=L] ... to the B-splines of order `Level`
// on the same knots: on return n[a] = N_{a,Level}(x) for a = 0..=K-Level.
template <int K, int Level>
__device__ __forceinline__ void cox_de_boor(float x, const float (&t)[K + 2], float (&n)[K + 1]) {
#pragma unroll
    for (int a = 0; a <= K; ++a) n[a] = (x >= t[a] && x < t[a + 1]) ? 1.f : 0.f;
#pragma unroll
    for (int d = 1; d <= Level; ++d) {
#pragma unroll
        for (int a = 0; a + d <= K; ++a) {
            const float left = span_ratio(x - t[a], t[a + d] - t[a]) * n[a];
            const float right = span_ratio(t[a + d + 1] - x, t[a + d + 1] - t[a + 1]) * n[a + 1];
            n[a] = left + right;
        }
    }
}

template <int K, bool Derivative>
__device__ __forceinline__ float eval_basis(float x, const float* __restrict__ knots) {
    float t[K + 2];
#pragma unroll
    for (int a = 0; a < K + 2; ++a) t[a] = __ldg(knots + a);
    if (!(x >= t[0] && x < t[K + 1])) return 0.f;  // outside the support (and ±inf)
    float n[K + 1];
    if constexpr (!Derivative) {
        cox_de_boor<K, K>(x, t, n);
        return n[0];
    } else if constexpr (K == 0) {
        return 0.f;
    } else {
        // d/dx N_{0,K} = K * (N_{0,K-1} / (t_K - t_0) - N_{1,K-1} / (t_{K+1} - t_1))
        cox_de_boor<K, K - 1>(x, t, n);
        return float(K) * (span_ratio(n[0], t[K] - t[0]) - span_ratio(n[1], t[K + 1] - t[1]));
    }
}

template <typename T, bool Derivative, int K>
__device__ __forceinline__ void bspline_elements(const T* __restrict__ x, const float* __restrict__ grid,
                                                 T* __restrict__ out, const BsplineParams& p) {
    const uint32_t n_bases = p.n_knots - 1u - uint32_t(K);
    const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
    for (uint64_t e = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < p.n_elements; e += stride) {
        const uint32_t e32 = uint32_t(e);
        const uint32_t row = e32 / n_bases;
        const uint32_t j = e32 - row * n_bases;
        const uint32_t feature = row % p.in_features;
        const float xv = hk::to_f32(x[row]);
        float v;
        if (xv != xv) {
            v = xv;
        } else {
            v = eval_basis<K, Derivative>(xv, grid + size_t(feature) * p.n_knots + j);
        }
        out[e] = hk::from_f32<T>(v);
    }
}

template <typename T, bool Derivative>
__device__ __forceinline__ void bspline_dispatch(const T* x, const float* grid, T* out, const BsplineParams& p) {
    switch (p.order) {
        case 0: bspline_elements<T, Derivative, 0>(x, grid, out, p); break;
        case 1: bspline_elements<T, Derivative, 1>(x, grid, out, p); break;
        case 2: bspline_elements<T, Derivative, 2>(x, grid, out, p); break;
        case 3: bspline_elements<T, Derivative, 3>(x, grid, out, p); break;
        case 4: bspline_elements<T, Derivative, 4>(x, grid, out, p); break;
        case 5: bspline_elements<T, Derivative, 5>(x, grid, out, p); break;
        case 6: bspline_elements<T, Derivative, 6>(x, grid, out, p); break;
        case 7: bspline_elements<T, Derivative, 7>(x, grid, out, p); break;
        default: break;  // rejected on the host: order <= MAX_SPLINE_ORDER
    }
    static_assert(MAX_SPLINE_ORDER == 7, "extend the switch with the maximum order");
}

}  // namespace

#define BSPLINE_KERNELS(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) bspline_basis_##SUFFIX(                      \
        const T* __restrict__ x, const float* __restrict__ grid, T* __restrict__ out,              \
        BsplineParams p) {                                                                         \
        bspline_dispatch<T, false>(x, grid, out, p);                                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) bspline_basis_derivative_##SUFFIX(           \
        const T* __restrict__ x, const float* __restrict__ grid, T* __restrict__ out,              \
        BsplineParams p) {                                                                         \
        bspline_dispatch<T, true>(x, grid, out, p);                                                \
    }

BSPLINE_KERNELS(f32, float)
BSPLINE_KERNELS(bf16, __nv_bfloat16)
BSPLINE_KERNELS(f16, __half)
