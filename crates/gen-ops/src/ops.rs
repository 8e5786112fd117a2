//! The ops. First versions are built from candle primitives whose backward passes are correct
//! (exp, sum, broadcast arithmetic, matmul), so gradients flow through them.

use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension, numerically stabilised. Any shape `(..., N)`.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
/// `x`: `(..., N)`; `weight`, `bias`: `(N)`. Computed in f32 for f16/bf16 inputs.
pub fn layer_norm(x: &Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// Group norm. `x`: `(B, C, ...)` with `C` divisible by `num_groups`; `weight`, `bias`: `(C)`.
pub fn group_norm(x: &Tensor, num_groups: usize, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || dims[1] % num_groups != 0 {
        candle_core::bail!("group_norm: {} groups do not divide the channels of shape {dims:?}", num_groups)
    }
    let (b, c) = (dims[0], dims[1]);
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?.reshape((b, num_groups, ()))?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.as_slice())?.to_dtype(dtype)?;
    let mut shape = vec![1usize; dims.len()];
    shape[1] = c;
    let mut y = y;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.reshape(shape.as_slice())?)?;
    }
    if let Some(bb) = bias {
        y = y.broadcast_add(&bb.reshape(shape.as_slice())?)?;
    }
    Ok(y)
}

/// Options of [`attention`].
#[derive(Debug, Clone, Copy, Default)]
pub struct AttentionConfig {
    /// Scale of the logits; `None` means `1/sqrt(D)`.
    pub scale: Option<f64>,
    /// Process queries in chunks of this many rows, bounding the `(Lq, Lk)` logits memory.
    pub chunk_size: Option<usize>,
    /// Mask out keys after the query position (CLIP's text transformer).
    pub causal: bool,
}

/// Scaled dot-product attention. `q`: `(B, H, Lq, D)`, `k`: `(B, H, Lk, D)`, `v`: `(B, H, Lk, Dv)`
/// → `(B, H, Lq, Dv)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttentionConfig) -> Result<Tensor> {
    let d = q.dim(candle_core::D::Minus1)?;
    let scale = cfg.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let lq = q.dim(2)?;
    let kt = k.transpose(2, 3)?.contiguous()?;
    let run = |q: &Tensor, offset: usize| -> Result<Tensor> {
        let mut logits = (q.contiguous()?.matmul(&kt)? * scale)?;
        if cfg.causal {
            let (lqc, lk) = (q.dim(2)?, k.dim(2)?);
            let mask: Vec<f32> = (0..lqc)
                .flat_map(|i| (0..lk).map(move |j| if j > i + offset { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (lqc, lk), q.device())?.to_dtype(logits.dtype())?;
            logits = logits.broadcast_add(&mask)?;
        }
        softmax_last_dim(&logits)?.matmul(&v.contiguous()?)
    };
    match cfg.chunk_size {
        Some(c) if c > 0 && c < lq => {
            let mut outs = Vec::new();
            let mut start = 0;
            while start < lq {
                let len = c.min(lq - start);
                outs.push(run(&q.narrow(2, start, len)?, start)?);
                start += len;
            }
            Tensor::cat(&outs, 2)
        }
        _ => run(q, 0),
    }
}

/// Nearest-neighbour upsampling by an integer factor. `x`: `(B, C, H, W)` → `(B, C, sH, sW)`.
/// Built from broadcast + reshape, so the backward pass sums correctly over each block.
pub fn upsample_nearest(x: &Tensor, scale: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, scale, w, scale))?
        .contiguous()?
        .reshape((b, c, h * scale, w * scale))
}
