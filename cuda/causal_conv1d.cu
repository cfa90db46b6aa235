// Causal depthwise conv1d (the causal-conv1d package's semantics, see
// src/ops/causal_conv1d/cpu.rs): forward, backward and the rolling-state decoding update.
// x is (batch, dim, len) with len contiguous; one block takes a tile of one (b, d) row, each
// thread 32 consecutive bytes of it by 16-byte accesses, the W-1 steps around a thread's
// chunk coming from the neighbouring lanes by shuffles. Arithmetic is f32.
#include "common.cuh"

namespace hk_conv {

// Mirrors ConvParams in src/ops/causal_conv1d/cuda.rs.
struct ConvParams {
    uint32_t batch;
    uint32_t dim;
    uint32_t len;
    uint32_t tiles;  // ceil(len / (THREADS * chunk_of<T>())): blocks per row
    uint32_t has_bias;
    uint32_t silu;
    uint32_t has_init;
    uint32_t has_resets;
    uint32_t has_dfinal;
    uint32_t state_len;  // the update's state length (>= W - 1)
    uint32_t tokens;     // the update's tokens per row
};
HK_PARAMS_LAYOUT(ConvParams, 11);

constexpr int THREADS = 128;
// Consecutive steps per thread: 32 bytes, two 16-byte accesses (8 f32, 16 bf16 / f16), so
// that every dtype keeps as many bytes in flight. A block's tile is THREADS of them.
template <typename T>
__host__ __device__ constexpr int chunk_of() {
    return 32 / int(sizeof(T));
}

// The earliest x position output t sees: the latest sequence start in [max(0, t-W+2), t], or
// -W (everything, the initial state too) when there is none. A start at or before t-W+1 hides
// nothing in the window t-W+1..t, and the initial state is in the window only while t < W-1,
// where the range covers every earlier step.
template <int W>
__device__ __forceinline__ int seen_from(const uint8_t* __restrict__ flags_row, int t) {
    const int lo = max(0, t - W + 2);
    for (int s = t; s >= lo; --s) {
        if (flags_row[s]) return s;
    }
    return -W;
}

// Input at x position s (-(W-1) <= s < len + W - 1) of row `row` as f32: the initial state
// left of 0 (zeros without one), zeros right of len.
template <typename T, int W>
__device__ __forceinline__ float input_at(const T* __restrict__ x, const T* __restrict__ init, const ConvParams& p,
                                          size_t row, int s) {
    if (s >= 0) return s < int(p.len) ? hk::to_f32(x[row * p.len + s]) : 0.f;
    return p.has_init ? hk::to_f32(init[row * (W - 1) + (s + W - 1)]) : 0.f;
}

__device__ __forceinline__ float silu(float a) { return a * hk::sigmoid_fast(a); }

__device__ __forceinline__ float silu_grad(float a) {
    const float s = hk::sigmoid_fast(a);
    return s * (1.f + a * (1.f - s));
}

// x[off .. off+CHUNK) of one row as f32, zeros at and past `valid` elements. Whole aligned
// chunks take 16-byte loads (every chunk when len * sizeof(T) % 16 == 0); the rest go
// element by element.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, size_t off, int valid, float* v) {
    constexpr int CHUNK = chunk_of<T>(), PER16 = 16 / int(sizeof(T));
    const T* q = p + off;
    if (valid >= CHUNK && (reinterpret_cast<uintptr_t>(q) & 15) == 0) {
        uint4 raw[CHUNK / PER16];
#pragma unroll
        for (int piece = 0; piece < CHUNK / PER16; ++piece) raw[piece] = reinterpret_cast<const uint4*>(q)[piece];
        const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) v[i] = hk::to_f32(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) v[i] = i < valid ? hk::to_f32(q[i]) : 0.f;
    }
}

// Stores the first min(valid, CHUNK) values, rounded once.
template <typename T>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, size_t off, int valid, const float* v) {
    constexpr int CHUNK = chunk_of<T>(), PER16 = 16 / int(sizeof(T));
    T* q = p + off;
    if (valid >= CHUNK && (reinterpret_cast<uintptr_t>(q) & 15) == 0) {
        uint4 raw[CHUNK / PER16];
        T* e = reinterpret_cast<T*>(raw);
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) e[i] = hk::from_f32<T>(v[i]);
#pragma unroll
        for (int piece = 0; piece < CHUNK / PER16; ++piece) reinterpret_cast<uint4*>(q)[piece] = raw[piece];
    } else {
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) {
            if (i < valid) q[i] = hk::from_f32<T>(v[i]);
        }
    }
}

// x over positions s0-(W-1) .. s0+CHUNK+AFTER-1 of a thread's chunk, AFTER (0 or W-1) steps
// past it: the thread's own CHUNK by one load, its neighbours' edges by warp shuffles, and
// at a warp's (or the row's) edge from global memory (the initial state left of 0).
template <typename T, int W, int AFTER>
__device__ __forceinline__ void gather_window(const T* __restrict__ x, const T* __restrict__ init, const ConvParams& p,
                                             size_t row, int s0, float* v) {
    constexpr int CHUNK = chunk_of<T>();
    const int L = int(p.len);
    load_chunk<T>(x, row * p.len + max(s0, 0), min(L - s0, CHUNK), v + (W - 1));
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int k = 0; k < W - 1; ++k) {
        const float from_left = __shfl_up_sync(0xffffffffu, v[W - 1 + CHUNK - (W - 1) + k], 1);
        v[k] = lane == 0 ? input_at<T, W>(x, init, p, row, s0 - (W - 1) + k) : from_left;
    }
#pragma unroll
    for (int k = 0; k < AFTER; ++k) {
        const float from_right = __shfl_down_sync(0xffffffffu, v[W - 1 + k], 1);
        v[W - 1 + CHUNK + k] = lane == 31 ? input_at<T, W>(x, init, p, row, s0 + CHUNK + k) : from_right;
    }
}

// The earliest position each of the steps s0 .. s0+N-1 sees (with resets): a step at a
// sequence start sees from itself on, others what the step before them saw.
// Without RESETS every step sees everything (-W).
template <int W, int N, bool RESETS>
__device__ __forceinline__ void visible_from(const uint8_t* __restrict__ flags, int s0, int L, int from[N]) {
    if (!RESETS) {
#pragma unroll
        for (int i = 0; i < N; ++i) from[i] = -W;
        return;
    }
    int f = s0 >= 1 ? seen_from<W>(flags, min(s0, L) - 1) : -W;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        if (s0 + i < L && flags[s0 + i]) f = s0 + i;
        from[i] = f;
    }
}

// RESETS: the launch has sequence starts; without, every visibility test folds away.
template <typename T, int W, bool RESETS>
__device__ __forceinline__ void forward(const T* __restrict__ x, const float* __restrict__ weight,
                                        const float* __restrict__ bias, const T* __restrict__ init,
                                        const uint8_t* __restrict__ resets, T* __restrict__ out,
                                        T* __restrict__ final_state, const ConvParams p) {
    constexpr int CHUNK = chunk_of<T>(), TILE = THREADS * CHUNK;
    const size_t row = blockIdx.x / p.tiles;
    const int tile = int(blockIdx.x % p.tiles);
    const int L = int(p.len);
    const int s0 = tile * TILE + int(threadIdx.x) * CHUNK;
    const int d = int(row % p.dim);
    float w[W];
#pragma unroll
    for (int k = 0; k < W; ++k) w[k] = weight[d * W + k];
    const float b = p.has_bias ? bias[d] : 0.f;
    const uint8_t* flags = RESETS ? resets + (row / p.dim) * p.len : nullptr;
    // Every lane takes part in the shuffles, also past the row's end.
    float v[W - 1 + CHUNK];
    gather_window<T, W, 0>(x, init, p, row, s0, v);
    int from[CHUNK];
    visible_from<W, CHUNK, RESETS>(flags, s0, L, from);
    float y[CHUNK];
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) {
        float acc = b;
#pragma unroll
        for (int k = 0; k < W; ++k) acc = s0 + i + k - (W - 1) >= from[i] ? fmaf(w[k], v[i + k], acc) : acc;
        y[i] = p.silu ? silu(acc) : acc;
    }
    if (s0 < L) store_chunk<T>(out, row * p.len + s0, L - s0, y);
    // The last W-1 inputs (what the last output saw), from the last tile's block.
    if (tile == int(p.tiles) - 1 && threadIdx.x < W - 1) {
        const int s = L - (W - 1) + int(threadIdx.x);
        const int from = flags ? seen_from<W>(flags, L - 1) : -W;
        final_state[row * (W - 1) + threadIdx.x] = hk::from_f32<T>(s >= from ? input_at<T, W>(x, init, p, row, s) : 0.f);
    }
}

// dpre = dout * SiLU'(pre) at step t (0 past the row's end), the scalar path for the
// initial state's gradient.
template <typename T, int W>
__device__ __forceinline__ float grad_at(const T* __restrict__ x, const T* __restrict__ init,
                                         const T* __restrict__ dout, const uint8_t* __restrict__ flags,
                                         const float w[W], float b, const ConvParams& p, size_t row, int t) {
    if (t >= int(p.len)) return 0.f;
    const int from = flags ? seen_from<W>(flags, t) : -W;
    float acc = b;
#pragma unroll
    for (int k = 0; k < W; ++k) {
        const int s = t + k - (W - 1);
        if (s >= from) acc = fmaf(w[k], input_at<T, W>(x, init, p, row, s), acc);
    }
    const float g = hk::to_f32(dout[row * p.len + t]);
    return p.silu ? g * silu_grad(acc) : g;
}

// Gradients of sum(out * dout) + sum(final_state * dfinal). Each thread recomputes dpre =
// dout * SiLU'(pre) for its CHUNK steps and the W-1 after them (dx at its chunk's end needs
// them), then dx[s] = sum_k w[k] dpre[s+W-1-k]. Its share of dweight / dbias goes through a
// fixed-order block sum into `partial`, one row of W+1 per block, summed in a fixed order by
// conv_reduce_weight: no atomics, repeatable bits.
template <typename T, int W, bool RESETS>
__device__ __forceinline__ void backward(const T* __restrict__ x, const float* __restrict__ weight,
                                         const float* __restrict__ bias, const T* __restrict__ init,
                                         const uint8_t* __restrict__ resets, const T* __restrict__ dout,
                                         const T* __restrict__ dfinal, T* __restrict__ dx, T* __restrict__ dinit,
                                         float* __restrict__ partial, const ConvParams p) {
    constexpr int CHUNK = chunk_of<T>(), TILE = THREADS * CHUNK;
    constexpr int SPAN = CHUNK + W - 1;  // steps with a dpre: the chunk and the W-1 after it
    __shared__ float red[THREADS / 32][W + 1];
    const size_t row = blockIdx.x / p.tiles;
    const int tile = int(blockIdx.x % p.tiles);
    const int L = int(p.len);
    const int s0 = tile * TILE + int(threadIdx.x) * CHUNK;
    const int d = int(row % p.dim);
    float w[W];
#pragma unroll
    for (int k = 0; k < W; ++k) w[k] = weight[d * W + k];
    const float b = p.has_bias ? bias[d] : 0.f;
    const uint8_t* flags = RESETS ? resets + (row / p.dim) * p.len : nullptr;

    float v[W - 1 + SPAN];  // x at s0-(W-1) .. s0+SPAN-1
    gather_window<T, W, W - 1>(x, init, p, row, s0, v);
    float g[SPAN];  // dout, then dpre, at s0 .. s0+SPAN-1
    load_chunk<T>(dout, row * p.len + max(s0, 0), min(L - s0, CHUNK), g);
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int k = 0; k < W - 1; ++k) {
        const float from_right = __shfl_down_sync(0xffffffffu, g[k], 1);
        const int t = s0 + CHUNK + k;
        g[CHUNK + k] = lane == 31 ? (t < L ? hk::to_f32(dout[row * p.len + t]) : 0.f) : from_right;
    }
    int from[SPAN];
    visible_from<W, SPAN, RESETS>(flags, s0, L, from);
    float dw[W + 1];  // dweight[0..W), dbias
#pragma unroll
    for (int k = 0; k <= W; ++k) dw[k] = 0.f;
#pragma unroll
    for (int i = 0; i < SPAN; ++i) {
        const int t = s0 + i;
        float acc = b;
#pragma unroll
        for (int k = 0; k < W; ++k) acc = t + k - (W - 1) >= from[i] ? fmaf(w[k], v[i + k], acc) : acc;
        g[i] = t < L ? (p.silu ? g[i] * silu_grad(acc) : g[i]) : 0.f;
        if (i < CHUNK) {  // the steps after the chunk belong to the next thread's sums
#pragma unroll
            for (int k = 0; k < W; ++k) dw[k] = t + k - (W - 1) >= from[i] ? fmaf(g[i], v[i + k], dw[k]) : dw[k];
            dw[W] += g[i];
        }
    }

    const int final_from = flags && L > 0 ? seen_from<W>(flags, L - 1) : -W;
    float dxs[CHUNK];
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) {
        const int s = s0 + i;
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const int j = i + (W - 1) - k;  // step s + W-1-k
            if (s >= from[j]) acc = fmaf(w[k], g[j], acc);
        }
        if (p.has_dfinal && s < L && s >= L - (W - 1) && s >= final_from)
            acc += hk::to_f32(dfinal[row * (W - 1) + s - (L - (W - 1))]);
        dxs[i] = acc;
    }
    if (s0 < L) store_chunk<T>(dx, row * p.len + s0, L - s0, dxs);
    if (tile == 0 && p.has_init && threadIdx.x < W - 1) {
        // The initial state's gradient: x positions -(W-1) .. -1, by the scalar path.
        const int s = int(threadIdx.x) - (W - 1);
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const int t = s + (W - 1) - k;
            if (t >= 0 && t < L && s >= (flags ? seen_from<W>(flags, t) : -W))
                acc = fmaf(w[k], grad_at<T, W>(x, init, dout, flags, w, b, p, row, t), acc);
        }
        if (p.has_dfinal && s >= L - (W - 1) && s >= final_from)
            acc += hk::to_f32(dfinal[row * (W - 1) + s - (L - (W - 1))]);
        dinit[row * (W - 1) + threadIdx.x] = hk::from_f32<T>(acc);
    }

    // Block sum of dw in a fixed order: warp shuffles, then the warps in order.
#pragma unroll
    for (int k = 0; k <= W; ++k) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) dw[k] += __shfl_down_sync(0xffffffffu, dw[k], off);
    }
    const int warp = threadIdx.x / 32;
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k <= W; ++k) red[warp][k] = dw[k];
    }
    __syncthreads();
    if (threadIdx.x <= W) {
        float acc = 0.f;
        for (int u = 0; u < THREADS / 32; ++u) acc += red[u][threadIdx.x];
        // partial: (batch, tiles, dim, W+1), so the reduce walks batch and tiles per channel.
        const size_t bidx = row / p.dim;
        partial[((bidx * p.tiles + tile) * p.dim + d) * (W + 1) + threadIdx.x] = acc;
    }
}

// dweight (dim, W) and dbias (dim): each the sum over batch and tiles, in that order.
template <int W>
__device__ __forceinline__ void reduce_weight(const float* __restrict__ partial, float* __restrict__ dweight,
                                              float* __restrict__ dbias, const ConvParams p) {
    const size_t n = size_t(p.dim) * (W + 1);
    const size_t slices = size_t(p.batch) * p.tiles;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += size_t(gridDim.x) * blockDim.x) {
        float acc = 0.f;
        for (size_t s = 0; s < slices; ++s) acc += partial[s * n + e];
        const size_t d = e / (W + 1), k = e % (W + 1);
        if (k < W) {
            dweight[d * W + k] = acc;
        } else if (p.has_bias) {
            dbias[d] = acc;
        }
    }
}

// One decoding update per (batch, channel) row: each token is convolved with the W-1 values
// before it in [state, x]; the state becomes the last state_len values of [state, x] (copied
// as stored, no rounding).
template <typename T, int W>
__device__ __forceinline__ void update(T* __restrict__ state, const T* __restrict__ x,
                                       const float* __restrict__ weight, const float* __restrict__ bias,
                                       T* __restrict__ out, const ConvParams p) {
    const size_t rows = size_t(p.batch) * p.dim;
    const uint32_t S = p.state_len, n_tok = p.tokens;
    for (size_t row = size_t(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
         row += size_t(gridDim.x) * blockDim.x) {
        const int d = int(row % p.dim);
        T* st = state + row * S;
        const T* xr = x + row * n_tok;
        float w[W], win[W];  // win[0..W-1): the W-1 values before the token
#pragma unroll
        for (int k = 0; k < W; ++k) w[k] = weight[d * W + k];
#pragma unroll
        for (int k = 0; k < W - 1; ++k) win[k] = hk::to_f32(st[S - (W - 1) + k]);
        const float b = p.has_bias ? bias[d] : 0.f;
        for (uint32_t t = 0; t < n_tok; ++t) {
            win[W - 1] = hk::to_f32(xr[t]);
            float acc = b;
#pragma unroll
            for (int k = 0; k < W; ++k) acc = fmaf(w[k], win[k], acc);
            out[row * n_tok + t] = hk::from_f32<T>(p.silu ? silu(acc) : acc);
#pragma unroll
            for (int k = 0; k < W - 1; ++k) win[k] = win[k + 1];
        }
        // Shift left by n_tok in place (reads stay ahead of writes), then append x's tail.
        const uint32_t kept = n_tok < S ? S - n_tok : 0;
        for (uint32_t i = 0; i < kept; ++i) st[i] = st[i + n_tok];
        for (uint32_t i = kept; i < S; ++i) st[i] = xr[n_tok - (S - i)];
    }
}

}  // namespace hk_conv

using hk_conv::ConvParams;

// One entry point per (dtype, width) and with or without resets: the reset-free kernels,
// the common case, get registers for their own path only.
#define HK_CONV_PASSES(T, SUFFIX, W, RESETS, TAIL)                                                              \
    extern "C" __global__ void __launch_bounds__(hk_conv::THREADS) causal_conv1d_fwd_##SUFFIX##_w##W##TAIL(     \
        const T* x, const float* weight, const float* bias, const T* init, const uint8_t* resets, T* out,        \
        T* final_state, const ConvParams p) {                                                                    \
        hk_conv::forward<T, W, RESETS>(x, weight, bias, init, resets, out, final_state, p);                      \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(hk_conv::THREADS) causal_conv1d_bwd_##SUFFIX##_w##W##TAIL(     \
        const T* x, const float* weight, const float* bias, const T* init, const uint8_t* resets, const T* dout, \
        const T* dfinal, T* dx, T* dinit, float* partial, const ConvParams p) {                                  \
        hk_conv::backward<T, W, RESETS>(x, weight, bias, init, resets, dout, dfinal, dx, dinit, partial, p);     \
    }

#define HK_CONV_WIDTH(T, SUFFIX, W)                                                                              \
    HK_CONV_PASSES(T, SUFFIX, W, false, )                                                                        \
    HK_CONV_PASSES(T, SUFFIX, W, true, _resets)                                                                  \
    extern "C" __global__ void causal_conv1d_update_##SUFFIX##_w##W(T* state, const T* x, const float* weight,  \
                                                                   const float* bias, T* out,                   \
                                                                   const ConvParams p) {                         \
        hk_conv::update<T, W>(state, x, weight, bias, out, p);                                                   \
    }

#define HK_CONV_DTYPE(T, SUFFIX) \
    HK_CONV_WIDTH(T, SUFFIX, 2)  \
    HK_CONV_WIDTH(T, SUFFIX, 3)  \
    HK_CONV_WIDTH(T, SUFFIX, 4)

HK_CONV_DTYPE(float, f32)
HK_CONV_DTYPE(__nv_bfloat16, bf16)
HK_CONV_DTYPE(__half, f16)

#define HK_CONV_REDUCE(W)                                                                                   \
    extern "C" __global__ void causal_conv1d_reduce_weight_w##W(const float* partial, float* dweight,      \
                                                                float* dbias, const ConvParams p) {         \
        hk_conv::reduce_weight<W>(partial, dweight, dbias, p);                                              \
    }

HK_CONV_REDUCE(2)
HK_CONV_REDUCE(3)
HK_CONV_REDUCE(4)
