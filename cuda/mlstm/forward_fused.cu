// The mLSTM's fused forward for inference (bf16 / f16, head dims up to 256). See
// fused_forward.cuh.
#include "fused_forward.cuh"

// The fused forward (bf16 / f16) by head-dimension class, 64 value columns per block: dqk up
// to 64 and 128 (two blocks per SM; shared memory allows it), 256 (one block).
#define HK_MLSTM_FWD_FUSED(NAME, T, DQK, BLOCKS)                                                                     \
    extern "C" __global__ void __launch_bounds__(hk_mlstm::fused::Cfg<DQK>::THREADS, BLOCKS)                      \
        NAME(const T* q, const T* k, const T* v, const float* ig, const float* fg, const float* c0, const float* n0,    \
             const float* m0, T* h, float* c_out, float* n_out, float* m_out, hk_mlstm::FusedParams p) {               \
        hk_mlstm::mlstm_fwd_fused<T, DQK, false>(q, k, v, ig, fg, c0, n0, m0, h, c_out, n_out, m_out, nullptr, p); \
    }

HK_MLSTM_FWD_FUSED(mlstm_fwd_fused_bf16_k64, __nv_bfloat16, 64, 2)
HK_MLSTM_FWD_FUSED(mlstm_fwd_fused_bf16_k128, __nv_bfloat16, 128, 2)
HK_MLSTM_FWD_FUSED(mlstm_fwd_fused_bf16_k256, __nv_bfloat16, 256, 1)
HK_MLSTM_FWD_FUSED(mlstm_fwd_fused_f16_k64, __half, 64, 2)
HK_MLSTM_FWD_FUSED(mlstm_fwd_fused_f16_k128, __half, 128, 2)
HK_MLSTM_FWD_FUSED(mlstm_fwd_fused_f16_k256, __half, 256, 1)
