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
#include "common.cuh"

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
                const float a = ex2(dt * a2[s]) * keep;
                h[s] = fmaf(a, h[s], dtu * (bv[s] + bc[s]));
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

template <typename T, int SPT, int NT, int BLK, bool GENERAL>
__device__ __forceinline__ void scan_forward(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
                             const T* __restrict__ Bv, const float* __restrict__ Bc, const T* __restrict__ Cv,
                             const float* __restrict__ Cc, const float* __restrict__ Dp, const T* __restrict__ z,
                             const float* __restrict__ bias, const float* __restrict__ h0,
                             const uint8_t* __restrict__ resets, T* __restrict__ out, float* __restrict__ last_state,
                             float* __restrict__ ckpt, const ScanParams p) {
    using L = Layout<SPT, NT, BLK>;
    // Steps per y reduction: 8, one transposing reduction (and its shuffle latency) per 8
    // steps; H100, dstate 16, 4 lanes per channel: bf16 280 -> 273 us, f32 323 -> 316 us
    // against min(NT, 8) = 4.
    constexpr int R = 8;
    constexpr int TILE = Tiles<SPT, NT, BLK>::FWD;
    constexpr int RS = TILE + 4;
    using Tile = FwdTile<T, SPT, NT, BLK, TILE>;
    // Checkpoints every CKPT steps, the backward's tile (BLOCK threads, this layout), so that
    // they fall on segment starts: the scan loop below then has no branch inside, and each
    // unrolled iteration is one basic block for the scheduler.
    constexpr int CKPT = Tiles<SPT, NT, BLOCK>::BWD;
    constexpr int SEG = CKPT < TILE ? CKPT : TILE;
    static_assert(TILE % SEG == 0 && SEG % R == 0 && (CKPT % TILE == 0 || TILE % CKPT == 0), "checkpoint segments");
    // The host mirrors Tiles; a mismatch is a bug.
    if (p.tile != uint32_t(TILE) || (p.write_ckpt && p.ckpt_interval != uint32_t(CKPT))) __trap();
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    // B and C: [t][n] f32 arrays, or with 16-bit T PackedBC's TILE x NPAD words at sB.
    float* sB = smem;
    float* sC = sB + TILE * L::BS;
    float* sDt = Tile::PACKED_BC ? smem + TILE * L::NPAD : sC + TILE * L::BS;
    float* sDtu = sDt + L::DB * RS;
    float* sSkip = sDtu + L::DB * RS;
    float* sGate = sSkip + L::DB * RS;
    // y, or with PARTIAL_Y its partial sums over each lane's states, [dl][j][t]: summing them
    // at the output costs fewer instructions than the transposing shuffles, and the loop
    // no longer waits on those (their adds held ~10% of the forward's stall samples).
    constexpr bool PARTIAL_Y = Tiles<SPT, NT, BLK>::PARTIAL_Y;
    float* sY = sGate + L::DB * RS;
    float* sKeep = sY + (PARTIAL_Y ? BLK : L::DB) * RS;

    const L lo(p);
    // Vectors need 16-byte aligned tensors and rows a whole number of 16-byte vectors.
    const bool vec = aligned16(u) && aligned16(delta) && aligned16(z) && aligned16(Bv) && aligned16(Cv) &&
                     aligned16(out) && p.len % (16 / sizeof(T)) == 0;
    float a_nat[SPT], a2[SPT], bc[SPT], cc[SPT], h[SPT];
    load_state_params<SPT, NT, BLK>(lo, p, A, Bc, Cc, a_nat, a2, bc, cc);
    const float dskip = (p.has_d && lo.valid) ? Dp[lo.d] : 0.f;
    const float dbias = (p.has_bias && lo.valid) ? bias[lo.d] : 0.f;
    const size_t state_base = (size_t(lo.b) * p.dim + lo.d) * p.dstate + size_t(lo.j) * SPT;
#pragma unroll
    for (int s = 0; s < SPT; ++s) {
        const bool ok = lo.valid && lo.j * SPT + s < int(p.dstate);
        h[s] = (ok && p.has_h0) ? h0[state_base + s] : 0.f;
    }
    const int len = int(p.len);
    Tile raw;
    raw.load(lo, p, 0, vec, u, delta, Bv, Cv, z, resets);
    for (int t0 = 0; t0 < len; t0 += TILE) {
        __syncthreads();  // the previous tile's shared memory is no longer read
        raw.template stage<RS>(lo, p, t0, dskip, dbias, sB, sC, sDt, sDtu, sSkip, sGate, sKeep);
        __syncthreads();
        // The next tile's loads fly while this one is scanned.
        if (t0 + TILE < len) raw.load(lo, p, t0 + TILE, vec, u, delta, Bv, Cv, z, resets);
        for (int seg = 0; seg < TILE; seg += SEG) {
            if (p.write_ckpt && (t0 + seg) % CKPT == 0 && t0 + seg < len) {
                const size_t k = size_t(t0 + seg) / CKPT;
                const size_t cb = ((size_t(lo.b) * p.n_ckpt + k) * p.dim + lo.d) * p.dstate + size_t(lo.j) * SPT;
#pragma unroll
                for (int s = 0; s < SPT; ++s)
                    if (lo.valid && lo.j * SPT + s < int(p.dstate)) ckpt[cb + s] = h[s];
            }
            // Two groups unrolled: one group's reduction (its shuffles, or with PARTIAL_Y its
            // partial-sum stores) overlaps the next one's loads and exponentials (H100, bf16,
            // before PARTIAL_Y: 255 -> 247 us; four: 245 us with more f32 spills; 16-step
            // groups: 294 us; with no branch in the loop four run as fast as two, 236 us).
#pragma unroll 2
            for (int tr = seg; tr < seg + SEG; tr += R)
                advance_and_emit_y<SPT, NT, BLK, R, RS, GENERAL, true, PARTIAL_Y, T>(lo, tr, h, a2, bc, cc, sB, sC, sDt,
                                                                                 sDtu, sKeep, sY);
        }
        __syncthreads();
        // out = (y + D u) SiLU(z), each lane its own steps again.
        if (lo.valid && lo.j < Tile::LANES) {
            const int ts = lo.j * Tile::PE;
            const int k = lo.dl * RS + ts;
            float y[Tile::PE], skip[Tile::PE], gate[Tile::PE];
            if (PARTIAL_Y) {
                load_shared<Tile::PE>(sY + lo.dl * NT * RS + ts, y);
#pragma unroll
                for (int jj = 1; jj < NT; ++jj) {
                    float part[Tile::PE];
                    load_shared<Tile::PE>(sY + (lo.dl * NT + jj) * RS + ts, part);
#pragma unroll
                    for (int i = 0; i < Tile::PE; ++i) y[i] += part[i];
                }
            } else {
                load_shared<Tile::PE>(sY + k, y);
            }
            load_shared<Tile::PE>(sSkip + k, skip);
            load_shared<Tile::PE>(sGate + k, gate);
#pragma unroll
            for (int i = 0; i < Tile::PE; ++i) y[i] = (y[i] + skip[i]) * gate[i];
            store_row<T, Tile::PE>(out + (size_t(lo.b) * p.dim + lo.d) * p.len + t0 + ts, y, len - t0 - ts, vec);
        }
    }
#pragma unroll
    for (int s = 0; s < SPT; ++s)
        if (lo.valid && lo.j * SPT + s < int(p.dstate)) last_state[state_base + s] = h[s];
}


template <typename T, int SPT, int NT, bool GENERAL>
__device__ __forceinline__ void scan_backward(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
                              const T* __restrict__ Bv, const float* __restrict__ Bc, const T* __restrict__ Cv,
                              const float* __restrict__ Cc, const float* __restrict__ Dp, const T* __restrict__ z,
                              const float* __restrict__ bias, const uint8_t* __restrict__ resets,
                              const T* __restrict__ dout, const float* __restrict__ dlast,
                              const float* __restrict__ ckpt, T* __restrict__ du, T* __restrict__ ddelta,
                              T* __restrict__ dz, float* __restrict__ bc_partial, float* __restrict__ param_partial,
                              float* __restrict__ dh0, const ScanParams p) {
    constexpr int BLK = BLOCK;
    using L = Layout<SPT, NT, BLK>;
    constexpr int DW = 32 / NT;  // channels per warp
    constexpr int WARPS = BLOCK / 32;
    constexpr int V = 2 * SPT;   // dB and dC values per lane and step
    constexpr int TILE = Tiles<SPT, NT, BLK>::BWD;  // == the checkpoint interval
    constexpr int RS = TILE + 4;
    constexpr int n_sub = TILE / S;
    if (p.tile != uint32_t(TILE) || p.ckpt_interval != uint32_t(TILE)) __trap();
    const int tile = TILE;
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    float* sB = smem;
    float* sC = sB + tile * L::BS;
    float* sDt = sC + tile * L::BS;
    float* sU = sDt + L::DB * RS;
    float* sDy = sU + L::DB * RS;
    float* sSig = sDy + L::DB * RS;
    float* sZ = sSig + L::DB * RS;  // z; then du
    float* sY = sZ + L::DB * RS;    // y; then d(delta)
    float* sKeep = sY + L::DB * RS;
    float* sH = sKeep + tile;                // [sub][s][thread]: states at each piece start
    float* sW = sH + n_sub * SPT * BLOCK;    // [warp][r][which * NPAD + n]: per-warp dB / dC
    float* sAcc = sW + WARPS * S * 2 * L::NPAD;  // [which * NPAD + n][t]: per-block dB / dC

    const L lo(p);
    const int warp = threadIdx.x / 32;
    const int dlw = (threadIdx.x % 32) / NT;  // channel within the warp
    float a_nat[SPT], a2[SPT], bc[SPT], cc[SPT];
    load_state_params<SPT, NT, BLK>(lo, p, A, Bc, Cc, a_nat, a2, bc, cc);
    const size_t state_base = (size_t(lo.b) * p.dim + lo.d) * p.dstate + size_t(lo.j) * SPT;
    bool state_ok[SPT];
    float g_next[SPT], dA[SPT], dBc[SPT], dCc[SPT];
#pragma unroll
    for (int s = 0; s < SPT; ++s) {
        state_ok[s] = lo.valid && lo.j * SPT + s < int(p.dstate);
        g_next[s] = (state_ok[s] && p.has_dlast) ? dlast[state_base + s] : 0.f;
        dA[s] = dBc[s] = dCc[s] = 0.f;
    }
    float dD_acc = 0.f, dbias_acc = 0.f;
    const float dskip = (p.has_d && lo.valid) ? Dp[lo.d] : 0.f;
    const int len = int(p.len);
    const int blocks_per_group = (int(p.dim / p.groups) + L::DB - 1) / L::DB;
    const int blk = blockIdx.x % blocks_per_group;
    // Without GENERAL both B and C vary in time (the kernel entry picks GENERAL otherwise).
    const bool bc_var = !GENERAL || p.b_variable || p.c_variable;

    using Tile = BwdTile<T, SPT, NT, BLK, TILE>;
    T* raw = reinterpret_cast<T*>(sAcc + 2 * L::NPAD * RS);
    const float* sCk = Tile::checkpoint_slot(raw) + threadIdx.x * SPT;
    const bool vec = aligned16(u) && aligned16(delta) && aligned16(z) && aligned16(dout) && aligned16(Bv) &&
                     aligned16(Cv) && p.len % (16 / sizeof(T)) == 0;
    const bool vec_out = aligned16(du) && aligned16(ddelta) && aligned16(dz) && p.len % (16 / sizeof(T)) == 0;
    const float dbias = (p.has_bias && lo.valid) ? bias[lo.d] : 0.f;
    auto fetch = [&](int k) {
        const size_t cb = ((size_t(lo.b) * p.n_ckpt + k) * p.dim + (lo.valid ? lo.d : 0)) * p.dstate + size_t(lo.j) * SPT;
        Tile::fetch(lo, p, k * tile, vec, raw, u, delta, Bv, Cv, z, dout, resets, ckpt + cb);
    };
    fetch(int(p.n_ckpt) - 1);
    for (int k = int(p.n_ckpt) - 1; k >= 0; --k) {
        const int t0 = k * tile;
        cp_async_wait_all();
        __syncthreads();  // every thread's copies have landed; the previous interval is done
        Tile::template stage<RS>(lo, p, t0, dbias, raw, sB, sC, sDt, sU, sDy, sSig, sZ, sKeep);
        float h[SPT];
#pragma unroll
        for (int s = 0; s < SPT; ++s) h[s] = state_ok[s] ? sCk[s] : 0.f;
        __syncthreads();
        // The previous interval's inputs fly while this one is processed.
        if (k > 0) fetch(k - 1);
        // 1. States through the interval from its checkpoint: y for dz, and each piece's start.
        constexpr int R = 8;  // steps per y reduction, as in the forward: one group per piece
        static_assert(R == S, "each y group starts a piece");
#pragma unroll 1
        for (int tr = 0; tr < tile; tr += R) {
#pragma unroll
            for (int s = 0; s < SPT; ++s) sH[((tr / S) * SPT + s) * BLOCK + threadIdx.x] = h[s];
            advance_and_emit_y<SPT, NT, BLK, R, RS, GENERAL, false>(lo, tr, h, a2, bc, cc, sB, sC, sDt, sU, sKeep, sY);
        }
        __syncthreads();
        // 2. The gate, each lane its own steps of its channel as staged (D a register, dz
        //    written by vectors): dz, and dy = dout SiLU(z) in place of dout.
        if (p.has_z && lo.j < Tile::LANES) {
            const int kk = lo.dl * RS + lo.j * Tile::PE;
            float zz[Tile::PE], yv[Tile::PE], uv[Tile::PE], dy[Tile::PE], dzv[Tile::PE];
            load_shared<Tile::PE>(sZ + kk, zz);
            load_shared<Tile::PE>(sY + kk, yv);
            load_shared<Tile::PE>(sU + kk, uv);
            load_shared<Tile::PE>(sDy + kk, dy);
#pragma unroll
            for (int i = 0; i < Tile::PE; ++i) {
                const float sg = sigmoid(zz[i]);
                dzv[i] = dy[i] * fmaf(dskip, uv[i], yv[i]) * silu_grad(zz[i], sg);
                dy[i] *= zz[i] * sg;
            }
            store_shared<Tile::PE>(sDy + kk, dy);
            int avail;
            const size_t row = Tile::F::channel_row(lo, p, t0, avail);
            store_row<T, Tile::PE>(dz + row, dzv, avail, vec_out);
        }
        __syncthreads();
        // 3. The adjoint, piece by piece, backwards.
#pragma unroll 1
        for (int sub = n_sub - 1; sub >= 0; --sub) {
            float a_r[S][SPT], q_r[S][SPT];
#pragma unroll
            for (int s = 0; s < SPT; ++s) h[s] = sH[(sub * SPT + s) * BLOCK + threadIdx.x];
#pragma unroll
            for (int r = 0; r < S; ++r) {
                const int t = sub * S + r;
                const float dt = sDt[lo.dl * RS + t];
                const float dtu = dt * sU[lo.dl * RS + t];
                const float keep = GENERAL ? sKeep[t] : 1.f;
                float bv[SPT];
                load_shared<SPT>(sB + t * L::BS + lo.j * SPT, bv);
#pragma unroll
                for (int s = 0; s < SPT; ++s) {
                    a_r[r][s] = GENERAL ? ex2(dt * a2[s]) * keep : ex2(dt * a2[s]);
                    q_r[r][s] = a_r[r][s] * h[s];
                    h[s] = fmaf(dtu, GENERAL ? bv[s] + bc[s] : bv[s], q_r[r][s]);
                }
            }
            float du_p[S], dd_p[S];
#pragma unroll
            for (int r = S - 1; r >= 0; --r) {
                const int t = sub * S + r;
                const float dt = sDt[lo.dl * RS + t];
                const float uu = sU[lo.dl * RS + t];
                const float dy = sDy[lo.dl * RS + t];
                const float dtu = dt * uu;
                float bv[SPT], cv[SPT];
                load_shared<SPT>(sB + t * L::BS + lo.j * SPT, bv);
                load_shared<SPT>(sC + t * L::BS + lo.j * SPT, cv);
                float vals[V];
                float du_acc = 0.f, dd_acc = 0.f;
#pragma unroll
                for (int s = 0; s < SPT; ++s) {
                    const float bb = GENERAL ? bv[s] + bc[s] : bv[s];
                    const float g = fmaf(GENERAL ? cv[s] + cc[s] : cv[s], dy, g_next[s]);
                    const float hcur = fmaf(dtu, bb, q_r[r][s]);
                    vals[s] = g * dtu;         // dB
                    vals[SPT + s] = dy * hcur;  // dC
                    // d(dt) = sum_n g (B u + A a h_{t-1}) = u sum_n g B + sum_n A g q.
                    du_acc = fmaf(g, bb, du_acc);
                    const float gq = g * q_r[r][s];
                    dA[s] = fmaf(dt, gq, dA[s]);
                    dd_acc = fmaf(a_nat[s], gq, dd_acc);
                    g_next[s] = a_r[r][s] * g;
                }
                du_p[r] = du_acc * dt;
                dd_p[r] = fmaf(du_acc, uu, dd_acc);
                if (GENERAL) {
#pragma unroll
                    for (int s = 0; s < SPT; ++s) {
                        dBc[s] += vals[s];
                        dCc[s] += vals[SPT + s];
                    }
                }
                if (bc_var) {
                    transpose_reduce<V, DW, Log2<NT>::value>(vals, dlw);
                    using Own = ReduceOwner<V, DW>;
                    if (Own::owns(dlw)) {
#pragma unroll
                        for (int i = 0; i < Own::count; ++i) {
                            const int idx = Own::first(dlw) + i;
                            const int which = idx / SPT, n = lo.j * SPT + idx % SPT;
                            sW[(warp * S + r) * 2 * L::NPAD + which * L::NPAD + n] = vals[i];
                        }
                    }
                }
            }
            transpose_reduce<S, NT, 0>(du_p, lo.j);
            transpose_reduce<S, NT, 0>(dd_p, lo.j);
            using Own = ReduceOwner<S, NT>;
            if (Own::owns(lo.j)) {
#pragma unroll
                for (int i = 0; i < Own::count; ++i) {
                    const int t = sub * S + Own::first(lo.j) + i;
                    const int kk = lo.dl * RS + t;
                    const float dy = sDy[kk];
                    const float ddt = dd_p[i] * sSig[kk];
                    sZ[kk] = fmaf(dskip, dy, du_p[i]);  // du
                    sY[kk] = ddt;                       // d(delta)
                    dD_acc = fmaf(dy, sU[kk], dD_acc);
                    if (t0 + t < len) dbias_acc += ddt;  // padding steps carry a gradient into dt
                }
            }
            if (bc_var) {
                __syncthreads();
        #pragma unroll 2
        for (int e = threadIdx.x; e < S * 2 * L::NPAD; e += BLOCK) {
                    const int r = e / (2 * L::NPAD), c = e % (2 * L::NPAD);
                    float acc = 0.f;
#pragma unroll
                    for (int w = 0; w < WARPS; ++w) acc += sW[(w * S + r) * 2 * L::NPAD + c];
                    sAcc[c * RS + sub * S + r] = acc;
                }
                __syncthreads();
            }
        }
        __syncthreads();
        // 4. This interval's du and d(delta), each lane its own steps by vectors, and the
        //    per-block dB / dC partials, four steps a thread.
        if (lo.j < Tile::LANES) {
            const int kk = lo.dl * RS + lo.j * Tile::PE;
            float duv[Tile::PE], ddv[Tile::PE];
            load_shared<Tile::PE>(sZ + kk, duv);
            load_shared<Tile::PE>(sY + kk, ddv);
            int avail;
            const size_t row = Tile::F::channel_row(lo, p, t0, avail);
            store_row<T, Tile::PE>(du + row, duv, avail, vec_out);
            store_row<T, Tile::PE>(ddelta + row, ddv, avail, vec_out);
        }
        if (bc_var) {
            constexpr int QUADS = TILE / 4;
            const size_t block_rows = ((size_t(lo.b) * p.groups + lo.g) * blocks_per_group + blk) * 2 * p.dstate;
            for (int e = threadIdx.x; e < int(p.dstate) * QUADS; e += BLOCK) {
                const int n = e / QUADS, t = 4 * (e % QUADS);
                const int avail = len - t0 - t;
#pragma unroll
                for (int which = 0; which < 2; ++which) {
                    const float4 v = *reinterpret_cast<const float4*>(sAcc + (which * L::NPAD + n) * RS + t);
                    float* dst = bc_partial + (block_rows + size_t(which) * p.dstate + n) * p.len + t0 + t;
                    if (len % 4 == 0 && avail >= 4) {
                        *reinterpret_cast<float4*>(dst) = v;
                    } else {
                        if (avail > 0) dst[0] = v.x;
                        if (avail > 1) dst[1] = v.y;
                        if (avail > 2) dst[2] = v.z;
                        if (avail > 3) dst[3] = v.w;
                    }
                }
            }
        }
    }
    // Per-(b, d) partials: dA, constant dB, constant dC (n each), dD, dbias.
    const size_t pp = (size_t(lo.b) * p.dim + lo.d) * (3 * size_t(p.dstate) + 2);
#pragma unroll
    for (int s = 0; s < SPT; ++s) {
        if (state_ok[s]) {
            const int n = lo.j * SPT + s;
            param_partial[pp + n] = dA[s];
            param_partial[pp + p.dstate + n] = dBc[s];
            param_partial[pp + 2 * p.dstate + n] = dCc[s];
            if (p.has_h0) dh0[state_base + s] = g_next[s];
        }
    }
#pragma unroll
    for (int m = NT / 2; m >= 1; m >>= 1) {
        dD_acc += __shfl_xor_sync(0xffffffffu, dD_acc, m);
        dbias_acc += __shfl_xor_sync(0xffffffffu, dbias_acc, m);
    }
    if (lo.valid && lo.j == 0) {
        param_partial[pp + 3 * p.dstate] = dD_acc;
        param_partial[pp + 3 * p.dstate + 1] = dbias_acc;
    }
}


// dB / dC (time-varying) = sum of the per-block partials, in block order.
template <typename T>
__device__ void reduce_bc(const float* __restrict__ partial, T* __restrict__ db, T* __restrict__ dc,
                          const ScanParams p, uint32_t blocks_per_group) {
    const size_t per_which = size_t(p.dstate) * p.len;
    const size_t n = size_t(p.batch) * p.groups * per_which;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += size_t(gridDim.x) * blockDim.x) {
        const size_t bg = e / per_which, rest = e % per_which;
        float sb = 0.f, sc = 0.f;
        for (uint32_t k = 0; k < blocks_per_group; ++k) {
            const size_t base = ((bg * blocks_per_group + k) * 2) * per_which + rest;
            sb += partial[base];
            sc += partial[base + per_which];
        }
        if (p.b_variable) db[e] = hk::from_f32<T>(sb);
        if (p.c_variable) dc[e] = hk::from_f32<T>(sc);
    }
}

// Three blocks per SM (168 registers) fit the issue's grid in one wave; eight states per
// lane (dstate > 128) need the registers of two.
__host__ __device__ constexpr int bwd_min_blocks(int spt) { return spt > 4 ? 2 : 3; }
// The forward: 64 threads (more, smaller blocks fill the SMs evenly) where a channel takes
// up to 8 lanes, 128 beyond; registers capped at ~168 either way.
__host__ __device__ constexpr int fwd_block(int nt) { return nt >= 16 ? 128 : 64; }
__host__ __device__ constexpr int fwd_min_blocks(int nt) { return nt >= 16 ? 3 : 6; }

}  // namespace hk_scan

using hk_scan::ScanParams;

// GENERAL: resets or a constant B / C. Without them (Mamba's usual call) the scan skips the
// reset mask and the constant terms.
#define HK_SCAN_FWD(T, SUFFIX, SPT, NT)                                                                          \
    extern "C" __global__ void __launch_bounds__(hk_scan::fwd_block(NT), hk_scan::fwd_min_blocks(NT))             \
        selective_scan_fwd_##SUFFIX##_s##SPT##_l##NT(const T* u, const T* delta, const float* A, const T* Bv,      \
                                                     const float* Bc, const T* Cv, const float* Cc, const float* Dp, \
                                                     const T* z, const float* bias, const float* h0,                \
                                                     const uint8_t* resets, T* out, float* last_state, float* ckpt, \
                                                     const ScanParams p) {                                         \
        constexpr int BLK = hk_scan::fwd_block(NT);                                                              \
        if (p.has_resets || !p.b_variable || !p.c_variable)                                                      \
            hk_scan::scan_forward<T, SPT, NT, BLK, true>(u, delta, A, Bv, Bc, Cv, Cc, Dp, z, bias, h0, resets, out, \
                                                         last_state, ckpt, p);                                   \
        else                                                                                                     \
            hk_scan::scan_forward<T, SPT, NT, BLK, false>(u, delta, A, Bv, Bc, Cv, Cc, Dp, z, bias, h0, resets,    \
                                                          out, last_state, ckpt, p);                             \
    }

#define HK_SCAN_BWD(T, SUFFIX, SPT, NT)                                                                           \
    extern "C" __global__ void __launch_bounds__(hk_scan::BLOCK, hk_scan::bwd_min_blocks(SPT))                   \
        selective_scan_bwd_##SUFFIX##_s##SPT##_l##NT(                                                             \
            const T* u, const T* delta, const float* A, const T* Bv, const float* Bc, const T* Cv, const float* Cc, \
            const float* Dp, const T* z, const float* bias, const uint8_t* resets, const T* dout,                   \
            const float* dlast, const float* ckpt, T* du, T* ddelta, T* dz, float* bc_partial,                     \
            float* param_partial, float* dh0, const ScanParams p) {                                                \
        if (p.has_resets || !p.b_variable || !p.c_variable)                                                       \
            hk_scan::scan_backward<T, SPT, NT, true>(u, delta, A, Bv, Bc, Cv, Cc, Dp, z, bias, resets, dout, dlast, \
                                                     ckpt, du, ddelta, dz, bc_partial, param_partial, dh0, p);     \
        else                                                                                                      \
            hk_scan::scan_backward<T, SPT, NT, false>(u, delta, A, Bv, Bc, Cv, Cc, Dp, z, bias, resets, dout,       \
                                                      dlast, ckpt, du, ddelta, dz, bc_partial, param_partial, dh0, \
                                                      p);                                                         \
    }

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

#define HK_SCAN_DTYPE(T, SUFFIX)                                                                               \
    HK_SCAN_LAYOUTS(HK_SCAN_FWD, T, SUFFIX)                                                                    \
    HK_SCAN_LAYOUTS(HK_SCAN_BWD, T, SUFFIX)                                                                    \
    extern "C" __global__ void selective_scan_reduce_bc_##SUFFIX(const float* partial, T* db, T* dc,            \
                                                                 const ScanParams p, uint32_t blocks_per_group) { \
        hk_scan::reduce_bc<T>(partial, db, dc, p, blocks_per_group);                                           \
    }

HK_SCAN_DTYPE(float, f32)
HK_SCAN_DTYPE(__nv_bfloat16, bf16)
HK_SCAN_DTYPE(__half, f16)

// dA, constant dB / dC, dD, dbias = sums over the batch of the per-(b, d) partials, in batch
// order. A partial row holds dA (n), dB (n), dC (n), dD, dbias for one (b, d).
extern "C" __global__ void selective_scan_reduce_params(const float* partial, float* dA, float* dB, float* dC,
                                                        float* dD, float* dbias, const ScanParams p) {
    const size_t row = 3 * size_t(p.dstate) + 2;
    const size_t n = size_t(p.dim) * row;
    for (size_t e = size_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += size_t(gridDim.x) * blockDim.x) {
        float acc = 0.f;
        for (uint32_t b = 0; b < p.batch; ++b) acc += partial[size_t(b) * n + e];
        const size_t d = e / row, c = e % row;
        if (c < p.dstate) {
            dA[d * p.dstate + c] = acc;
        } else if (c < 2 * size_t(p.dstate)) {
            if (!p.b_variable) dB[d * p.dstate + c - p.dstate] = acc;
        } else if (c < 3 * size_t(p.dstate)) {
            if (!p.c_variable) dC[d * p.dstate + c - 2 * p.dstate] = acc;
        } else if (c == 3 * size_t(p.dstate)) {
            if (p.has_d) dD[d] = acc;
        } else if (p.has_bias) {
            dbias[d] = acc;
        }
    }
}

// One decoding step (mamba's selective_state_update), the state updated in place:
//   dt = softplus(dt + bias); h = exp(dt A) h + dt B x; out = (C . h + D x) SiLU(z)
// B / C are (batch, groups, dstate) or constant (dim, dstate) f32. The step moves the state
// twice (read and write), so the loads decide its speed: for dstate = 8, 16, .. 128,
// step_lanes(dstate) = dstate / 4 consecutive lanes share a (batch, channel) row, each with
// four states by 16-byte loads and stores (a warp then touches whole rows), and y is summed by
// shuffles; other sizes take one thread per row.
namespace hk_scan {
__host__ __device__ constexpr int step_lanes(int n) { return (n >= 8 && n <= 128 && (n & (n - 1)) == 0) ? n / 4 : 1; }
}  // namespace hk_scan

template <typename T>
__device__ __forceinline__ void state_update(float* __restrict__ state, const T* __restrict__ x,
                                             const T* __restrict__ dt_in, const float* __restrict__ A,
                                             const T* __restrict__ Bv, const float* __restrict__ Bc,
                                             const T* __restrict__ Cv, const float* __restrict__ Cc,
                                             const float* __restrict__ Dp, const T* __restrict__ z,
                                             const float* __restrict__ bias, T* __restrict__ out,
                                             const ScanParams p) {
    const int N = int(p.dstate);
    const int nl = hk_scan::step_lanes(N);
    // The row's inputs and its output gate, the same on every lane of the row.
    auto row_inputs = [&](size_t row, size_t d, float& xv, float& dtv) {
        xv = hk::to_f32(x[row]);
        float dx = hk::to_f32(dt_in[row]);
        if (p.has_bias) dx += bias[d];
        dtv = p.softplus ? hk_scan::softplus(dx) : dx;
    };
    auto finish = [&](size_t row, size_t d, float acc, float xv) {
        if (p.has_d) acc = fmaf(Dp[d], xv, acc);
        if (p.has_z) {
            const float zz = hk::to_f32(z[row]);
            acc *= zz * hk::sigmoid_fast(zz);
        }
        out[row] = hk::from_f32<T>(acc);
    };
    if (nl > 1) {
        const size_t items = size_t(p.batch) * p.dim * nl;
        const uint32_t lane = threadIdx.x % 32;
        const uint32_t group = (nl == 32 ? 0xffffffffu : ((1u << nl) - 1u) << (lane & ~uint32_t(nl - 1)));
        // items is a multiple of nl and the stride of 32, so a row's lanes run together.
        for (size_t it = size_t(blockIdx.x) * blockDim.x + threadIdx.x; it < items;
             it += size_t(gridDim.x) * blockDim.x) {
            const size_t row = it / nl, j = it % nl;
            const size_t b = row / p.dim, d = row % p.dim;
            const size_t g = d / (p.dim / p.groups);
            float xv, dtv;
            row_inputs(row, d, xv, dtv);
            const float dtx = dtv * xv;
            float4* hp = reinterpret_cast<float4*>(state + row * N + 4 * j);
            float4 h = *hp;
            const float4 a = *reinterpret_cast<const float4*>(A + d * N + 4 * j);
            // This lane's four states of B or C: the group's varying row (T) or the
            // channel's constant one (f32).
            auto load4 = [&](bool variable, const T* varying, const float* constant, float (&w)[4]) {
                if (variable) {
                    hk_scan::RowSegment<T, 4> seg;
                    seg.load(varying + (b * p.groups + g) * N + 4 * j, 4, true);
                    for (int s = 0; s < 4; ++s) w[s] = seg.get(s);
                } else {
                    const float4 v = *reinterpret_cast<const float4*>(constant + d * N + 4 * j);
                    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
                }
            };
            float bv[4], cv[4];
            load4(p.b_variable, Bv, Bc, bv);
            load4(p.c_variable, Cv, Cc, cv);
            // exp(dt A) as the scan forms it: dt times A log2(e).
            using hk_scan::ex2;
            using hk_scan::LOG2E;
            h.x = fmaf(ex2(dtv * (a.x * LOG2E)), h.x, dtx * bv[0]);
            h.y = fmaf(ex2(dtv * (a.y * LOG2E)), h.y, dtx * bv[1]);
            h.z = fmaf(ex2(dtv * (a.z * LOG2E)), h.z, dtx * bv[2]);
            h.w = fmaf(ex2(dtv * (a.w * LOG2E)), h.w, dtx * bv[3]);
            *hp = h;
            float acc = fmaf(cv[0], h.x, fmaf(cv[1], h.y, fmaf(cv[2], h.z, cv[3] * h.w)));
            for (int o = nl / 2; o >= 1; o /= 2) acc += __shfl_xor_sync(group, acc, o);
            if (j == 0) finish(row, d, acc, xv);
        }
        return;
    }
    const size_t n_rows = size_t(p.batch) * p.dim;
    for (size_t row = size_t(blockIdx.x) * blockDim.x + threadIdx.x; row < n_rows;
         row += size_t(gridDim.x) * blockDim.x) {
        const size_t b = row / p.dim, d = row % p.dim;
        const size_t g = d / (p.dim / p.groups);
        float xv, dtv;
        row_inputs(row, d, xv, dtv);
        const float dtx = dtv * xv;
        float* h = state + row * N;
        const float* a = A + d * N;
        const size_t bc_row = (b * p.groups + g) * N;
        float acc = 0.f;
#pragma unroll 4
        for (int n = 0; n < N; ++n) {
            const float bn = p.b_variable ? hk::to_f32(Bv[bc_row + n]) : Bc[d * N + n];
            const float cn = p.c_variable ? hk::to_f32(Cv[bc_row + n]) : Cc[d * N + n];
            const float hn = fmaf(hk_scan::ex2(dtv * a[n] * hk_scan::LOG2E), h[n], dtx * bn);
            h[n] = hn;
            acc = fmaf(cn, hn, acc);
        }
        finish(row, d, acc, xv);
    }
}

#define HK_STATE_UPDATE(T, SUFFIX)                                                                            \
    extern "C" __global__ void selective_state_update_##SUFFIX(                                               \
        float* state, const T* x, const T* dt, const float* A, const T* Bv, const float* Bc, const T* Cv,      \
        const float* Cc, const float* Dp, const T* z, const float* bias, T* out, const ScanParams p) {          \
        state_update<T>(state, x, dt, A, Bv, Bc, Cv, Cc, Dp, z, bias, out, p);                                 \
    }

HK_STATE_UPDATE(float, f32)
HK_STATE_UPDATE(__nv_bfloat16, bf16)
HK_STATE_UPDATE(__half, f16)
