// The selective scan's forward (with or without the backward's checkpoints). See
// selective_scan.cuh.
#include "selective_scan.cuh"

namespace hk_scan {

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



}  // namespace hk_scan

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

#define HK_SCAN_FWD_DTYPE(T, SUFFIX) HK_SCAN_LAYOUTS(HK_SCAN_FWD, T, SUFFIX)

HK_SCAN_FWD_DTYPE(float, f32)
HK_SCAN_FWD_DTYPE(__nv_bfloat16, bf16)
HK_SCAN_FWD_DTYPE(__half, f16)
