//! CLIP text and vision transformers (Radford et al. 2021, "Learning Transferable Visual Models
//! From Natural Language Supervision"), with transformers' config fields and safetensors key
//! names, so that a diffusers `text_encoder/` folder or a transformers `CLIPModel` /
//! `CLIPVisionModelWithProjection` checkpoint loads without renaming.
//!
//! Every op is differentiable: linear layers are [`gen_ops::nn::Linear`] (LoRA-ready), layer norms
//! and softmax are gen-ops' (candle's fused versions drop gradients), activations are built
//! from primitives with correct backward passes.
//!
//! Constructors take the `VarBuilder` at the checkpoint's root: [`ClipTextTransformer::new`]
//! reads `text_model.*`, [`ClipVisionTransformer::new`] reads `vision_model.*`, the projection
//! models add `text_projection.weight` / `visual_projection.weight`.

use std::path::Path;

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;
use gen_core::{Error, Result};
use gen_ops::nn::{LayerNorm, Linear};
use gen_ops::{attention, AttentionConfig};

use crate::loading::JsonConfig;

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (`quick_gelu`, OpenAI CLIP).
    QuickGelu,
    /// Exact erf GELU (`gelu`, OpenCLIP models such as SD2's text encoder).
    Gelu,
    /// Tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    /// Parses transformers' `hidden_act` string.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    /// Applies the activation elementwise.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // sigmoid(z) = (1 + tanh(z/2)) / 2: stable for large |z| in forward and backward.
            Self::QuickGelu => {
                let s = (((x * (1.702 * 0.5))?.tanh()? + 1.0)? * 0.5)?;
                x * s
            }
            // x/2 (1 + erf(x/√2)); candle's fused gelu_erf backward rounds 1/√(2π) to 6 digits.
            Self::Gelu => x * (((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5)?,
            Self::GeluTanh => x.gelu(),
        }
    }
}

fn parse_act(cfg: &JsonConfig, default: &str) -> Result<Activation> {
    let s = cfg.string("hidden_act", Some(default))?;
    Activation::parse(&s).ok_or_else(|| {
        cfg.invalid(
            "hidden_act",
            format!("unsupported activation {s:?} (quick_gelu, gelu, gelu_new)"),
        )
    })
}

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`). Absent fields take
/// transformers' defaults, as `save_pretrained` omits fields equal to the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

impl ClipTextConfig {
    /// Reads a `CLIPTextConfig` JSON; a `CLIPModel` config's `text_config` is used when present.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let cfg = JsonConfig::from_file(path)?;
        let cfg = cfg.sub("text_config").unwrap_or(cfg);
        Self::from_json(&cfg)
    }

    /// From a parsed config (see [`JsonConfig`]).
    pub fn from_json(c: &JsonConfig) -> Result<Self> {
        let cfg = Self {
            vocab_size: c.usize("vocab_size", Some(49408))?,
            hidden_size: c.usize("hidden_size", Some(512))?,
            intermediate_size: c.usize("intermediate_size", Some(2048))?,
            num_hidden_layers: c.usize("num_hidden_layers", Some(12))?,
            num_attention_heads: c.usize("num_attention_heads", Some(8))?,
            max_position_embeddings: c.usize("max_position_embeddings", Some(77))?,
            hidden_act: parse_act(c, "quick_gelu")?,
            layer_norm_eps: c.f64("layer_norm_eps", Some(1e-5))?,
            projection_dim: c.usize("projection_dim", Some(512))?,
            pad_token_id: c.usize("pad_token_id", Some(1))? as u32,
            bos_token_id: c.usize("bos_token_id", Some(49406))? as u32,
            eos_token_id: c.usize("eos_token_id", Some(49407))? as u32,
        };
        check_dims(c, cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers)?;
        Ok(cfg)
    }

    /// The text encoder of Stable Diffusion 1.x (openai/clip-vit-large-patch14).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: 768,
            pad_token_id: 1,
            bos_token_id: 0,
            eos_token_id: 2,
        }
    }

    /// The text encoder of Stable Diffusion 2.x (OpenCLIP ViT-H/14, stored with 23 layers).
    pub fn sd2() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: Activation::Gelu,
            projection_dim: 512,
            ..Self::sd15()
        }
    }
}

fn check_dims(c: &JsonConfig, hidden: usize, heads: usize, layers: usize) -> Result<()> {
    if heads == 0 || hidden.checked_rem(heads) != Some(0) {
        return Err(c.invalid(
            "num_attention_heads",
            format!("{heads} heads do not divide hidden_size {hidden}"),
        ));
    }
    if layers == 0 {
        return Err(c.invalid("num_hidden_layers", "must be at least 1"));
    }
    Ok(())
}

/// transformers' `CLIPVisionConfig`. Absent fields take transformers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
}

impl ClipVisionConfig {
    /// Reads a `CLIPVisionConfig` JSON; a `CLIPModel` config's `vision_config` is used when present.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let cfg = JsonConfig::from_file(path)?;
        let cfg = cfg.sub("vision_config").unwrap_or(cfg);
        Self::from_json(&cfg)
    }

    /// From a parsed config (see [`JsonConfig`]).
    pub fn from_json(c: &JsonConfig) -> Result<Self> {
        let cfg = Self {
            hidden_size: c.usize("hidden_size", Some(768))?,
            intermediate_size: c.usize("intermediate_size", Some(3072))?,
            num_hidden_layers: c.usize("num_hidden_layers", Some(12))?,
            num_attention_heads: c.usize("num_attention_heads", Some(12))?,
            num_channels: c.usize("num_channels", Some(3))?,
            image_size: c.usize("image_size", Some(224))?,
            patch_size: c.usize("patch_size", Some(32))?,
            hidden_act: parse_act(c, "quick_gelu")?,
            layer_norm_eps: c.f64("layer_norm_eps", Some(1e-5))?,
            projection_dim: c.usize("projection_dim", Some(512))?,
        };
        check_dims(c, cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers)?;
        if cfg.image_size.checked_rem(cfg.patch_size) != Some(0) {
            return Err(c.invalid(
                "patch_size",
                format!("{} does not divide image_size {}", cfg.patch_size, cfg.image_size),
            ));
        }
        Ok(cfg)
    }

    /// Number of patches plus the class token.
    pub fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

fn cerr(context: impl std::fmt::Display) -> impl FnOnce(candle_core::Error) -> Error {
    move |e| Error::msg(format!("{context}: {e}"))
}

/// Multi-head self-attention (`self_attn`: `q_proj`, `k_proj`, `v_proj`, `out_proj`, all biased).
#[derive(Debug, Clone)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    num_heads: usize,
}

impl ClipAttention {
    pub fn new(vb: VarBuilder, hidden: usize, num_heads: usize) -> candle_core::Result<Self> {
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), hidden, hidden, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), hidden, hidden, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), hidden, hidden, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), hidden, hidden, true)?,
            num_heads,
        })
    }

    /// `x`: `(B, L, D)` → `(B, L, D)`; `causal` masks later positions (text model).
    pub fn forward(&self, x: &Tensor, causal: bool) -> candle_core::Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let hd = d / self.num_heads;
        let heads = |t: Tensor| t.reshape((b, l, self.num_heads, hd))?.transpose(1, 2);
        let q = heads(self.q_proj.forward(x)?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        let cfg = AttentionConfig { causal, ..Default::default() };
        let o = attention(&q, &k, &v, &cfg)?.transpose(1, 2)?.reshape((b, l, d))?;
        self.out_proj.forward(&o)
    }
}

/// `mlp`: `fc1` → activation → `fc2`.
#[derive(Debug, Clone)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    act: Activation,
}

impl ClipMlp {
    pub fn new(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: Linear::new(vb.pp("fc1"), hidden, intermediate, true)?,
            fc2: Linear::new(vb.pp("fc2"), intermediate, hidden, true)?,
            act,
        })
    }

    /// `(…, D)` → `(…, D)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(x)?)?)
    }
}

/// One pre-norm transformer layer (`layer_norm1`, `self_attn`, `layer_norm2`, `mlp`).
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: ClipMlp,
}

impl ClipEncoderLayer {
    pub fn new(vb: VarBuilder, dims: &EncoderDims) -> candle_core::Result<Self> {
        Ok(Self {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), dims.hidden, dims.eps)?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), dims.hidden, dims.heads)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), dims.hidden, dims.eps)?,
            mlp: ClipMlp::new(vb.pp("mlp"), dims.hidden, dims.intermediate, dims.act)?,
        })
    }

    /// `(B, L, D)` → `(B, L, D)`.
    pub fn forward(&self, x: &Tensor, causal: bool) -> candle_core::Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?, causal)?)?;
        &h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?
    }
}

/// Sizes shared by the text and vision encoders.
#[derive(Debug, Clone, Copy)]
pub struct EncoderDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub eps: f64,
    pub act: Activation,
}

/// The layer stack (`encoder.layers.N`).
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    pub fn new(vb: VarBuilder, dims: &EncoderDims) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..dims.layers)
            .map(|i| ClipEncoderLayer::new(vb.pp(i), dims).map_err(Error::from))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Every linear layer, in layer order (`q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, `fc2`).
    pub fn linears(&self) -> Vec<Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                let a = &l.self_attn;
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &l.mlp.fc1, &l.mlp.fc2]
                    .map(Linear::clone)
            })
            .collect()
    }

    /// All hidden states: `[input, output of layer 1, …, output of layer N]`, each `(B, L, D)`.
    pub fn forward_all(&self, x: &Tensor, causal: bool) -> Result<Vec<Tensor>> {
        let mut hs = vec![x.clone()];
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer
                .forward(hs.last().expect("non-empty"), causal)
                .map_err(cerr(format!("encoder layer {i}")))?;
            hs.push(h);
        }
        Ok(hs)
    }
}

/// Options of [`ClipTextTransformer::forward`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TextForwardOptions {
    /// Which hidden state goes to [`ClipTextOutput::selected`]: 0 = the last layer's output,
    /// `k` = the output `k` layers before it (`hidden_states[-(k + 1)]`, diffusers' `clip_skip`;
    /// 1 = the penultimate layer).
    pub clip_skip: usize,
    /// Leave out `final_layer_norm` on the selected state when `clip_skip > 0`
    /// (diffusers applies it; SD2-style penultimate conditioning applies it too).
    pub no_final_layer_norm_on_skip: bool,
    /// Keep every hidden state in [`ClipTextOutput::hidden_states`].
    pub output_hidden_states: bool,
}

/// What [`ClipTextTransformer::forward`] returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `(B, L, D)`: the last layer's output after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// `(B, L, D)`: `hidden_states[-2]`, the input of the last layer, without final layer norm.
    pub penultimate: Tensor,
    /// `(B, L, D)`: the hidden state picked by [`TextForwardOptions`] (equal to
    /// `last_hidden_state` with the default options) — the UNet's conditioning.
    pub selected: Tensor,
    /// `(B, D)`: `last_hidden_state` at the end-of-text token.
    pub pooled: Tensor,
    /// `[embeddings, layer 1, …, layer N]` when requested, else empty.
    pub hidden_states: Vec<Tensor>,
}

/// The CLIP text transformer (`text_model.*` of a diffusers `text_encoder`).
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    pub token_embedding: Tensor,
    pub position_embedding: Tensor,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
    pub config: ClipTextConfig,
}

impl ClipTextTransformer {
    /// `vb` at the checkpoint root; weights are read under `text_model.`.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Self::new_unprefixed(vb.pp("text_model"), cfg)
    }

    /// `vb` already at the text model (`embeddings.…`, `encoder.…`, `final_layer_norm.…`), for
    /// checkpoints converted without the `text_model.` prefix.
    pub fn new_unprefixed(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let emb = vb.pp("embeddings");
        let d = cfg.hidden_size;
        let dims = EncoderDims {
            hidden: d,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        Ok(Self {
            token_embedding: emb.pp("token_embedding").get((cfg.vocab_size, d), "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, d), "weight")?,
            encoder: ClipEncoder::new(vb.pp("encoder"), &dims)?,
            final_layer_norm: LayerNorm::new(vb.pp("final_layer_norm"), d, cfg.layer_norm_eps)?,
            config: cfg.clone(),
        })
    }

    /// Every linear layer (`q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, `fc2` of each layer),
    /// as handles for attaching LoRA adapters.
    pub fn linears(&self) -> Vec<Linear> {
        self.encoder.linears()
    }

    /// Token plus position embeddings. `input_ids`: `(B, L)` u32 or i64 → `(B, L, D)`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2().map_err(cerr("input_ids must be (batch, length)"))?;
        if l > self.config.max_position_embeddings {
            return Err(Error::invalid(
                "input_ids",
                format!(
                    "length {l} exceeds max_position_embeddings {}",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let max = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.config.vocab_size {
            return Err(Error::invalid(
                "input_ids",
                format!("token id {max} >= vocab_size {}", self.config.vocab_size),
            ));
        }
        let tok = self.token_embedding.index_select(&ids, 0)?.reshape((b, l, ()))?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    /// `input_ids`: `(B, L)` (u32 or i64) → [`ClipTextOutput`]. Causal attention.
    ///
    /// The pooled output is taken at the end-of-text token as transformers does: the position of
    /// the largest id when `eos_token_id == 2` (legacy configs), else the first position holding
    /// `eos_token_id` (position 0 when the row has none, as in transformers).
    pub fn forward(&self, input_ids: &Tensor, opts: &TextForwardOptions) -> Result<ClipTextOutput> {
        let x = self.embed(input_ids)?;
        let hs = self.encoder.forward_all(&x, true)?;
        let n = hs.len() - 1;
        let last = &hs[n];
        let last_hidden_state = self.final_layer_norm.forward(last)?;
        if opts.clip_skip > n {
            return Err(Error::invalid(
                "clip_skip",
                format!("{} exceeds the {n} layers of the text encoder", opts.clip_skip),
            ));
        }
        let selected = if opts.clip_skip == 0 {
            last_hidden_state.clone()
        } else if opts.no_final_layer_norm_on_skip {
            hs[n - opts.clip_skip].clone()
        } else {
            self.final_layer_norm.forward(&hs[n - opts.clip_skip])?
        };
        let pooled = self.pool(input_ids, &last_hidden_state)?;
        let penultimate = hs[n - 1].clone();
        Ok(ClipTextOutput {
            last_hidden_state,
            penultimate,
            selected,
            pooled,
            hidden_states: if opts.output_hidden_states { hs } else { Vec::new() },
        })
    }

    /// The end-of-text position of each row of `input_ids` `(B, L)`.
    pub fn eos_positions(&self, input_ids: &Tensor) -> Result<Vec<usize>> {
        let rows = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let eos = self.config.eos_token_id;
        Ok(rows
            .iter()
            .map(|r| {
                if eos == 2 {
                    // first position of the maximum, like torch.argmax
                    let mut best = 0;
                    for (i, &v) in r.iter().enumerate() {
                        if v > r[best] {
                            best = i;
                        }
                    }
                    best
                } else {
                    r.iter().position(|&v| v == eos).unwrap_or(0)
                }
            })
            .collect())
    }

    fn pool(&self, input_ids: &Tensor, h: &Tensor) -> Result<Tensor> {
        let (b, l, d) = h.dims3()?;
        let idx: Vec<u32> = self
            .eos_positions(input_ids)?
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * l + p) as u32)
            .collect();
        let idx = Tensor::from_vec(idx, b, h.device())?;
        Ok(h.reshape((b * l, d))?.index_select(&idx, 0)?)
    }
}

/// Text transformer plus `text_projection` (transformers' `CLIPTextModelWithProjection`; the
/// text half of `CLIPModel`), for CLIP scores.
#[derive(Debug, Clone)]
pub struct ClipTextModelWithProjection {
    pub text_model: ClipTextTransformer,
    pub text_projection: Linear,
}

impl ClipTextModelWithProjection {
    /// `vb` at the checkpoint root (`text_model.*`, `text_projection.weight`).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            text_model: ClipTextTransformer::new(vb.clone(), cfg)?,
            text_projection: Linear::new(
                vb.pp("text_projection"),
                cfg.hidden_size,
                cfg.projection_dim,
                false,
            )?,
        })
    }

    /// `input_ids` `(B, L)` → (text output, `text_embeds` `(B, projection_dim)`, not normalised).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        opts: &TextForwardOptions,
    ) -> Result<(ClipTextOutput, Tensor)> {
        let out = self.text_model.forward(input_ids, opts)?;
        let embeds = self.text_projection.forward(&out.pooled)?;
        Ok((out, embeds))
    }
}

/// What [`ClipVisionTransformer::forward`] returns.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// `(B, 1 + P, D)`: the encoder output (no post layer norm), class token first.
    pub last_hidden_state: Tensor,
    /// `(B, D)`: `post_layernorm` of the class token.
    pub pooled: Tensor,
}

/// The CLIP vision transformer (`vision_model.*`).
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    /// `(D, C, p, p)`, no bias.
    pub patch_embedding: Tensor,
    /// `(D)`.
    pub class_embedding: Tensor,
    /// `(1 + P, D)`.
    pub position_embedding: Tensor,
    pub pre_layrnorm: LayerNorm,
    pub encoder: ClipEncoder,
    pub post_layernorm: LayerNorm,
    pub config: ClipVisionConfig,
}

impl ClipVisionTransformer {
    /// `vb` at the checkpoint root; weights are read under `vision_model.`.
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let vb = vb.pp("vision_model");
        let emb = vb.pp("embeddings");
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let dims = EncoderDims {
            hidden: d,
            intermediate: cfg.intermediate_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            eps: cfg.layer_norm_eps,
            act: cfg.hidden_act,
        };
        Ok(Self {
            patch_embedding: emb
                .pp("patch_embedding")
                .get((d, cfg.num_channels, p, p), "weight")?,
            class_embedding: emb.get(d, "class_embedding")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.num_positions(), d), "weight")?,
            pre_layrnorm: LayerNorm::new(vb.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?,
            encoder: ClipEncoder::new(vb.pp("encoder"), &dims)?,
            post_layernorm: LayerNorm::new(vb.pp("post_layernorm"), d, cfg.layer_norm_eps)?,
            config: cfg.clone(),
        })
    }

    /// Patch, class and position embeddings. `pixel_values`: `(B, C, H, W)` with
    /// `H = W = image_size` → `(B, 1 + P, D)`.
    ///
    /// The patch convolution (kernel = stride = patch size) is computed as a reshape and a
    /// matmul, which has the same result and a simple, exact backward pass.
    pub fn embed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, c, h, w) =
            pixel_values.dims4().map_err(cerr("pixel_values must be (B, C, H, W)"))?;
        if c != cfg.num_channels || h != cfg.image_size || w != cfg.image_size {
            return Err(Error::invalid(
                "pixel_values",
                format!(
                    "shape {:?}, the model takes (B, {}, {}, {})",
                    pixel_values.dims(),
                    cfg.num_channels,
                    cfg.image_size,
                    cfg.image_size
                ),
            ));
        }
        let p = cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let d = cfg.hidden_size;
        let patches = pixel_values
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let wmat = self.patch_embedding.reshape((d, c * p * p))?;
        let x = patches.broadcast_matmul(&wmat.t()?)?;
        let cls = self.class_embedding.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls.to_dtype(x.dtype())?, &x], 1)?;
        Ok(x.broadcast_add(&self.position_embedding)?)
    }

    /// Every linear layer of the encoder, as handles for attaching LoRA adapters.
    pub fn linears(&self) -> Vec<Linear> {
        self.encoder.linears()
    }

    /// `pixel_values`: `(B, C, H, W)`, already normalised with CLIP's mean and std
    /// (see [`clip_normalize`]).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let x = self.pre_layrnorm.forward(&self.embed(pixel_values)?)?;
        let hs = self.encoder.forward_all(&x, false)?;
        let last = hs.last().expect("non-empty").clone();
        let cls = last.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.post_layernorm.forward(&cls)?;
        Ok(ClipVisionOutput { last_hidden_state: last, pooled })
    }
}

/// Vision transformer plus `visual_projection` (transformers' `CLIPVisionModelWithProjection`;
/// the vision half of `CLIPModel`).
#[derive(Debug, Clone)]
pub struct ClipVisionModelWithProjection {
    pub vision_model: ClipVisionTransformer,
    pub visual_projection: Linear,
}

/// What [`ClipVisionModelWithProjection::forward`] returns.
#[derive(Debug, Clone)]
pub struct ClipVisionProjOutput {
    /// `(B, 1 + P, D)`.
    pub last_hidden_state: Tensor,
    /// `(B, D)`.
    pub pooled: Tensor,
    /// `(B, projection_dim)`, not normalised.
    pub image_embeds: Tensor,
}

impl ClipVisionModelWithProjection {
    /// `vb` at the checkpoint root (`vision_model.*`, `visual_projection.weight`).
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        Ok(Self {
            vision_model: ClipVisionTransformer::new(vb.clone(), cfg)?,
            visual_projection: Linear::new(
                vb.pp("visual_projection"),
                cfg.hidden_size,
                cfg.projection_dim,
                false,
            )?,
        })
    }

    /// `pixel_values`: `(B, C, H, W)` normalised.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionProjOutput> {
        let out = self.vision_model.forward(pixel_values)?;
        let image_embeds = self.visual_projection.forward(&out.pooled)?;
        Ok(ClipVisionProjOutput {
            last_hidden_state: out.last_hidden_state,
            pooled: out.pooled,
            image_embeds,
        })
    }
}

/// CLIP's image normalisation constants (OpenAI CLIP, `CLIPImageProcessor` defaults).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Differentiable normalisation of images in `[0, 1]`, `(B, 3, H, W)` → `(x - mean) / std`
/// per channel. Resizing to the model's `image_size` is the caller's job.
pub fn clip_normalize(images: &Tensor) -> candle_core::Result<Tensor> {
    let dev = images.device();
    let mean = Tensor::new(&CLIP_MEAN, dev)?.to_dtype(images.dtype())?.reshape((1, 3, 1, 1))?;
    let std = Tensor::new(&CLIP_STD, dev)?.to_dtype(images.dtype())?.reshape((1, 3, 1, 1))?;
    images.broadcast_sub(&mean)?.broadcast_div(&std)
}

/// transformers' `CLIPConfig`: text and vision configs with the shared `projection_dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
}

impl ClipConfig {
    /// Reads a `CLIPModel` `config.json` (`text_config`, `vision_config`, `projection_dim`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let cfg = JsonConfig::from_file(path)?;
        // absent sub-configs take transformers' defaults
        let empty = || JsonConfig { path: cfg.path.clone(), value: serde_json::json!({}) };
        let projection_dim = cfg.usize("projection_dim", Some(512))?;
        let mut text = ClipTextConfig::from_json(&cfg.sub("text_config").unwrap_or_else(empty))?;
        let mut vision =
            ClipVisionConfig::from_json(&cfg.sub("vision_config").unwrap_or_else(empty))?;
        text.projection_dim = projection_dim;
        vision.projection_dim = projection_dim;
        Ok(Self { text, vision, projection_dim })
    }
}

/// transformers' `CLIPModel`: both towers, their projections and `logit_scale`, for CLIP
/// scores and rewards.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub text: ClipTextModelWithProjection,
    pub vision: ClipVisionModelWithProjection,
    /// Scalar; the logits are scaled by `exp(logit_scale)`.
    pub logit_scale: Tensor,
}

impl ClipModel {
    /// `vb` at the checkpoint root (`text_model.*`, `vision_model.*`, `text_projection.weight`,
    /// `visual_projection.weight`, `logit_scale`).
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let mut text_cfg = cfg.text.clone();
        text_cfg.projection_dim = cfg.projection_dim;
        let mut vision_cfg = cfg.vision.clone();
        vision_cfg.projection_dim = cfg.projection_dim;
        Ok(Self {
            text: ClipTextModelWithProjection::new(vb.clone(), &text_cfg)?,
            vision: ClipVisionModelWithProjection::new(vb.clone(), &vision_cfg)?,
            logit_scale: vb.get((), "logit_scale")?,
        })
    }

    /// `input_ids` `(Bt, L)`, `pixel_values` `(Bi, 3, H, W)` normalised → `logits_per_image`
    /// `(Bi, Bt)`: `exp(logit_scale)` times the cosine similarities.
    pub fn logits_per_image(&self, input_ids: &Tensor, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, t) = self.text.forward(input_ids, &TextForwardOptions::default())?;
        let i = self.vision.forward(pixel_values)?.image_embeds;
        let sims = l2_normalize(&i)?.matmul(&l2_normalize(&t)?.t()?)?;
        Ok(sims.broadcast_mul(&self.logit_scale.exp()?)?)
    }
}

/// L2-normalises the last dimension: `(…, E)` → `(…, E)`.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// Cosine similarity of text and image embeddings, `(B, E)` each → `(B)`.
pub fn clip_cosine(text_embeds: &Tensor, image_embeds: &Tensor) -> candle_core::Result<Tensor> {
    (l2_normalize(text_embeds)? * l2_normalize(image_embeds)?)?.sum(D::Minus1)
}
