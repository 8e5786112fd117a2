//! `AutoencoderKL` as in diffusers (`models/autoencoders/autoencoder_kl.py`, `vae.py`): the same
//! module tree, `config.json` fields and safetensors keys, so `vae/diffusion_pytorch_model.safetensors`
//! of a diffusers folder loads with no renaming. The mid-block attention accepts both the current
//! key names (`to_q`, `to_k`, `to_v`, `to_out.0`) and the legacy ones (`query`, `key`, `value`,
//! `proj_attn`).
//!
//! Gradients are exact (group norm, softmax and attention from `gen_ops`; FD tests in
//! `tests/vae.rs`, diffusers parity in `tests/vae_parity.rs`), so the VAE can sit inside a
//! differentiable loss (reward fine-tuning, score distillation through the decoder).

use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use gen_core::{Error, Result, ResultExt, SeededRng};
use gen_ops::nn::{GroupNorm, Linear};
use gen_ops::AttentionConfig;
use serde::Deserialize;
use serde_json::Value;

use crate::blocks::{
    conv2d, Activation, Attention, AttentionLayerConfig, Conv2d, Downsample2D, ResnetBlock2D,
    ResnetConfig, Upsample2D, ATTENTION_KEYS, LEGACY_ATTENTION_KEYS,
};
use crate::unet::{parse_config, read_json};

fn default_3() -> usize {
    3
}
fn default_1() -> usize {
    1
}
fn default_4() -> usize {
    4
}
fn default_32() -> usize {
    32
}
fn default_silu() -> String {
    "silu".into()
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

/// The fields of diffusers' `vae/config.json` (names as in diffusers). `block_out_channels`,
/// `down_block_types` and `up_block_types` are required; the others take diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_3")]
    pub in_channels: usize,
    #[serde(default = "default_3")]
    pub out_channels: usize,
    /// Required: `DownEncoderBlock2D` per block.
    pub down_block_types: Vec<String>,
    /// Required: `UpDecoderBlock2D` per block.
    pub up_block_types: Vec<String>,
    /// Required.
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_1")]
    pub layers_per_block: usize,
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Latents are `scaling_factor * (z - shift_factor)` in the diffusion model's space.
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics some VAEs publish (SD-XL-derived models); the VAE itself
    /// does not use them — pipelines that normalise latents with them read them from here.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

const REQUIRED_FIELDS: &[&str] = &["block_out_channels", "down_block_types", "up_block_types"];
const FIXED_FIELDS: &[(&str, &[&str])] = &[];

impl VaeConfig {
    /// Reads diffusers' `vae/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json(&read_json(path)?, &path.display().to_string())
    }

    /// Parses a config object; `origin` names it in errors. Checks that the values are supported.
    pub fn from_json(value: &Value, origin: &str) -> Result<Self> {
        let cfg: Self = parse_config(value, origin, REQUIRED_FIELDS, FIXED_FIELDS)?;
        let err = |key: &str, msg: String| {
            Err(Error::Config { file: origin.into(), key: key.into(), msg })
        };
        let n = cfg.block_out_channels.len();
        if n == 0 {
            return err("block_out_channels", "must not be empty".into());
        }
        if cfg.down_block_types.len() != n
            || cfg.down_block_types.iter().any(|t| t != "DownEncoderBlock2D")
        {
            return err(
                "down_block_types",
                format!("expected {n} × \"DownEncoderBlock2D\", found {:?}", cfg.down_block_types),
            );
        }
        if cfg.up_block_types.len() != n
            || cfg.up_block_types.iter().any(|t| t != "UpDecoderBlock2D")
        {
            return err(
                "up_block_types",
                format!("expected {n} × \"UpDecoderBlock2D\", found {:?}", cfg.up_block_types),
            );
        }
        if Activation::parse(&cfg.act_fn).is_none() {
            return err("act_fn", format!("activation {:?} is not supported", cfg.act_fn));
        }
        if cfg.norm_num_groups == 0 {
            return err("norm_num_groups", "must be positive".into());
        }
        if let Some(c) = cfg.block_out_channels.iter().find(|c| **c % cfg.norm_num_groups != 0) {
            return err(
                "norm_num_groups",
                format!("{} groups do not divide {c} channels", cfg.norm_num_groups),
            );
        }
        if cfg.layers_per_block == 0 {
            return err("layers_per_block", "must be positive".into());
        }
        for (key, v) in [("latents_mean", &cfg.latents_mean), ("latents_std", &cfg.latents_std)] {
            if let Some(v) = v {
                if v.len() != cfg.latent_channels {
                    return err(
                        key,
                        format!("{} values for {} latent channels", v.len(), cfg.latent_channels),
                    );
                }
            }
        }
        Ok(cfg)
    }

    fn act(&self) -> Activation {
        Activation::parse(&self.act_fn).unwrap_or(Activation::Silu)
    }
}

/// The VAE's mid-block attention: group norm, single-head attention over the `H·W` positions,
/// residual.
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    attn: Attention,
}

impl VaeAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let keys = if legacy { LEGACY_ATTENTION_KEYS } else { ATTENTION_KEYS };
        let cfg = AttentionLayerConfig {
            query_dim: channels,
            cross_attention_dim: None,
            heads: 1,
            dim_head: channels,
            qkv_bias: true,
        };
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, 1e-6)?,
            attn: Attention::with_keys(vb, &cfg, keys)?,
        })
    }

    /// `(B, C, H, W)` → `(B, C, H, W)`.
    fn forward(&self, x: &Tensor, attn: &AttentionConfig) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let s =
            self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let y = self.attn.forward(&s, None, attn)?;
        y.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, (attention,) resnet.
#[derive(Debug, Clone)]
struct VaeMidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    fn new(vb: VarBuilder, channels: usize, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let rc = ResnetConfig {
            in_channels: channels,
            out_channels: channels,
            temb_channels: None,
            groups: cfg.norm_num_groups,
            eps: 1e-6,
            act: cfg.act(),
        };
        let attention = if cfg.mid_block_add_attention {
            Some(VaeAttention::new(vb.pp("attentions.0"), channels, cfg.norm_num_groups)?)
        } else {
            None
        };
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::new(vb.pp("resnets.0"), &rc)?,
                ResnetBlock2D::new(vb.pp("resnets.1"), &rc)?,
            ],
            attention,
        })
    }

    fn forward(&self, x: &Tensor, attn: &AttentionConfig) -> candle_core::Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x, attn)?;
        }
        self.resnets[1].forward(&x, None)
    }

    fn collect_linears(&self, out: &mut Vec<Linear>) {
        if let Some(a) = &self.attention {
            a.attn.collect_linears(out);
        }
    }
}

/// `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets, then an optional down- or upsampler.
#[derive(Debug, Clone)]
struct CoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
    upsampler: Option<Upsample2D>,
}

impl CoderBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x, None)?;
        }
        if let Some(d) = &self.downsampler {
            x = d.forward(&x)?;
        }
        if let Some(u) = &self.upsampler {
            x = u.forward(&x)?;
        }
        Ok(x)
    }
}

/// diffusers `Encoder` with `double_z=True`.
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<CoderBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let groups = cfg.norm_num_groups;
        let mut down_blocks = Vec::with_capacity(n);
        let mut cout = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let cin = cout;
            cout = c;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let rc = ResnetConfig {
                        in_channels: if j == 0 { cin } else { cout },
                        out_channels: cout,
                        temb_channels: None,
                        groups,
                        eps: 1e-6,
                        act: cfg.act(),
                    };
                    ResnetBlock2D::new(vb.pp(format!("resnets.{j}")), &rc)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(vb.pp("downsamplers.0"), cout, 0)?)
            } else {
                None
            };
            down_blocks.push(CoderBlock { resnets, downsampler, upsampler: None });
        }
        Ok(Self {
            conv_in: conv2d(vb.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::new(vb.pp("mid_block"), boc[n - 1], cfg)?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), groups, boc[n - 1], 1e-6)?,
            conv_out: conv2d(vb.pp("conv_out"), boc[n - 1], 2 * cfg.latent_channels, 3, 1, 1)?,
            // diffusers' `conv_act` is SiLU whatever `act_fn` says.
            act: Activation::Silu,
        })
    }

    fn forward(&self, x: &Tensor, attn: &AttentionConfig) -> candle_core::Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            x = b.forward(&x)?;
        }
        let x = self.mid_block.forward(&x, attn)?;
        self.conv_out.forward(&self.act.apply(&self.conv_norm_out.forward(&x)?)?)
    }
}

/// diffusers `Decoder`.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<CoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let groups = cfg.norm_num_groups;
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut cout = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let cin = cout;
            cout = c;
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let rc = ResnetConfig {
                        in_channels: if j == 0 { cin } else { cout },
                        out_channels: cout,
                        temb_channels: None,
                        groups,
                        eps: 1e-6,
                        act: cfg.act(),
                    };
                    ResnetBlock2D::new(vb.pp(format!("resnets.{j}")), &rc)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsampler =
                if i + 1 < n { Some(Upsample2D::new(vb.pp("upsamplers.0"), cout)?) } else { None };
            up_blocks.push(CoderBlock { resnets, downsampler: None, upsampler });
        }
        Ok(Self {
            conv_in: conv2d(vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?,
            mid_block: VaeMidBlock::new(vb.pp("mid_block"), rev[0], cfg)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), groups, boc[0], 1e-6)?,
            conv_out: conv2d(vb.pp("conv_out"), boc[0], cfg.out_channels, 3, 1, 1)?,
            // diffusers' `conv_act` is SiLU whatever `act_fn` says.
            act: Activation::Silu,
        })
    }

    fn forward(&self, z: &Tensor, attn: &AttentionConfig) -> candle_core::Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid_block.forward(&x, attn)?;
        for b in &self.up_blocks {
            x = b.forward(&x)?;
        }
        self.conv_out.forward(&self.act.apply(&self.conv_norm_out.forward(&x)?)?)
    }
}

/// The encoder's output distribution: a diagonal Gaussian over latents.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// `(B, latent_channels, h, w)`.
    pub mean: Tensor,
    /// `(B, latent_channels, h, w)`, clamped to `[-30, 20]` as in diffusers.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// A reparameterised sample `mean + std * ε`, `ε ~ N(0, I)` drawn from `rng`
    /// (differentiable w.r.t. `mean` and `logvar`).
    pub fn sample(&self, rng: &mut SeededRng) -> Result<Tensor> {
        let eps = rng.randn(self.mean.shape(), self.mean.dtype(), self.mean.device())?;
        Ok((&self.mean + self.std()?.mul(&eps)?)?)
    }

    /// The mode (the mean).
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }
}

/// diffusers `AutoencoderKL`: `encoder`, `quant_conv`, `post_quant_conv`, `decoder`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    cfg: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    attn: AttentionConfig,
}

impl AutoencoderKL {
    /// Builds the model with weights from `vb` (diffusers keys: `encoder.conv_in.weight`, …).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        Self::build(vb, cfg).ctx("AutoencoderKL: loading weights")
    }

    fn build(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let l = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv2d(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            attn: AttentionConfig::default(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Processes the mid-block attention's queries in chunks of this many rows; `None`: all at once.
    pub fn set_attention_chunk_size(&mut self, chunk: Option<usize>) {
        self.attn.chunk_size = chunk;
    }

    /// The linear layers (the mid-block attentions' projections), named by module path.
    pub fn linears(&self) -> Vec<Linear> {
        let mut out = Vec::new();
        self.encoder.mid_block.collect_linears(&mut out);
        self.decoder.mid_block.collect_linears(&mut out);
        out
    }

    /// The spatial downscale factor, `2^(blocks-1)`.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.cfg.block_out_channels.len() - 1)
    }

    /// `x`: `(B, in_channels, H, W)` with values in `[-1, 1]`, `H`, `W` divisible by
    /// [`Self::downscale_factor`] → the latent distribution over `(B, latent_channels, H/f, W/f)`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let (_, c, h, w) = x.dims4().ctx("VAE encode: input must be (B, C, H, W)")?;
        let f = self.downscale_factor();
        if c != self.cfg.in_channels || h % f != 0 || w % f != 0 {
            return Err(Error::invalid(
                "VAE encode input",
                format!(
                    "shape {:?}: needs {} channels and sides divisible by {f}",
                    x.dims(),
                    self.cfg.in_channels
                ),
            ));
        }
        let run = || -> candle_core::Result<DiagonalGaussian> {
            let mut m = self.encoder.forward(x, &self.attn)?;
            if let Some(q) = &self.quant_conv {
                m = q.forward(&m)?;
            }
            let l = self.cfg.latent_channels;
            let mean = m.narrow(1, 0, l)?;
            let logvar = m.narrow(1, l, l)?.clamp(-30f64, 20f64)?;
            Ok(DiagonalGaussian { mean, logvar })
        };
        run().ctx("AutoencoderKL::encode")
    }

    /// `z`: `(B, latent_channels, h, w)` (unscaled latents, i.e. divided by `scaling_factor`)
    /// → `(B, out_channels, h·f, w·f)`, roughly in `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = z.dims4().ctx("VAE decode: latents must be (B, C, h, w)")?;
        if c != self.cfg.latent_channels {
            return Err(Error::invalid(
                "VAE decode latents",
                format!("shape {:?}: needs {} channels", z.dims(), self.cfg.latent_channels),
            ));
        }
        let run = || -> candle_core::Result<Tensor> {
            let z = match &self.post_quant_conv {
                Some(p) => p.forward(z)?,
                None => z.clone(),
            };
            self.decoder.forward(&z, &self.attn)
        };
        run().ctx("AutoencoderKL::decode")
    }
}
