//! The ops. On the CPU they run as fused custom ops (`fused` (private)) with analytic backward
//! passes; on other devices they fall back to [`crate::composite`], built from candle
//! primitives whose backward passes are correct. Both paths give the same values and gradients
//! (checked in `tests/`).

use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, D,
};

use candle_core::backend::BackendStorage;

use crate::composite;
use crate::fused::{compute_dtype, NormOp, SoftmaxLastDim, UpsampleNearest};

/// Runs `f` in the fused kernels' compute dtype (f32 for f16/bf16) and casts the result back.
fn in_compute_dtype(
    x: &Tensor,
    what: &str,
    f: impl FnOnce(&Tensor, DType) -> Result<Tensor>,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let Some(cdt) = compute_dtype(dtype) else {
        bail!("{what}: unsupported dtype {dtype:?} (floats only)")
    };
    if cdt == dtype {
        f(&x.contiguous()?, cdt)
    } else {
        f(&x.to_dtype(cdt)?.contiguous()?, cdt)?.to_dtype(dtype)
    }
}

/// Softmax over the last dimension, numerically stabilised. `x`: `(..., N)` → same shape.
///
/// Backward: `dx = y ⊙ (g − Σ g⊙y)` (fused on the CPU).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return composite::softmax_last_dim(x);
    }
    in_compute_dtype(x, "softmax_last_dim", |x, _| x.apply_op1(SoftmaxLastDim))
}

/// `t` converted to `dtype` and made contiguous, or `fill` of `n` values when `t` is `None`;
/// checks that it has `n` elements.
fn affine_param(
    t: Option<&Tensor>,
    n: usize,
    fill: f64,
    dtype: DType,
    like: &Tensor,
    what: &str,
) -> Result<Tensor> {
    match t {
        Some(t) => {
            if t.elem_count() != n {
                bail!(
                    "{what} has shape {:?}, expected {n} elements for input {:?}",
                    t.dims(),
                    like.dims()
                )
            }
            t.to_dtype(dtype)?.contiguous()
        }
        None => Tensor::full(fill, n, like.device())?.to_dtype(dtype),
    }
}

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
/// `x`: `(..., N)`; `weight`, `bias`: `(N)` → `(..., N)`. Computed in f32 for f16/bf16 inputs
/// (statistics in f64). Gradients reach `x`, `weight` and `bias`.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return composite::layer_norm(x, weight, bias, eps);
    }
    let n = x.dim(D::Minus1)?;
    in_compute_dtype(x, "layer_norm", |xc, cdt| {
        let w = affine_param(weight, n, 1.0, cdt, x, "layer_norm weight")?;
        let b = affine_param(bias, n, 0.0, cdt, x, "layer_norm bias")?;
        let op =
            NormOp { eps, groups: None, has_weight: weight.is_some(), has_bias: bias.is_some() };
        xc.apply_op3(&w, &b, op)
    })
}

/// Group norm: normalises each of `num_groups` groups of channels over the group's channels
/// and all spatial positions, then scales and shifts per channel.
/// `x`: `(B, C, ...)` with `C` divisible by `num_groups`; `weight`, `bias`: `(C)` → same shape
/// as `x`. Computed in f32 for f16/bf16 inputs (statistics in f64). Gradients reach `x`,
/// `weight` and `bias`.
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || num_groups == 0 || dims[1] % num_groups != 0 {
        bail!("group_norm: {num_groups} groups do not divide the channels of shape {dims:?}")
    }
    if !x.device().is_cpu() {
        return composite::group_norm(x, num_groups, weight, bias, eps);
    }
    let c = dims[1];
    in_compute_dtype(x, "group_norm", |xc, cdt| {
        let w = affine_param(weight, c, 1.0, cdt, x, "group_norm weight")?;
        let b = affine_param(bias, c, 0.0, cdt, x, "group_norm bias")?;
        let op = NormOp {
            eps,
            groups: Some(num_groups),
            has_weight: weight.is_some(),
            has_bias: bias.is_some(),
        };
        xc.apply_op3(&w, &b, op)
    })
}

/// Options of [`attention`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionConfig {
    /// Scale of the logits; `None` means `1/sqrt(D)`.
    pub scale: Option<f64>,
    /// Process queries in chunks of this many rows, bounding the `(Lq, Lk)` logits memory.
    ///
    /// On the CPU this runs a fused op that keeps only `q`, `k`, `v` and the output for the
    /// backward pass and recomputes each chunk's probabilities there, so at most one chunk's
    /// `(chunk, Lk)` logits are alive at any time, in inference and in training. Values and
    /// gradients equal the unchunked path's up to rounding.
    pub chunk_size: Option<usize>,
    /// Mask out keys after the query position (CLIP's text transformer): query `i` attends to
    /// keys `j <= i`.
    pub causal: bool,
}

/// Scaled dot-product attention `softmax(q kᵀ·scale [+ causal mask]) v`.
/// `q`: `(B, H, Lq, D)`, `k`: `(B, H, Lk, D)`, `v`: `(B, H, Lk, Dv)` → `(B, H, Lq, Dv)`.
/// (Any rank ≥ 2 works: the last two dimensions are the sequence and features.)
///
/// Without `chunk_size` the probabilities are kept for the backward pass (fastest); with it,
/// see [`AttentionConfig::chunk_size`]. On the CPU, f16/bf16 inputs are computed in f32.
///
/// Design note: the chunked op's kernels are candle's own matmuls plus the fused softmax (a
/// hand-written fused CPU attention kernel would not beat candle's gemm); what the custom op
/// buys is the memory bound in training, by recomputing probabilities in the backward pass
/// (measured: same forward + backward time as the unchunked path at L = 1024, chunk 256).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttentionConfig) -> Result<Tensor> {
    let r = q.rank();
    if r < 2 || k.rank() != r || v.rank() != r {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} must have the same rank >= 2",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let (lq, d) = (q.dim(r - 2)?, q.dim(r - 1)?);
    let (lk, dk) = (k.dim(r - 2)?, k.dim(r - 1)?);
    if dk != d
        || v.dim(r - 2)? != lk
        || q.dims()[..r - 2] != k.dims()[..r - 2]
        || k.dims()[..r - 2] != v.dims()[..r - 2]
    {
        bail!("attention: incompatible shapes q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims())
    }
    let scale = cfg.scale.unwrap_or(1.0 / (d as f64).sqrt());
    match cfg.chunk_size {
        Some(c) if q.device().is_cpu() && lq > 0 => {
            let op = AttentionOp { scale, chunk: c.clamp(1, lq), causal: cfg.causal };
            in_compute_dtype(q, "attention", |qc, cdt| {
                qc.apply_op3(&k.to_dtype(cdt)?.contiguous()?, &v.to_dtype(cdt)?.contiguous()?, op)
            })
        }
        // candle's CPU backend has no bf16 matmul and a slow f16 one: compute in f32 there.
        _ if q.device().is_cpu() && matches!(q.dtype(), DType::F16 | DType::BF16) => {
            let (q32, k32, v32) =
                (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
            composite::attention_with(&q32, &k32, &v32, cfg, softmax_last_dim)?.to_dtype(q.dtype())
        }
        _ => composite::attention_with(q, k, v, cfg, softmax_last_dim),
    }
}

/// Fused, memory-bounded attention: `(q, k, v)` → output; backward recomputes each chunk.
struct AttentionOp {
    scale: f64,
    chunk: usize,
    causal: bool,
}

/// A CPU tensor holding a copy of the contiguous data of `s`/`l`.
fn cpu_tensor<T: WithDType>(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let data = s.as_slice::<T>()?;
    let Some((a, b)) = l.contiguous_offsets() else { bail!("attention: non-contiguous input") };
    Tensor::from_slice(&data[a..b], l.dims(), &candle_core::Device::Cpu)
}

impl AttentionOp {
    /// Chunked forward on tensors that track no gradients.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let cfg = AttentionConfig {
            scale: Some(self.scale),
            chunk_size: Some(self.chunk),
            causal: self.causal,
        };
        composite::attention_with(q, k, v, &cfg, softmax_last_dim)
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "gen-chunked-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (sq, sk, sv) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let o = self.forward(
                    &cpu_tensor::<f32>(sq, lq)?,
                    &cpu_tensor::<f32>(sk, lk)?,
                    &cpu_tensor::<f32>(sv, lv)?,
                )?;
                (CpuStorage::F32(o.flatten_all()?.to_vec1()?), o.shape().clone())
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let o = self.forward(
                    &cpu_tensor::<f64>(sq, lq)?,
                    &cpu_tensor::<f64>(sk, lk)?,
                    &cpu_tensor::<f64>(sv, lv)?,
                )?;
                (CpuStorage::F64(o.flatten_all()?.to_vec1()?), o.shape().clone())
            }
            _ => bail!(
                "{}: unsupported dtypes {:?}, {:?}, {:?}",
                self.name(),
                sq.dtype(),
                sk.dtype(),
                sv.dtype()
            ),
        };
        Ok(out)
    }

    /// Per chunk of queries: `P = softmax(S)`, `dV += Pᵀ dO`, `dP = dO Vᵀ`,
    /// `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = dS K·scale`, `dK += dSᵀ Q·scale`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Gradients are only computed for inputs that are part of a graph.
        let (need_q, need_k, need_v) = (q.track_op(), k.track_op(), v.track_op());
        let (q, k, v, o, g) = (q.detach(), k.detach(), v.detach(), o.detach(), g.detach());
        let r = q.rank();
        let lq = q.dim(r - 2)?;
        let kt = k.t()?.contiguous()?;
        let vt = v.t()?.contiguous()?;
        let mut dq = Vec::new();
        let mut dk = k.zeros_like()?;
        let mut dv = v.zeros_like()?;
        let mut start = 0;
        while start < lq {
            let len = self.chunk.min(lq - start);
            let qc = q.narrow(r - 2, start, len)?.contiguous()?;
            let gc = g.narrow(r - 2, start, len)?.contiguous()?;
            let oc = o.narrow(r - 2, start, len)?;
            let p = composite::probs(&qc, &kt, self.scale, self.causal, start, softmax_last_dim)?;
            if need_v {
                dv = (dv + p.t()?.contiguous()?.matmul(&gc)?)?;
            }
            if need_q || need_k {
                let dp = gc.matmul(&vt)?;
                let rowdot = (&gc * oc)?.sum_keepdim(D::Minus1)?;
                let ds = (dp.broadcast_sub(&rowdot)? * p)?;
                if need_q {
                    dq.push((ds.matmul(&k)? * self.scale)?);
                }
                if need_k {
                    dk = (dk + (ds.t()?.contiguous()?.matmul(&qc)? * self.scale)?)?;
                }
            }
            start += len;
        }
        let dq = if need_q { Some(Tensor::cat(&dq, r - 2)?) } else { None };
        Ok((dq, need_k.then_some(dk), need_v.then_some(dv)))
    }
}

/// Nearest-neighbour upsampling by an integer factor. `x`: `(B, C, H, W)` → `(B, C, sH, sW)`.
///
/// Unlike candle's `upsample_nearest2d`, whose backward overwrites the input's gradient, the
/// gradient here (sum over each `s × s` block) is accumulated with the input's other uses.
pub fn upsample_nearest(x: &Tensor, scale: usize) -> Result<Tensor> {
    if scale == 0 {
        bail!("upsample_nearest: scale must be >= 1")
    }
    x.dims4()?;
    if !x.device().is_cpu() {
        return composite::upsample_nearest(x, scale);
    }
    x.contiguous()?.apply_op1(UpsampleNearest { scale })
}

/// Quick GELU of CLIP: `x · sigmoid(1.702 x)`. Any shape. (candle's sigmoid custom op has a
/// correct backward, so this is a plain composite.)
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// 2-D convolution with a backward pass that works for every geometry.
/// `x`: `(B, C_in, H, W)`, `kernel`: `(C_out, C_in / groups, kh, kw)` →
/// `(B, C_out, H', W')` with `H' = (H + 2p − d(kh − 1) − 1) / s + 1` (same for `W'`).
///
/// candle 0.11.1's conv2d backward derives the transposed convolution's output padding from the
/// height alone, so it fails with a shape error whenever `(H + 2p − k) mod s` differs from
/// `(W + 2p − k) mod s` (e.g. a 5×6 input, padding 1, stride 2). In that case this function
/// pads explicitly and crops the rows/columns the convolution never reads, so both remainders
/// are zero; otherwise it is candle's conv2d unchanged.
///
/// On the CPU in f32/f64 with one group and no dilation it runs as an im2col + GEMM custom op
/// with a GEMM backward (`conv` module), several times faster than candle's backward.
pub fn conv2d(x: &Tensor, kernel: &Tensor, cfg: &candle_nn::Conv2dConfig) -> Result<Tensor> {
    conv2d_bias(x, kernel, None, cfg)
}

/// [`conv2d`] plus a per-channel `bias` `(C_out)`, fused into the CPU GEMM path (the bias
/// gradient is a contiguous sum there, instead of candle's strided reduction).
pub fn conv2d_bias(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    cfg: &candle_nn::Conv2dConfig,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (_, _, kh, kw) = kernel.dims4()?;
    let (p, s, d) = (cfg.padding, cfg.stride.max(1), cfg.dilation.max(1));
    let (ekh, ekw) = (d * (kh - 1) + 1, d * (kw - 1) + 1);
    if h + 2 * p < ekh || w + 2 * p < ekw {
        bail!("conv2d: kernel {kh}x{kw} (dilation {d}) larger than padded input {h}x{w} + 2*{p}")
    }
    if crate::conv::supported(x, kernel, cfg.groups, d) {
        return crate::conv::conv2d_gemm(x, kernel, bias, p, s);
    }
    let y = conv2d_candle(x, kernel, cfg)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// candle's conv2d, padded explicitly when its backward would fail (see [`conv2d`]).
fn conv2d_candle(x: &Tensor, kernel: &Tensor, cfg: &candle_nn::Conv2dConfig) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (_, _, kh, kw) = kernel.dims4()?;
    let (p, s, d) = (cfg.padding, cfg.stride.max(1), cfg.dilation.max(1));
    let (ekh, ekw) = (d * (kh - 1) + 1, d * (kw - 1) + 1);
    let (rh, rw) = ((h + 2 * p - ekh) % s, (w + 2 * p - ekw) % s);
    if rh == rw {
        return x.conv2d(kernel, p, s, d, cfg.groups);
    }
    let xp = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
    let xp = xp.narrow(2, 0, h + 2 * p - rh)?.narrow(3, 0, w + 2 * p - rw)?;
    xp.conv2d(kernel, 0, s, d, cfg.groups)
}
