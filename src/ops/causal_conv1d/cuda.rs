//! Launches of `cuda/causal_conv1d.cu`.

use super::{cpu, ConvDims, ConvGrads, ConvInputs, ConvOutput, UpdateDims};
use crate::device::CudaDevice;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{kernel_name, KernelModule};
use crate::ops::push_opt;
use crate::tensor::{CudaElement, Tensor};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Mirrors `hk_conv::ConvParams` in cuda/causal_conv1d.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ConvParams {
    batch: u32,
    dim: u32,
    len: u32,
    tiles: u32,
    has_bias: u32,
    silu: u32,
    has_init: u32,
    has_resets: u32,
    has_dfinal: u32,
    state_len: u32,
    tokens: u32,
}
crate::kernels::assert_kernel_params!(ConvParams, 11);

// SAFETY: eleven u32 fields, repr(C), no padding: the same bytes as the C struct.
unsafe impl DeviceRepr for ConvParams {}

/// `hk_conv::THREADS` in the .cu.
const THREADS: usize = 128;

/// Steps per block: THREADS chunks of 32 bytes (`hk_conv::chunk_of`).
fn tile(dtype: DType) -> usize {
    THREADS * 32 / dtype.size_in_bytes()
}
const MAX_GRID_X: usize = i32::MAX as usize;

/// Which kernel of cuda/causal_conv1d.cu: the passes have a variant for packed rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Forward { resets: bool },
    Backward { resets: bool },
    Update,
}

/// `causal_conv1d_<fwd|bwd|update>_<dtype>_w<width>[_resets]`.
fn conv_kernel(kernel: Kernel, dtype: DType, width: usize) -> String {
    let (variant, resets) = match kernel {
        Kernel::Forward { resets } => ("fwd", resets),
        Kernel::Backward { resets } => ("bwd", resets),
        Kernel::Update => ("update", false),
    };
    kernel_name("causal_conv1d", variant, dtype, &format!("_w{width}{}", if resets { "_resets" } else { "" }))
}

fn params(dims: &ConvDims, inputs: &ConvInputs) -> Result<(ConvParams, LaunchConfig)> {
    let tile = tile(dims.dtype);
    let tiles = dims.len.div_ceil(tile);
    let rows = dims.batch * dims.dim;
    if dims.len > i32::MAX as usize - tile || dims.dim > u32::MAX as usize || dims.batch > u32::MAX as usize {
        return Err(Error::invalid(
            "x",
            format!("batch and dim below 2^32, len below 2^31 - {tile}"),
            format!("shape {:?}", inputs.x.shape()),
        ));
    }
    let blocks = rows.checked_mul(tiles).filter(|&b| b <= MAX_GRID_X).ok_or_else(|| {
        Error::invalid(
            "x",
            format!("batch * dim * ceil(len / {tile}) up to {MAX_GRID_X} blocks"),
            format!("shape {:?}", inputs.x.shape()),
        )
    })?;
    let p = ConvParams {
        batch: dims.batch as u32,
        dim: dims.dim as u32,
        len: dims.len as u32,
        tiles: tiles as u32,
        has_bias: u32::from(inputs.bias.is_some()),
        silu: u32::from(inputs.silu),
        has_init: u32::from(inputs.initial_state.is_some()),
        has_resets: u32::from(inputs.resets.is_some()),
        ..ConvParams::default()
    };
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 };
    Ok((p, cfg))
}

/// Empty problems (no batch, channel or step) go through the reference and are copied over.
fn degenerate(dims: &ConvDims) -> bool {
    dims.batch == 0 || dims.dim == 0 || dims.len == 0
}

pub(super) fn forward(dev: &CudaDevice, inputs: &ConvInputs, dims: &ConvDims) -> Result<ConvOutput> {
    if degenerate(dims) {
        let device = crate::Device::Cuda(dev.clone());
        let f = cpu::forward(&inputs.to_f64()?);
        return Ok(ConvOutput {
            out: Tensor::from_f64_rounded(&f.out, inputs.x.shape(), dims.dtype)?.to_device(&device)?,
            final_state: Tensor::from_f64_rounded(&f.final_state, &dims.state_shape(), dims.dtype)?
                .to_device(&device)?,
        });
    }
    match dims.dtype {
        DType::F32 => forward_typed::<f32>(dev, inputs, dims),
        DType::BF16 => forward_typed::<bf16>(dev, inputs, dims),
        DType::F16 => forward_typed::<f16>(dev, inputs, dims),
    }
}

fn forward_typed<T: CudaElement>(dev: &CudaDevice, inputs: &ConvInputs, dims: &ConvDims) -> Result<ConvOutput> {
    let (p, cfg) = params(dims, inputs)?;
    // SAFETY (allocations): the forward writes every (b, d, t) of out, and the last tile's
    // block of each row writes its width - 1 final-state values (len >= 1 here).
    let mut out = unsafe { Tensor::cuda_uninit(dev, dims.dtype, inputs.x.shape())? };
    let mut final_state = unsafe { Tensor::cuda_uninit(dev, dims.dtype, &dims.state_shape())? };
    let resets = inputs.resets.map(|r| r.on_device(dev)).transpose()?;
    let name = conv_kernel(Kernel::Forward { resets: inputs.resets.is_some() }, dims.dtype, dims.width);
    let f = dev.function(KernelModule::CausalConv1d, &name)?;
    let null = 0u64;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(inputs.x.cuda_slice::<T>("x")?).arg(inputs.weight.cuda_slice::<f32>("weight")?);
    push_opt::<f32>(&mut args, inputs.bias, "bias", &null)?;
    push_opt::<T>(&mut args, inputs.initial_state, "initial_state", &null)?;
    match &resets {
        Some(r) => args.arg(r.as_ref()),
        None => args.arg(&null),
    };
    args.arg(out.cuda_slice_mut::<T>("out")?).arg(final_state.cuda_slice_mut::<T>("final_state")?).arg(&p);
    // SAFETY: causal_conv1d_fwd_<T>_w<W>[_resets](x, weight, bias, init, resets, out, final_state,
    // ConvParams): ConvInputs::dims checked every shape, type and device; x and out hold
    // batch*dim*len T, weight dim*W f32, bias dim f32, init and final_state batch*dim*(W-1)
    // T, resets batch*len bytes; absent ones are null with their flag 0. The grid is
    // batch*dim*tiles blocks of THREADS, each reading and writing only its row's tile.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching causal_conv1d_fwd", e))?;
    Ok(ConvOutput { out, final_state })
}

pub(super) fn backward(
    dev: &CudaDevice,
    inputs: &ConvInputs,
    dims: &ConvDims,
    dout: &Tensor,
    dfinal: Option<&Tensor>,
) -> Result<ConvGrads> {
    if degenerate(dims) {
        let device = crate::Device::Cuda(dev.clone());
        let host = |t: &Tensor| t.to_device(&crate::Device::Cpu);
        let (x, weight, dout) = (host(inputs.x)?, host(inputs.weight)?, host(dout)?);
        let bias = inputs.bias.map(host).transpose()?;
        let init = inputs.initial_state.map(host).transpose()?;
        let dfinal = dfinal.map(host).transpose()?;
        let cpu_inputs =
            ConvInputs { x: &x, weight: &weight, bias: bias.as_ref(), initial_state: init.as_ref(), ..*inputs };
        let g = super::causal_conv1d_backward(&cpu_inputs, &dout, dfinal.as_ref())?;
        let mv = |t: Option<Tensor>| t.map(|t| t.to_device(&device)).transpose();
        return Ok(ConvGrads {
            dx: g.dx.to_device(&device)?,
            dweight: g.dweight.to_device(&device)?,
            dbias: mv(g.dbias)?,
            dinitial_state: mv(g.dinitial_state)?,
        });
    }
    match dims.dtype {
        DType::F32 => backward_typed::<f32>(dev, inputs, dims, dout, dfinal),
        DType::BF16 => backward_typed::<bf16>(dev, inputs, dims, dout, dfinal),
        DType::F16 => backward_typed::<f16>(dev, inputs, dims, dout, dfinal),
    }
}

fn backward_typed<T: CudaElement>(
    dev: &CudaDevice,
    inputs: &ConvInputs,
    dims: &ConvDims,
    dout: &Tensor,
    dfinal: Option<&Tensor>,
) -> Result<ConvGrads> {
    let (mut p, cfg) = params(dims, inputs)?;
    p.has_dfinal = u32::from(dfinal.is_some());
    let w = dims.width;
    // SAFETY (allocations): every (b, d, t) of dx is written by its tile's block, dinit by
    // the first tile's block of each row, each partial row by its block, and dweight / dbias
    // (with a bias) by the reduce.
    let mut dx = unsafe { Tensor::cuda_uninit(dev, dims.dtype, inputs.x.shape())? };
    let mut dinit = match inputs.initial_state {
        Some(_) => Some(unsafe { Tensor::cuda_uninit(dev, dims.dtype, &dims.state_shape())? }),
        None => None,
    };
    let slices = dims.batch * p.tiles as usize;
    let mut partial = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[slices, dims.dim, w + 1])? };
    let mut dweight = unsafe { Tensor::cuda_uninit(dev, DType::F32, &[dims.dim, w])? };
    let mut dbias = match inputs.bias {
        Some(_) => Some(unsafe { Tensor::cuda_uninit(dev, DType::F32, &[dims.dim])? }),
        None => None,
    };
    let resets = inputs.resets.map(|r| r.on_device(dev)).transpose()?;
    let null = 0u64;
    {
        let name = conv_kernel(Kernel::Backward { resets: inputs.resets.is_some() }, dims.dtype, w);
        let f = dev.function(KernelModule::CausalConv1d, &name)?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(inputs.x.cuda_slice::<T>("x")?).arg(inputs.weight.cuda_slice::<f32>("weight")?);
        push_opt::<f32>(&mut args, inputs.bias, "bias", &null)?;
        push_opt::<T>(&mut args, inputs.initial_state, "initial_state", &null)?;
        match &resets {
            Some(r) => args.arg(r.as_ref()),
            None => args.arg(&null),
        };
        args.arg(dout.cuda_slice::<T>("dout")?);
        push_opt::<T>(&mut args, dfinal, "dfinal_state", &null)?;
        args.arg(dx.cuda_slice_mut::<T>("dx")?);
        match dinit.as_mut() {
            Some(t) => args.arg(t.cuda_slice_mut::<T>("dinitial_state")?),
            None => args.arg(&null),
        };
        args.arg(partial.cuda_slice_mut::<f32>("partial")?).arg(&p);
        // SAFETY: causal_conv1d_bwd_<T>_w<W>[_resets](x, weight, bias, init, resets, dout, dfinal, dx,
        // dinit, partial, ConvParams): shapes, types and devices checked by dims() and
        // causal_conv1d_backward; x, dout, dx hold batch*dim*len T, weight dim*W f32, bias dim
        // f32, init, dfinal, dinit batch*dim*(W-1) T, resets batch*len bytes, partial
        // batch*tiles*dim*(W+1) f32; absent ones null with their flag 0 (dinit only with init).
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching causal_conv1d_bwd", e))?;
    }
    {
        let name =
            ["causal_conv1d_reduce_weight_w2", "causal_conv1d_reduce_weight_w3", "causal_conv1d_reduce_weight_w4"]
                [w - super::MIN_WIDTH];
        let f = dev.function(KernelModule::CausalConv1d, name)?;
        let cfg = dev.grid_stride_config(KernelModule::CausalConv1d, name, 256, dims.dim * (w + 1), 256)?;
        let mut args = dev.stream().launch_builder(&f);
        args.arg(partial.cuda_slice::<f32>("partial")?).arg(dweight.cuda_slice_mut::<f32>("dweight")?);
        match dbias.as_mut() {
            Some(t) => args.arg(t.cuda_slice_mut::<f32>("dbias")?),
            None => args.arg(&null),
        };
        args.arg(&p);
        // SAFETY: causal_conv1d_reduce_weight_w<W>(partial, dweight, dbias, ConvParams):
        // partial holds batch*tiles*dim*(W+1) f32 written above, dweight dim*W f32, dbias dim
        // f32 (null and unwritten without a bias).
        unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching causal_conv1d_reduce_weight", e))?;
    }
    Ok(ConvGrads { dx, dweight, dbias, dinitial_state: dinit })
}

pub(super) fn update(
    dev: &CudaDevice,
    state: &mut Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
    dims: &UpdateDims,
) -> Result<Tensor> {
    match dims.dtype {
        DType::F32 => update_typed::<f32>(dev, state, x, weight, bias, silu, dims),
        DType::BF16 => update_typed::<bf16>(dev, state, x, weight, bias, silu, dims),
        DType::F16 => update_typed::<f16>(dev, state, x, weight, bias, silu, dims),
    }
}

fn update_typed<T: CudaElement>(
    dev: &CudaDevice,
    state: &mut Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
    dims: &UpdateDims,
) -> Result<Tensor> {
    // SAFETY (allocation): the kernel writes every token of every (batch, channel) row.
    let mut out = unsafe { Tensor::cuda_uninit(dev, dims.dtype, x.shape())? };
    let rows = dims.batch * dims.dim;
    if rows == 0 || dims.tokens == 0 {
        return Ok(out);
    }
    if dims.batch > u32::MAX as usize
        || dims.dim > u32::MAX as usize
        || dims.state_len > u32::MAX as usize
        || dims.tokens > u32::MAX as usize
    {
        return Err(Error::invalid(
            "x",
            "batch, dim, tokens and state_len below 2^32",
            format!("x {:?}, state {:?}", x.shape(), state.shape()),
        ));
    }
    let p = ConvParams {
        batch: dims.batch as u32,
        dim: dims.dim as u32,
        has_bias: u32::from(bias.is_some()),
        silu: u32::from(silu),
        state_len: dims.state_len as u32,
        tokens: dims.tokens as u32,
        ..ConvParams::default()
    };
    let name = conv_kernel(Kernel::Update, dims.dtype, dims.width);
    let f = dev.function(KernelModule::CausalConv1d, &name)?;
    let cfg = dev.grid_stride_config(KernelModule::CausalConv1d, &name, 128, rows, 128)?;
    let null = 0u64;
    let mut args = dev.stream().launch_builder(&f);
    args.arg(state.cuda_slice_mut::<T>("state")?).arg(x.cuda_slice::<T>("x")?).arg(weight.cuda_slice::<f32>("weight")?);
    push_opt::<f32>(&mut args, bias, "bias", &null)?;
    args.arg(out.cuda_slice_mut::<T>("out")?).arg(&p);
    // SAFETY: causal_conv1d_update_<T>_w<W>(state, x, weight, bias, out, ConvParams): shapes,
    // types and devices checked by update_dims; state holds batch*dim*state_len T (each row
    // read and written by its own thread), x and out batch*dim*tokens T, weight dim*W f32,
    // bias dim f32 or null with has_bias 0.
    unsafe { args.launch(cfg) }.map_err(|e| dev.map_err("launching causal_conv1d_update", e))?;
    Ok(out)
}
