//! `UNet2DConditionModel` as in diffusers (`models/unets/unet_2d_condition.py`), for the Stable
//! Diffusion 1.x/2.x family: the same module tree, `config.json` fields and safetensors keys, so
//! `unet/diffusion_pytorch_model.safetensors` of a diffusers folder loads with no renaming.
//!
//! Unlike candle-transformers' UNet, every op here has a correct gradient (normalisation, softmax
//! and attention from `gen_ops`; FD tests in `tests/unet.rs`, diffusers parity in
//! `tests/unet_parity.rs`), timesteps may differ per sample, and every linear layer is a LoRA-ready
//! [`gen_ops::nn::Linear`] reachable through [`UNet2DConditionModel::linears`].
//!
//! Supported: down blocks `CrossAttnDownBlock2D` / `DownBlock2D`, up blocks `UpBlock2D` /
//! `CrossAttnUpBlock2D`, mid block `UNetMidBlock2DCrossAttn`, positional time embedding, conv or
//! linear projections in the transformers, `only_cross_attention`, several transformer layers per
//! block. Not supported (rejected with an error naming the field): class / addition embeddings
//! (SDXL), dual cross-attention, scale-shift time conditioning, other kernels and block types.

use std::path::Path;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use gen_core::{Error, Result, ResultExt};
use gen_ops::nn::{GroupNorm, LayerNorm, Linear};
use gen_ops::AttentionConfig;
use serde::Deserialize;
use serde_json::Value;

use crate::blocks::{
    conv2d, Activation, Attention, AttentionLayerConfig, Conv2d, Downsample2D, ResnetBlock2D,
    ResnetConfig, Upsample2D,
};

/// A config value that diffusers accepts either as one number for all blocks or as a list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    List(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks; `None` when a list has the wrong length.
    pub fn expand(&self, n: usize) -> Option<Vec<T>> {
        match self {
            PerBlock::One(v) => Some(vec![v.clone(); n]),
            PerBlock::List(v) if v.len() == n => Some(v.clone()),
            PerBlock::List(_) => None,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_1() -> usize {
    1
}
fn default_silu() -> String {
    "silu".into()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_false_per_block() -> PerBlock<bool> {
    PerBlock::One(false)
}

/// The fields of diffusers' `unet/config.json` that this model reads (names as in diffusers).
///
/// Fields marked required must be present in the file; the others take diffusers' defaults.
/// Fields with values this implementation does not support are rejected by
/// [`UNetConfig::from_json`] with an error naming them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UNetConfig {
    /// Required.
    pub in_channels: usize,
    /// Required.
    pub out_channels: usize,
    /// Required.
    pub block_out_channels: Vec<usize>,
    /// Required: `CrossAttnDownBlock2D` or `DownBlock2D` per block.
    pub down_block_types: Vec<String>,
    /// Required: `UpBlock2D` or `CrossAttnUpBlock2D` per block.
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "default_layers")]
    pub layers_per_block: PerBlock<usize>,
    /// Required: width of the text encoder's hidden states.
    pub cross_attention_dim: usize,
    /// Despite its name, the number of attention heads when `num_attention_heads` is absent
    /// (diffusers' naming quirk).
    #[serde(default = "default_heads")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    /// Self-attention (`attn1`) attends to the text instead, per down block (up blocks
    /// mirrored). The mid block never does (diffusers' `UNetMidBlock2DCrossAttn` ignores it).
    #[serde(default = "default_false_per_block")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "default_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "default_1")]
    pub downsample_padding: usize,
}

/// Fields whose value must be one of the listed ones (absent counts as diffusers' default,
/// which is the first). Anything else needs model parts this implementation lacks.
const FIXED_FIELDS: &[(&str, &[&str])] = &[
    ("dual_cross_attention", &["false"]),
    ("class_embed_type", &["null"]),
    ("addition_embed_type", &["null"]),
    ("num_class_embeds", &["null"]),
    ("encoder_hid_dim", &["null"]),
    ("encoder_hid_dim_type", &["null"]),
    ("time_embedding_type", &["\"positional\""]),
    ("time_embedding_dim", &["null"]),
    ("time_embedding_act_fn", &["null"]),
    ("timestep_post_act", &["null"]),
    ("time_cond_proj_dim", &["null"]),
    ("resnet_time_scale_shift", &["\"default\""]),
    ("resnet_skip_time_act", &["false"]),
    ("resnet_out_scale_factor", &["1.0", "1"]),
    ("mid_block_scale_factor", &["1", "1.0"]),
    ("conv_in_kernel", &["3"]),
    ("conv_out_kernel", &["3"]),
    ("attention_type", &["\"default\""]),
    ("class_embeddings_concat", &["false"]),
    ("cross_attention_norm", &["null"]),
    ("reverse_transformer_layers_per_block", &["null"]),
    ("projection_class_embeddings_input_dim", &["null"]),
];

/// Fields without a usable default.
const REQUIRED_FIELDS: &[&str] = &[
    "in_channels",
    "out_channels",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "cross_attention_dim",
];

/// Parses a config object: checks `required` keys, rejects `fixed` fields with other values, then
/// deserialises. Errors name `origin` (the file) and the key.
pub(crate) fn parse_config<T: for<'de> Deserialize<'de>>(
    value: &Value,
    origin: &str,
    required: &[&str],
    fixed: &[(&str, &[&str])],
) -> Result<T> {
    let cfg_err =
        |key: &str, msg: String| Error::Config { file: origin.into(), key: key.into(), msg };
    let obj =
        value.as_object().ok_or_else(|| cfg_err("<root>", "expected a JSON object".into()))?;
    for key in required {
        if !obj.contains_key(*key) {
            return Err(cfg_err(key, "required field is missing".into()));
        }
    }
    for (key, allowed) in fixed {
        if let Some(v) = obj.get(*key) {
            let s = v.to_string();
            if !allowed.contains(&s.as_str()) {
                return Err(cfg_err(
                    key,
                    format!("value {s} is not supported (supported: {})", allowed.join(", ")),
                ));
            }
        }
    }
    T::deserialize(value).map_err(|e| {
        let msg = e.to_string();
        // Name the offending key: serde names missing fields; for a bad value, find the key
        // whose removal makes the rest parse (or only complain that this key is missing).
        let key = obj
            .keys()
            .find(|k| msg.contains(&format!("`{k}`")))
            .or_else(|| {
                obj.keys().find(|k| {
                    let mut rest = obj.clone();
                    rest.remove(k.as_str());
                    match T::deserialize(&Value::Object(rest)) {
                        Ok(_) => true,
                        Err(e) => e.to_string().contains(&format!("missing field `{k}`")),
                    }
                })
            })
            .cloned()
            .unwrap_or_else(|| "<unknown>".into());
        cfg_err(&key, msg)
    })
}

/// Reads a JSON file into a `Value`, naming the file on error.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        file: path.into(),
        key: "<root>".into(),
        msg: format!("invalid JSON: {e}"),
    })
}

impl UNetConfig {
    /// Reads diffusers' `unet/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json(&read_json(path)?, &path.display().to_string())
    }

    /// Parses a config object; `origin` names it in errors (a file path). Also checks that the
    /// values are supported and consistent.
    pub fn from_json(value: &Value, origin: &str) -> Result<Self> {
        let cfg: Self = parse_config(value, origin, REQUIRED_FIELDS, FIXED_FIELDS)?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let err = |key: &str, msg: String| {
            Err(Error::Config { file: origin.into(), key: key.into(), msg })
        };
        let n = self.block_out_channels.len();
        if n == 0 {
            return err("block_out_channels", "must not be empty".into());
        }
        if self.down_block_types.len() != n {
            return err(
                "down_block_types",
                format!("{} entries for {n} block_out_channels", self.down_block_types.len()),
            );
        }
        if self.up_block_types.len() != n {
            return err(
                "up_block_types",
                format!("{} entries for {n} block_out_channels", self.up_block_types.len()),
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return err("down_block_types", format!("block type {t:?} is not supported"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return err("up_block_types", format!("block type {t:?} is not supported"));
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return err("mid_block_type", format!("{:?} is not supported", self.mid_block_type));
        }
        if Activation::parse(&self.act_fn).is_none() {
            return err("act_fn", format!("activation {:?} is not supported", self.act_fn));
        }
        let groups = match self.norm_num_groups {
            Some(g) if g > 0 => g,
            _ => return err("norm_num_groups", "must be a positive number".into()),
        };
        if let Some(c) = self.block_out_channels.iter().find(|c| **c % groups != 0) {
            return err("norm_num_groups", format!("{groups} groups do not divide {c} channels"));
        }
        if self.layers_per_block.expand(n).is_none() {
            return err("layers_per_block", format!("list length differs from {n} blocks"));
        }
        if self.transformer_layers_per_block.expand(n).is_none() {
            return err(
                "transformer_layers_per_block",
                format!("list length differs from {n} blocks"),
            );
        }
        if self.only_cross_attention.expand(n).is_none() {
            return err("only_cross_attention", format!("list length differs from {n} blocks"));
        }
        let (key, heads) = self.heads_field();
        match heads.expand(n) {
            None => return err(key, format!("list length differs from {n} blocks")),
            Some(h) => {
                for (c, h) in self.block_out_channels.iter().zip(&h) {
                    if *h == 0 || c % h != 0 {
                        return err(key, format!("{h} heads do not divide {c} channels"));
                    }
                }
            }
        }
        if self.norm_eps.is_nan() || self.norm_eps < 0.0 {
            return err("norm_eps", format!("{} is not a non-negative number", self.norm_eps));
        }
        if !self.freq_shift.is_finite() {
            return err("freq_shift", format!("{} is not a finite number", self.freq_shift));
        }
        Ok(())
    }

    /// The field that gives the number of heads per block (diffusers: `num_attention_heads or
    /// attention_head_dim`) and its value.
    fn heads_field(&self) -> (&'static str, &PerBlock<usize>) {
        match &self.num_attention_heads {
            Some(h) => ("num_attention_heads", h),
            None => ("attention_head_dim", &self.attention_head_dim),
        }
    }

    fn groups(&self) -> usize {
        self.norm_num_groups.unwrap_or(32)
    }

    fn act(&self) -> Activation {
        Activation::parse(&self.act_fn).unwrap_or(Activation::Silu)
    }
}

/// Sinusoidal timestep embedding (diffusers `get_timestep_embedding`, scale 1, max period
/// 10000). `t`: `(B)` → `(B, dim)`, computed in f32.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    // The same f32 arithmetic as diffusers: exp(-ln(10000) * i / (half - shift)).
    let denom = (half as f64 - freq_shift) as f32;
    let ln = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (ln * i as f32 / denom).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = t.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut emb =
        if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    Ok(emb)
}

/// `proj_in` / `proj_out` of a transformer: a 1×1 convolution or a linear layer.
#[derive(Debug, Clone)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers `FeedForward` with GEGLU: `net.2(h * gelu(gate))`, `[h, gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> candle_core::Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::new(vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            out: Linear::new(vb.pp("net.2"), inner, dim, true)?,
            inner,
        })
    }

    /// `(B, L, dim)` → `(B, L, dim)`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.proj.forward(x)?;
        let last = h.rank() - 1;
        let a = h.narrow(last, 0, self.inner)?;
        let gate = h.narrow(last, self.inner, self.inner)?;
        self.out.forward(&(a * crate::blocks::gelu(&gate)?)?)
    }
}

/// diffusers `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU).
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

/// Options of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
struct TransformerConfig {
    channels: usize,
    heads: usize,
    layers: usize,
    cross_attention_dim: usize,
    groups: usize,
    use_linear_projection: bool,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, cfg: &TransformerConfig) -> candle_core::Result<Self> {
        let dim = cfg.channels;
        let dim_head = dim / cfg.heads;
        let self_cfg = AttentionLayerConfig {
            query_dim: dim,
            cross_attention_dim: cfg.only_cross_attention.then_some(cfg.cross_attention_dim),
            heads: cfg.heads,
            dim_head,
            qkv_bias: false,
        };
        let cross_cfg =
            AttentionLayerConfig { cross_attention_dim: Some(cfg.cross_attention_dim), ..self_cfg };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), &self_cfg)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), &cross_cfg)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            only_cross_attention: cfg.only_cross_attention,
        })
    }

    /// `x`: `(B, L, dim)`, `ctx`: `(B, Lk, cross_attention_dim)` → `(B, L, dim)`.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        attn: &AttentionConfig,
    ) -> candle_core::Result<Tensor> {
        let self_ctx = if self.only_cross_attention { Some(ctx) } else { None };
        let x = (self.attn1.forward(&self.norm1.forward(x)?, self_ctx, attn)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(ctx), attn)? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + &x
    }

    fn collect_linears(&self, out: &mut Vec<Linear>) {
        self.attn1.collect_linears(out);
        self.attn2.collect_linears(out);
        out.push(self.ff.proj.clone());
        out.push(self.ff.out.clone());
    }
}

/// diffusers `Transformer2DModel` for continuous inputs: group norm, `proj_in`, transformer
/// blocks, `proj_out`, plus the input as residual.
#[derive(Debug, Clone)]
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    fn new(vb: VarBuilder, cfg: &TransformerConfig) -> candle_core::Result<Self> {
        let c = cfg.channels;
        let proj = |name: &str| -> candle_core::Result<Proj> {
            Ok(if cfg.use_linear_projection {
                Proj::Linear(Linear::new(vb.pp(name), c, c, true)?)
            } else {
                Proj::Conv(conv2d(vb.pp(name), c, c, 1, 1, 0)?)
            })
        };
        let blocks = (0..cfg.layers)
            .map(|i| BasicTransformerBlock::new(vb.pp(format!("transformer_blocks.{i}")), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), cfg.groups, c, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    /// `x`: `(B, C, H, W)`, `ctx`: `(B, Lk, cross_attention_dim)` → `(B, C, H, W)`.
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        attn: &AttentionConfig,
    ) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_seq = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let to_img = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let n = self.norm.forward(x)?;
        let mut s = match &self.proj_in {
            Proj::Conv(conv) => to_seq(&conv.forward(&n)?)?,
            Proj::Linear(lin) => lin.forward(&to_seq(&n)?)?,
        };
        for blk in &self.blocks {
            s = blk.forward(&s, ctx, attn)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&to_img(&s)?)?,
            Proj::Linear(lin) => to_img(&lin.forward(&s)?)?,
        };
        out + x
    }

    fn collect_linears(&self, out: &mut Vec<Linear>) {
        if let Proj::Linear(l) = &self.proj_in {
            out.push(l.clone());
        }
        for b in &self.blocks {
            b.collect_linears(out);
        }
        if let Proj::Linear(l) = &self.proj_out {
            out.push(l.clone());
        }
    }
}

/// `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// `x`: `(B, Cin, H, W)` → `(B, Cout, H/2, W/2)` (no halving in the last block); pushes each
    /// layer's output onto `skips` for the up blocks.
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        attn: &AttentionConfig,
        skips: &mut Vec<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            x = r.forward(&x, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                x = a.forward(&x, ctx, attn)?;
            }
            skips.push(x.clone());
        }
        if let Some(d) = &self.downsampler {
            x = d.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `x`: `(B, Cprev, H, W)`; pops one skip connection per resnet from `skips`.
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        attn: &AttentionConfig,
        skips: &mut Vec<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("UNet: skip connections exhausted".into())
            })?;
            x = r.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                x = a.forward(&x, ctx, attn)?;
            }
        }
        if let Some(u) = &self.upsampler {
            x = u.forward(&x)?;
        }
        Ok(x)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

impl MidBlock {
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
        attn: &AttentionConfig,
    ) -> candle_core::Result<Tensor> {
        let mut x = self.resnets[0].forward(x, Some(temb))?;
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = a.forward(&x, ctx, attn)?;
            x = r.forward(&x, Some(temb))?;
        }
        Ok(x)
    }
}

/// The conditional UNet of Stable Diffusion (diffusers `UNet2DConditionModel`).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    cfg: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    attn: AttentionConfig,
}

impl UNet2DConditionModel {
    /// Builds the model with weights from `vb`, whose keys are diffusers' (`conv_in.weight`,
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`, …). A `VarBuilder`
    /// over a `VarMap` gives a trainable model with fresh variables.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        Self::build(vb, cfg).ctx("UNet2DConditionModel: loading weights")
    }

    fn build(vb: VarBuilder, cfg: &UNetConfig) -> candle_core::Result<Self> {
        let n = cfg.block_out_channels.len();
        let bad = |key: &str| {
            candle_core::Error::Msg(format!(
                "UNet config: inconsistent `{key}` (use UNetConfig::from_json)"
            ))
        };
        let boc = &cfg.block_out_channels;
        let layers = cfg.layers_per_block.expand(n).ok_or_else(|| bad("layers_per_block"))?;
        let tlayers = cfg
            .transformer_layers_per_block
            .expand(n)
            .ok_or_else(|| bad("transformer_layers_per_block"))?;
        let heads = cfg.heads_field().1.expand(n).ok_or_else(|| bad("attention_head_dim"))?;
        let only_cross =
            cfg.only_cross_attention.expand(n).ok_or_else(|| bad("only_cross_attention"))?;
        let groups = cfg.groups();
        let eps = cfg.norm_eps;
        let act = cfg.act();
        let temb_dim = boc[0] * 4;
        let resnet = |vb: VarBuilder, cin: usize, cout: usize| {
            ResnetBlock2D::new(
                vb,
                &ResnetConfig {
                    in_channels: cin,
                    out_channels: cout,
                    temb_channels: Some(temb_dim),
                    groups,
                    eps,
                    act,
                },
            )
        };
        let tcfg = |channels: usize, i: usize, layers: usize, only: bool| TransformerConfig {
            channels,
            heads: heads[i],
            layers,
            cross_attention_dim: cfg.cross_attention_dim,
            groups,
            use_linear_projection: cfg.use_linear_projection,
            only_cross_attention: only,
        };

        let conv_in = conv2d(vb.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?;
        let time_linear_1 = Linear::new(vb.pp("time_embedding.linear_1"), boc[0], temb_dim, true)?;
        let time_linear_2 =
            Linear::new(vb.pp("time_embedding.linear_2"), temb_dim, temb_dim, true)?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut cout = boc[0];
        for i in 0..n {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let cin = cout;
            cout = boc[i];
            let cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                resnets.push(resnet(
                    vb.pp(format!("resnets.{j}")),
                    if j == 0 { cin } else { cout },
                    cout,
                )?);
                if cross {
                    attentions.push(Transformer2D::new(
                        vb.pp(format!("attentions.{j}")),
                        &tcfg(cout, i, tlayers[i], only_cross[i]),
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(vb.pp("downsamplers.0"), cout, cfg.downsample_padding)?)
            } else {
                None
            };
            down_blocks.push(DownBlock { resnets, attentions, downsampler });
        }

        let cmid = boc[n - 1];
        let vbm = vb.pp("mid_block");
        let mid_block = MidBlock {
            resnets: vec![
                resnet(vbm.pp("resnets.0"), cmid, cmid)?,
                resnet(vbm.pp("resnets.1"), cmid, cmid)?,
            ],
            attentions: vec![Transformer2D::new(
                vbm.pp("attentions.0"),
                &tcfg(cmid, n - 1, tlayers[n - 1], false),
            )?],
        };

        let mut up_blocks = Vec::with_capacity(n);
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut cout = rev[0];
        for i in 0..n {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let bi = n - 1 - i; // the matching down block
            let cprev = cout;
            cout = rev[i];
            let cin = rev[(i + 1).min(n - 1)];
            let cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
            let nl = layers[bi] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..nl {
                let skip = if j == nl - 1 { cin } else { cout };
                let rin = if j == 0 { cprev } else { cout };
                resnets.push(resnet(vb.pp(format!("resnets.{j}")), rin + skip, cout)?);
                if cross {
                    attentions.push(Transformer2D::new(
                        vb.pp(format!("attentions.{j}")),
                        &tcfg(cout, bi, tlayers[bi], only_cross[bi]),
                    )?);
                }
            }
            let upsampler =
                if i + 1 < n { Some(Upsample2D::new(vb.pp("upsamplers.0"), cout)?) } else { None };
            up_blocks.push(UpBlock { resnets, attentions, upsampler });
        }

        Ok(Self {
            cfg: cfg.clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), groups, boc[0], eps)?,
            conv_out: conv2d(vb.pp("conv_out"), boc[0], cfg.out_channels, 3, 1, 1)?,
            act,
            attn: AttentionConfig::default(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Processes attention queries in chunks of this many rows (bounds the memory of the
    /// `(L, L)` logits at high resolution); `None` attends all at once. Results are the same.
    pub fn set_attention_chunk_size(&mut self, chunk: Option<usize>) {
        self.attn.chunk_size = chunk;
    }

    pub fn attention_chunk_size(&self) -> Option<usize> {
        self.attn.chunk_size
    }

    /// Every linear layer, in module order, each named by its diffusers module path
    /// (`time_embedding.linear_1`, `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
    /// …). The handles share state with the model: adapters attached to them take effect.
    pub fn linears(&self) -> Vec<Linear> {
        let mut out = vec![self.time_linear_1.clone(), self.time_linear_2.clone()];
        let tr = |ts: &[Transformer2D], out: &mut Vec<Linear>| {
            ts.iter().for_each(|t| t.collect_linears(out))
        };
        let rs = |rs: &[ResnetBlock2D], out: &mut Vec<Linear>| {
            rs.iter().for_each(|r| r.collect_linears(out))
        };
        for b in &self.down_blocks {
            rs(&b.resnets, &mut out);
            tr(&b.attentions, &mut out);
        }
        rs(&self.mid_block.resnets, &mut out);
        tr(&self.mid_block.attentions, &mut out);
        for b in &self.up_blocks {
            rs(&b.resnets, &mut out);
            tr(&b.attentions, &mut out);
        }
        out
    }

    /// Predicts the noise (or v, per the checkpoint) for `sample`.
    ///
    /// - `sample`: `(B, in_channels, H, W)`; `H` and `W` divisible by `2^(blocks-1)`.
    /// - `timesteps`: `(B)` one timestep per sample, or a single value (`()` or `(1)`) for all;
    ///   any float or integer dtype, on any device (moved to the sample's).
    /// - `encoder_hidden_states`: `(B, L, cross_attention_dim)`.
    ///
    /// Returns `(B, out_channels, H, W)` in the dtype of `sample`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let (b, c, h, w) = sample.dims4().ctx("UNet: sample must be (B, C, H, W)")?;
        if c != self.cfg.in_channels {
            return Err(Error::invalid(
                "UNet sample",
                format!("{c} channels, the config says {}", self.cfg.in_channels),
            ));
        }
        let f = 1usize << (self.cfg.block_out_channels.len() - 1);
        if h % f != 0 || w % f != 0 {
            return Err(Error::invalid(
                "UNet sample",
                format!("size {h}×{w} is not divisible by {f}"),
            ));
        }
        let ctx_dims = encoder_hidden_states.dims();
        if ctx_dims.len() != 3 || ctx_dims[0] != b || ctx_dims[2] != self.cfg.cross_attention_dim {
            return Err(Error::invalid(
                "UNet encoder_hidden_states",
                format!("shape {ctx_dims:?}, expected ({b}, L, {})", self.cfg.cross_attention_dim),
            ));
        }
        let t = match timesteps.elem_count() {
            1 => timesteps.flatten_all()?.broadcast_as(b)?.contiguous()?,
            n if n == b && timesteps.rank() == 1 => timesteps.clone(),
            _ => {
                return Err(Error::invalid(
                    "UNet timesteps",
                    format!("shape {:?}, expected ({b}) or a single value", timesteps.dims()),
                ))
            }
        };
        let t = t.to_device(sample.device())?;
        let ctx = encoder_hidden_states.to_dtype(sample.dtype())?;
        self.forward_inner(sample, &t, &ctx).ctx("UNet2DConditionModel::forward")
    }

    fn forward_inner(
        &self,
        sample: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let dtype = sample.dtype();
        let boc0 = self.cfg.block_out_channels[0];
        let t_emb = timestep_embedding(t, boc0, self.cfg.flip_sin_to_cos, self.cfg.freq_shift)?
            .to_dtype(dtype)?;
        let temb =
            self.time_linear_2.forward(&self.act.apply(&self.time_linear_1.forward(&t_emb)?)?)?;

        let sample =
            if self.cfg.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };
        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for blk in &self.down_blocks {
            x = blk.forward(&x, &temb, ctx, &self.attn, &mut skips)?;
        }
        x = self.mid_block.forward(&x, &temb, ctx, &self.attn)?;
        for blk in &self.up_blocks {
            x = blk.forward(&x, &temb, ctx, &self.attn, &mut skips)?;
        }
        let x = self.act.apply(&self.conv_norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }
}
