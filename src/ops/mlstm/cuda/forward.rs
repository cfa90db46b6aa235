//! The forward's launches: the chunked kernel (`mlstm/forward_chunked`, every dtype and chunk;
//! with stats for the backward's recomputation) and the fused one (`mlstm/forward_fused`, or
//! its `_stats` instantiation in `mlstm/backward_fused` for training).

use super::*;

pub(crate) fn forward(dev: &CudaDevice, inputs: &MlstmInputs, dims: &MlstmDims) -> Result<MlstmOutput> {
    let heads = dims.batch * dims.heads;
    check_gpu_dims(dims.dqk, dims.dhv, heads, dims.len)?;
    let tiling = forward_tiling(dev, dims, inputs.chunk)?;
    match (dims.dtype, tiling.fused) {
        (DType::BF16, true) => forward_fused::<bf16>(dev, inputs, dims, &tiling, None),
        (DType::F16, true) => forward_fused::<f16>(dev, inputs, dims, &tiling, None),
        (DType::F32, _) => forward_typed::<f32>(dev, inputs, dims, &tiling, None),
        (DType::BF16, false) => forward_typed::<bf16>(dev, inputs, dims, &tiling, None),
        (DType::F16, false) => forward_typed::<f16>(dev, inputs, dims, &tiling, None),
    }
}

/// `stats`: the backward's per-step m, d and den (rows 0-2 of `heads * len` f32 each, as
/// [`forward_typed`] records them), by the `_stats` kernels.
pub(super) fn forward_fused<T: CudaElement>(
    dev: &CudaDevice,
    inputs: &MlstmInputs,
    dims: &MlstmDims,
    tiling: &Tiling,
    stats: Option<&mut Tensor>,
) -> Result<MlstmOutput> {
    let heads = dims.batch * dims.heads;
    let v_tiles = dims.dhv.div_ceil(tiling.tv);
    let blocks = heads * v_tiles;
    if blocks > i32::MAX as usize {
        return Err(Error::invalid(
            "q",
            format!("batch * heads * ceil(dhv / {}) below 2^31", tiling.tv),
            format!("{heads} x {v_tiles}"),
        ));
    }
    // SAFETY (allocations): for every head, its ceil(dhv / tv) blocks write all of h's (len,
    // dhv) values and the final C's (dqk, dhv) values, the first of them the final n and m;
    // with no head nothing is read.
    let mut out = unsafe { uninit_output(dev, dims)? };
    if heads > 0 {
        // Tensors own whole allocations (256-byte aligned), so rows start 16-byte aligned
        // exactly when their length in bytes is a multiple of 16.
        let rows_vec = dims.dqk % 8 == 0 && dims.dhv % 8 == 0;
        let p = FusedParams {
            heads: heads as u32,
            len: dims.len as u32,
            dqk: dims.dqk as u32,
            dhv: dims.dhv as u32,
            has_init: u32::from(inputs.initial.is_some()),
            vec_in: u32::from(rows_vec),
            vec_out: u32::from(dims.dhv % 8 == 0),
            eps: inputs.eps,
            scale: 1.0 / (dims.dqk as f32).sqrt(),
        };
        if !FUSED_DQK.contains(&tiling.dqk_pad) || dims.dtype == DType::F32 {
            return Err(Error::invalid(
                "q",
                "dqk up to 256 in bf16 or f16 for the fused forward",
                dims.dqk.to_string(),
            ));
        }
        // Inference runs the forward module's kernel; the training forward (with the backward's
        // stats) the backward module's `_stats` instantiation.
        let (module, stats_suffix) = match stats {
            Some(_) => (KernelModule::MlstmBackwardFused, "_stats"),
            None => (KernelModule::MlstmForwardFused, ""),
        };
        let name = kernel_name("mlstm", "fwd_fused", dims.dtype, &format!("_k{}{stats_suffix}", tiling.dqk_pad));
        let f = dev.function(module, &name)?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            tiling.smem_bytes as i32,
        )
        .map_err(|e| dev.map_err("setting mlstm_fwd_fused's shared memory", e))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (fused_threads(tiling.dqk_pad) as u32, 1, 1),
            shared_mem_bytes: tiling.smem_bytes as u32,
        };
        let null = 0u64;
        let mut args = dev.stream().launch_builder(&f);
        push_forward_args::<T>(&mut args, inputs, &null, &mut out)?;
        if let Some(st) = stats {
            args.arg(st.cuda_slice_mut::<f32>("stats")?);
        }
        args.arg(&p);
        // SAFETY: mlstm_fwd_fused_<T>_k<class>[_stats](q, k, v, i, f, c0, n0, m0, h, c, n, m,
        // [stats,] FusedParams): MlstmInputs::dims checked every shape, type and device: q, k
        // hold heads*len*dqk T with dqk <= class, v and h heads*len*dhv T, i and f heads*len
        // f32, the states heads*dqk*dhv, heads*dqk and heads f32 (initial ones null with
        // has_init 0); with stats (the _stats kernel) stats holds at least 3 * heads * len f32
        // (the backward allocates it). Block b
        // reads head b / ceil(dhv / tv) and writes its tv value columns (and stats rows) only;
        // 16-byte accesses only where vec_in / vec_out say the rows allow them. The shared
        // memory is fused_smem_bytes(class), which the kernel checks against its own layout
        // and which the function was allowed above.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching mlstm_fwd_fused", e))?;
    }
    Ok(out)
}

/// The forward's outputs, uninitialised: h and the final C, n, m.
///
/// # Safety
/// The caller's launch writes every value, or nothing reads them.
unsafe fn uninit_output(dev: &CudaDevice, dims: &MlstmDims) -> Result<MlstmOutput> {
    let (b, nh) = (dims.batch, dims.heads);
    // SAFETY: forwarded to the caller (above).
    unsafe {
        Ok(MlstmOutput {
            h: Tensor::cuda_uninit(dev, dims.dtype, &dims.h_shape())?,
            final_state: MlstmState {
                c: Tensor::cuda_uninit(dev, DType::F32, &[b, nh, dims.dqk, dims.dhv])?,
                n: Tensor::cuda_uninit(dev, DType::F32, &[b, nh, dims.dqk])?,
                m: Tensor::cuda_uninit(dev, DType::F32, &[b, nh])?,
            },
        })
    }
}

/// The arguments both forward kernels (`mlstm_fwd_*`, `mlstm_fwd_fused_*`) start with: q, k,
/// v, i, f, the initial C, n, m (`null` without one), h and the final C, n, m.
fn push_forward_args<'a, T: CudaElement>(
    args: &mut LaunchArgs<'a>,
    inputs: &'a MlstmInputs,
    null: &'a u64,
    out: &'a mut MlstmOutput,
) -> Result<()> {
    args.arg(inputs.q.cuda_slice::<T>("q")?)
        .arg(inputs.k.cuda_slice::<T>("k")?)
        .arg(inputs.v.cuda_slice::<T>("v")?)
        .arg(inputs.i.cuda_slice::<f32>("i")?)
        .arg(inputs.f.cuda_slice::<f32>("f")?);
    let initial = inputs.initial;
    push_opt::<f32>(args, initial.map(|s| &s.c), "initial.c", null)?;
    push_opt::<f32>(args, initial.map(|s| &s.n), "initial.n", null)?;
    push_opt::<f32>(args, initial.map(|s| &s.m), "initial.m", null)?;
    let MlstmOutput { h, final_state: MlstmState { c, n, m } } = out;
    args.arg(h.cuda_slice_mut::<T>("h")?)
        .arg(c.cuda_slice_mut::<f32>("final.c")?)
        .arg(n.cuda_slice_mut::<f32>("final.n")?)
        .arg(m.cuda_slice_mut::<f32>("final.m")?);
    Ok(())
}

pub(super) fn forward_typed<T: CudaElement>(
    dev: &CudaDevice,
    inputs: &MlstmInputs,
    dims: &MlstmDims,
    tiling: &Tiling,
    stats: Option<(&Tensor, &mut Tensor)>,
) -> Result<MlstmOutput> {
    let heads = dims.batch * dims.heads;
    // SAFETY (allocations): for every head, the blocks (one per value tile) write all of h's
    // (len, dhv) values, the final C's (dqk, dhv) values, and the first tile's block the
    // final n and m; with no head nothing is read.
    let mut out = unsafe { uninit_output(dev, dims)? };
    if heads > 0 {
        let p = MlstmParams {
            heads: heads as u32,
            len: dims.len as u32,
            dqk: dims.dqk as u32,
            dhv: dims.dhv as u32,
            dqk_pad: tiling.dqk_pad as u32,
            tv: tiling.tv as u32,
            has_init: u32::from(inputs.initial.is_some()),
            eps: inputs.eps,
            scale: 1.0 / (dims.dqk as f32).sqrt(),
        };
        let name = chunk_kernel_name("fwd", dims.dtype, tiling.chunk)?;
        let f = dev.function(KernelModule::MlstmForwardChunked, &name)?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            tiling.smem_bytes as i32,
        )
        .map_err(|e| dev.map_err("setting mlstm_fwd's shared memory", e))?;
        let v_tiles = dims.dhv.div_ceil(tiling.tv);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, v_tiles as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: tiling.smem_bytes as u32,
        };
        let null = 0u64;
        let mut args = dev.stream().launch_builder(&f);
        push_forward_args::<T>(&mut args, inputs, &null, &mut out)?;
        match stats {
            Some((dh, st)) => {
                args.arg(dh.cuda_slice::<T>("dh")?).arg(st.cuda_slice_mut::<f32>("stats")?);
            }
            None => {
                args.arg(&null).arg(&null);
            }
        }
        args.arg(&p);
        // SAFETY: mlstm_fwd_<T>_l<chunk>(q, k, v, i, f, c0, n0, m0, h, c, n, m, dh, stats,
        // MlstmParams): MlstmInputs::dims checked every shape, type and device: q, k hold
        // heads*len*dqk T, v and h heads*len*dhv T, i and f heads*len f32, the states
        // heads*dqk*dhv, heads*dqk and heads f32 (initial ones null with has_init 0); dh (when
        // given) is shaped like h and stats holds (3 + value tiles) * heads * len f32
        // (checked by the backward that passes them; null otherwise). The grid is heads x
        // ceil(dhv / tv) blocks, each reading its head and writing its value columns only;
        // the shared memory is `tiling.smem_bytes`, which the kernel checks against its own
        // carving and which the function was allowed above.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching mlstm_fwd", e))?;
    }
    Ok(out)
}
