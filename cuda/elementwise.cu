// Elementwise ops of the model layer, forward and backward, in f32 arithmetic:
//   activation  y = act(x)                       act: SiLU, GELU (tanh approximation), GELU (erf)
//   gated       y = act(gate) * up               SwiGLU / GeGLU, and Mamba's y * SiLU(z)
//   add_into    dst += src                       the residual stream (f32) += a block's output
// Grid-stride over 16-byte vectors (VEC elements of the widest type a kernel reads), then the
// remainder element by element, so any length works and every full vector is one access.
// f32 arithmetic with IEEE-accurate expf, tanhf and erff: the kernels are memory-bound, and the
// accurate functions keep the f32 error at a few ulp (the backward's derivatives too).
#include "common.cuh"

namespace hk_ew {

constexpr int THREADS = 256;

enum Act : uint32_t { SILU = 0, GELU_TANH = 1, GELU_ERF = 2 };

struct EwParams {
    uint32_t n_lo;  // element count, low and high 32 bits (tensors may exceed 2^32 elements)
    uint32_t n_hi;
    uint32_t act;
    uint32_t pad;
};
HK_PARAMS_LAYOUT(EwParams, 4);

__device__ __forceinline__ size_t count(const EwParams& p) { return (size_t(p.n_hi) << 32) | p.n_lo; }

constexpr float SQRT_2_OVER_PI = 0.7978845608028654f;
constexpr float GELU_C = 0.044715f;
constexpr float INV_SQRT_2 = 0.7071067811865476f;
constexpr float INV_SQRT_2PI = 0.3989422804014327f;

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float act(uint32_t a, float x) {
    switch (a) {
        case SILU: return x * sigmoid(x);
        case GELU_TANH: return 0.5f * x * (1.f + tanhf(SQRT_2_OVER_PI * fmaf(GELU_C * x, x * x, x)));
        default: return 0.5f * x * (1.f + erff(x * INV_SQRT_2));
    }
}

// d act / dx.
__device__ __forceinline__ float act_grad(uint32_t a, float x) {
    switch (a) {
        case SILU: {
            const float s = sigmoid(x);
            return s * fmaf(x, 1.f - s, 1.f);
        }
        case GELU_TANH: {
            const float t = tanhf(SQRT_2_OVER_PI * fmaf(GELU_C * x, x * x, x));
            const float du = SQRT_2_OVER_PI * fmaf(3.f * GELU_C, x * x, 1.f);
            return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * du;
        }
        default: return 0.5f * (1.f + erff(x * INV_SQRT_2)) + x * INV_SQRT_2PI * expf(-0.5f * x * x);
    }
}

template <typename T>
struct alignas(16) Vec16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

// Runs f(i, vector index) over the whole vectors of n elements of T, then f_tail(i) over the
// elements past them.
template <typename T, typename F, typename G>
__device__ __forceinline__ void grid_stride(size_t n, F f, G tail) {
    constexpr int N = Vec16<T>::N;
    const size_t nvec = n / N, stride = size_t(gridDim.x) * blockDim.x;
    const size_t first = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    for (size_t i = first; i < nvec; i += stride) f(i);
    for (size_t i = nvec * N + first; i < n; i += stride) tail(i);
}

template <typename T>
__device__ void activation_fwd(const T* __restrict__ x, T* __restrict__ y, const EwParams p) {
    using V = Vec16<T>;
    grid_stride<T>(
        count(p),
        [&](size_t i) {
            V v = reinterpret_cast<const V*>(x)[i];
#pragma unroll
            for (int e = 0; e < V::N; ++e) v.v[e] = hk::from_f32<T>(act(p.act, hk::to_f32(v.v[e])));
            reinterpret_cast<V*>(y)[i] = v;
        },
        [&](size_t i) { y[i] = hk::from_f32<T>(act(p.act, hk::to_f32(x[i]))); });
}

template <typename T>
__device__ void activation_bwd(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                               const EwParams p) {
    using V = Vec16<T>;
    grid_stride<T>(
        count(p),
        [&](size_t i) {
            V v = reinterpret_cast<const V*>(x)[i];
            const V d = reinterpret_cast<const V*>(dy)[i];
#pragma unroll
            for (int e = 0; e < V::N; ++e)
                v.v[e] = hk::from_f32<T>(hk::to_f32(d.v[e]) * act_grad(p.act, hk::to_f32(v.v[e])));
            reinterpret_cast<V*>(dx)[i] = v;
        },
        [&](size_t i) { dx[i] = hk::from_f32<T>(hk::to_f32(dy[i]) * act_grad(p.act, hk::to_f32(x[i]))); });
}

template <typename T>
__device__ void gated_fwd(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y,
                          const EwParams p) {
    using V = Vec16<T>;
    grid_stride<T>(
        count(p),
        [&](size_t i) {
            V g = reinterpret_cast<const V*>(gate)[i];
            const V u = reinterpret_cast<const V*>(up)[i];
#pragma unroll
            for (int e = 0; e < V::N; ++e)
                g.v[e] = hk::from_f32<T>(act(p.act, hk::to_f32(g.v[e])) * hk::to_f32(u.v[e]));
            reinterpret_cast<V*>(y)[i] = g;
        },
        [&](size_t i) { y[i] = hk::from_f32<T>(act(p.act, hk::to_f32(gate[i])) * hk::to_f32(up[i])); });
}

// dgate = dy * up * act'(gate), dup = dy * act(gate).
template <typename T>
__device__ void gated_bwd(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dy,
                          T* __restrict__ dgate, T* __restrict__ dup, const EwParams p) {
    using V = Vec16<T>;
    auto one = [&](float g, float u, float d, T& dg, T& du) {
        dg = hk::from_f32<T>(d * u * act_grad(p.act, g));
        du = hk::from_f32<T>(d * act(p.act, g));
    };
    grid_stride<T>(
        count(p),
        [&](size_t i) {
            const V g = reinterpret_cast<const V*>(gate)[i], u = reinterpret_cast<const V*>(up)[i],
                    d = reinterpret_cast<const V*>(dy)[i];
            V dg, du;
#pragma unroll
            for (int e = 0; e < V::N; ++e)
                one(hk::to_f32(g.v[e]), hk::to_f32(u.v[e]), hk::to_f32(d.v[e]), dg.v[e], du.v[e]);
            reinterpret_cast<V*>(dgate)[i] = dg;
            reinterpret_cast<V*>(dup)[i] = du;
        },
        [&](size_t i) { one(hk::to_f32(gate[i]), hk::to_f32(up[i]), hk::to_f32(dy[i]), dgate[i], dup[i]); });
}

// dst += src, both of n elements; vectors of the narrower source type (8 bf16 into 8 f32).
template <typename D, typename S>
__device__ void add_into(D* __restrict__ dst, const S* __restrict__ src, const EwParams p) {
    using V = Vec16<S>;
    constexpr int N = V::N;
    struct alignas(sizeof(D) * N) DV {
        D v[N];
    };
    grid_stride<S>(
        count(p),
        [&](size_t i) {
            const V s = reinterpret_cast<const V*>(src)[i];
            DV d = reinterpret_cast<const DV*>(dst)[i];
#pragma unroll
            for (int e = 0; e < N; ++e) d.v[e] = hk::from_f32<D>(hk::to_f32(d.v[e]) + hk::to_f32(s.v[e]));
            reinterpret_cast<DV*>(dst)[i] = d;
        },
        [&](size_t i) { dst[i] = hk::from_f32<D>(hk::to_f32(dst[i]) + hk::to_f32(src[i])); });
}

}  // namespace hk_ew

#define HK_EW_KERNELS(SUFFIX, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(hk_ew::THREADS)                                                \
        elementwise_act_##SUFFIX(const T* __restrict__ x, T* __restrict__ y, hk_ew::EwParams p) {              \
        hk_ew::activation_fwd<T>(x, y, p);                                                                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(hk_ew::THREADS) elementwise_actbwd_##SUFFIX(                   \
        const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx, hk_ew::EwParams p) {             \
        hk_ew::activation_bwd<T>(x, dy, dx, p);                                                                 \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(hk_ew::THREADS) elementwise_gated_##SUFFIX(                    \
        const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y, hk_ew::EwParams p) {           \
        hk_ew::gated_fwd<T>(gate, up, y, p);                                                                    \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(hk_ew::THREADS)                                                \
        elementwise_gatedbwd_##SUFFIX(const T* __restrict__ gate, const T* __restrict__ up,                    \
                                      const T* __restrict__ dy, T* __restrict__ dgate, T* __restrict__ dup,    \
                                      hk_ew::EwParams p) {                                                     \
        hk_ew::gated_bwd<T>(gate, up, dy, dgate, dup, p);                                                       \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(hk_ew::THREADS)                                                \
        elementwise_add_##SUFFIX(T* __restrict__ dst, const T* __restrict__ src, hk_ew::EwParams p) {          \
        hk_ew::add_into<T, T>(dst, src, p);                                                                     \
    }

HK_EW_KERNELS(f32, float)
HK_EW_KERNELS(bf16, __nv_bfloat16)
HK_EW_KERNELS(f16, __half)

// The f32 residual stream plus a 16-bit block output: elementwise_add_f32_from_<src>.
extern "C" __global__ void __launch_bounds__(hk_ew::THREADS)
    elementwise_add_f32_from_bf16(float* __restrict__ dst, const __nv_bfloat16* __restrict__ src, hk_ew::EwParams p) {
    hk_ew::add_into<float, __nv_bfloat16>(dst, src, p);
}
extern "C" __global__ void __launch_bounds__(hk_ew::THREADS)
    elementwise_add_f32_from_f16(float* __restrict__ dst, const __half* __restrict__ src, hk_ew::EwParams p) {
    hk_ew::add_into<float, __half>(dst, src, p);
}
