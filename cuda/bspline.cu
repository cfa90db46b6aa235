// B-spline basis evaluation for KAN layers (efficient-kan `b_splines` semantics).
//
// Work is split by rows (one row = one (batch, feature) element of x); a warp takes 32
// consecutive rows, one per lane. A lane finds the knot interval s holding its x (binary
// search) and evaluates only the k + 1 bases that can be non-zero there, N_{s-k..s}, with
// de Boor's triangular scheme, keeping them in registers. The warp's rows own one
// contiguous stretch of outputs, mostly zeros, which it writes in one of two ways:
//  - n_bases <= STAGED_MAX_BASES: zero-fill a 16-byte-aligned slab of shared memory, drop
//    the k + 1 values of each row in, and copy the slab out with 16-byte loads and stores
//    (about one instruction per output element);
//  - larger rows: each row's values are broadcast from its lane with shuffles and the warp
//    writes the row, consecutive lanes to consecutive addresses.
//
// Earlier versions (see docs/performance.md): v1, one thread per output recomputing the
// whole triangle, 11% of copy bandwidth; v2, per-element store loop through shared memory,
// 35%, bound by instruction issue.
//
// Conventions shared with the CPU reference (src/ops/bspline/cpu.rs):
//  - a zero-width knot span (repeated knots) contributes 0 instead of efficient-kan's 0/0;
//  - bases vanish outside [t_0, t_last), so ±inf give zeros;
//  - x = NaN gives NaN for every basis of that row.
#include "bspline_device.cuh"

// A named namespace, not an anonymous one: names with internal linkage are mangled with a
// per-compilation hash, which would make the committed PTX differ from build to build.
namespace hk_bspline {

template <typename T, bool Derivative>
__device__ __forceinline__ void bspline_dispatch(const T* x, const float* grid, T* out, const BsplineParams& p) {
    __shared__ Stage<T> stage;
    HK_WITH_ORDER(p.order, HK_WITH_GRID(p.uniform, bspline_rows<T, Derivative, K, 0, U>(x, grid, out, p, stage)));
}

}  // namespace hk_bspline

#define HK_BSPLINE_KERNELS(SUFFIX, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) bspline_basis_##SUFFIX(                      \
        const T* __restrict__ x, const float* __restrict__ grid, T* __restrict__ out,              \
        hk_bspline::BsplineParams p) {                                                                         \
        hk_bspline::bspline_dispatch<T, false>(x, grid, out, p);                                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) bspline_basis_derivative_##SUFFIX(           \
        const T* __restrict__ x, const float* __restrict__ grid, T* __restrict__ out,              \
        hk_bspline::BsplineParams p) {                                                                         \
        hk_bspline::bspline_dispatch<T, true>(x, grid, out, p);                                                \
    }

HK_BSPLINE_KERNELS(f32, float)
HK_BSPLINE_KERNELS(bf16, __nv_bfloat16)
HK_BSPLINE_KERNELS(f16, __half)
