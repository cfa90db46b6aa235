// The mLSTM's one-token decode step. See mlstm.cuh.
#include "mlstm.cuh"

namespace hk_mlstm {

// Mirrors StepParams in src/ops/mlstm/cuda.rs.
struct StepParams {
    uint32_t heads;
    uint32_t dqk;
    uint32_t dhv;
    float eps;
    float scale;
};
HK_PARAMS_LAYOUT(StepParams, 5);

constexpr int STEP_THREADS = 128;

// One decoding step of one head per block: each thread owns value columns and walks the rows
// of C (coalesced across the block), updating them in place.
template <typename T>
__device__ void mlstm_step(float* __restrict__ c, float* __restrict__ n, float* __restrict__ m,
                           const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const float* __restrict__ ig, const float* __restrict__ fg, T* __restrict__ h,
                           const StepParams& p) {
    extern __shared__ __align__(16) float step_smem[];
    float* qs = step_smem;       // q / sqrt(dqk)
    float* ks = qs + p.dqk;      // k
    float* red = ks + p.dqk;     // STEP_THREADS / 32 partial sums
    const size_t head = blockIdx.x;
    const float lf = logsigmoid(fg[head]);
    const float m_old = m[head];
    const float m_new = fmaxf(lf + m_old, ig[head]);
    const float fa = expf(lf + m_old - m_new), ia = expf(ig[head] - m_new);
    float part = 0.f;
    for (int a = threadIdx.x; a < int(p.dqk); a += STEP_THREADS) {
        const float qa = hk::to_f32(q[head * p.dqk + a]) * p.scale, ka = hk::to_f32(k[head * p.dqk + a]);
        qs[a] = qa;
        ks[a] = ka;
        const float nn = fmaf(fa, n[head * p.dqk + a], ia * ka);
        n[head * p.dqk + a] = nn;
        part = fmaf(qa, nn, part);
    }
    part = warp_sum(part);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = part;
    __syncthreads();  // qs, ks, red ready; every thread has read m[head]
    float den = 0.f;
#pragma unroll
    for (int w = 0; w < STEP_THREADS / 32; ++w) den += red[w];
    const float inv_d = 1.f / (fmaxf(fabsf(den), expf(-m_new)) + p.eps);
    if (threadIdx.x == 0) m[head] = m_new;
    float* ch = c + head * p.dqk * p.dhv;
    for (int j = threadIdx.x; j < int(p.dhv); j += STEP_THREADS) {
        const float ivj = ia * hk::to_f32(v[head * p.dhv + j]);
        float acc = 0.f;
#pragma unroll 4
        for (int a = 0; a < int(p.dqk); ++a) {
            const float cc = fmaf(fa, ch[size_t(a) * p.dhv + j], ks[a] * ivj);
            ch[size_t(a) * p.dhv + j] = cc;
            acc = fmaf(qs[a], cc, acc);
        }
        h[head * p.dhv + j] = hk::from_f32<T>(acc * inv_d);
    }
}

}  // namespace hk_mlstm

#define HK_MLSTM_STEP(NAME, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::STEP_THREADS)                                               \
        NAME(float* c, float* n, float* m, const T* q, const T* k, const T* v, const float* ig, const float* fg, T* h, \
             hk_mlstm::StepParams p) {                                                                                 \
        hk_mlstm::mlstm_step<T>(c, n, m, q, k, v, ig, fg, h, p);                                                       \
    }

HK_MLSTM_STEP(mlstm_step_f32, float)
HK_MLSTM_STEP(mlstm_step_bf16, __nv_bfloat16)
HK_MLSTM_STEP(mlstm_step_f16, __half)
