// Softmax cross-entropy over the vocabulary, fused with its backward (llm.c's
// fused_classifier): per row of logits x (one token), with the optional soft-cap
// v = cap tanh(x / cap) (xLSTM-7B: 30),
//   loss = logsumexp(v) - v[target],  dx = (softmax(v) - onehot(target)) * scale * dv/dx,
// dv/dx = 1 - (v / cap)^2, scale = the caller's gradient scale / valid tokens (the mean).
// With GRAD the logits are overwritten by dx: no probability tensor exists. Rows whose target
// is the ignore index have loss 0 and dx 0 and count neither as valid nor correct.
// A block per row (grid-stride). The row is read once: each thread keeps VPT 16-byte vectors
// of it in registers as loaded (bf16 stays packed), past them it streams from memory again.
// Max and argmax of the raw logits (the first index of the maximum, as torch.argmax), then
// the sum of exponentials, then dx. cross_entropy_reduce sums the per-row losses and hits in a fixed
// order (deterministic).
#include "common.cuh"

namespace hk_ce {

constexpr int MAX_THREADS = 512;
constexpr uint32_t SOFTCAP = 2, IGNORE = 4;  // flags (bit 0 unused: the kernel name says whether dx is written)

struct CeParams {
    uint32_t rows;
    uint32_t vocab;
    int32_t ignore_index;
    uint32_t flags;
    float softcap;     // with SOFTCAP
    float grad_scale;  // multiplies every dx (the caller's scale / valid tokens)
};
HK_PARAMS_LAYOUT(CeParams, 6);

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

struct MaxArg {
    float v;
    uint32_t i;
};

// The larger value; on equal values the smaller index (the first occurrence).
__device__ __forceinline__ MaxArg better(MaxArg a, MaxArg b) {
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
}

__device__ __forceinline__ MaxArg block_max(MaxArg x, MaxArg* scratch) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
        MaxArg o{__shfl_xor_sync(0xffffffffu, x.v, m), __shfl_xor_sync(0xffffffffu, x.i, m)};
        x = better(x, o);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < int(blockDim.x / 32) ? scratch[lane] : MaxArg{-INFINITY, 0xffffffffu};
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
        MaxArg o{__shfl_xor_sync(0xffffffffu, x.v, m), __shfl_xor_sync(0xffffffffu, x.i, m)};
        x = better(x, o);
    }
    return x;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < int(blockDim.x / 32) ? scratch[lane] : 0.f;
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

template <typename T, int VEC, int VPT, bool WRITE_GRAD>
__device__ __forceinline__ void fused(T* __restrict__ logits, const int32_t* __restrict__ targets,
                                      float* __restrict__ losses, float* __restrict__ correct, const CeParams p) {
    using P = Pack<T, VEC>;
    __shared__ MaxArg max_scratch[32];
    __shared__ float sum_scratch[32];
    const uint32_t nvec = p.vocab / VEC, t = threadIdx.x, stride = blockDim.x;
    const bool capped = p.flags & SOFTCAP;
    const float cap = p.softcap, inv_cap = capped ? 1.f / p.softcap : 0.f;
    // The capped logit. tanh through one exponential (tanh y = 1 - 2 / (e^2y + 1), saturating
    // to +-1 without NaN): the accurate tanhf would make the capped pass compute-bound.
    auto capped_value = [&](float x) { return cap * (1.f - __fdividef(2.f, __expf(2.f * x * inv_cap) + 1.f)); };
    auto value = [&](T raw) {
        const float x = hk::to_f32(raw);
        return capped ? capped_value(x) : x;
    };
    for (uint32_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        T* row = logits + size_t(r) * p.vocab;
        const int32_t target = targets[r];
        const bool valid = !((p.flags & IGNORE) && target == p.ignore_index);
        // Read before any thread overwrites the row (the reductions below synchronise).
        const float target_value = valid ? value(row[target]) : 0.f;
        P cache[VPT];
        MaxArg best{-INFINITY, 0xffffffffu};
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const uint32_t i = t + k * stride;
            if (i < nvec) {
                cache[k] = reinterpret_cast<const P*>(row)[i];
#pragma unroll
                for (int e = 0; e < VEC; ++e) best = better(best, MaxArg{hk::to_f32(cache[k].v[e]), i * VEC + e});
            }
        }
        for (uint32_t i = t + VPT * stride; i < nvec; i += stride) {
            const P v = reinterpret_cast<const P*>(row)[i];
#pragma unroll
            for (int e = 0; e < VEC; ++e) best = better(best, MaxArg{hk::to_f32(v.v[e]), i * VEC + e});
        }
        // The cap is increasing: the capped maximum is the cap of the raw maximum, and the
        // argmax is that of the raw logits (the same but where the cap's f32 saturation ties).
        best = block_max(best, max_scratch);
        const float m = capped ? capped_value(best.v) : best.v;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            if (t + k * stride < nvec) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) s += __expf(value(cache[k].v[e]) - m);
            }
        }
        for (uint32_t i = t + VPT * stride; i < nvec; i += stride) {
            const P v = reinterpret_cast<const P*>(row)[i];
#pragma unroll
            for (int e = 0; e < VEC; ++e) s += __expf(value(v.v[e]) - m);
        }
        s = block_sum(s, sum_scratch);
        if (WRITE_GRAD) {
            const float inv_s = 1.f / s, scale = valid ? p.grad_scale : 0.f;
            auto grad = [&](P& v, uint32_t i) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float z = value(v.v[e]);
                    float g = __expf(z - m) * inv_s - (int32_t(i * VEC + e) == target ? 1.f : 0.f);
                    if (capped) g *= 1.f - (z * inv_cap) * (z * inv_cap);
                    v.v[e] = hk::from_f32<T>(g * scale);
                }
                reinterpret_cast<P*>(row)[i] = v;
            };
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                if (t + k * stride < nvec) grad(cache[k], t + k * stride);
            }
            for (uint32_t i = t + VPT * stride; i < nvec; i += stride) {
                P v = reinterpret_cast<const P*>(row)[i];
                grad(v, i);
            }
        }
        if (t == 0) {
            losses[r] = valid ? __logf(s) + m - target_value : 0.f;
            correct[r] = valid && best.i == uint32_t(target) ? 1.f : 0.f;
        }
    }
}

}  // namespace hk_ce

// cross_entropy_{fwd,fused}_<T>_v<VEC>_p<VPT>: fwd leaves the logits alone (evaluation),
// fused overwrites them with dlogits. At most 12 cached vectors: the compiler holds them
// converted to f32, and 16 spill under the 512-thread bound (ptxas -v); 512 x 12 x 8 bf16
// covers 49152 of a 50304 vocabulary, the rest is read twice.
#define HK_CE_KERNEL(KIND, GRAD_FLAG, SUFFIX, T, VEC, VPT)                                                       \
    extern "C" __global__ void __launch_bounds__(hk_ce::MAX_THREADS) cross_entropy_##KIND##_##SUFFIX##_v##VEC##_p##VPT( \
        T* __restrict__ logits, const int32_t* __restrict__ targets, float* __restrict__ losses,               \
        float* __restrict__ correct, hk_ce::CeParams p) {                                                       \
        hk_ce::fused<T, VEC, VPT, GRAD_FLAG>(logits, targets, losses, correct, p);                             \
    }

#define HK_CE_TYPE(SUFFIX, T, VEC)                  \
    HK_CE_KERNEL(fwd, false, SUFFIX, T, VEC, 1)     \
    HK_CE_KERNEL(fwd, false, SUFFIX, T, VEC, 4)     \
    HK_CE_KERNEL(fwd, false, SUFFIX, T, VEC, 12)    \
    HK_CE_KERNEL(fused, true, SUFFIX, T, VEC, 1)    \
    HK_CE_KERNEL(fused, true, SUFFIX, T, VEC, 4)    \
    HK_CE_KERNEL(fused, true, SUFFIX, T, VEC, 12)   \
    HK_CE_KERNEL(fwd, false, SUFFIX, T, 1, 1)       \
    HK_CE_KERNEL(fwd, false, SUFFIX, T, 1, 16)      \
    HK_CE_KERNEL(fused, true, SUFFIX, T, 1, 1)      \
    HK_CE_KERNEL(fused, true, SUFFIX, T, 1, 16)

HK_CE_TYPE(f32, float, 4)
HK_CE_TYPE(bf16, __nv_bfloat16, 8)
HK_CE_TYPE(f16, __half, 8)

// out[0] = sum of losses * inv_valid (the mean over valid rows), out[1] = sum of correct. One
// block of 1024 threads: each sums its rows in order, then a fixed tree: deterministic.
extern "C" __global__ void __launch_bounds__(1024)
    cross_entropy_reduce(const float* __restrict__ losses, const float* __restrict__ correct,
                         float* __restrict__ out, uint32_t rows, float inv_valid) {
    __shared__ float l[1024], c[1024];
    float a = 0.f, b = 0.f;
    for (uint32_t r = threadIdx.x; r < rows; r += blockDim.x) {
        a += losses[r];
        b += correct[r];
    }
    l[threadIdx.x] = a;
    c[threadIdx.x] = b;
    __syncthreads();
    for (uint32_t half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            l[threadIdx.x] += l[threadIdx.x + half];
            c[threadIdx.x] += c[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[0] = l[0] * inv_valid;
        out[1] = c[0];
    }
}
