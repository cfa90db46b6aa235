//! The backward's launches: the dq / dk / dv passes (`mlstm/backward`, chunked;
//! `mlstm/backward_fused`, on the fused structure), the per-step dot products and the gate
//! gradients.

use super::forward::{forward_fused, forward_typed};
use super::*;

/// Mirrors `hk_mlstm::PassParams` in cuda/mlstm/backward.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PassParams {
    heads: u32,
    len: u32,
    dx: u32,
    dx_pad: u32,
    dz: u32,
    tz: u32,
    reverse: u32,
    x_extra: u32,
    y_extra: u32,
    has_init: u32,
    init_transposed: u32,
    init_m_default: f32,
    out_scale: f32,
    init_scale: f32,
}
crate::kernels::assert_kernel_params!(PassParams, 14);

// SAFETY: eleven u32 and three f32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for PassParams {}

/// Mirrors `hk_mlstm::PrepParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PrepParams {
    heads: u32,
    len: u32,
    value_tiles: u32,
    exact: u32,
    dhv: u32,
    dots: RowDotShape,
}
crate::kernels::assert_kernel_params!(PrepParams, 7);

// SAFETY: seven u32 fields (RowDotShape's two inline), repr(C), no padding.
unsafe impl DeviceRepr for PrepParams {}

/// Mirrors `hk_mlstm::DotParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DotParams {
    rows: u32,
    dqk: u32,
    dots: RowDotShape,
}
crate::kernels::assert_kernel_params!(DotParams, 4);

// SAFETY: four u32 fields (RowDotShape's two inline), repr(C), no padding.
unsafe impl DeviceRepr for DotParams {}

/// Mirrors `hk_mlstm::RowDotShape`: how the row dot product kernels (`mlstm_bwd_prep_h_*`,
/// `mlstm_bwd_dots_*`) split a row of `dim` elements over a warp's lanes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RowDotShape {
    lanes: u32,
    vec: u32,
}
crate::kernels::assert_kernel_params!(RowDotShape, 2);

impl RowDotShape {
    /// 16-byte loads where every row is whole vectors, and about two loads per lane and
    /// operand: enough bytes in flight per warp for the copy rate without idle lanes.
    fn new(dim: usize, dtype: DType) -> RowDotShape {
        let per_vec = 16 / dtype.size_in_bytes();
        let vec = dim % per_vec == 0;
        let loads = if vec { dim / per_vec } else { dim };
        let lanes = (loads / 2).clamp(1, 32);
        // The largest power of two not above it (lanes share a row by xor shuffles).
        let lanes = 1usize << (usize::BITS - 1 - lanes.leading_zeros());
        RowDotShape { lanes: lanes as u32, vec: u32::from(vec) }
    }

    /// Blocks of PREP_THREADS threads that cover `rows` rows.
    fn blocks(&self, rows: usize) -> u32 {
        let rows_per_block = (PREP_THREADS as usize / 32) * (32 / self.lanes as usize);
        rows.div_ceil(rows_per_block) as u32
    }
}

/// Mirrors `hk_mlstm::GateParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GateParams {
    heads: u32,
    len: u32,
    dqk: u32,
    dhv: u32,
    exact: u32,
}
crate::kernels::assert_kernel_params!(GateParams, 5);

// SAFETY: five u32 fields, repr(C), no padding.
unsafe impl DeviceRepr for GateParams {}

/// `hk_mlstm::PREP_THREADS`, `hk_mlstm::GATE_THREADS`.
const PREP_THREADS: u32 = 256;
const GATE_THREADS: u32 = 256;

/// Column 'extra' of a pass operand (`hk_mlstm::PassParams::x_extra`).
const EXTRA_NONE: u32 = 0;
const EXTRA_DN: u32 = 1;
const EXTRA_ONES: u32 = 2;

/// The dynamic shared memory of `mlstm_pass`, piece by piece as its `Carve` takes it.
pub(super) fn pass_smem_bytes(dtype: DType, chunk: usize, dx_pad: usize, tz: usize) -> usize {
    let es = dtype.size_in_bytes();
    let skew = 16 / es;
    let f32s = dtype == DType::F32;
    let piece = |bytes: usize| bytes.div_ceil(128) * 128;
    let (ldx, ldz, ldcf, ldct, lds, ldp, ldo) =
        (dx_pad + skew, tz + skew, tz + 4, tz + skew, chunk + 4, chunk + skew, tz + 4);
    let mut total = piece(chunk * ldx * es) * 2 + piece(chunk * ldz * es) + piece(dx_pad * ldcf * 4);
    if !f32s {
        total += piece(dx_pad * ldct * es);
    }
    total += piece(chunk * lds * 4);
    if !f32s {
        total += piece(chunk * ldp * es);
    }
    total += piece(chunk * ldo * 4) + piece(chunk * 8) + 5 * piece(chunk * 4) + piece(2 * 8);
    total
}

/// One backward pass: which operands play X, Y, Z and how the pass is gated.
#[derive(Clone, Copy, Debug)]
struct PassSpec {
    name: &'static str,
    dx: usize,
    dz: usize,
    reverse: bool,
    x_extra: u32,
    y_extra: u32,
    init_transposed: bool,
    init_m_default: f32,
    out_scale: f32,
    init_scale: f32,
}

/// The chunk and the widest Z tile of a pass that fit in `max_smem` (as the forward's
/// [`tiling`]): `(chunk, tz, dx_pad, smem)`.
fn pass_tiling(
    dtype: DType,
    spec: &PassSpec,
    chunk: Option<usize>,
    max_smem: usize,
) -> Result<(usize, usize, usize, usize)> {
    let extra = spec.x_extra != EXTRA_NONE || spec.y_extra != EXTRA_NONE;
    let dx_pad = round16(spec.dx + usize::from(extra));
    match fit_chunk_and_tile(chunk, spec.dz, max_smem, |c, tz| pass_smem_bytes(dtype, c, dx_pad, tz)) {
        Some((c, tz, smem)) => Ok((c, tz, dx_pad, smem)),
        None => Err(Error::invalid(
            "q",
            format!(
                "head dimensions whose backward chunk of {:?} steps fits in {max_smem} bytes of shared memory",
                chunks_tried(chunk)
            ),
            format!("{} pass over {} x {} columns in {dtype}", spec.name, spec.dx, spec.dz),
        )),
    }
}

/// The per-step and per-head buffers every pass reads: the gates, the forward's stats (m, d,
/// den, h . dh per value tile), aux (d dn, r, dm) and head_aux (-m_final,
/// m0 + logsigmoid(f[0])).
struct BackwardBufs<'a> {
    ig: &'a CudaSlice<f32>,
    fg: &'a CudaSlice<f32>,
    stats: &'a CudaSlice<f32>,
    aux: &'a CudaSlice<f32>,
    head_aux: &'a CudaSlice<f32>,
}

/// A pass's initial state: C (or its extended transpose's source), n, and m per head (None:
/// the spec's `init_m_default`).
type PassInit<'a> = (&'a CudaSlice<f32>, &'a CudaSlice<f32>, Option<CudaView<'a, f32>>);

/// Launches a pass kernel (`mlstm_pass_*` or `mlstm_pass_fused_*`, which take the same
/// arguments) with `params`: x, y, z, i, f, the forward's m and d, aux's d dn row, the initial
/// C, n and m (null without), out, then the final C, n and their log weight (null without).
///
/// # Safety
/// `f` is such a kernel taking `P` as its params, and the operands, states and `cfg` are
/// what it reads and writes within (the callers' SAFETY comments say how).
#[allow(clippy::too_many_arguments)]
unsafe fn launch_pass_kernel<T: CudaElement, P: DeviceRepr>(
    dev: &CudaDevice,
    dims: &MlstmDims,
    f: &CudaFunction,
    cfg: LaunchConfig,
    params: &P,
    what: &'static str,
    [x, y, z]: [&CudaSlice<T>; 3],
    bufs: &BackwardBufs,
    init: Option<PassInit>,
    out: &mut CudaSlice<T>,
    final_state: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
) -> Result<()> {
    let heads = dims.batch * dims.heads;
    let rows = heads * dims.len;
    let null = 0u64;
    let m_fwd = bufs.stats.slice(0..rows);
    let d_fwd = bufs.stats.slice(rows..2 * rows);
    let extra = bufs.aux.slice(0..rows);
    let final_log = bufs.head_aux.slice(heads..2 * heads);
    let mut args = dev.stream().launch_builder(f);
    args.arg(x).arg(y).arg(z).arg(bufs.ig).arg(bufs.fg).arg(&m_fwd).arg(&d_fwd).arg(&extra);
    let init_m;
    match init {
        Some((c, n, m)) => {
            init_m = m;
            args.arg(c).arg(n);
            match &init_m {
                Some(m) => args.arg(m),
                None => args.arg(&null),
            };
        }
        None => {
            args.arg(&null).arg(&null).arg(&null);
        }
    }
    args.arg(out);
    match final_state {
        Some((c, n)) => {
            args.arg(c).arg(n).arg(&final_log);
        }
        None => {
            args.arg(&null).arg(&null).arg(&null);
        }
    }
    args.arg(params);
    // SAFETY: forwarded to the caller (above).
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err(what, e))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn launch_pass<T: CudaElement>(
    dev: &CudaDevice,
    dims: &MlstmDims,
    chunk: Option<usize>,
    spec: &PassSpec,
    [x, y, z]: [&CudaSlice<T>; 3],
    bufs: &BackwardBufs,
    init: Option<PassInit>,
    out: &mut CudaSlice<T>,
    final_state: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
) -> Result<()> {
    let heads = dims.batch * dims.heads;
    let (chunk, tz, dx_pad, smem) = pass_tiling(dims.dtype, spec, chunk, dev.max_shared_memory_per_block())?;
    let p = PassParams {
        heads: heads as u32,
        len: dims.len as u32,
        dx: spec.dx as u32,
        dx_pad: dx_pad as u32,
        dz: spec.dz as u32,
        tz: tz as u32,
        reverse: u32::from(spec.reverse),
        x_extra: spec.x_extra,
        y_extra: spec.y_extra,
        has_init: u32::from(init.is_some()),
        init_transposed: u32::from(spec.init_transposed),
        init_m_default: spec.init_m_default,
        out_scale: spec.out_scale,
        init_scale: spec.init_scale,
    };
    let f = dev.function(KernelModule::MlstmBackward, &chunk_kernel_name("pass", dims.dtype, chunk)?)?;
    f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .map_err(|e| dev.map_err("setting mlstm_pass's shared memory", e))?;
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, spec.dz.div_ceil(tz) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: mlstm_pass_<T>_l<chunk>(x, y, z, i, f, m_fwd, d_fwd, extra, init_c, init_n,
    // init_m, out, final_c, final_n, final_log, PassParams): backward_typed passes x and y
    // with heads*len*dx T, z and out with heads*len*dz T, i, f and the m, d, extra views
    // with heads*len f32, an initial state of heads*dx*dz (+ heads*dz) f32 and init_m and
    // final_log of heads f32 (or null, with has_init 0 / no final state), a final state of
    // heads*dqk*dhv and heads*dqk f32. Block (head, tile) reads that head's rows and writes
    // out's columns of its tile only; the shared memory is what pass_smem_bytes computes,
    // which the kernel checks against its own carving and which the function was allowed.
    unsafe {
        launch_pass_kernel(dev, dims, &f, cfg, &p, "launching mlstm_pass", [x, y, z], bufs, init, out, final_state)
    }
}

/// Mirrors `hk_mlstm::FusedPassParams` in cuda/mlstm/backward_fused.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FusedPassParams {
    heads: u32,
    len: u32,
    dx: u32,
    dz: u32,
    reverse: u32,
    x_extra: u32,
    y_extra: u32,
    has_init: u32,
    init_transposed: u32,
    vec_in: u32,
    vec_out: u32,
    init_m_default: f32,
    out_scale: f32,
    init_scale: f32,
}
crate::kernels::assert_kernel_params!(FusedPassParams, 14);

// SAFETY: eleven u32 and three f32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for FusedPassParams {}

/// `hk_mlstm::fused::PassCfg<class>::SMEM`: X and Y twice (64 rows of class + 8), Z twice
/// (64 rows of TV + 8), the state's copy (class rows of TV + 8), all 2-byte elements, E's copy
/// (TV f32) and two `PassGateTile`s (seven f32 per step, an f64 and two f32).
fn fused_pass_smem_bytes(class: usize) -> usize {
    let (l, vx, ldx) = (FUSED_CHUNK, FUSED_TV + 8, class + 8);
    (4 * l * ldx + 2 * l * vx + class * vx) * 2 + FUSED_TV * 4 + 2 * (7 * l * 4 + 16)
}

/// The classes of the fused backward (the stats-recording fused forward's for dqk, the passes'
/// for dhv (dq, dk) and dqk (dv)): bf16 / f16, both head dimensions up to 256, chunk unset or
/// 64, and every kernel's shared memory within `max_smem`.
fn fused_backward_classes(dims: &MlstmDims, chunk: Option<usize>, max_smem: usize) -> Option<(usize, usize)> {
    let qk = fused_dqk_class(dims, chunk, max_smem)?;
    let hv = *FUSED_DQK.iter().find(|&&c| dims.dhv <= c)?;
    (fused_pass_smem_bytes(qk) <= max_smem && fused_pass_smem_bytes(hv) <= max_smem).then_some((qk, hv))
}

/// One backward pass on the fused kernel (`mlstm_pass_fused_*`): as [`launch_pass`], with
/// `class` the class of `spec.dx`.
#[allow(clippy::too_many_arguments)]
fn launch_pass_fused<T: CudaElement>(
    dev: &CudaDevice,
    dims: &MlstmDims,
    spec: &PassSpec,
    class: usize,
    [x, y, z]: [&CudaSlice<T>; 3],
    bufs: &BackwardBufs,
    init: Option<PassInit>,
    out: &mut CudaSlice<T>,
    final_state: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
) -> Result<()> {
    let heads = dims.batch * dims.heads;
    let z_tiles = spec.dz.div_ceil(FUSED_TV);
    let blocks = heads * z_tiles;
    if blocks > i32::MAX as usize || spec.dx > class || (final_state.is_some() && !spec.init_transposed) {
        return Err(Error::invalid(
            "q",
            format!("a fused {} pass: dx up to {class}, below 2^31 blocks", spec.name),
            format!("dx {}, {blocks} blocks", spec.dx),
        ));
    }
    let extra = spec.x_extra != EXTRA_NONE || spec.y_extra != EXTRA_NONE;
    let p = FusedPassParams {
        heads: heads as u32,
        len: dims.len as u32,
        dx: spec.dx as u32,
        dz: spec.dz as u32,
        reverse: u32::from(spec.reverse),
        x_extra: spec.x_extra,
        y_extra: spec.y_extra,
        has_init: u32::from(init.is_some()),
        init_transposed: u32::from(spec.init_transposed),
        // Tensors own whole allocations (256-byte aligned): rows start 16-byte aligned exactly
        // when their length in bytes is a multiple of 16.
        vec_in: u32::from(spec.dx % 8 == 0 && spec.dz % 8 == 0),
        vec_out: u32::from(spec.dz % 8 == 0),
        init_m_default: spec.init_m_default,
        out_scale: spec.out_scale,
        init_scale: spec.init_scale,
    };
    if !FUSED_DQK.contains(&class) || dims.dtype == DType::F32 {
        return Err(Error::invalid("q", "a fused pass class of 64, 128 or 256 in bf16 or f16", class.to_string()));
    }
    let extra_suffix = if extra { "_extra" } else { "" };
    let name = kernel_name("mlstm", "pass_fused", dims.dtype, &format!("_k{class}{extra_suffix}"));
    let f = dev.function(KernelModule::MlstmBackwardFused, &name)?;
    let smem = fused_pass_smem_bytes(class);
    f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .map_err(|e| dev.map_err("setting mlstm_pass_fused's shared memory", e))?;
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (fused_threads(class) as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: mlstm_pass_fused_<T>_k<class>[_extra](x, y, z, i, f, m_fwd, d_fwd, extra,
    // init_c, init_n, init_m, out, final_c, final_n, final_log, FusedPassParams): as
    // launch_pass's (x and y heads*len*dx T with dx <= class, z and out heads*len*dz T, the
    // per-step views heads*len f32, an initial state heads*dx*dz (+ heads*dz) f32 or null, a
    // final state only with the transposed layout, checked above). Block b reads head
    // b / ceil(dz / 64) and writes its 64 columns of out (and of the final state) only; 16-byte
    // accesses only where vec_in / vec_out say the rows allow them. The shared memory is
    // fused_pass_smem_bytes(class), which the kernel checks against its own layout and which
    // the function was allowed above.
    unsafe {
        launch_pass_kernel(
            dev,
            dims,
            &f,
            cfg,
            &p,
            "launching mlstm_pass_fused",
            [x, y, z],
            bufs,
            init,
            out,
            final_state,
        )
    }
}

/// A backward pass on the fused kernel (`fused`: [`fused_backward_classes`] took the shape) or
/// the chunked one.
#[allow(clippy::too_many_arguments)]
fn run_pass<T: CudaElement>(
    dev: &CudaDevice,
    dims: &MlstmDims,
    chunk: Option<usize>,
    fused: bool,
    spec: &PassSpec,
    operands: [&CudaSlice<T>; 3],
    bufs: &BackwardBufs,
    init: Option<PassInit>,
    out: &mut CudaSlice<T>,
    final_state: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
) -> Result<()> {
    match FUSED_DQK.iter().find(|&&c| spec.dx <= c) {
        Some(&class) if fused => launch_pass_fused(dev, dims, spec, class, operands, bufs, init, out, final_state),
        _ => launch_pass(dev, dims, chunk, spec, operands, bufs, init, out, final_state),
    }
}

/// The forward of a training step: on the fused backward's path the fused forward recording
/// m, d and den (`3 x heads * len` f32, as the backward's recomputation would), elsewhere the
/// plain forward and no stats.
pub(crate) fn forward_for_backward(
    dev: &CudaDevice,
    inputs: &MlstmInputs,
    dims: &MlstmDims,
) -> Result<(MlstmOutput, Option<Tensor>)> {
    let heads = dims.batch * dims.heads;
    check_gpu_dims(dims.dqk, dims.dhv, heads, dims.len)?;
    let Some((qk, _)) = fused_backward_classes(dims, inputs.chunk, dev.max_shared_memory_per_block()) else {
        return Ok((forward(dev, inputs, dims)?, None));
    };
    let tiling =
        Tiling { chunk: FUSED_CHUNK, tv: FUSED_TV, dqk_pad: qk, smem_bytes: fused_smem_bytes(qk), fused: true };
    // SAFETY: the fused forward's first value-tile blocks write all three rows of every step
    // (with no step or no head there is nothing to read).
    let mut stats = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[3, heads * dims.len])? };
    let out = match dims.dtype {
        DType::BF16 => forward_fused::<bf16>(dev, inputs, dims, &tiling, Some(&mut stats))?,
        DType::F16 => forward_fused::<f16>(dev, inputs, dims, &tiling, Some(&mut stats))?,
        DType::F32 => return Ok((forward(dev, inputs, dims)?, None)),
    };
    Ok((out, Some(stats)))
}

/// `saved`: a fused forward's output and stats for these inputs ([`forward_for_backward`]),
/// used in place of the recomputation where the backward takes the fused path.
pub(crate) fn backward(
    dev: &CudaDevice,
    inputs: &MlstmInputs,
    dims: &MlstmDims,
    dh: &Tensor,
    dfinal: Option<&MlstmState>,
    mode: NormalizerGrad,
    saved: Option<(&MlstmOutput, &Tensor)>,
) -> Result<MlstmGrads> {
    let heads = dims.batch * dims.heads;
    check_gpu_dims(dims.dqk, dims.dhv, heads, dims.len)?;
    match dims.dtype {
        DType::F32 => backward_typed::<f32>(dev, inputs, dims, dh, dfinal, mode, saved),
        DType::BF16 => backward_typed::<bf16>(dev, inputs, dims, dh, dfinal, mode, saved),
        DType::F16 => backward_typed::<f16>(dev, inputs, dims, dh, dfinal, mode, saved),
    }
}

fn backward_typed<T: CudaElement>(
    dev: &CudaDevice,
    inputs: &MlstmInputs,
    dims: &MlstmDims,
    dh: &Tensor,
    dfinal: Option<&MlstmState>,
    mode: NormalizerGrad,
    saved: Option<(&MlstmOutput, &Tensor)>,
) -> Result<MlstmGrads> {
    let (batch, nh, len, dqk, dhv) = (dims.batch, dims.heads, dims.len, dims.dqk, dims.dhv);
    let heads = batch * nh;
    let rows = heads * len;
    let exact = mode == NormalizerGrad::Exact;
    let device = Device::Cuda(dev.clone());
    if rows > i32::MAX as usize {
        return Err(Error::invalid("q", "batch * heads * len below 2^31", format!("{rows}")));
    }
    // SAFETY (allocations): the dq pass writes every dq value, the dk and dv passes every dk
    // and dv value, the gate kernel every di, df value and dm0 entry (one block per head),
    // the dk pass every dc0 and dn0 value (its blocks cover all dqk columns). With no step
    // (or no head) nothing is launched and they are empty or replaced below.
    let mut dq = unsafe { Tensor::cuda_uninit(dev, dims.dtype, inputs.q.shape())? };
    let mut dk = unsafe { Tensor::cuda_uninit(dev, dims.dtype, inputs.k.shape())? };
    let mut dv = unsafe { Tensor::cuda_uninit(dev, dims.dtype, inputs.v.shape())? };
    let mut di = unsafe { Tensor::cuda_uninit(dev, DType::F32, inputs.i.shape())? };
    let mut df = unsafe { Tensor::cuda_uninit(dev, DType::F32, inputs.f.shape())? };
    if rows == 0 {
        // No step: the final state is the initial one (and m moves nothing in Constant mode).
        let dinitial = match (inputs.initial, dfinal) {
            (None, _) => None,
            (Some(_), Some(d)) => Some(MlstmState {
                c: d.c.to_device(&device)?,
                n: d.n.to_device(&device)?,
                m: if exact { d.m.to_device(&device)? } else { Tensor::full(0.0, &[batch, nh], DType::F32, &device)? },
            }),
            (Some(_), None) => Some(MlstmState::zeros(batch, nh, dqk, dhv, &device)?),
        };
        return Ok(MlstmGrads { dq, dk, dv, di, df, dinitial });
    }

    // The backward's recomputation records per-step stats, which the chunked forward does.
    // The fused kernels where they take the shape (bf16 / f16, head dimensions up to 256),
    // else the chunked ones.
    let max_smem = dev.max_shared_memory_per_block();
    let classes = fused_backward_classes(dims, inputs.chunk, max_smem);
    let fused = classes.is_some();
    let tiling = match classes {
        Some((qk, _)) => {
            Tiling { chunk: FUSED_CHUNK, tv: FUSED_TV, dqk_pad: qk, smem_bytes: fused_smem_bytes(qk), fused: true }
        }
        None => tiling(dims, inputs.chunk, max_smem)?,
    };
    // The chunked forward records h . dh per value tile in stats rows 3.., the fused one
    // leaves it to mlstm_bwd_prep_h.
    let value_tiles = if fused { 0 } else { dhv.div_ceil(tiling.tv) };
    let recomputed;
    let (fwd, stats) = match saved {
        Some((out, stats)) if fused => (out, stats),
        _ => {
            // SAFETY: the forward's first value-tile blocks write rows 0..3 of every step, and
            // the chunked forward's blocks of value tile j row 3 + j.
            let mut stats = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[3 + value_tiles, rows])? };
            let out = if fused {
                forward_fused::<T>(dev, inputs, dims, &tiling, Some(&mut stats))?
            } else {
                forward_typed::<T>(dev, inputs, dims, &tiling, Some((dh, &mut stats)))?
            };
            recomputed = (out, stats);
            (&recomputed.0, &recomputed.1)
        }
    };
    // SAFETY: mlstm_bwd_prep writes all three rows of every step and both head_aux rows of
    // every head (at its first and last step; len >= 1 here).
    let mut aux = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[3, rows])? };
    let mut head_aux = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[2, heads])? };
    {
        let p = PrepParams {
            heads: heads as u32,
            len: len as u32,
            value_tiles: value_tiles as u32,
            exact: u32::from(exact),
            dhv: dhv as u32,
            dots: RowDotShape::new(dhv, dims.dtype),
        };
        // One thread per step, or (fused) a few lanes per step with h . dh from h and dh.
        let (name, blocks) = if fused {
            (kernel_name("mlstm", "bwd_prep_h", dims.dtype, ""), p.dots.blocks(rows))
        } else {
            ("mlstm_bwd_prep".to_string(), rows.div_ceil(PREP_THREADS as usize) as u32)
        };
        let f = dev.function(KernelModule::MlstmBackward, &name)?;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (PREP_THREADS, 1, 1), shared_mem_bytes: 0 };
        let null = 0u64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(stats.cuda_slice::<f32>("stats")?);
        if fused {
            args.arg(fwd.h.cuda_slice::<T>("h")?).arg(dh.cuda_slice::<T>("dh")?);
        }
        args.arg(inputs.f.cuda_slice::<f32>("f")?);
        match inputs.initial {
            Some(s) => args.arg(s.m.cuda_slice::<f32>("initial.m")?),
            None => args.arg(&null),
        };
        args.arg(aux.cuda_slice_mut::<f32>("aux")?).arg(head_aux.cuda_slice_mut::<f32>("head_aux")?).arg(&p);
        // SAFETY: mlstm_bwd_prep(stats, f, m0, aux, head_aux, PrepParams) or
        // mlstm_bwd_prep_h_<T>(stats, h, dh, f, m0, aux, head_aux, PrepParams): stats holds
        // (3 + value_tiles) * rows f32, h (the recomputed forward's) and dh rows * dhv T, f
        // rows f32, m0 heads f32 or null, aux 3 * rows and head_aux 2 * heads f32; one thread
        // (p.dots.lanes lanes, 16-byte loads only if p.dots.vec says dhv allows them) per
        // step, those past `rows` return.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching mlstm_bwd_prep", e))?;
    }

    let scale = 1.0 / (dqk as f32).sqrt();
    let bufs = BackwardBufs {
        ig: inputs.i.cuda_slice::<f32>("i")?,
        fg: inputs.f.cuda_slice::<f32>("f")?,
        stats: stats.cuda_slice::<f32>("stats")?,
        aux: aux.cuda_slice::<f32>("aux")?,
        head_aux: head_aux.cuda_slice::<f32>("head_aux")?,
    };
    let (q, k, v, dh_s) = (
        inputs.q.cuda_slice::<T>("q")?,
        inputs.k.cuda_slice::<T>("k")?,
        inputs.v.cuda_slice::<T>("v")?,
        dh.cuda_slice::<T>("dh")?,
    );
    let reverse_start = || bufs.head_aux.slice(0..heads);

    // dq: forwards, X = (dh, d dn), Y = (v, 1), Z = k, rows weighted by 1 / d, from the
    // initial state [C0 | n0]^T.
    let dq_spec = PassSpec {
        name: "dq",
        dx: dhv,
        dz: dqk,
        reverse: false,
        x_extra: EXTRA_DN,
        y_extra: EXTRA_ONES,
        init_transposed: true,
        init_m_default: 0.0,
        out_scale: scale,
        init_scale: 1.0,
    };
    let init = match inputs.initial {
        Some(s) => Some((
            s.c.cuda_slice::<f32>("initial.c")?,
            s.n.cuda_slice::<f32>("initial.n")?,
            Some(s.m.cuda_slice::<f32>("initial.m")?.slice(0..heads)),
        )),
        None => None,
    };
    run_pass(dev, dims, inputs.chunk, fused, &dq_spec, [dh_s, v, k], &bufs, init, dq.cuda_slice_mut::<T>("dq")?, None)?;

    // dk: backwards, X = (v, 1), Y = (dh, d dn) with 1 / d in the key gate, Z = q, from
    // [dC | dn]_final^T; ends at the initial state's gradient.
    let dfin_c = dfinal.map(|s| s.c.cuda_slice::<f32>("dfinal.c")).transpose()?;
    let dfin_n = dfinal.map(|s| s.n.cuda_slice::<f32>("dfinal.n")).transpose()?;
    let dk_spec = PassSpec {
        name: "dk",
        dx: dhv,
        dz: dqk,
        reverse: true,
        x_extra: EXTRA_ONES,
        y_extra: EXTRA_DN,
        init_transposed: true,
        init_m_default: f32::NEG_INFINITY,
        out_scale: scale,
        init_scale: 1.0 / scale,
    };
    let mut dinitial = match inputs.initial {
        // SAFETY (allocations): the dk pass writes all of dc0 and dn0, the gate kernel dm0.
        Some(_) => Some(unsafe {
            MlstmState {
                c: Tensor::cuda_uninit(dev, DType::F32, &[batch, nh, dqk, dhv])?,
                n: Tensor::cuda_uninit(dev, DType::F32, &[batch, nh, dqk])?,
                m: Tensor::cuda_uninit(dev, DType::F32, &[batch, nh])?,
            }
        }),
        None => None,
    };
    {
        let init = dfin_c.zip(dfin_n).map(|(c, n)| (c, n, Some(reverse_start())));
        let fin = match dinitial.as_mut() {
            Some(s) => {
                let MlstmState { c, n, .. } = s;
                Some((c.cuda_slice_mut::<f32>("dinitial.c")?, n.cuda_slice_mut::<f32>("dinitial.n")?))
            }
            None => None,
        };
        run_pass(
            dev,
            dims,
            inputs.chunk,
            fused,
            &dk_spec,
            [v, dh_s, q],
            &bufs,
            init,
            dk.cuda_slice_mut::<T>("dk")?,
            fin,
        )?;
    }

    // dv: backwards, X = k, Y = q, Z = dh with 1 / d in the key gate, from dC_final.
    let dv_spec = PassSpec {
        name: "dv",
        dx: dqk,
        dz: dhv,
        reverse: true,
        x_extra: EXTRA_NONE,
        y_extra: EXTRA_NONE,
        init_transposed: false,
        init_m_default: f32::NEG_INFINITY,
        out_scale: scale,
        init_scale: 1.0 / scale,
    };
    // The n part of the initial state is unused without an extra column (y_extra none).
    let init = dfin_c.zip(dfin_n).map(|(c, n)| (c, n, Some(reverse_start())));
    run_pass(dev, dims, inputs.chunk, fused, &dv_spec, [k, q, dh_s], &bufs, init, dv.cuda_slice_mut::<T>("dv")?, None)?;

    // Per step: c = k . dk, then di = c and db = r - c.
    {
        let p = DotParams { rows: rows as u32, dqk: dqk as u32, dots: RowDotShape::new(dqk, dims.dtype) };
        let f = dev.function(KernelModule::MlstmBackward, &kernel_name("mlstm", "bwd_dots", dims.dtype, ""))?;
        let cfg = LaunchConfig {
            grid_dim: (p.dots.blocks(rows), 1, 1),
            block_dim: (PREP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = dev.stream().launch_builder(&f);
        args.arg(k)
            .arg(dk.cuda_slice::<T>("dk")?)
            .arg(aux.cuda_slice_mut::<f32>("aux")?)
            .arg(di.cuda_slice_mut::<f32>("di")?)
            .arg(df.cuda_slice_mut::<f32>("df")?)
            .arg(&p);
        // SAFETY: mlstm_bwd_dots_<T>(k, dk, aux, di, df, DotParams): k and dk hold rows * dqk
        // T, aux 3 * rows f32, di and df rows f32; p.dots.lanes lanes per step (16-byte loads
        // only if p.dots.vec says dqk allows them), those past `rows` return.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching mlstm_bwd_dots", e))?;
    }

    // Gate gradients and dm0.
    {
        let p = GateParams {
            heads: heads as u32,
            len: len as u32,
            dqk: dqk as u32,
            dhv: dhv as u32,
            exact: u32::from(exact),
        };
        let f = dev.function(KernelModule::MlstmBackward, "mlstm_bwd_gates")?;
        let cfg = LaunchConfig { grid_dim: (heads as u32, 1, 1), block_dim: (GATE_THREADS, 1, 1), shared_mem_bytes: 0 };
        let null = 0u64;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(inputs.i.cuda_slice::<f32>("i")?)
            .arg(inputs.f.cuda_slice::<f32>("f")?)
            .arg(stats.cuda_slice::<f32>("stats")?)
            .arg(aux.cuda_slice_mut::<f32>("aux")?)
            .arg(fwd.final_state.c.cuda_slice::<f32>("final.c")?)
            .arg(fwd.final_state.n.cuda_slice::<f32>("final.n")?);
        match dfinal {
            Some(s) => {
                args.arg(s.c.cuda_slice::<f32>("dfinal.c")?)
                    .arg(s.n.cuda_slice::<f32>("dfinal.n")?)
                    .arg(s.m.cuda_slice::<f32>("dfinal.m")?);
            }
            None => {
                args.arg(&null).arg(&null).arg(&null);
            }
        }
        match (inputs.initial, dinitial.as_mut()) {
            (Some(s), Some(d)) => {
                let MlstmState { c, n, m } = d;
                args.arg(s.c.cuda_slice::<f32>("initial.c")?)
                    .arg(s.n.cuda_slice::<f32>("initial.n")?)
                    .arg(c.cuda_slice::<f32>("dinitial.c")?)
                    .arg(n.cuda_slice::<f32>("dinitial.n")?)
                    .arg(di.cuda_slice_mut::<f32>("di")?)
                    .arg(df.cuda_slice_mut::<f32>("df")?)
                    .arg(m.cuda_slice_mut::<f32>("dinitial.m")?);
            }
            _ => {
                args.arg(&null)
                    .arg(&null)
                    .arg(&null)
                    .arg(&null)
                    .arg(di.cuda_slice_mut::<f32>("di")?)
                    .arg(df.cuda_slice_mut::<f32>("df")?)
                    .arg(&null);
            }
        }
        args.arg(&p);
        // SAFETY: mlstm_bwd_gates(i, f, stats, aux, c_fin, n_fin, dc_fin, dn_fin, dm_fin, c0,
        // n0, dc0, dn0, di, df, dm0, GateParams): i, f, di, df hold rows f32, stats >= rows
        // f32 (m first), aux 3*rows f32, the states
        // heads*dqk*dhv, heads*dqk, heads f32 (null when absent). One block per head touches
        // that head's steps and state only.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching mlstm_bwd_gates", e))?;
    }
    Ok(MlstmGrads { dq, dk, dv, di, df, dinitial })
}
