// Token embedding: out[r, :] = table[ids[r], :], and its backward as a deterministic
// scatter-add dtable[v, :] += sum over the rows r with ids[r] = v of dout[r, :].
// The backward needs no atomics: the host groups the rows by id (it holds the ids), in row
// order, and a block column per distinct id sums its rows in that order and adds the sum once:
// every call adds the same numbers in the same order (bitwise repeatable), whatever the
// schedule. Both kernels move 16-byte vectors when dim is a multiple of their width.
#include "common.cuh"

namespace hk_emb {

constexpr int THREADS = 256;

struct EmbParams {
    uint32_t rows;  // forward: tokens; backward: distinct ids
    uint32_t dim;
};
HK_PARAMS_LAYOUT(EmbParams, 2);

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

// Grid x: the row's vectors (a thread each), y: rows in grid-stride.
template <typename T, int N>
__device__ __forceinline__ void gather(const T* __restrict__ table, const int32_t* __restrict__ ids,
                                       T* __restrict__ out, const EmbParams p) {
    const uint32_t nvec = p.dim / N;
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nvec) return;
    for (uint32_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
        const size_t src = size_t(ids[r]) * nvec + i, dst = size_t(r) * nvec + i;
        reinterpret_cast<Pack<T, N>*>(out)[dst] = reinterpret_cast<const Pack<T, N>*>(table)[src];
    }
}

// groups: [distinct ids (U) | offsets (U + 1) | rows (tokens)], rows of one id in row order.
template <typename T, int N>
__device__ __forceinline__ void scatter_add(const T* __restrict__ dout, const int32_t* __restrict__ groups,
                                            float* __restrict__ dtable, const EmbParams p) {
    const uint32_t nvec = p.dim / N;
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nvec) return;
    const int32_t* offsets = groups + p.rows;
    const int32_t* rows = offsets + p.rows + 1;
    for (uint32_t u = blockIdx.y; u < p.rows; u += gridDim.y) {
        float sum[N];
#pragma unroll
        for (int e = 0; e < N; ++e) sum[e] = 0.f;
        for (int32_t k = offsets[u]; k < offsets[u + 1]; ++k) {
            const Pack<T, N> d = reinterpret_cast<const Pack<T, N>*>(dout)[size_t(rows[k]) * nvec + i];
#pragma unroll
            for (int e = 0; e < N; ++e) sum[e] += hk::to_f32(d.v[e]);
        }
        float* dst = dtable + size_t(groups[u]) * p.dim + size_t(i) * N;
#pragma unroll
        for (int e = 0; e < N; ++e) dst[e] += sum[e];
    }
}

}  // namespace hk_emb

#define HK_EMB_KERNELS(SUFFIX, T, N)                                                                              \
    extern "C" __global__ void __launch_bounds__(hk_emb::THREADS) embedding_fwd_##SUFFIX##_v##N(                \
        const T* __restrict__ table, const int32_t* __restrict__ ids, T* __restrict__ out, hk_emb::EmbParams p) { \
        hk_emb::gather<T, N>(table, ids, out, p);                                                               \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(hk_emb::THREADS) embedding_bwd_##SUFFIX##_v##N(                \
        const T* __restrict__ dout, const int32_t* __restrict__ groups, float* __restrict__ dtable,             \
        hk_emb::EmbParams p) {                                                                                   \
        hk_emb::scatter_add<T, N>(dout, groups, dtable, p);                                                     \
    }

HK_EMB_KERNELS(f32, float, 4)
HK_EMB_KERNELS(f32, float, 1)
HK_EMB_KERNELS(bf16, __nv_bfloat16, 8)
HK_EMB_KERNELS(bf16, __nv_bfloat16, 1)
HK_EMB_KERNELS(f16, __half, 8)
HK_EMB_KERNELS(f16, __half, 1)
