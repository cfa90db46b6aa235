// Softmax cross-entropy over the vocabulary, fused with its backward (llm.c's
// fused_classifier): per row of logits x (one token), with the optional soft-cap
// v = cap tanh(x / cap) (xLSTM-7B: 30),
//   loss = logsumexp(v) - v[target],  dx = (softmax(v) - onehot(target)) * scale * dv/dx,
// dv/dx = 1 - (v / cap)^2, scale = the caller's gradient scale / valid tokens (the mean).
// With GRAD the logits are overwritten by dx: no probability tensor exists. Rows whose target
// is the ignore index have loss 0 and dx 0 and count neither as valid nor correct.
// A block per row (grid-stride), 16-byte vectors: one pass for the argmax of the raw logits
// (the first index of the maximum, as torch.argmax) and the online max and sum of
// exponentials, then (fused) a second pass over the row, which a block read a moment before
// and so comes from L2, writing dx. Keeping the row in registers instead (a first version)
// left one 512-thread block per SM and nothing to overlap its loads with: 37% of the copy
// bandwidth at 16384 x 50304 bf16. cross_entropy_reduce sums the per-row losses and hits in a fixed
// order (deterministic).
#include "common.cuh"

namespace hk_ce {

constexpr int MAX_THREADS = 512;  // the block (fewer for short rows)
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

// A running (max, sum of exp(v - max)) pair, and the pair of two parts combined.
struct Online {
    float m, s;
};

__device__ __forceinline__ Online combine(Online a, Online b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return Online{m, 0.f};
    return Online{m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ Online block_online(Online x, Online* scratch) {
#pragma unroll
    for (int k = 16; k > 0; k >>= 1)
        x = combine(x, Online{__shfl_xor_sync(0xffffffffu, x.m, k), __shfl_xor_sync(0xffffffffu, x.s, k)});
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < int(blockDim.x / 32) ? scratch[lane] : Online{-INFINITY, 0.f};
#pragma unroll
    for (int k = 16; k > 0; k >>= 1)
        x = combine(x, Online{__shfl_xor_sync(0xffffffffu, x.m, k), __shfl_xor_sync(0xffffffffu, x.s, k)});
    return x;
}

template <typename T, int VEC, bool WRITE_GRAD>
__device__ __forceinline__ void fused(T* __restrict__ logits, const int32_t* __restrict__ targets,
                                      float* __restrict__ losses, float* __restrict__ correct, const CeParams p) {
    using P = Pack<T, VEC>;
    __shared__ MaxArg max_scratch[32];
    __shared__ Online sum_scratch[32];
    const uint32_t nvec = p.vocab / VEC, t = threadIdx.x, stride = blockDim.x;
    const bool capped = p.flags & SOFTCAP;
    const float cap = p.softcap, inv_cap = capped ? 1.f / p.softcap : 0.f;
    // The capped logit. tanh through one exponential (tanh y = 1 - 2 / (e^2y + 1), saturating
    // to +-1 without NaN): the accurate tanhf would make the capped pass compute-bound.
    auto value = [&](T raw) {
        const float x = hk::to_f32(raw);
        return capped ? cap * (1.f - __fdividef(2.f, __expf(2.f * x * inv_cap) + 1.f)) : x;
    };
    for (uint32_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        T* row = logits + size_t(r) * p.vocab;
        const int32_t target = targets[r];
        const bool valid = !((p.flags & IGNORE) && target == p.ignore_index);
        // Read before any thread overwrites the row (the reductions below synchronise).
        const float target_value = valid ? value(row[target]) : 0.f;
        // One pass: the online max and sum of exponentials of the capped logits, and the
        // argmax of the raw ones (the cap is increasing: the same but where its f32
        // saturation ties).
        MaxArg best{-INFINITY, 0xffffffffu};
        Online acc{-INFINITY, 0.f};
        for (uint32_t i = t; i < nvec; i += stride) {
            const P v = reinterpret_cast<const P*>(row)[i];
            float z[VEC];
            float vm = -INFINITY;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                best = better(best, MaxArg{hk::to_f32(v.v[e]), i * VEC + e});
                z[e] = value(v.v[e]);
                vm = fmaxf(vm, z[e]);
            }
            // The vector's own max first: one rescale of the running sum per vector.
            const float m = fmaxf(acc.m, vm);
            float s = acc.m == -INFINITY ? 0.f : acc.s * __expf(acc.m - m);
#pragma unroll
            for (int e = 0; e < VEC; ++e) s += __expf(z[e] - m);
            acc = m == -INFINITY ? Online{m, 0.f} : Online{m, s};
        }
        best = block_max(best, max_scratch);
        acc = block_online(acc, sum_scratch);
        const float m = acc.m, sum = acc.s;
        if (WRITE_GRAD) {
            // The row again, from L2 (a block's row was read a moment ago): dx over it.
            const float inv_s = 1.f / sum, scale = valid ? p.grad_scale : 0.f;
            for (uint32_t i = t; i < nvec; i += stride) {
                P v = reinterpret_cast<const P*>(row)[i];
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float z = value(v.v[e]);
                    float g = __expf(z - m) * inv_s - (int32_t(i * VEC + e) == target ? 1.f : 0.f);
                    if (capped) g *= 1.f - (z * inv_cap) * (z * inv_cap);
                    v.v[e] = hk::from_f32<T>(g * scale);
                }
                reinterpret_cast<P*>(row)[i] = v;
            }
        }
        if (t == 0) {
            losses[r] = valid ? __logf(sum) + m - target_value : 0.f;
            correct[r] = valid && best.i == uint32_t(target) ? 1.f : 0.f;
        }
    }
}

}  // namespace hk_ce

// cross_entropy_{fwd,fused}_<T>_v<VEC>: fwd leaves the logits alone (evaluation), fused
// overwrites them with dlogits.
#define HK_CE_KERNEL(KIND, GRAD_FLAG, SUFFIX, T, VEC)                                                           \
    extern "C" __global__ void __launch_bounds__(hk_ce::MAX_THREADS) cross_entropy_##KIND##_##SUFFIX##_v##VEC( \
        T* __restrict__ logits, const int32_t* __restrict__ targets, float* __restrict__ losses,               \
        float* __restrict__ correct, hk_ce::CeParams p) {                                                       \
        hk_ce::fused<T, VEC, GRAD_FLAG>(logits, targets, losses, correct, p);                                  \
    }

#define HK_CE_TYPE(SUFFIX, T, VEC)             \
    HK_CE_KERNEL(fwd, false, SUFFIX, T, VEC)   \
    HK_CE_KERNEL(fused, true, SUFFIX, T, VEC)  \
    HK_CE_KERNEL(fwd, false, SUFFIX, T, 1)     \
    HK_CE_KERNEL(fused, true, SUFFIX, T, 1)

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
