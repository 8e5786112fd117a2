//! Building blocks shared by the UNet and the VAE, named as in diffusers so that checkpoint keys
//! resolve with no renaming: `ResnetBlock2D` (`resnet.py`), `Downsample2D`, `Upsample2D` and
//! `Attention` (`attention_processor.py`).
//!
//! Every linear layer is a LoRA-ready [`gen_ops::nn::Linear`]; normalisations, softmax and
//! attention come from `gen_ops`, whose gradients are checked against finite differences.
//! Dropout is not applied (inference and deterministic training).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use gen_ops::nn::{GroupNorm, Linear};
use gen_ops::AttentionConfig;

/// The activation named by a config's `act_fn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`: `x * sigmoid(x)`.
    Silu,
    /// `gelu`: the exact (erf) GELU, as `torch.nn.functional.gelu`.
    Gelu,
}

impl Activation {
    /// Parses diffusers' `act_fn` string; `None` for names this crate does not implement.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    /// Applies the activation elementwise.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => gelu(x),
        }
    }
}

/// Exact GELU `x·Φ(x) = x/2·(1 + erf(x/√2))` (torch's default), built from `erf` so that the
/// backward pass is exact (candle's fused `gelu_erf` backward rounds `1/√(2π)` to 6 digits).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let e = (x * std::f64::consts::FRAC_1_SQRT_2)?.erf()?;
    (x * 0.5)? * (e + 1.0)?
}

/// A 2-D convolution (`weight` `(out, in, k, k)`, `bias` `(out)`) run through
/// [`gen_ops::conv2d`], whose backward pass works for every input geometry.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    cfg: Conv2dConfig,
}

impl Module for Conv2d {
    /// `(B, in, H, W)` → `(B, out, H', W')`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        gen_ops::conv2d_bias(x, &self.weight, Some(&self.bias), &self.cfg)
    }
}

/// A [`Conv2d`] loaded from `weight` and `bias` under `vb`.
pub fn conv2d(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    Ok(Conv2d {
        weight: vb.get((cout, cin, kernel, kernel), "weight")?,
        bias: vb.get(cout, "bias")?,
        cfg,
    })
}

/// Options of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` for the VAE's blocks (no `time_emb_proj`).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
}

/// diffusers `ResnetBlock2D` with `time_embedding_norm="default"` and output scale 1:
/// `x + conv2(act(norm2(conv1(act(norm1(x))) + time_emb_proj(act(temb)))))`, with a 1×1
/// `conv_shortcut` on `x` when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: &ResnetConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(Linear::new(vb.pp("time_emb_proj"), t, cout, true)?),
            None => None,
        };
        let conv_shortcut = if cin != cout {
            Some(conv2d(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: conv2d(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(vb.pp("norm2"), cfg.groups, cout, cfg.eps)?,
            conv2: conv2d(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut,
            act: cfg.act,
        })
    }

    /// `x`: `(B, Cin, H, W)`, `temb`: `(B, T)` or `None` → `(B, Cout, H, W)`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.act.apply(&self.norm1.forward(x)?)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&self.act.apply(t)?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.act.apply(&self.norm2.forward(&h)?)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }

    pub(crate) fn collect_linears(&self, out: &mut Vec<Linear>) {
        out.extend(self.time_emb_proj.iter().cloned());
    }
}

/// diffusers `Downsample2D` with a convolution (`conv`, stride 2). With `padding == 0` (the VAE)
/// the input is first padded by one zero row/column at the bottom/right, as diffusers does.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self { conv: conv2d(vb.pp("conv"), channels, channels, 3, 2, padding)?, padding })
    }

    /// `(B, C, H, W)` → `(B, C, ⌈H/2⌉, ⌈W/2⌉)` (for even sizes `H/2`, `W/2`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers `Upsample2D` with a convolution: nearest ×2, then a 3×3 `conv`.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self { conv: conv2d(vb.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    /// `(B, C, H, W)` → `(B, C, 2H, 2W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&gen_ops::upsample_nearest(x, 2)?)
    }
}

/// Options of an [`Attention`] layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionLayerConfig {
    /// Width of the queries' input (and of the output).
    pub query_dim: usize,
    /// Width of the keys' and values' input; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    pub heads: usize,
    pub dim_head: usize,
    /// Whether `to_q`, `to_k`, `to_v` have biases (`False` in the UNet, `True` in the VAE).
    pub qkv_bias: bool,
}

/// The names of the four projections: diffusers' current `to_q, to_k, to_v, to_out.0`, or the
/// legacy VAE names `query, key, value, proj_attn`.
pub const ATTENTION_KEYS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
pub const LEGACY_ATTENTION_KEYS: [&str; 4] = ["query", "key", "value", "proj_attn"];

/// diffusers `Attention` (multi-head scaled dot-product attention with `to_q`, `to_k`, `to_v`,
/// `to_out.0`), scale `dim_head^-1/2`. Half-precision inputs are attended in f32.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    dim_head: usize,
}

impl Attention {
    pub fn new(vb: VarBuilder, cfg: &AttentionLayerConfig) -> Result<Self> {
        Self::with_keys(vb, cfg, ATTENTION_KEYS)
    }

    /// Like [`Attention::new`] with the projections stored under `keys` (q, k, v, out).
    pub fn with_keys(vb: VarBuilder, cfg: &AttentionLayerConfig, keys: [&str; 4]) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let kv_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        Ok(Self {
            to_q: Linear::new(vb.pp(keys[0]), cfg.query_dim, inner, cfg.qkv_bias)?,
            to_k: Linear::new(vb.pp(keys[1]), kv_dim, inner, cfg.qkv_bias)?,
            to_v: Linear::new(vb.pp(keys[2]), kv_dim, inner, cfg.qkv_bias)?,
            to_out: Linear::new(vb.pp(keys[3]), inner, cfg.query_dim, true)?,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
        })
    }

    /// `(B, L, heads*dim_head)` → `(B, heads, L, dim_head)`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.heads, self.dim_head))?.transpose(1, 2)
    }

    /// `x`: `(B, L, query_dim)`, `context`: `(B, Lk, cross_attention_dim)` or `None` (attend to
    /// `x` itself) → `(B, L, query_dim)`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        attn: &AttentionConfig,
    ) -> Result<Tensor> {
        // Contiguous inputs: candle 0.11.1's batched matmul silently returns wrong values for a
        // transposed (B, L, C) input against a broadcast weight.
        let x = &x.contiguous()?;
        let ctx = &match context {
            Some(c) => c.contiguous()?,
            None => x.clone(),
        };
        let (b, l, _) = x.dims3()?;
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(ctx)?)?;
        let v = self.split_heads(&self.to_v.forward(ctx)?)?;
        let dtype = q.dtype();
        let out = if matches!(dtype, DType::F16 | DType::BF16) {
            let up = |t: &Tensor| t.to_dtype(DType::F32);
            gen_ops::attention(&up(&q)?, &up(&k)?, &up(&v)?, attn)?.to_dtype(dtype)?
        } else {
            gen_ops::attention(&q, &k, &v, attn)?
        };
        let out = out.transpose(1, 2)?.reshape((b, l, self.heads * self.dim_head))?;
        self.to_out.forward(&out)
    }

    pub(crate) fn collect_linears(&self, out: &mut Vec<Linear>) {
        out.extend([self.to_q.clone(), self.to_k.clone(), self.to_v.clone(), self.to_out.clone()]);
    }
}
