//! Slow reference implementations built only from candle primitives whose backward passes are
//! correct (exp, sums, broadcast arithmetic, matmul, reshape).
//!
//! They are the fallback on non-CPU devices (CUDA, Metal), where the fused kernels of
//! `fused` (private) have no implementation, and the references that the tests compare the fused
//! ops against (values and gradients). Same shapes and semantics as the functions of
//! [`crate::ops`].

use candle_core::{DType, Result, Tensor, D};

use crate::ops::AttentionConfig;

/// Softmax over the last dimension, numerically stabilised. `x`: `(..., N)` → same shape.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
/// `x`: `(..., N)`; `weight`, `bias`: `(N)`. Computed in f32 for f16/bf16 inputs.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let cdt = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let xf = x.to_dtype(cdt)?;
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
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || num_groups == 0 || dims[1] % num_groups != 0 {
        candle_core::bail!(
            "group_norm: {} groups do not divide the channels of shape {dims:?}",
            num_groups
        )
    }
    let (b, c) = (dims[0], dims[1]);
    let dtype = x.dtype();
    let cdt = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let xf = x.to_dtype(cdt)?.reshape((b, num_groups, ()))?;
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

/// Additive causal mask `(lq, lk)`: `-inf` where key `j > offset + i`, else 0.
pub(crate) fn causal_mask(lq: usize, lk: usize, offset: usize, like: &Tensor) -> Result<Tensor> {
    let mask: Vec<f32> = (0..lq)
        .flat_map(|i| (0..lk).map(move |j| if j > i + offset { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (lq, lk), like.device())?.to_dtype(like.dtype())
}

/// Attention probabilities of a block of queries: `softmax(q kᵀ·scale + mask)`.
/// `q`: `(..., Lc, D)`, `kt`: `(..., D, Lk)` → `(..., Lc, Lk)`; `offset`: index of `q`'s first row.
/// `softmax` is the softmax implementation to use.
pub(crate) fn probs(
    q: &Tensor,
    kt: &Tensor,
    scale: f64,
    causal: bool,
    offset: usize,
    softmax: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut logits = (q.contiguous()?.matmul(kt)? * scale)?;
    if causal {
        let r = logits.rank();
        let mask = causal_mask(logits.dim(r - 2)?, logits.dim(r - 1)?, offset, &logits)?;
        logits = logits.broadcast_add(&mask)?;
    }
    softmax(&logits)
}

/// Scaled dot-product attention from primitives; with `chunk_size` the queries are processed in
/// chunks (this bounds the logits memory in inference only: in training the graph keeps every
/// chunk's probabilities). `q`: `(..., Lq, D)`, `k`: `(..., Lk, D)`, `v`: `(..., Lk, Dv)` →
/// `(..., Lq, Dv)`; usually `(B, H, L, D)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttentionConfig) -> Result<Tensor> {
    attention_with(q, k, v, cfg, softmax_last_dim)
}

/// [`attention`] with a given softmax implementation.
pub(crate) fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &AttentionConfig,
    softmax: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let r = q.rank();
    if r < 2 || k.rank() != r || v.rank() != r {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} must have the same rank >= 2",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let d = q.dim(D::Minus1)?;
    let scale = cfg.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let lq = q.dim(r - 2)?;
    let kt = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let run = |q: &Tensor, offset: usize| -> Result<Tensor> {
        probs(q, &kt, scale, cfg.causal, offset, softmax)?.matmul(&v)
    };
    match cfg.chunk_size {
        Some(c) if c > 0 && c < lq => {
            let mut outs = Vec::new();
            let mut start = 0;
            while start < lq {
                let len = c.min(lq - start);
                outs.push(run(&q.narrow(r - 2, start, len)?, start)?);
                start += len;
            }
            Tensor::cat(&outs, r - 2)
        }
        _ => run(q, 0),
    }
}

/// Nearest-neighbour upsampling by an integer factor from broadcast + reshape (its backward
/// sums each block). `x`: `(B, C, H, W)` → `(B, C, sH, sW)`.
pub fn upsample_nearest(x: &Tensor, scale: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, scale, w, scale))?
        .contiguous()?
        .reshape((b, c, h * scale, w * scale))
}
