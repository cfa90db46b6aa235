// The selective scan's shared device code: parameters, the softplus / exponential helpers,
// lane layouts, the tile staging of forward and backward, and the launch bounds. One file per
// pass includes it (forward.cu, backward.cu; step.cu for decoding), each its own module.
//
// Fused selective scan (Mamba), forward and backward, mamba-ssm semantics:
//   dt = softplus(delta + bias);  h_t = exp(dt A) h_{t-1} + dt B_t u_t;  y_t = C_t . h_t + D u_t
//   out = y SiLU(z)
// plus an initial state, per-sequence resets and a gradient into the last state.
//
// Work split: a block owns DB = BLK / NT channels d of one (batch, group); each channel's
// N states are spread over NT consecutive lanes, SPT states per lane, kept in registers for
// the whole sequence. Time runs in tiles: the block stages a tile of dt, u, B, C (and z)
// in shared memory, as f32 except 16-bit B and C, kept as loaded (PackedBC: one 16-byte
// read per lane and step), softplus and SiLU computed once per element, not once per state;
// every lane advances its states through the tile, and y_t = sum_n C h is summed over the
// NT lanes, by partial sums per lane added at the output (up to 4 lanes) or a transposing
// shuffle (NT - 1 shuffles per NT timesteps, not log2(NT) per timestep). Staging goes by
// channel: lane j of a channel loads steps j*PE .. j*PE + PE - 1 of its own rows by vectors
// (FwdTile), so bias and D are registers and the same lane writes those steps of the
// output. The forward loads the next tile into registers (raw, unconverted) before scanning
// the current one, so the loads' latency hides behind the scan. exp(dt A) is one ex2.approx
// per (t, n) on A pre-scaled by log2(e). Without resets and with time-varying B and C
// (Mamba's usual call) the scan skips the reset mask and the constant-B/C terms (the
// GENERAL = false instantiation).
//
// Backward: the forward is recomputed, not stored. The forward (scan with ckpt) leaves the
// states at every `ckpt_interval` steps; the backward walks those intervals in reverse,
// copying the next interval's inputs and checkpoint into shared memory by cp.async while it
// works on the current one (BwdTile). Per interval it recomputes the states once to get y (for dz) and the states at every S = 8
// steps, then per S-step piece recomputes exp(dt A) and a h_{t-1} into registers and runs the
// adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} backwards. Sums over channels (dB, dC when they
// vary in time) are reduced across the warp's channels by shuffles, across the block's warps
// in shared memory, then written as per-block partials that scan_reduce_bc adds in a fixed
// order; sums over batch and time (dA, dD, dbias, constant dB/dC) go through per-(b, d)
// partials and scan_reduce_params. No float atomics: the gradients are bitwise reproducible.
#pragma once

#include "../common.cuh"

namespace hk_scan {

constexpr int BLOCK = 128;
constexpr int S = 8;  // backward: steps per register-resident piece
constexpr float LOG2E = 1.4426950408889634f;

struct ScanParams {
    uint32_t batch, dim, dstate, len;
    uint32_t groups;         // of the time-varying B / C (dim is a multiple); 1 if both constant
    uint32_t tile;           // timesteps per shared-memory tile; a multiple of 8
    uint32_t ckpt_interval;  // steps between saved states; a multiple of 8
    uint32_t n_ckpt;         // ceil(len / ckpt_interval)
    uint32_t b_variable, c_variable;
    uint32_t has_d, has_z, has_bias, softplus, has_h0, has_resets;
    uint32_t has_dlast, write_ckpt;
};
HK_PARAMS_LAYOUT(ScanParams, 18);

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// PyTorch's softplus (threshold 20), as mamba-ssm's kernels use it: log1p(e^x) for x <= 20.
// Here max(x, 0) + log1p(t) with t = e^-|x| in (0, 1], log1p(t) = t P(t) with P a degree-8
// fit of log1p(t) / t on [0, 1] (relative error 2.1e-7 evaluated in f32, below that of
// ex2.approx's 2^-22 plus one rounding): one special-function operation, where log1p by
// lg2(1 + e^x) takes two and, to stay accurate for small e^x, a series beside it. Branch-free:
// it runs once per staged element. The backward uses the same function, so its recomputed
// states match the forward's; `grad` is its derivative, sigmoid(x), from the same t.
__device__ __forceinline__ float softplus(float x, float& grad) {
    const float t = ex2(-fabsf(x) * LOG2E);
    float q = 0.005232697818428278f;
    q = fmaf(q, t, -0.029505258426070213f);
    q = fmaf(q, t, 0.0782259926199913f);
    q = fmaf(q, t, -0.13663250207901f);
    q = fmaf(q, t, 0.19106009602546692f);
    q = fmaf(q, t, -0.24842983484268188f);
    q = fmaf(q, t, 0.3331909775733948f);
    q = fmaf(q, t, -0.4999949336051941f);
    q = fmaf(q, t, 0.9999999403953552f);
    const float r = fmaf(t, q, fmaxf(x, 0.f));
    const float inv = __fdividef(1.f, 1.f + t);
    grad = x <= 20.f ? (x >= 0.f ? inv : t * inv) : 1.f;
    return x <= 20.f ? r : x;
}
__device__ __forceinline__ float softplus(float x) {
    float unused;
    return softplus(x, unused);
}
// 1 / (1 + e^-x) on ex2.approx.ftz: __expf's path for results below 2^-126 (two predicated
// multiplies) buys nothing here, where such an e^-x next to 1 rounds away anyway.
__device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.f, 1.f + ex2(-x * LOG2E)); }
// The derivative of x sigmoid(x), given s = sigmoid(x) (the caller needs s for SiLU too).
__device__ __forceinline__ float silu_grad(float x, float s) { return s * (1.f + x * (1.f - s)); }
// v, computed on every path. A value used under a per-element condition (a step past the
// end, an absent z) is otherwise computed inside a branch per element, and the branches keep
// the elements' special-function chains from overlapping: the forward's staging was 27% of
// its instructions and 35% of its stall samples that way (H100, bf16, Nsight Compute).
__device__ __forceinline__ float unconditional(float v) {
    asm volatile("" : "+f"(v));
    return v;
}

template <int X> struct Log2 { static constexpr int value = 1 + Log2<X / 2>::value; };
template <> struct Log2<1> { static constexpr int value = 0; };

// Sums v over L lanes (lane id bits SHIFT.. SHIFT + log2 L) and spreads the V sums over them:
// with V >= L, lane j ends with the totals of entries j*V/L .. j*V/L + V/L - 1 in v[0..V/L);
// with V < L, entry j / (L/V) in v[0], held by all L/V lanes of that index.
template <int V, int L, int SHIFT>
__device__ __forceinline__ void transpose_reduce(float (&v)[V], int j) {
    constexpr int LOG_V = Log2<V>::value;
    constexpr int LOG_L = Log2<L>::value;
    constexpr int STAGES = LOG_V < LOG_L ? LOG_V : LOG_L;
#pragma unroll
    for (int st = 0; st < STAGES; ++st) {
        const int m = (L >> 1) >> st;
        const int half = (V >> 1) >> st;
        const bool upper = (j & m) != 0;
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const float send = upper ? v[i] : v[i + half];
            const float keep = upper ? v[i + half] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, m << SHIFT);
        }
    }
#pragma unroll
    for (int m = (L >> 1) >> STAGES; m >= 1; m >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], m << SHIFT);
}

// Which of transpose_reduce's results lane j holds: entries first .. first + count - 1,
// or none (count 0) where another lane of the same index writes it.
template <int V, int L> struct ReduceOwner {
    static constexpr int count = V >= L ? V / L : 1;
    __device__ __forceinline__ static int first(int j) { return V >= L ? j * (V / L) : j / (L / V); }
    __device__ __forceinline__ static bool owns(int j) { return V >= L ? true : (j % (L / V)) == 0; }
};

// Where a block's channels are and what each thread owns.
template <int SPT, int NT, int BLK> struct Layout {
    static constexpr int DB = BLK / NT;      // channels per block
    static constexpr int NPAD = SPT * NT;    // states per channel, padded
    static constexpr int BS = NPAD + 4;      // row stride of the [t][n] B / C tiles (16-byte rows)
    int b, g, d0, n_ch;                      // batch, group, first channel, channels in this block
    int j, dl, d;                            // lane in channel, channel in block, channel
    bool valid;                              // d is a real channel
    __device__ Layout(const ScanParams& p) {
        const int dpg = int(p.dim / p.groups);
        const int blocks_per_group = (dpg + DB - 1) / DB;
        b = blockIdx.y;
        g = blockIdx.x / blocks_per_group;
        const int blk = blockIdx.x % blocks_per_group;
        d0 = g * dpg + blk * DB;
        n_ch = min(DB, dpg - blk * DB);
        j = threadIdx.x % NT;
        dl = threadIdx.x / NT;
        d = d0 + dl;
        valid = dl < n_ch;
    }
};

// Time tiles, fixed per layout: the forward's keeps DB x tile and NPAD x tile at 2048
// elements (~54 KiB of shared memory, 16 staged elements per thread and array); the
// backward's (= the checkpoint interval) is at most 32, its shared memory being larger.
template <int SPT, int NT, int BLK> struct Tiles {
    static constexpr int DB = BLK / NT, NPAD = SPT * NT;
    static constexpr int cap(int t) { return (t > 8 && (DB * t > 16 * BLK || NPAD * t > 16 * BLK)) ? cap(t / 2) : t; }
    // Up to 4 lanes per channel the forward sums y over them at the output (partials in shared
    // memory, PARTIAL_Y), which needs a row per lane: tiles of 32 steps keep that in budget.
    static constexpr bool PARTIAL_Y = NT <= 4;
    static constexpr int FWD = PARTIAL_Y ? cap(32) : cap(64);
    static constexpr int BWD = FWD < 32 ? FWD : 32;
};


// Per-thread constants: A (and A log2 e), constant B and C, for this thread's states.
template <int SPT, int NT, int BLK>
__device__ __forceinline__ void load_state_params(const Layout<SPT, NT, BLK>& lo, const ScanParams& p,
                                                  const float* __restrict__ A, const float* __restrict__ Bc,
                                                  const float* __restrict__ Cc, float (&a_nat)[SPT],
                                                  float (&a2)[SPT], float (&bc)[SPT], float (&cc)[SPT]) {
#pragma unroll
    for (int s = 0; s < SPT; ++s) {
        const int n = lo.j * SPT + s;
        const bool ok = lo.valid && n < int(p.dstate);
        const size_t i = size_t(lo.d) * p.dstate + n;
        a_nat[s] = ok ? A[i] : 0.f;
        a2[s] = a_nat[s] * LOG2E;
        bc[s] = (ok && !p.b_variable) ? Bc[i] : 0.f;
        cc[s] = (ok && !p.c_variable) ? Cc[i] : 0.f;
    }
}

template <int COUNT>
__device__ __forceinline__ void load_shared(const float* src, float (&v)[COUNT]) {
#pragma unroll
    for (int i = 0; i < COUNT; i += (COUNT % 4 == 0 ? 4 : 1)) {
        if (COUNT % 4 == 0) {
            const float4 x = *reinterpret_cast<const float4*>(src + i);
            v[i] = x.x, v[i + 1] = x.y, v[i + 2] = x.z, v[i + 3] = x.w;
        } else {
            v[i] = src[i];
        }
    }
}

template <int COUNT>
__device__ __forceinline__ void store_shared(float* dst, const float (&v)[COUNT]) {
#pragma unroll
    for (int i = 0; i < COUNT; i += (COUNT % 4 == 0 ? 4 : 1)) {
        if (COUNT % 4 == 0) *reinterpret_cast<float4*>(dst + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
        else dst[i] = v[i];
    }
}

// One element of a 32-bit word holding two 16-bit ones (high: the upper half) as f32.
__device__ __forceinline__ float unpack_word(uint32_t word, bool high, __nv_bfloat16) {
    return __uint_as_float(high ? word & 0xffff0000u : word << 16);
}
__device__ __forceinline__ float unpack_word(uint32_t word, bool high, __half) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(high ? word >> 16 : word)));
}
__device__ __forceinline__ float unpack_word(uint32_t word, bool, float) { return __uint_as_float(word); }

// With 16-bit inputs the forward stages B and C as loaded, not as f32: a row per step of
// NPAD / SPT lane groups, each SPT elements of B then SPT of C, so that a lane reads its
// step's B and C in one 16-byte read (4 states) where two f32 [t][n] arrays take two. Every
// lane reads B_t and C_t of its own states each step; a warp's 16-byte read takes 4
// shared-memory wavefronts (one per quarter warp) whatever the broadcast, and the SM serves
// one per cycle. At dstate 16 (12 warps per SM, 4 states per lane) a step's reads took 120
// cycles with f32 B and C (96 of them B and C), more than the 96 of its exponentials on
// each quarter of the special-function unit; packed, 72. Unpacking costs one integer
// operation per element. H100, bf16: 236 -> 217 us.
template <typename T> __host__ __device__ constexpr bool packs_bc() { return sizeof(T) == 2; }
template <typename T, int SPT, int NT> struct PackedBC {
    static constexpr int NPAD = SPT * NT;
    static constexpr int WORDS = NPAD;  // 32-bit words per step
    static_assert(packs_bc<T>() && SPT % 2 == 0, "two 16-bit elements per word");
    __device__ __forceinline__ static void load(const float* s, int t, int j, float (&bv)[SPT], float (&cv)[SPT]) {
        float w[SPT];
        load_shared<SPT>(s + t * WORDS + j * SPT, w);
#pragma unroll
        for (int i = 0; i < SPT / 2; ++i) {
            const uint32_t wb = __float_as_uint(w[i]), wc = __float_as_uint(w[SPT / 2 + i]);
            bv[2 * i] = unpack_word(wb, false, T());
            bv[2 * i + 1] = unpack_word(wb, true, T());
            cv[2 * i] = unpack_word(wc, false, T());
            cv[2 * i + 1] = unpack_word(wc, true, T());
        }
    }
    // State n's B at step t, in 16-bit elements from the tile's start; its C is SPT further.
    __device__ __forceinline__ static int b_index(int t, int n) { return t * 2 * WORDS + (n / SPT) * 2 * SPT + n % SPT; }
};

// Advances this lane's states through steps tr .. tr + R of the staged tile (rows of RS
// floats) and writes y for those steps to sY, reduced over the channel's NT lanes, or with
// PARTIAL this lane's sums over its own states to its row (dl, j) for the caller to add. The
// forward stages dt u (DtuStaged); the backward keeps u and forms dt u here. B and C: f32
// [t][n] arrays sB and sC, or with a 16-bit STAGED type PackedBC's rows at sB.
template <int SPT, int NT, int BLK, int R, int RS, bool GENERAL, bool DtuStaged, bool PARTIAL = false,
          typename STAGED = float>
__device__ __forceinline__ void advance_and_emit_y(const Layout<SPT, NT, BLK>& lo, int tr, float (&h)[SPT],
                                                   const float (&a2)[SPT], const float (&bc)[SPT],
                                                   const float (&cc)[SPT], const float* sB, const float* sC,
                                                   const float* sDt, const float* sDtuOrU, const float* sKeep,
                                                   float* sY) {
    using L = Layout<SPT, NT, BLK>;
    float y[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int t = tr + r;
        const float keep = GENERAL ? sKeep[t] : 1.f;
        float bv[SPT], cv[SPT];
        if constexpr (packs_bc<STAGED>()) {
            PackedBC<STAGED, SPT, NT>::load(sB, t, lo.j, bv, cv);
        } else {
            load_shared<SPT>(sB + t * L::BS + lo.j * SPT, bv);
            load_shared<SPT>(sC + t * L::BS + lo.j * SPT, cv);
        }
        const float dt = sDt[lo.dl * RS + t];
        const float dtu = DtuStaged ? sDtuOrU[lo.dl * RS + t] : dt * sDtuOrU[lo.dl * RS + t];
        float acc = 0.f;
#pragma unroll
        for (int s = 0; s < SPT; ++s) {
            if (GENERAL) {
                // A reset replaces the state (a select, not a multiply by 0), so a non-finite
                // state of the sequence before cannot reach this one: 0 * inf is NaN.
                const float x = dtu * (bv[s] + bc[s]);
                h[s] = keep != 0.f ? fmaf(ex2(dt * a2[s]), h[s], x) : x;
                acc = fmaf(cv[s] + cc[s], h[s], acc);
            } else {
                h[s] = fmaf(ex2(dt * a2[s]), h[s], dtu * bv[s]);
                acc = fmaf(cv[s], h[s], acc);
            }
        }
        y[r] = acc;
    }
    if (PARTIAL) {  // this lane's partial sums, row (dl, j) of RS floats
        store_shared<R>(sY + (lo.dl * NT + lo.j) * RS + tr, y);
        return;
    }
    transpose_reduce<R, NT, 0>(y, lo.j);
    using Own = ReduceOwner<R, NT>;
    if (Own::owns(lo.j)) {
#pragma unroll
        for (int i = 0; i < Own::count; ++i) sY[lo.dl * RS + tr + Own::first(lo.j) + i] = y[i];
    }
}

// COUNT consecutive elements of one row as loaded: raw 32-bit words, converted only when
// staged, so that a prefetch's registers do not wait on their own conversion (and bf16 / f16
// take half the registers of f32).
template <typename T, int COUNT> struct RowSegment {
    static constexpr int BYTES = COUNT * int(sizeof(T));
    static constexpr int WORDS = (BYTES + 3) / 4;
    static constexpr int VW = BYTES % 16 == 0 ? 4 : BYTES % 8 == 0 ? 2 : 1;  // words per vector
    static constexpr int EPW = 4 / int(sizeof(T));                          // elements per word
    static constexpr bool VECTORS = BYTES % 4 == 0;
    uint32_t w[WORDS];

    // Elements from index `avail` on read as 0. With `vec` (src aligned to its vector and
    // rows a whole number of vectors) by 16-, 8- or 4-byte vectors, else one by one.
    __device__ __forceinline__ void load(const T* __restrict__ src, int avail, bool vec) {
        if (VECTORS && vec) {
#pragma unroll
            for (int c = 0; c < WORDS / VW; ++c) {
                const bool ok = c * VW * EPW < avail;
                const T* at = src + c * VW * EPW;
                if (VW == 4) {
                    const uint4 v = ok ? *reinterpret_cast<const uint4*>(at) : make_uint4(0u, 0u, 0u, 0u);
                    w[4 * c] = v.x, w[4 * c + 1] = v.y, w[4 * c + 2] = v.z, w[4 * c + 3] = v.w;
                } else if (VW == 2) {
                    const uint2 v = ok ? *reinterpret_cast<const uint2*>(at) : make_uint2(0u, 0u);
                    w[2 * c] = v.x, w[2 * c + 1] = v.y;
                } else {
                    w[c] = ok ? *reinterpret_cast<const uint32_t*>(at) : 0u;
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < COUNT; ++i) {
                const uint32_t bits = i < avail ? bits_of(src[i]) : 0u;
                if (EPW == 1) w[i] = bits;
                else if (i % 2 == 0) w[i / 2] = bits;
                else w[i / 2] |= bits << 16;
            }
        }
    }
    __device__ __forceinline__ float get(int i) const {
        if (EPW == 1) return __uint_as_float(w[i]);
        return unpack_word(w[i / 2], i % 2 != 0, T());
    }
    // Element i's 16 bits (16-bit T).
    __device__ __forceinline__ uint16_t bits(int i) const {
        return static_cast<uint16_t>(i % 2 != 0 ? w[i / 2] >> 16 : w[i / 2]);
    }
    __device__ __forceinline__ static uint32_t bits_of(float v) { return __float_as_uint(v); }
    __device__ __forceinline__ static uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
    __device__ __forceinline__ static uint32_t bits_of(__half v) { return __half_as_ushort(v); }
};

// Writes COUNT values to dst[0 .. min(COUNT, avail)), converted to T; vectors as RowSegment.
template <typename T, int COUNT>
__device__ __forceinline__ void store_row(T* __restrict__ dst, const float (&v)[COUNT], int avail, bool vec) {
    using Seg = RowSegment<T, COUNT>;
    if (Seg::VECTORS && vec) {
        uint32_t w[Seg::WORDS];
#pragma unroll
        for (int k = 0; k < Seg::WORDS; ++k) {
            if (Seg::EPW == 1) {
                w[k] = __float_as_uint(v[k]);
            } else {
                const T lo = hk::from_f32<T>(v[2 * k]), hi = hk::from_f32<T>(v[2 * k + 1]);
                w[k] = Seg::bits_of(lo) | (Seg::bits_of(hi) << 16);
            }
        }
#pragma unroll
        for (int c = 0; c < Seg::WORDS / Seg::VW; ++c) {
            if (c * Seg::VW * Seg::EPW >= avail) break;
            T* at = dst + c * Seg::VW * Seg::EPW;
            if (Seg::VW == 4)
                *reinterpret_cast<uint4*>(at) = make_uint4(w[4 * c], w[4 * c + 1], w[4 * c + 2], w[4 * c + 3]);
            else if (Seg::VW == 2)
                *reinterpret_cast<uint2*>(at) = make_uint2(w[2 * c], w[2 * c + 1]);
            else
                *reinterpret_cast<uint32_t*>(at) = w[c];
        }
    } else {
#pragma unroll
        for (int i = 0; i < COUNT; ++i)
            if (i < avail) dst[i] = hk::from_f32<T>(v[i]);
    }
}

// The forward's tile inputs, staged by channel: lane j of a channel loads steps j*PE ..
// j*PE + PE - 1 of its own rows (vectors of one row), so its bias and D are two registers and
// softplus / SiLU run once per element; B and C: each thread PB consecutive steps of a state
// row, RB rows. Loaded in one batch while the previous tile is scanned.
template <typename T, int SPT, int NT, int BLK, int TILE> struct FwdTile {
    static constexpr int DB = BLK / NT, NPAD = SPT * NT;
    static constexpr int PE = TILE >= NT ? TILE / NT : 1;  // steps per lane
    static constexpr int LANES = TILE / PE;                // lanes of a channel that stage
    static constexpr int PB = NPAD * TILE < BLK ? 1 : NPAD * TILE / BLK < TILE ? NPAD * TILE / BLK : TILE;
    static constexpr int SEGS = TILE / PB;                           // threads per B / C row
    static constexpr int RB = NPAD * SEGS < BLK ? 1 : NPAD * SEGS / BLK;  // B / C rows per thread
    static_assert(TILE % PE == 0 && TILE % PB == 0 && RB * BLK >= NPAD * SEGS, "tile split");
    // B and C staged as PackedBC's rows (16-bit T) or as two f32 [t][n] arrays.
    static constexpr bool PACKED_BC = packs_bc<T>();
    RowSegment<T, PE> u, delta, z;
    RowSegment<T, PB> b[RB], c[RB];
    float keep;

    // Lane j's PE steps of its channel from step t0 + j*PE: their offset in a (batch, dim, len)
    // tensor and how many exist (0 for an absent channel or a lane that does not stage).
    __device__ __forceinline__ static size_t channel_row(const Layout<SPT, NT, BLK>& lo, const ScanParams& p, int t0,
                                                         int& avail) {
        const int ts = t0 + lo.j * PE;
        const bool mine = lo.valid && lo.j < LANES;
        avail = mine ? int(p.len) - ts : 0;
        return mine ? (size_t(lo.b) * p.dim + lo.d) * p.len + ts : 0;
    }
    // This thread's r-th B / C row: its state (NPAD or more: none) and its first step in the tile.
    __device__ __forceinline__ static int bc_state(int r) { return int(threadIdx.x / SEGS) + r * (BLK / SEGS); }
    __device__ __forceinline__ static int bc_step() { return int(threadIdx.x % SEGS) * PB; }
    // State n's PB steps from step t in a (batch, groups, dstate, len) tensor: offset and how
    // many exist (0 for a padding state).
    __device__ __forceinline__ static size_t bc_row(const Layout<SPT, NT, BLK>& lo, const ScanParams& p, int n, int t,
                                                    int& avail) {
        const bool ok = n < int(p.dstate);
        avail = ok ? int(p.len) - t : 0;
        return ok ? ((size_t(lo.b) * p.groups + lo.g) * p.dstate + n) * p.len + t : 0;
    }
    // State n's steps ts .. ts + PB into the [t][n] tiles.
    __device__ __forceinline__ static void store_bc(float* sB, float* sC, int n, int ts, const RowSegment<T, PB>& bv,
                                                    const RowSegment<T, PB>& cv) {
        constexpr int BS = Layout<SPT, NT, BLK>::BS;
#pragma unroll
        for (int i = 0; i < PB; ++i) {
            sB[(ts + i) * BS + n] = bv.get(i);
            sC[(ts + i) * BS + n] = cv.get(i);
        }
    }

    // State n's steps ts .. ts + PB into PackedBC's rows (16-bit T).
    __device__ __forceinline__ static void store_bc_packed(float* sBC, int n, int ts, const RowSegment<T, PB>& bv,
                                                           const RowSegment<T, PB>& cv) {
        uint16_t* s16 = reinterpret_cast<uint16_t*>(sBC);
#pragma unroll
        for (int i = 0; i < PB; ++i) {
            const int k = PackedBC<T, SPT, NT>::b_index(ts + i, n);
            s16[k] = bv.bits(i);
            s16[k + SPT] = cv.bits(i);
        }
    }

    __device__ __forceinline__ void load(const Layout<SPT, NT, BLK>& lo, const ScanParams& p, int t0, bool vec,
                                         const T* __restrict__ uu, const T* __restrict__ dd,
                                         const T* __restrict__ Bv, const T* __restrict__ Cv,
                                         const T* __restrict__ zz, const uint8_t* __restrict__ resets) {
        const int len = int(p.len);
        {
            int avail;
            const size_t row = channel_row(lo, p, t0, avail);
            u.load(uu + row, avail, vec);
            delta.load(dd + row, avail, vec);
            z.load(zz + row, p.has_z ? avail : 0, vec);
        }
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            const int n = bc_state(r);
            if (n >= NPAD) break;
            int avail;
            const size_t row = bc_row(lo, p, n, t0 + bc_step(), avail);
            b[r].load(Bv + row, p.b_variable ? avail : 0, vec);
            c[r].load(Cv + row, p.c_variable ? avail : 0, vec);
        }
        const int ta = t0 + int(threadIdx.x);
        keep = (p.has_resets && int(threadIdx.x) < TILE && ta < len && resets[size_t(lo.b) * p.len + ta]) ? 0.f : 1.f;
    }

    // dt, dt u, D u and SiLU(z) (1 without z) into rows of RS floats; B and C as [t][n] (f32)
    // or PackedBC's rows at sB (16-bit T).
    // Steps past the end and absent channels get dt = 0 (and B = C = 0): the states stay.
    template <int RS>
    __device__ __forceinline__ void stage(const Layout<SPT, NT, BLK>& lo, const ScanParams& p, int t0, float dskip,
                                          float dbias, float* sB, float* sC, float* sDt, float* sDtu, float* sSkip,
                                          float* sGate, float* sKeep) const {
        if (lo.j < LANES) {
            const int ts = lo.j * PE;
            float dt[PE], dtu[PE], skip[PE], gate[PE];
#pragma unroll
            for (int i = 0; i < PE; ++i) {
                const bool real = lo.valid && t0 + ts + i < int(p.len);
                const float x = delta.get(i) + dbias;
                const float uv = u.get(i);
                const float sp = unconditional(softplus(x));
                dt[i] = real ? (p.softplus ? sp : x) : 0.f;
                dtu[i] = dt[i] * uv;
                skip[i] = dskip * uv;
                const float zv = z.get(i);
                const float silu = unconditional(zv * sigmoid(zv));
                gate[i] = p.has_z ? silu : 1.f;
            }
            const int k = lo.dl * RS + ts;
            store_shared<PE>(sDt + k, dt);
            store_shared<PE>(sDtu + k, dtu);
            store_shared<PE>(sSkip + k, skip);
            store_shared<PE>(sGate + k, gate);
        }
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            const int n = bc_state(r);
            if (n >= NPAD) break;
            if constexpr (PACKED_BC) store_bc_packed(sB, n, bc_step(), b[r], c[r]);
            else store_bc(sB, sC, n, bc_step(), b[r], c[r]);
        }
        if (int(threadIdx.x) < TILE) sKeep[threadIdx.x] = keep;
    }
};

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// COUNT consecutive elements of a row from global to shared memory: by cp.async (16-, 8- or
// 4-byte vectors, as RowSegment) with `vec`, else by plain loads and stores; those from
// index `avail` on become 0.
template <typename T, int COUNT>
__device__ __forceinline__ void copy_row_async(T* dst, const T* __restrict__ src, int avail, bool vec) {
    using Seg = RowSegment<T, COUNT>;
    if (Seg::VECTORS && vec) {
        constexpr int BYTES = Seg::VW * 4, ELEMS = Seg::VW * Seg::EPW;
#pragma unroll
        for (int c = 0; c < Seg::WORDS / Seg::VW; ++c) {
            T* d = dst + c * ELEMS;
            if (c * ELEMS < avail) {
                const uint32_t sd = static_cast<uint32_t>(__cvta_generic_to_shared(d));
                asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(sd), "l"(src + c * ELEMS), "n"(BYTES)
                             : "memory");
            } else if (BYTES == 16) {
                *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
            } else if (BYTES == 8) {
                *reinterpret_cast<uint2*>(d) = make_uint2(0u, 0u);
            } else {
                *reinterpret_cast<uint32_t*>(d) = 0u;
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < COUNT; ++i) dst[i] = i < avail ? src[i] : hk::from_f32<T>(0.f);
    }
}

// The backward's tile inputs (one checkpoint interval): copied into shared memory as raw
// elements by cp.async while the previous interval is processed (the registers are full),
// then staged by channel like the forward's: lane j of a channel owns steps j*PE ..
// j*PE + PE - 1 of its rows; B and C as FwdTile. Raw layout: u, delta, z, dout as [dl][t],
// then B, C as [n][t], then the reset flags.
template <typename T, int SPT, int NT, int BLK, int TILE> struct BwdTile {
    using F = FwdTile<T, SPT, NT, BLK, TILE>;
    static constexpr int DB = F::DB, NPAD = F::NPAD, PE = F::PE, LANES = F::LANES, PB = F::PB, SEGS = F::SEGS,
                         RB = F::RB;
    static constexpr int RAW_ELEMS = 4 * DB * TILE + 2 * NPAD * TILE;
    // Floats of the raw area: the elements and TILE reset flags (to 16 bytes), then BLK x SPT
    // checkpointed states.
    static constexpr int RAW_FLOATS = (RAW_ELEMS * int(sizeof(T)) + TILE + 15) / 16 * 4 + BLK * SPT;
    __device__ __forceinline__ static float* checkpoint_slot(T* raw) {
        return reinterpret_cast<float*>(raw) + (RAW_ELEMS * int(sizeof(T)) + TILE + 15) / 16 * 4;
    }

    __device__ __forceinline__ static void fetch(const Layout<SPT, NT, BLK>& lo, const ScanParams& p, int t0, bool vec,
                                                 T* raw, const T* __restrict__ uu, const T* __restrict__ dd,
                                                 const T* __restrict__ Bv, const T* __restrict__ Cv,
                                                 const T* __restrict__ zz, const T* __restrict__ dout,
                                                 const uint8_t* __restrict__ resets, const float* __restrict__ ck_src) {
        const int len = int(p.len);
        if (lo.j < LANES) {
            int avail;
            const size_t row = F::channel_row(lo, p, t0, avail);
            T* at = raw + lo.dl * TILE + lo.j * PE;
            copy_row_async<T, PE>(at, uu + row, avail, vec);
            copy_row_async<T, PE>(at + DB * TILE, dd + row, avail, vec);
            copy_row_async<T, PE>(at + 2 * DB * TILE, zz + row, p.has_z ? avail : 0, vec);
            copy_row_async<T, PE>(at + 3 * DB * TILE, dout + row, avail, vec);
        }
        const int ts = F::bc_step();
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            const int n = F::bc_state(r);
            if (n >= NPAD) break;
            int avail;
            const size_t row = F::bc_row(lo, p, n, t0 + ts, avail);
            T* at = raw + 4 * DB * TILE + n * TILE + ts;
            copy_row_async<T, PB>(at, Bv + row, p.b_variable ? avail : 0, vec);
            copy_row_async<T, PB>(at + NPAD * TILE, Cv + row, p.c_variable ? avail : 0, vec);
        }
        if (int(threadIdx.x) < TILE) {
            const int ta = t0 + int(threadIdx.x);
            reinterpret_cast<uint8_t*>(raw + RAW_ELEMS)[threadIdx.x] =
                (p.has_resets && ta < len) ? resets[size_t(lo.b) * p.len + ta] : uint8_t(0);
        }
        // This thread's states at the interval's start, from the forward's checkpoint.
        float* ck_dst = checkpoint_slot(raw) + threadIdx.x * SPT;
#pragma unroll
        for (int s = 0; s < SPT; ++s) {
            if (lo.valid && lo.j * SPT + s < int(p.dstate)) {
                const uint32_t sd = static_cast<uint32_t>(__cvta_generic_to_shared(ck_dst + s));
                asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(sd), "l"(ck_src + s) : "memory");
            }
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }

    // dt, u, dout, softplus'(delta + bias) (1 without softplus) and z into rows of RS floats;
    // B and C as [t][n]. Steps past the end and absent channels get dt = 0.
    template <int RS>
    __device__ __forceinline__ static void stage(const Layout<SPT, NT, BLK>& lo, const ScanParams& p, int t0,
                                                 float dbias, const T* raw, float* sB, float* sC, float* sDt,
                                                 float* sU, float* sDy, float* sSig, float* sZ, float* sKeep) {
        if (lo.j < LANES) {
            const int ts = lo.j * PE;
            const T* at = raw + lo.dl * TILE + ts;
            RowSegment<T, PE> u, delta, z, dout;
            u.load(at, PE, true);
            delta.load(at + DB * TILE, PE, true);
            z.load(at + 2 * DB * TILE, PE, true);
            dout.load(at + 3 * DB * TILE, PE, true);
            float dt[PE], uv[PE], dy[PE], sig[PE], zv[PE];
#pragma unroll
            for (int i = 0; i < PE; ++i) {
                const bool real = lo.valid && t0 + ts + i < int(p.len);
                const float x = delta.get(i) + dbias;
                float sp_grad;
                const float sp = unconditional(softplus(x, sp_grad));
                sp_grad = unconditional(sp_grad);
                dt[i] = real ? (p.softplus ? sp : x) : 0.f;
                sig[i] = (p.softplus && real) ? sp_grad : 1.f;
                uv[i] = u.get(i);
                dy[i] = dout.get(i);
                zv[i] = z.get(i);
            }
            const int k = lo.dl * RS + ts;
            store_shared<PE>(sDt + k, dt);
            store_shared<PE>(sU + k, uv);
            store_shared<PE>(sDy + k, dy);
            store_shared<PE>(sSig + k, sig);
            store_shared<PE>(sZ + k, zv);
        }
        const int ts = F::bc_step();
#pragma unroll
        for (int r = 0; r < RB; ++r) {
            const int n = F::bc_state(r);
            if (n >= NPAD) break;
            RowSegment<T, PB> b, c;
            b.load(raw + 4 * DB * TILE + n * TILE + ts, PB, true);
            c.load(raw + 4 * DB * TILE + (NPAD + n) * TILE + ts, PB, true);
            F::store_bc(sB, sC, n, ts, b, c);
        }
        if (int(threadIdx.x) < TILE)
            sKeep[threadIdx.x] = reinterpret_cast<const uint8_t*>(raw + RAW_ELEMS)[threadIdx.x] ? 0.f : 1.f;
    }
};

template <typename T>
__device__ __forceinline__ bool aligned16(const T* ptr) {
    return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}

// lane (dstate > 128) need the registers of two.
__host__ __device__ constexpr int bwd_min_blocks(int spt) { return spt > 4 ? 2 : 3; }
// The forward: 64 threads (more, smaller blocks fill the SMs evenly) where a channel takes
// up to 8 lanes, 128 beyond; registers capped at ~168 either way.
__host__ __device__ constexpr int fwd_block(int nt) { return nt >= 16 ? 128 : 64; }
__host__ __device__ constexpr int fwd_min_blocks(int nt) { return nt >= 16 ? 3 : 6; }


}  // namespace hk_scan

using hk_scan::ScanParams;

// Layouts (states per lane x lanes per channel): 4 states per lane, 8 only past 128 states.
// Measured on H100 at dstate 16: 8 states on 2 lanes ran the forward 1.6x slower than 4 on
// 4 (half the warps per SM to hide latency with); the backward's per-piece registers grow
// with the states per lane.
#define HK_SCAN_LAYOUTS(M, T, SUFFIX) \
    M(T, SUFFIX, 4, 1)                    \
    M(T, SUFFIX, 4, 2)                    \
    M(T, SUFFIX, 4, 4)                    \
    M(T, SUFFIX, 4, 8)                    \
    M(T, SUFFIX, 4, 16)                   \
    M(T, SUFFIX, 4, 32)                   \
    M(T, SUFFIX, 8, 32)
