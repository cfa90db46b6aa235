// Element conversions shared by every kernel: storage types are f32, bf16 or f16;
// arithmetic is always f32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Every kernel parameter struct is mirrored by a #[repr(C)] struct on the host (its comment
// names it); both sides assert at compile time that it is FIELDS 4-byte fields with no
// padding, the host with `assert_kernel_params!` in src/kernels.rs.
#define HK_PARAMS_LAYOUT(T, FIELDS) \
    static_assert(sizeof(T) == 4 * (FIELDS) && alignof(T) == 4, #T " must be " #FIELDS " 4-byte fields, as on the host")

namespace hk {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }
// The division by __fdividef (2 ulp; 0 once exp(-x) overflows): several instructions fewer
// than an IEEE division, for the memory-bound kernels that apply it per element.
__device__ __forceinline__ float sigmoid_fast(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }
__device__ __forceinline__ float silu(float x) { return x * sigmoid(x); }

}  // namespace hk
