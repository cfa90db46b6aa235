// Causal depthwise conv1d (the causal-conv1d package's semantics, see
// src/ops/causal_conv1d/cpu.rs): forward, backward and the rolling-state decoding update.
// x is (batch, dim, len) with len contiguous; one block takes TILE steps of one (b, d) row,
// staged in shared memory as f32 with the W-1 steps before it (or the initial state), so the
// global loads and stores of a warp are consecutive elements. Arithmetic is f32.
#include "common.cuh"

namespace hk_conv {

// Mirrors ConvParams in src/ops/causal_conv1d/cuda.rs.
struct ConvParams {
    uint32_t batch;
    uint32_t dim;
    uint32_t len;
    uint32_t tiles;  // ceil(len / TILE): blocks per row
    uint32_t has_bias;
    uint32_t silu;
    uint32_t has_init;
    uint32_t has_resets;
    uint32_t has_dfinal;
    uint32_t state_len;  // the update's state length (>= W - 1)
    uint32_t tokens;     // the update's tokens per row
};

constexpr int THREADS = 128;
constexpr int PER_THREAD = 8;
constexpr int TILE = THREADS * PER_THREAD;

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

__device__ __forceinline__ float silu_grad(float a) {
    const float s = hk::sigmoid(a);
    return s * (1.f + a * (1.f - s));
}

template <typename T, int W>
__device__ __forceinline__ void forward(const T* __restrict__ x, const float* __restrict__ weight,
                                        const float* __restrict__ bias, const T* __restrict__ init,
                                        const uint8_t* __restrict__ resets, T* __restrict__ out,
                                        T* __restrict__ final_state, const ConvParams p) {
    __shared__ float xs[TILE + W - 1];  // x positions t0-(W-1) .. t0+TILE-1
    const size_t row = blockIdx.x / p.tiles;
    const int tile = int(blockIdx.x % p.tiles);
    const int t0 = tile * TILE;
    const int L = int(p.len);
    for (int i = threadIdx.x; i < TILE + W - 1; i += THREADS) xs[i] = input_at<T, W>(x, init, p, row, t0 - (W - 1) + i);
    const int d = int(row % p.dim);
    float w[W];
#pragma unroll
    for (int k = 0; k < W; ++k) w[k] = weight[d * W + k];
    const float b = p.has_bias ? bias[d] : 0.f;
    const uint8_t* flags = p.has_resets ? resets + (row / p.dim) * p.len : nullptr;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        const int j = threadIdx.x + i * THREADS;
        const int t = t0 + j;
        if (t >= L) break;
        float acc = b;
        if (flags) {
            const int from = seen_from<W>(flags, t);
#pragma unroll
            for (int k = 0; k < W; ++k) acc = t + k - (W - 1) >= from ? fmaf(w[k], xs[j + k], acc) : acc;
        } else {
#pragma unroll
            for (int k = 0; k < W; ++k) acc = fmaf(w[k], xs[j + k], acc);
        }
        out[row * p.len + t] = hk::from_f32<T>(p.silu ? hk::silu(acc) : acc);
    }
    // The last W-1 inputs, from the block that holds them (positions L-W+1 .. L-1 lie in
    // this tile's staged range).
    if (tile == int(p.tiles) - 1 && threadIdx.x < W - 1) {
        const int s = L - (W - 1) + int(threadIdx.x);
        const int from = flags ? seen_from<W>(flags, L - 1) : -W;
        final_state[row * (W - 1) + threadIdx.x] = hk::from_f32<T>(s >= from ? xs[s - t0 + W - 1] : 0.f);
    }
}

// Gradients of sum(out * dout) + sum(final_state * dfinal). A block recomputes dpre = dout *
// SiLU'(pre) for its TILE steps and the W-1 after them (dx at the tile's end needs them), then
// dx[s] = sum_k w[k] dpre[s+W-1-k]. Its share of dweight / dbias goes to `partial`, one row of
// W+1 per block, summed in a fixed order by conv_reduce_weight: no atomics, repeatable bits.
template <typename T, int W>
__device__ __forceinline__ void backward(const T* __restrict__ x, const float* __restrict__ weight,
                                         const float* __restrict__ bias, const T* __restrict__ init,
                                         const uint8_t* __restrict__ resets, const T* __restrict__ dout,
                                         const T* __restrict__ dfinal, T* __restrict__ dx, T* __restrict__ dinit,
                                         float* __restrict__ partial, const ConvParams p) {
    constexpr int SPAN = TILE + W - 1;    // steps t0 .. t0+TILE+W-2 with a dpre
    __shared__ float xs[SPAN + W - 1];    // x positions t0-(W-1) .. t0+TILE+W-2
    __shared__ float gs[SPAN];            // dpre
    __shared__ int from_s[SPAN];          // seen_from of each step (with resets)
    __shared__ float red[THREADS / 32][W + 1];
    const size_t row = blockIdx.x / p.tiles;
    const int tile = int(blockIdx.x % p.tiles);
    const int t0 = tile * TILE;
    const int L = int(p.len);
    const int d = int(row % p.dim);
    for (int i = threadIdx.x; i < SPAN + W - 1; i += THREADS) xs[i] = input_at<T, W>(x, init, p, row, t0 - (W - 1) + i);
    float w[W];
#pragma unroll
    for (int k = 0; k < W; ++k) w[k] = weight[d * W + k];
    const float b = p.has_bias ? bias[d] : 0.f;
    const uint8_t* flags = p.has_resets ? resets + (row / p.dim) * p.len : nullptr;
    __syncthreads();

    float dw[W + 1];  // dweight[0..W), dbias
#pragma unroll
    for (int k = 0; k <= W; ++k) dw[k] = 0.f;
    for (int j = threadIdx.x; j < SPAN; j += THREADS) {
        const int t = t0 + j;
        if (t >= L) {
            gs[j] = 0.f;
            from_s[j] = L;
            continue;
        }
        const int from = flags ? seen_from<W>(flags, t) : -W;
        float acc = b;
#pragma unroll
        for (int k = 0; k < W; ++k) acc = t + k - (W - 1) >= from ? fmaf(w[k], xs[j + k], acc) : acc;
        float g = hk::to_f32(dout[row * p.len + t]);
        if (p.silu) g *= silu_grad(acc);
        gs[j] = g;
        from_s[j] = from;
        if (j < TILE) {  // the steps after the tile belong to the next block's sums
#pragma unroll
            for (int k = 0; k < W; ++k) dw[k] = t + k - (W - 1) >= from ? fmaf(g, xs[j + k], dw[k]) : dw[k];
            dw[W] += g;
        }
    }
    __syncthreads();

    const int final_from = flags && L > 0 ? seen_from<W>(flags, L - 1) : -W;
    // dxp at x position s (-(W-1) <= s < L), s in this block's staged dpre range.
    auto dxp = [&](int s) {
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const int t = s + (W - 1) - k;
            const int j = t - t0;
            if (t >= 0 && t < L && s >= from_s[j]) acc = fmaf(w[k], gs[j], acc);
        }
        if (p.has_dfinal && s >= L - (W - 1) && s >= final_from) acc += hk::to_f32(dfinal[row * (W - 1) + s - (L - (W - 1))]);
        return acc;
    };
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        const int s = t0 + threadIdx.x + i * THREADS;
        if (s >= L) break;
        dx[row * p.len + s] = hk::from_f32<T>(dxp(s));
    }
    if (tile == 0 && p.has_init && threadIdx.x < W - 1) {
        const int s = int(threadIdx.x) - (W - 1);
        dinit[row * (W - 1) + threadIdx.x] = hk::from_f32<T>(dxp(s));
    }

    // Block sum of dw in a fixed order: warp shuffles, then the warps in order.
#pragma unroll
    for (int k = 0; k <= W; ++k) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) dw[k] += __shfl_down_sync(0xffffffffu, dw[k], off);
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k <= W; ++k) red[warp][k] = dw[k];
    }
    __syncthreads();
    if (threadIdx.x <= W) {
        float acc = 0.f;
        for (int v = 0; v < THREADS / 32; ++v) acc += red[v][threadIdx.x];
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
            out[row * n_tok + t] = hk::from_f32<T>(p.silu ? hk::silu(acc) : acc);
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

#define HK_CONV_WIDTH(T, SUFFIX, W)                                                                              \
    extern "C" __global__ void __launch_bounds__(hk_conv::THREADS) causal_conv1d_fwd_##SUFFIX##_w##W(           \
        const T* x, const float* weight, const float* bias, const T* init, const uint8_t* resets, T* out,        \
        T* final_state, const ConvParams p) {                                                                    \
        hk_conv::forward<T, W>(x, weight, bias, init, resets, out, final_state, p);                              \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(hk_conv::THREADS) causal_conv1d_bwd_##SUFFIX##_w##W(           \
        const T* x, const float* weight, const float* bias, const T* init, const uint8_t* resets, const T* dout, \
        const T* dfinal, T* dx, T* dinit, float* partial, const ConvParams p) {                                  \
        hk_conv::backward<T, W>(x, weight, bias, init, resets, dout, dfinal, dx, dinit, partial, p);             \
    }                                                                                                            \
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
