// AdamW over many tensors in one launch (PyTorch's torch.optim.AdamW, decoupled weight decay,
// bias correction; torch.nn.utils.clip_grad_norm_ in front), f32 master weights and states:
//   g  = grad * clip,  clip = min(1, max_norm / (||all grads||_2 + 1e-6))   (with CLIP)
//   p  = p * (1 - lr wd)
//   m  = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
//   p  = p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),  bc_i = 1 - b_i^step
// and, in the same pass, the model's copy of p in its type (bf16, f16 or f32) and grad = 0
// (with ZERO_GRAD). Work is split in chunks of CHUNK elements over all tensors: a block finds its
// chunk's tensor by binary search in the prefix of chunk counts. The gradient norm is summed per
// chunk, then over chunks in a fixed order (adamw_norm_reduce): deterministic, and the update
// reads it from device memory, so a step needs no synchronisation with the host.
#include "common.cuh"

namespace hk_adamw {

constexpr int THREADS = 256;
constexpr uint32_t CHUNK = 4096;  // elements per chunk: 16 per thread
constexpr uint32_t ZERO_GRAD = 1, CLIP = 2;
enum CopyType : uint32_t { COPY_NONE = 0, COPY_F32 = 1, COPY_BF16 = 2, COPY_F16 = 3 };

// One tensor: device pointers, element count and group. Mirrored by `TensorDesc` in
// src/ops/adamw/cuda.rs (56 bytes, 8-byte aligned).
struct TensorDesc {
    float* param;
    float* grad;
    float* m;
    float* v;
    void* copy;  // null with COPY_NONE
    uint64_t n;
    uint32_t group;
    uint32_t copy_type;
};
static_assert(sizeof(TensorDesc) == 56 && alignof(TensorDesc) == 8, "TensorDesc must be 56 bytes, as on the host");

struct AdamParams {
    uint32_t tensors;
    uint32_t chunks;  // total over all tensors
    uint32_t flags;
    float beta1;
    float beta2;
    float eps;
    float step_size_scale;  // 1 / bc1
    float inv_sqrt_bc2;     // 1 / sqrt(bc2)
    float max_norm;         // with CLIP
    uint32_t pad;
};
HK_PARAMS_LAYOUT(AdamParams, 10);

// The tensor holding chunk c: the last t with chunk_start[t] <= c.
__device__ __forceinline__ uint32_t find_tensor(const uint32_t* __restrict__ chunk_start, uint32_t tensors,
                                                uint32_t c) {
    uint32_t lo = 0, hi = tensors;  // chunk_start[lo] <= c < chunk_start[hi]
    while (hi - lo > 1) {
        const uint32_t mid = (lo + hi) / 2;
        if (chunk_start[mid] <= c) lo = mid; else hi = mid;
    }
    return lo;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < THREADS / 32 ? scratch[lane] : 0.f;
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    return v;
}

// Chunk c's elements [begin, end) of its tensor.
struct Span {
    const TensorDesc* t;
    uint64_t begin, end;
};

__device__ __forceinline__ Span span(const TensorDesc* __restrict__ descs, const uint32_t* __restrict__ chunk_start,
                                     const AdamParams& p, uint32_t c) {
    const uint32_t ti = find_tensor(chunk_start, p.tensors, c);
    const TensorDesc* t = descs + ti;
    const uint64_t begin = uint64_t(c - chunk_start[ti]) * CHUNK;
    const uint64_t end = begin + CHUNK < t->n ? begin + CHUNK : t->n;
    return Span{t, begin, end};
}

}  // namespace hk_adamw

using namespace hk_adamw;

// partial[c] = sum of squared gradient elements of chunk c.
extern "C" __global__ void __launch_bounds__(THREADS)
    adamw_grad_sq(const TensorDesc* __restrict__ descs, const uint32_t* __restrict__ chunk_start,
                  float* __restrict__ partial, AdamParams p) {
    __shared__ float scratch[32];
    for (uint32_t c = blockIdx.x; c < p.chunks; c += gridDim.x) {
        const Span s = span(descs, chunk_start, p, c);
        const float* g = s.t->grad;
        float acc = 0.f;
        for (uint64_t i = s.begin + threadIdx.x * 4; i < s.end; i += THREADS * 4) {
            if (i + 4 <= s.end) {
                const float4 q = *reinterpret_cast<const float4*>(g + i);
                acc = fmaf(q.x, q.x, fmaf(q.y, q.y, fmaf(q.z, q.z, fmaf(q.w, q.w, acc))));
            } else {
                for (uint64_t j = i; j < s.end; ++j) acc = fmaf(g[j], g[j], acc);
            }
        }
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) partial[c] = acc;
    }
}

// norm[0] = sqrt(sum of partial[0 .. chunks)), in a fixed order: 1024 threads each summing a
// strided subset in order, then a tree.
extern "C" __global__ void __launch_bounds__(1024)
    adamw_norm_reduce(const float* __restrict__ partial, float* __restrict__ norm, uint32_t chunks) {
    __shared__ float s[1024];
    float a = 0.f;
    for (uint32_t c = threadIdx.x; c < chunks; c += blockDim.x) a += partial[c];
    s[threadIdx.x] = a;
    __syncthreads();
    for (uint32_t half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) s[threadIdx.x] += s[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) norm[0] = sqrtf(s[0]);
}

__device__ __forceinline__ void write_copy(const TensorDesc* t, uint64_t i, float v) {
    switch (t->copy_type) {
        case COPY_F32: static_cast<float*>(t->copy)[i] = v; break;
        case COPY_BF16: static_cast<__nv_bfloat16*>(t->copy)[i] = __float2bfloat16_rn(v); break;
        case COPY_F16: static_cast<__half*>(t->copy)[i] = __float2half_rn(v); break;
        default: break;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    adamw_update(const TensorDesc* __restrict__ descs, const uint32_t* __restrict__ chunk_start,
                 const float2* __restrict__ groups, const float* __restrict__ norm, AdamParams p) {
    float clip = 1.f;
    if (p.flags & CLIP) {
        const float c = p.max_norm / (norm[0] + 1e-6f);
        clip = c < 1.f ? c : 1.f;
    }
    const bool zero = p.flags & ZERO_GRAD;
    for (uint32_t c = blockIdx.x; c < p.chunks; c += gridDim.x) {
        const Span s = span(descs, chunk_start, p, c);
        const TensorDesc* t = s.t;
        const float2 gr = groups[t->group];  // (lr, weight decay)
        const float decay = 1.f - gr.x * gr.y, step = gr.x * p.step_size_scale;
        auto one = [&](float& w, float g, float& m, float& v) {
            g *= clip;
            m = fmaf(p.beta1, m, (1.f - p.beta1) * g);
            v = fmaf(p.beta2, v, (1.f - p.beta2) * g * g);
            w = w * decay - step * m / (sqrtf(v) * p.inv_sqrt_bc2 + p.eps);
        };
        for (uint64_t i = s.begin + threadIdx.x * 4; i < s.end; i += THREADS * 4) {
            if (i + 4 <= s.end) {
                float4 w = *reinterpret_cast<const float4*>(t->param + i);
                const float4 g = *reinterpret_cast<const float4*>(t->grad + i);
                float4 m = *reinterpret_cast<const float4*>(t->m + i);
                float4 v = *reinterpret_cast<const float4*>(t->v + i);
                one(w.x, g.x, m.x, v.x);
                one(w.y, g.y, m.y, v.y);
                one(w.z, g.z, m.z, v.z);
                one(w.w, g.w, m.w, v.w);
                *reinterpret_cast<float4*>(t->param + i) = w;
                *reinterpret_cast<float4*>(t->m + i) = m;
                *reinterpret_cast<float4*>(t->v + i) = v;
                if (zero) *reinterpret_cast<float4*>(t->grad + i) = make_float4(0.f, 0.f, 0.f, 0.f);
                if (t->copy_type == COPY_BF16) {
                    __nv_bfloat162 lo = __floats2bfloat162_rn(w.x, w.y), hi = __floats2bfloat162_rn(w.z, w.w);
                    uint2 packed;
                    packed.x = *reinterpret_cast<uint32_t*>(&lo);
                    packed.y = *reinterpret_cast<uint32_t*>(&hi);
                    *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(t->copy) + i) = packed;
                } else if (t->copy_type != COPY_NONE) {
                    write_copy(t, i, w.x);
                    write_copy(t, i + 1, w.y);
                    write_copy(t, i + 2, w.z);
                    write_copy(t, i + 3, w.w);
                }
            } else {
                for (uint64_t j = i; j < s.end; ++j) {
                    float w = t->param[j], m = t->m[j], v = t->v[j];
                    one(w, t->grad[j], m, v);
                    t->param[j] = w;
                    t->m[j] = m;
                    t->v[j] = v;
                    if (zero) t->grad[j] = 0.f;
                    write_copy(t, j, w);
                }
            }
        }
    }
}
