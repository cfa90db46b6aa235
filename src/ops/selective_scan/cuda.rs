//! Launches of `cuda/selective_scan/` (forward.cu, backward.cu, step.cu: one module each).

use super::{cpu, ScanCheckpoints, ScanDims, ScanGrads, ScanInputs, ScanOutput};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{kernel_name, KernelModule};
use crate::ops::push_opt;
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_scan::ScanParams` in cuda/selective_scan/selective_scan.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ScanParams {
    batch: u32,
    dim: u32,
    dstate: u32,
    len: u32,
    groups: u32,
    tile: u32,
    ckpt_interval: u32,
    n_ckpt: u32,
    b_variable: u32,
    c_variable: u32,
    has_d: u32,
    has_z: u32,
    has_bias: u32,
    softplus: u32,
    has_h0: u32,
    has_resets: u32,
    has_dlast: u32,
    write_ckpt: u32,
}
crate::kernels::assert_kernel_params!(ScanParams, 18);

// SAFETY: eighteen u32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for ScanParams {}

/// cuda/selective_scan/: the backward's BLOCK, S and the instantiated (states per lane,
/// lanes per channel) layouts, `HK_SCAN_LAYOUTS`.
const BWD_BLOCK: usize = 128;
const PIECE: usize = 8;
const LAYOUTS: [(usize, usize); 7] = [(4, 1), (4, 2), (4, 4), (4, 8), (4, 16), (4, 32), (8, 32)];
const MAX_GRID_Y: usize = 65_535;
/// Above this much dynamic shared memory a kernel must opt in.
const DEFAULT_SMEM: usize = 48 * 1024;

/// A kernel's thread layout: `spt` states per lane, `nt` lanes per channel, `blk` threads.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    spt: usize,
    nt: usize,
    blk: usize,
    /// Bytes per element of u, delta, B, C, z.
    elem: usize,
    dtype: DType,
    /// `fwd` or `bwd`.
    pass: &'static str,
}

impl Geometry {
    /// The smallest layout that holds `dstate` states per channel.
    fn layout(dstate: usize) -> usize {
        LAYOUTS.iter().position(|&(spt, nt)| spt * nt >= dstate).unwrap_or(LAYOUTS.len() - 1)
    }

    /// The forward: 64-thread blocks up to 8 lanes per channel (more, smaller blocks fill
    /// the SMs evenly), 128 beyond.
    fn forward(dstate: usize, dtype: DType) -> Geometry {
        let (spt, nt) = LAYOUTS[Geometry::layout(dstate)];
        let blk = if nt >= 16 { 128 } else { 64 };
        Geometry { spt, nt, blk, elem: dtype.size_in_bytes(), dtype, pass: "fwd" }
    }

    fn backward(dstate: usize, dtype: DType) -> Geometry {
        let (spt, nt) = LAYOUTS[Geometry::layout(dstate)];
        Geometry { spt, nt, blk: BWD_BLOCK, elem: dtype.size_in_bytes(), dtype, pass: "bwd" }
    }

    /// `selective_scan_<fwd|bwd>_<dtype>_s<spt>_l<nt>`, one per `HK_SCAN_LAYOUTS` entry.
    fn kernel(&self) -> String {
        kernel_name("selective_scan", self.pass, self.dtype, &format!("_s{}_l{}", self.spt, self.nt))
    }

    fn channels_per_block(&self) -> usize {
        self.blk / self.nt
    }
    fn npad(&self) -> usize {
        self.spt * self.nt
    }
    /// `Tiles::PARTIAL_Y` in the .cu: up to 4 lanes per channel the forward keeps a row of
    /// partial y sums per lane (and tiles of 32 steps).
    fn partial_y(&self) -> bool {
        self.nt <= 4
    }
    /// `Tiles::FWD` in the .cu: from 32 steps (`partial_y`) or 64, halved while a thread
    /// would stage more than 16 elements of a per-channel array or of B / C (never below 8).
    fn tile(&self) -> usize {
        let mut t = if self.partial_y() { 32 } else { 64 };
        while t > 8 && (self.channels_per_block() * t > 16 * self.blk || self.npad() * t > 16 * self.blk) {
            t /= 2;
        }
        t
    }
    /// The forward's shared memory in bytes (its tile: `tile()`).
    fn forward_smem(&self) -> usize {
        let tile = self.tile();
        let y_rows = if self.partial_y() { self.blk } else { self.channels_per_block() };
        // B and C: two f32 [t][n] arrays with rows padded by 4, or packed as 16-bit elements
        // (`PackedBC`: NPAD words per step).
        let bc = if self.elem == 2 { tile * self.npad() } else { 2 * tile * (self.npad() + 4) };
        4 * (bc + (4 * self.channels_per_block() + y_rows) * (tile + 4) + tile)
    }
    /// The backward's tile = the checkpoint interval: `Tiles::BWD`, at most 32.
    fn backward_tile(&self) -> usize {
        self.tile().min(32)
    }
    /// The backward's shared memory in bytes: the staged f32 tile, the piece states, the dB /
    /// dC sums, then `BwdTile`'s raw area (the next interval's elements, its reset flags
    /// rounded to 16 bytes, and each thread's checkpointed states).
    fn backward_smem(&self) -> usize {
        let (tile, db, npad) = (self.backward_tile(), self.channels_per_block(), self.npad());
        let staged = 4
            * (2 * tile * (npad + 4)
                + 6 * db * (tile + 4)
                + tile
                + (tile / PIECE) * self.spt * self.blk
                + (self.blk / 32) * PIECE * 2 * npad
                + 2 * npad * (tile + 4));
        let raw = ((4 * db * tile + 2 * npad * tile) * self.elem + tile).div_ceil(16) * 16;
        staged + raw + 4 * self.blk * self.spt
    }
}

/// Steps between the checkpoints the forward saves for the backward. The forward kernel
/// derives the same number from its layout (`Tiles<SPT, NT, BLOCK>::BWD`: forward and backward
/// share the layout) and traps on a mismatch.
fn checkpoint_interval(dims: &ScanDims) -> usize {
    Geometry::backward(dims.dstate, dims.dtype).backward_tile()
}

fn params(dims: &ScanDims, inputs: &ScanInputs) -> Result<ScanParams> {
    if dims.batch > MAX_GRID_Y {
        return Err(Error::invalid("u", format!("batch up to {MAX_GRID_Y}"), dims.batch.to_string()));
    }
    if dims.len > i32::MAX as usize || dims.dim > i32::MAX as usize {
        return Err(Error::invalid("u", "dim and len below 2^31", format!("dim {} len {}", dims.dim, dims.len)));
    }
    Ok(ScanParams {
        batch: dims.batch as u32,
        dim: dims.dim as u32,
        dstate: dims.dstate as u32,
        len: dims.len as u32,
        groups: dims.groups as u32,
        b_variable: u32::from(dims.b_variable),
        c_variable: u32::from(dims.c_variable),
        has_d: u32::from(inputs.d.is_some()),
        has_z: u32::from(inputs.z.is_some()),
        has_bias: u32::from(inputs.delta_bias.is_some()),
        softplus: u32::from(inputs.delta_softplus),
        has_h0: u32::from(inputs.h0.is_some()),
        has_resets: u32::from(inputs.resets.is_some()),
        ..ScanParams::default()
    })
}

fn grid(dims: &ScanDims, g: &Geometry, smem: usize) -> LaunchConfig {
    let blocks_per_group = (dims.dim / dims.groups).div_ceil(g.channels_per_block());
    LaunchConfig {
        grid_dim: ((dims.groups * blocks_per_group) as u32, dims.batch as u32, 1),
        block_dim: (g.blk as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

fn allow_smem(dev: &CudaDevice, f: &CudaFunction, bytes: usize) -> Result<()> {
    if bytes > DEFAULT_SMEM {
        f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
            .map_err(|e| dev.map_err("allowing the scan's shared memory", e))?;
    }
    Ok(())
}

/// The reset flags on `dev`, when the scan has them.
fn resets_on(dev: &CudaDevice, inputs: &ScanInputs) -> Result<Option<std::sync::Arc<CudaSlice<u8>>>> {
    inputs.resets.map(|r| r.on_device(dev)).transpose()
}

/// Empty problems (no batch, channel or step) go through the reference and are copied over.
fn degenerate(dims: &ScanDims) -> bool {
    dims.batch == 0 || dims.dim == 0 || dims.len == 0
}

pub(super) fn forward(
    dev: &CudaDevice,
    inputs: &ScanInputs,
    dims: &ScanDims,
    checkpoints: bool,
) -> Result<(ScanOutput, ScanCheckpoints)> {
    let device = crate::Device::Cuda(dev.clone());
    if degenerate(dims) {
        let f = cpu::forward(&inputs.to_f64()?);
        let out = Tensor::from_f64_rounded(&f.out, inputs.u.shape(), dims.dtype)?.to_device(&device)?;
        let last_state =
            Tensor::from_f64_rounded(&f.last_state, &dims.state_shape(), DType::F32)?.to_device(&device)?;
        return Ok((ScanOutput { out, last_state }, ScanCheckpoints { states: None, interval: 0 }));
    }
    match dims.dtype {
        DType::F32 => forward_typed::<f32>(dev, inputs, dims, checkpoints),
        DType::BF16 => forward_typed::<bf16>(dev, inputs, dims, checkpoints),
        DType::F16 => forward_typed::<f16>(dev, inputs, dims, checkpoints),
    }
}

fn forward_typed<T: CudaElement>(
    dev: &CudaDevice,
    inputs: &ScanInputs,
    dims: &ScanDims,
    checkpoints: bool,
) -> Result<(ScanOutput, ScanCheckpoints)> {
    let g = Geometry::forward(dims.dstate, dims.dtype);
    let mut p = params(dims, inputs)?;
    let interval = checkpoint_interval(dims);
    p.tile = g.tile() as u32;
    p.ckpt_interval = interval as u32;
    p.n_ckpt = dims.len.div_ceil(interval) as u32;
    p.write_ckpt = u32::from(checkpoints);
    // SAFETY (allocations): the forward writes every element of out and last_state (every
    // valid (b, d, t) and (b, d, n)), and with write_ckpt every checkpoint slot.
    let mut out = unsafe { Tensor::cuda_uninit(dev, dims.dtype, inputs.u.shape())? };
    let mut last = unsafe { Tensor::cuda_uninit(dev, DType::F32, &dims.state_shape())? };
    let mut ckpt = if checkpoints {
        Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, &[dims.batch, p.n_ckpt as usize, dims.dim, dims.dstate])? })
    } else {
        None
    };
    let resets = resets_on(dev, inputs)?;
    let f = dev.function(KernelModule::SelectiveScanForward, &g.kernel())?;
    let smem = g.forward_smem();
    allow_smem(dev, &f, smem)?;
    let null = 0u64;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(inputs.u.cuda_slice::<T>("u")?)
        .arg(inputs.delta.cuda_slice::<T>("delta")?)
        .arg(inputs.a.cuda_slice::<f32>("A")?);
    push_bc::<T>(&mut args, inputs.b, dims.b_variable, "B", &null)?;
    push_bc::<T>(&mut args, inputs.c, dims.c_variable, "C", &null)?;
    push_opt::<f32>(&mut args, inputs.d, "D", &null)?;
    push_opt::<T>(&mut args, inputs.z, "z", &null)?;
    push_opt::<f32>(&mut args, inputs.delta_bias, "delta_bias", &null)?;
    push_opt::<f32>(&mut args, inputs.h0, "h0", &null)?;
    match &resets {
        Some(r) => args.arg(r.as_ref()),
        None => args.arg(&null),
    };
    args.arg(out.cuda_slice_mut::<T>("out")?).arg(last.cuda_slice_mut::<f32>("last_state")?);
    match ckpt.as_mut() {
        Some(t) => args.arg(t.cuda_slice_mut::<f32>("checkpoints")?),
        None => args.arg(&null),
    };
    args.arg(&p);
    // SAFETY: selective_scan_fwd_<T>_s<SPT>_l<NT>(u, delta, A, Bv, Bc, Cv, Cc, D, z, bias, h0,
    // resets, out, last_state, ckpt, ScanParams): ScanInputs::dims checked every shape,
    // element type and device; u, delta, z, out hold batch*dim*len T, A dim*dstate f32,
    // Bv/Cv batch*groups*dstate*len T or Bc/Cc dim*dstate f32 (the other null and unread,
    // selected by b_variable / c_variable), D and bias dim f32, h0 and last_state
    // batch*dim*dstate f32, resets batch*len bytes, ckpt batch*n_ckpt*dim*dstate f32; absent
    // ones are null and their has_* flag is 0. The grid covers groups x channel blocks x
    // batch; smem is Geometry::forward_smem (the layout the kernel computes), allowed above.
    unsafe { args.launch(grid(dims, &g, smem)) }.map_err(|e| dev.map_err("launching selective_scan_fwd", e))?;
    Ok((ScanOutput { out, last_state: last }, ScanCheckpoints { states: ckpt, interval }))
}

fn push_bc<'a, T: CudaElement>(
    args: &mut cudarc::driver::LaunchArgs<'a>,
    t: &'a Tensor,
    variable: bool,
    arg: &'static str,
    null: &'a u64,
) -> Result<()> {
    if variable {
        args.arg(t.cuda_slice::<T>(arg)?).arg(null);
    } else {
        args.arg(null).arg(t.cuda_slice::<f32>(arg)?);
    }
    Ok(())
}

pub(super) fn backward(
    dev: &CudaDevice,
    inputs: &ScanInputs,
    dims: &ScanDims,
    dout: &Tensor,
    dlast: Option<&Tensor>,
    checkpoints: Option<&ScanCheckpoints>,
) -> Result<ScanGrads> {
    if degenerate(dims) {
        let device = crate::Device::Cuda(dev.clone());
        let cpu_inputs = CpuCopies::new(inputs)?;
        let dout = dout.to_device(&crate::Device::Cpu)?;
        let dlast = dlast.map(|t| t.to_device(&crate::Device::Cpu)).transpose()?;
        let g = super::selective_scan_backward(&cpu_inputs.inputs(inputs), &dout, dlast.as_ref(), None)?;
        let to = |t: Tensor| t.to_device(&device);
        let opt = |t: Option<Tensor>| t.map(to).transpose();
        return Ok(ScanGrads {
            du: to(g.du)?,
            ddelta: to(g.ddelta)?,
            da: to(g.da)?,
            db: to(g.db)?,
            dc: to(g.dc)?,
            dd: opt(g.dd)?,
            dz: opt(g.dz)?,
            ddelta_bias: opt(g.ddelta_bias)?,
            dh0: opt(g.dh0)?,
        });
    }
    match dims.dtype {
        DType::F32 => backward_typed::<f32>(dev, inputs, dims, dout, dlast, checkpoints),
        DType::BF16 => backward_typed::<bf16>(dev, inputs, dims, dout, dlast, checkpoints),
        DType::F16 => backward_typed::<f16>(dev, inputs, dims, dout, dlast, checkpoints),
    }
}

/// Host copies of a scan's inputs (for the empty-problem path).
struct CpuCopies {
    t: Vec<Option<Tensor>>,
}

impl CpuCopies {
    fn new(i: &ScanInputs) -> Result<CpuCopies> {
        let host = |t: Option<&Tensor>| t.map(|t| t.to_device(&crate::Device::Cpu)).transpose();
        Ok(CpuCopies {
            t: vec![
                host(Some(i.u))?,
                host(Some(i.delta))?,
                host(Some(i.a))?,
                host(Some(i.b))?,
                host(Some(i.c))?,
                host(i.d)?,
                host(i.z)?,
                host(i.delta_bias)?,
                host(i.h0)?,
            ],
        })
    }

    fn inputs<'a>(&'a self, i: &ScanInputs<'a>) -> ScanInputs<'a> {
        let t = |k: usize| self.t[k].as_ref();
        ScanInputs {
            u: t(0).unwrap_or(i.u),
            delta: t(1).unwrap_or(i.delta),
            a: t(2).unwrap_or(i.a),
            b: t(3).unwrap_or(i.b),
            c: t(4).unwrap_or(i.c),
            d: t(5),
            z: t(6),
            delta_bias: t(7),
            h0: t(8),
            ..*i
        }
    }
}

fn backward_typed<T: CudaElement>(
    dev: &CudaDevice,
    inputs: &ScanInputs,
    dims: &ScanDims,
    dout: &Tensor,
    dlast: Option<&Tensor>,
    checkpoints: Option<&ScanCheckpoints>,
) -> Result<ScanGrads> {
    let g = Geometry::backward(dims.dstate, dims.dtype);
    let interval = g.backward_tile();
    let n_ckpt = dims.len.div_ceil(interval);
    let made;
    let ckpt = match checkpoints {
        Some(c) => {
            let states = c.states.as_ref().ok_or_else(|| {
                Error::invalid("checkpoints", "checkpoints from selective_scan_for_backward on a CUDA device", "none")
            })?;
            if c.interval != interval {
                return Err(Error::invalid("checkpoints", format!("interval {interval}"), c.interval.to_string()));
            }
            states.expect_shape("checkpoints", &[dims.batch, n_ckpt, dims.dim, dims.dstate])?;
            states.expect_device("checkpoints", &inputs.u.device())?;
            states
        }
        None => {
            made = forward_typed::<T>(dev, inputs, dims, true)?.1;
            made.states.as_ref().ok_or_else(|| Error::invalid("checkpoints", "made by the forward", "none"))?
        }
    };
    let mut p = params(dims, inputs)?;
    p.tile = interval as u32;
    p.ckpt_interval = interval as u32;
    p.n_ckpt = n_ckpt as u32;
    p.has_dlast = u32::from(dlast.is_some());
    let blocks_per_group = (dims.dim / dims.groups).div_ceil(g.channels_per_block());
    let shape = inputs.u.shape();
    let dt = dims.dtype;
    // SAFETY (allocations): the backward kernel writes every valid (b, d, t) of du, ddelta
    // and (with z) dz, every (b, d) row of param_partial, every (b, d, n) of dh0 (with h0)
    // and, when B or C varies in time, every (b, g, block, which, n, t) of bc_partial; the
    // reduce kernels write every element of db / dc / da / dd / dbias they are given.
    let mut du = unsafe { Tensor::cuda_uninit(dev, dt, shape)? };
    let mut ddelta = unsafe { Tensor::cuda_uninit(dev, dt, shape)? };
    let mut dz = match inputs.z {
        Some(_) => Some(unsafe { Tensor::cuda_uninit(dev, dt, shape)? }),
        None => None,
    };
    let bc_var = dims.b_variable || dims.c_variable;
    let mut bc_partial = if bc_var {
        Some(unsafe {
            Tensor::cuda_uninit(
                dev,
                DType::F32,
                &[dims.batch * dims.groups * blocks_per_group * 2, dims.dstate, dims.len],
            )?
        })
    } else {
        None
    };
    let row = 3 * dims.dstate + 2;
    let mut param_partial = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[dims.batch, dims.dim, row])? };
    let mut dh0 = match inputs.h0 {
        Some(_) => Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, &dims.state_shape())? }),
        None => None,
    };
    let resets = resets_on(dev, inputs)?;
    let null = 0u64;
    {
        let f = dev.function(KernelModule::SelectiveScanBackward, &g.kernel())?;
        let smem = g.backward_smem();
        allow_smem(dev, &f, smem)?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(inputs.u.cuda_slice::<T>("u")?)
            .arg(inputs.delta.cuda_slice::<T>("delta")?)
            .arg(inputs.a.cuda_slice::<f32>("A")?);
        push_bc::<T>(&mut args, inputs.b, dims.b_variable, "B", &null)?;
        push_bc::<T>(&mut args, inputs.c, dims.c_variable, "C", &null)?;
        push_opt::<f32>(&mut args, inputs.d, "D", &null)?;
        push_opt::<T>(&mut args, inputs.z, "z", &null)?;
        push_opt::<f32>(&mut args, inputs.delta_bias, "delta_bias", &null)?;
        match &resets {
            Some(r) => args.arg(r.as_ref()),
            None => args.arg(&null),
        };
        args.arg(dout.cuda_slice::<T>("dout")?);
        push_opt::<f32>(&mut args, dlast, "dlast_state", &null)?;
        args.arg(ckpt.cuda_slice::<f32>("checkpoints")?)
            .arg(du.cuda_slice_mut::<T>("du")?)
            .arg(ddelta.cuda_slice_mut::<T>("ddelta")?);
        match dz.as_mut() {
            Some(t) => args.arg(t.cuda_slice_mut::<T>("dz")?),
            None => args.arg(&null),
        };
        match bc_partial.as_mut() {
            Some(t) => args.arg(t.cuda_slice_mut::<f32>("bc_partial")?),
            None => args.arg(&null),
        };
        args.arg(param_partial.cuda_slice_mut::<f32>("param_partial")?);
        match dh0.as_mut() {
            Some(t) => args.arg(t.cuda_slice_mut::<f32>("dh0")?),
            None => args.arg(&null),
        };
        args.arg(&p);
        // SAFETY: selective_scan_bwd_<T>_s<SPT>_l<NT>(u, delta, A, Bv, Bc, Cv, Cc, D, z, bias,
        // resets, dout, dlast, ckpt, du, ddelta, dz, bc_partial, param_partial, dh0,
        // ScanParams): inputs as for the forward (checked by ScanInputs::dims); dout and the
        // du / ddelta / dz outputs batch*dim*len T; dlast and dh0 batch*dim*dstate f32;
        // ckpt batch*n_ckpt*dim*dstate f32 (shape checked, or made just above with this
        // interval); bc_partial batch*groups*blocks_per_group*2*dstate*len f32;
        // param_partial batch*dim*(3*dstate+2) f32. Absent ones are null with their flag 0.
        // smem is backward_smem_floats(interval) * 4 bytes, allowed above.
        unsafe { args.launch(grid(dims, &g, smem)) }.map_err(|e| dev.map_err("launching selective_scan_bwd", e))?;
    }
    let (mut db, mut dc) = (None, None);
    if let Some(partial) = &bc_partial {
        let kernel = kernel_name("selective_scan", "reduce_bc", dt, "");
        let n = dims.batch * dims.groups * dims.dstate * dims.len;
        // SAFETY (allocations): selective_scan_reduce_bc writes every element of each
        // time-varying one.
        let mut b_t =
            if dims.b_variable { Some(unsafe { Tensor::cuda_uninit(dev, dt, inputs.b.shape())? }) } else { None };
        let mut c_t =
            if dims.c_variable { Some(unsafe { Tensor::cuda_uninit(dev, dt, inputs.c.shape())? }) } else { None };
        let f = dev.function(KernelModule::SelectiveScanBackward, &kernel)?;
        let cfg = dev.grid_stride_config(KernelModule::SelectiveScanBackward, &kernel, 256, n, 256)?;
        let bpg = blocks_per_group as u32;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(partial.cuda_slice::<f32>("bc_partial")?);
        match b_t.as_mut() {
            Some(t) => args.arg(t.cuda_slice_mut::<T>("dB")?),
            None => args.arg(&null),
        };
        match c_t.as_mut() {
            Some(t) => args.arg(t.cuda_slice_mut::<T>("dC")?),
            None => args.arg(&null),
        };
        args.arg(&p).arg(&bpg);
        // SAFETY: selective_scan_reduce_bc_<T>(partial, db, dc, ScanParams, blocks_per_group):
        // partial holds batch*groups*bpg*2*dstate*len f32 (allocated above with this bpg);
        // db / dc batch*groups*dstate*len T, each written only when b_variable / c_variable
        // (and null otherwise).
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching selective_scan_reduce_bc", e))?;
        db = b_t;
        dc = c_t;
    }
    // SAFETY (allocations): selective_scan_reduce_params writes every element of da, of the
    // constant dB / dC, and of dd / dbias when present.
    let mut da = unsafe { Tensor::cuda_uninit(dev, DType::F32, inputs.a.shape())? };
    let mut db_const =
        if dims.b_variable { None } else { Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, inputs.b.shape())? }) };
    let mut dc_const =
        if dims.c_variable { None } else { Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, inputs.c.shape())? }) };
    let mut dd = match inputs.d {
        Some(_) => Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, &[dims.dim])? }),
        None => None,
    };
    let mut dbias = match inputs.delta_bias {
        Some(_) => Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, &[dims.dim])? }),
        None => None,
    };
    {
        let kernel = "selective_scan_reduce_params";
        let f = dev.function(KernelModule::SelectiveScanBackward, kernel)?;
        let cfg = dev.grid_stride_config(KernelModule::SelectiveScanBackward, kernel, 256, dims.dim * row, 256)?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(param_partial.cuda_slice::<f32>("param_partial")?).arg(da.cuda_slice_mut::<f32>("dA")?);
        for (t, name) in [(&mut db_const, "dB"), (&mut dc_const, "dC"), (&mut dd, "dD"), (&mut dbias, "ddelta_bias")] {
            match t.as_mut() {
                Some(t) => args.arg(t.cuda_slice_mut::<f32>(name)?),
                None => args.arg(&null),
            };
        }
        args.arg(&p);
        // SAFETY: selective_scan_reduce_params(partial, dA, dB, dC, dD, dbias, ScanParams):
        // partial holds batch*dim*(3*dstate+2) f32; dA dim*dstate; dB / dC dim*dstate, written
        // only when constant (else null); dD / dbias dim, written only with has_d / has_bias.
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching selective_scan_reduce_params", e))?;
    }
    let pick = |var: Option<Tensor>, cst: Option<Tensor>| {
        var.or(cst).ok_or_else(|| Error::invalid("B", "a time-varying or a constant layout", "neither"))
    };
    Ok(ScanGrads { du, ddelta, da, db: pick(db, db_const)?, dc: pick(dc, dc_const)?, dd, dz, ddelta_bias: dbias, dh0 })
}

pub(super) fn state_update(
    dev: &CudaDevice,
    state: &mut Tensor,
    inputs: &super::StepInputs,
    dims: &ScanDims,
) -> Result<Tensor> {
    match dims.dtype {
        DType::F32 => state_update_typed::<f32>(dev, state, inputs, dims),
        DType::BF16 => state_update_typed::<bf16>(dev, state, inputs, dims),
        DType::F16 => state_update_typed::<f16>(dev, state, inputs, dims),
    }
}

/// `hk_scan::step_lanes` in cuda/selective_scan/selective_scan.cuh: lanes per (batch, channel) row of the
/// decoding step, four states each, for dstate = 8, 16, .. 128; one otherwise.
fn step_lanes(dstate: usize) -> usize {
    if (8..=128).contains(&dstate) && dstate.is_power_of_two() {
        dstate / 4
    } else {
        1
    }
}

fn state_update_typed<T: CudaElement>(
    dev: &CudaDevice,
    state: &mut Tensor,
    inputs: &super::StepInputs,
    dims: &ScanDims,
) -> Result<Tensor> {
    // SAFETY (allocation): the kernel writes out for every (batch, channel).
    let mut out = unsafe { Tensor::cuda_uninit(dev, dims.dtype, &[dims.batch, dims.dim])? };
    let rows = dims.batch * dims.dim;
    if rows == 0 {
        return Ok(out);
    }
    if dims.dim > u32::MAX as usize || dims.batch > u32::MAX as usize {
        return Err(Error::invalid("x", "batch and dim below 2^32", format!("{} x {}", dims.batch, dims.dim)));
    }
    let p = ScanParams {
        batch: dims.batch as u32,
        dim: dims.dim as u32,
        dstate: dims.dstate as u32,
        len: 1,
        groups: dims.groups as u32,
        b_variable: u32::from(dims.b_variable),
        c_variable: u32::from(dims.c_variable),
        has_d: u32::from(inputs.d.is_some()),
        has_z: u32::from(inputs.z.is_some()),
        has_bias: u32::from(inputs.dt_bias.is_some()),
        softplus: u32::from(inputs.dt_softplus),
        ..ScanParams::default()
    };
    let kernel = kernel_name("selective_state", "update", dims.dtype, "");
    let f = dev.function(KernelModule::SelectiveScanStep, &kernel)?;
    let items = rows * step_lanes(dims.dstate);
    let cfg = dev.grid_stride_config(KernelModule::SelectiveScanStep, &kernel, 128, items, 128)?;
    let null = 0u64;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(state.cuda_slice_mut::<f32>("state")?)
        .arg(inputs.x.cuda_slice::<T>("x")?)
        .arg(inputs.dt.cuda_slice::<T>("dt")?)
        .arg(inputs.a.cuda_slice::<f32>("A")?);
    push_bc::<T>(&mut args, inputs.b, dims.b_variable, "B", &null)?;
    push_bc::<T>(&mut args, inputs.c, dims.c_variable, "C", &null)?;
    push_opt::<f32>(&mut args, inputs.d, "D", &null)?;
    push_opt::<T>(&mut args, inputs.z, "z", &null)?;
    push_opt::<f32>(&mut args, inputs.dt_bias, "dt_bias", &null)?;
    args.arg(out.cuda_slice_mut::<T>("out")?).arg(&p);
    // SAFETY: selective_state_update_<T>(state, x, dt, A, Bv, Bc, Cv, Cc, D, z, bias, out,
    // ScanParams): StepInputs::dims checked every shape, type and device; state holds
    // batch*dim*dstate f32 (each state read and written by one thread only; with
    // step_lanes > 1, dstate a multiple of 4 keeps the rows' 16-byte accesses aligned), x, dt, z, out
    // batch*dim T, A dim*dstate f32, Bv/Cv batch*groups*dstate T or Bc/Cc dim*dstate f32 (the
    // other null, selected by b_variable / c_variable), D and bias dim f32; absent ones null
    // with their flag 0.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching selective_state_update", e))?;
    Ok(out)
}
