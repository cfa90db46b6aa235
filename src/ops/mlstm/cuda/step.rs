//! The decode step's launch (`mlstm/step`).

use super::*;

/// Mirrors `hk_mlstm::StepParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct StepParams {
    heads: u32,
    dqk: u32,
    dhv: u32,
    eps: f32,
    scale: f32,
}
crate::kernels::assert_kernel_params!(StepParams, 5);

// SAFETY: three u32 and two f32 fields, repr(C), no padding.
unsafe impl DeviceRepr for StepParams {}

/// `hk_mlstm::STEP_THREADS`.
const STEP_THREADS: u32 = 128;

#[allow(clippy::too_many_arguments)]
pub(crate) fn step(
    dev: &CudaDevice,
    state: &mut MlstmState,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    i: &Tensor,
    f: &Tensor,
    eps: f32,
    dims: &MlstmDims,
) -> Result<Tensor> {
    let heads = dims.batch * dims.heads;
    check_gpu_dims(dims.dqk, dims.dhv, heads, 1)?;
    match dims.dtype {
        DType::F32 => step_typed::<f32>(dev, state, [q, k, v, i, f], eps, dims),
        DType::BF16 => step_typed::<bf16>(dev, state, [q, k, v, i, f], eps, dims),
        DType::F16 => step_typed::<f16>(dev, state, [q, k, v, i, f], eps, dims),
    }
}

fn step_typed<T: CudaElement>(
    dev: &CudaDevice,
    state: &mut MlstmState,
    [q, k, v, i, f]: [&Tensor; 5],
    eps: f32,
    dims: &MlstmDims,
) -> Result<Tensor> {
    let heads = dims.batch * dims.heads;
    // SAFETY (allocation): each head's block writes all dhv values of its h row.
    let mut h = unsafe { Tensor::cuda_uninit(dev, dims.dtype, &[dims.batch, dims.heads, dims.dhv])? };
    if heads == 0 {
        return Ok(h);
    }
    let p = StepParams {
        heads: heads as u32,
        dqk: dims.dqk as u32,
        dhv: dims.dhv as u32,
        eps,
        scale: 1.0 / (dims.dqk as f32).sqrt(),
    };
    let func = dev.function(KernelModule::MlstmStep, &kernel_name("mlstm", "step", dims.dtype, ""))?;
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, 1, 1),
        block_dim: (STEP_THREADS, 1, 1),
        shared_mem_bytes: ((2 * dims.dqk + STEP_THREADS as usize / 32) * 4) as u32,
    };
    let MlstmState { c, n, m } = state;
    let mut args = dev.stream().launch_builder(&func);
    args.arg(c.cuda_slice_mut::<f32>("state.c")?)
        .arg(n.cuda_slice_mut::<f32>("state.n")?)
        .arg(m.cuda_slice_mut::<f32>("state.m")?)
        .arg(q.cuda_slice::<T>("q")?)
        .arg(k.cuda_slice::<T>("k")?)
        .arg(v.cuda_slice::<T>("v")?)
        .arg(i.cuda_slice::<f32>("i")?)
        .arg(f.cuda_slice::<f32>("f")?)
        .arg(h.cuda_slice_mut::<T>("h")?)
        .arg(&p);
    // SAFETY: mlstm_step_<T>(c, n, m, q, k, v, i, f, h, StepParams): mlstm_step checked the
    // shapes, types and devices: the state holds heads*dqk*dhv, heads*dqk and heads f32,
    // q and k heads*dqk T, v and h heads*dhv T, i and f heads f32. One block per head
    // touches only that head's state; shared memory holds 2*dqk + warps floats (dqk <= 512).
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching mlstm_step", e))?;
    Ok(h)
}
