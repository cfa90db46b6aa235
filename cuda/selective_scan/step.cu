// The selective scan's one-token decode step (mamba's selective_state_update). See
// selective_scan.cuh.
#include "selective_scan.cuh"

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

#define HK_SCAN_STATE_UPDATE(T, SUFFIX)                                                                            \
    extern "C" __global__ void selective_state_update_##SUFFIX(                                               \
        float* state, const T* x, const T* dt, const float* A, const T* Bv, const float* Bc, const T* Cv,      \
        const float* Cc, const float* Dp, const T* z, const float* bias, T* out, const ScanParams p) {          \
        state_update<T>(state, x, dt, A, Bv, Bc, Cv, Cc, Dp, z, bias, out, p);                                 \
    }

HK_SCAN_STATE_UPDATE(float, f32)
HK_SCAN_STATE_UPDATE(__nv_bfloat16, bf16)
HK_SCAN_STATE_UPDATE(__half, f16)
