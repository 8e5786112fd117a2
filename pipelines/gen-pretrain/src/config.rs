//! The training configuration: one serde struct saved next to the outputs (`config.json` of the
//! run folder), with a tiny preset for tests and the real preset for the shipped model.
//!
//! Model architectures are kept as the JSON objects that become the exported `config.json`
//! files (diffusers / transformers field names), so what is trained is exactly what is shipped.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use gen_core::{Error, Result};
use gen_optim::{AdamWConfig, Cosine, GroupConfig};

/// Hyper-parameters shared by every stage's optimisation loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageConfig {
    /// Optimizer updates in total.
    pub steps: u64,
    pub batch_size: usize,
    /// Peak AdamW learning rate (linear warm-up, then cosine decay to `lr * final_lr_fraction`).
    pub lr: f64,
    pub warmup_steps: u64,
    pub final_lr_fraction: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clipping; `None`: none.
    pub max_grad_norm: Option<f64>,
    /// A checkpoint every this many steps (and at the last step).
    pub checkpoint_every: u64,
    /// Decay of a moving average of the weights kept beside them (0 = none; e.g. 0.999, with
    /// diffusers' warm-up `min(decay, (1 + n) / (10 + n))`). With it, the stage's weights —
    /// what later stages load and what is exported — are the average.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ema_decay: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// The CLIP stage: transformers `CLIPConfig` pieces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipStage {
    pub train: StageConfig,
    /// `CLIPTextConfig` fields (`vocab_size` is filled from the tokenizer).
    pub text_config: Value,
    /// `CLIPVisionConfig` fields.
    pub vision_config: Value,
    pub projection_dim: usize,
}

/// The VAE stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeStage {
    pub train: StageConfig,
    /// diffusers `AutoencoderKL` config (its `scaling_factor` is replaced by `1 / std` of the
    /// trained latents at export).
    pub config: Value,
    /// Weight of the mean-squared error (the L1 term has weight 1).
    pub mse_weight: f64,
    /// Weight of the KL term (per latent element mean).
    pub kl_weight: f64,
}

/// The UNet stage (text encoder and VAE frozen).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnetStage {
    pub train: StageConfig,
    /// diffusers `UNet2DConditionModel` config (`cross_attention_dim` must equal the text width).
    pub config: Value,
    /// Probability of replacing a caption with the empty prompt (classifier-free guidance).
    pub caption_dropout: f64,
    /// Probability of leaving out the background clause of a kept caption, and (drawn
    /// separately) its view clause, so the model also learns prompts such as "a red cube" or
    /// "a red cube, front view". 0 (the default, and what the shipped model used) draws nothing.
    #[serde(default)]
    pub caption_part_dropout: f64,
    /// Images used to measure the latent standard deviation (the VAE scaling factor).
    pub scaling_samples: usize,
}

/// The evaluator stage: a small CNN classifying shape, hue, tone, view and background.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluatorStage {
    pub train: StageConfig,
    /// Channels of the stride-2 convolutions.
    pub channels: Vec<usize>,
    pub norm_groups: usize,
}

/// The whole training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    /// Seed of parameter initialisation, batch sampling and noise.
    pub seed: u64,
    /// Side of the world's images (and of every model's input).
    pub image_size: u32,
    /// Anti-aliasing subsamples per pixel axis of the renderer.
    pub supersample: u32,
    /// Train-split indices the batches draw from; each is rendered once and kept in memory.
    pub pool_size: usize,
    /// Length of the tokenized prompts (`max_position_embeddings` of the text encoder).
    pub max_text_len: usize,
    pub clip: ClipStage,
    pub vae: VaeStage,
    pub unet: UnetStage,
    pub evaluator: EvaluatorStage,
}

fn stage(steps: u64, batch_size: usize, lr: f64, checkpoint_every: u64) -> StageConfig {
    StageConfig {
        steps,
        batch_size,
        lr,
        warmup_steps: (steps / 20).clamp(1, 200),
        final_lr_fraction: 0.1,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        checkpoint_every,
        ema_decay: 0.0,
    }
}

impl PretrainConfig {
    /// A few-second configuration for tests: 16² images, 2-block models of width 8–16.
    pub fn tiny() -> Self {
        let max_text_len = 16;
        Self {
            seed: 7,
            image_size: 16,
            supersample: 1,
            pool_size: 64,
            max_text_len,
            clip: ClipStage {
                train: stage(30, 8, 3e-3, 10),
                text_config: json!({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": max_text_len, "hidden_act": "quick_gelu"}),
                vision_config: json!({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "image_size": 16, "patch_size": 4, "hidden_act": "quick_gelu"}),
                projection_dim: 16,
            },
            vae: VaeStage {
                train: stage(30, 4, 3e-3, 10),
                config: json!({"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
                    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "layers_per_block": 1, "latent_channels": 4,
                    "norm_num_groups": 4, "sample_size": 16}),
                mse_weight: 1.0,
                kl_weight: 1e-4,
            },
            unet: UnetStage {
                train: stage(30, 8, 1e-2, 10),
                config: json!({"in_channels": 4, "out_channels": 4, "block_out_channels": [8, 16],
                    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                    "layers_per_block": 1, "cross_attention_dim": 16, "attention_head_dim": 2, "norm_num_groups": 4, "sample_size": 8}),
                caption_dropout: 0.1,
                caption_part_dropout: 0.0,
                scaling_samples: 16,
            },
            evaluator: EvaluatorStage {
                train: stage(30, 16, 1e-2, 10),
                channels: vec![8, 16],
                norm_groups: 4,
            },
        }
    }

    /// The shipped model's configuration: 64² images; CLIP towers of width 64 (3 layers, 8²
    /// patches); VAE (32, 64, 64) 64² → 4×16×16 (the prototype's); UNet (32, 64, 64) on the
    /// 16×16 latents (1.5 M parameters) with attention at 8×8 and 4×4 only (attention over 256
    /// tokens at 16×16 cost more than the rest of the model on the CPU); evaluator CNN
    /// (32, 64, 64, 128). The UNet trains on captions with their background/view clauses
    /// dropped at random (30% each) so short prompts work, and exports the moving average of its
    /// weights (decay 0.999). Step counts are sized for about two hours on two CPU cores
    /// (measured on a quiet 2-core machine: VAE ~1.3 s per step of 16 images, UNet ~0.47 s per
    /// step of 32; see the model card).
    pub fn real() -> Self {
        let max_text_len = 16;
        Self {
            seed: 20261128,
            image_size: 64,
            supersample: 3,
            pool_size: 4000,
            max_text_len,
            clip: ClipStage {
                train: stage(600, 32, 1e-3, 100),
                text_config: json!({"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "max_position_embeddings": max_text_len, "hidden_act": "quick_gelu"}),
                vision_config: json!({"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
                    "num_attention_heads": 4, "image_size": 64, "patch_size": 8, "hidden_act": "quick_gelu"}),
                projection_dim: 64,
            },
            vae: VaeStage {
                train: StageConfig { warmup_steps: 50, ..stage(1200, 16, 1e-3, 100) },
                config: json!({"block_out_channels": [32, 64, 64],
                    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
                    "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 16, "sample_size": 64}),
                mse_weight: 1.0,
                kl_weight: 1e-5,
            },
            unet: UnetStage {
                train: StageConfig {
                    warmup_steps: 100,
                    ema_decay: 0.999,
                    ..stage(10000, 32, 1.5e-3, 100)
                },
                config: json!({"in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64, 64],
                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                    "layers_per_block": 1, "cross_attention_dim": 64, "attention_head_dim": 4, "norm_num_groups": 16,
                    "sample_size": 16}),
                caption_dropout: 0.1,
                caption_part_dropout: 0.3,
                scaling_samples: 256,
            },
            evaluator: EvaluatorStage {
                train: stage(400, 32, 2e-3, 100),
                channels: vec![32, 64, 64, 128],
                norm_groups: 8,
            },
        }
    }

    /// A preset by name: `tiny` or `real`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "real" => Ok(Self::real()),
            _ => Err(Error::invalid("preset", format!("{name:?}; expected `tiny` or `real`"))),
        }
    }

    /// Reads a config saved by [`PretrainConfig::save`] (or written by hand) and checks all of
    /// it (see [`PretrainConfig::validate`]): an unknown key is an error naming the nearest
    /// known key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(path, &text)
    }

    /// Parses and checks a config as if read from `path` (named in errors).
    pub fn from_json_str(path: &Path, text: &str) -> Result<Self> {
        let err = |key: &str, msg: String| Error::Config {
            file: path.to_path_buf(),
            key: key.into(),
            msg,
        };
        let value: Value = serde_json::from_str(text)
            .map_err(|e| err("(file)", format!("not valid JSON: {e}")))?;
        check_keys(path, "", &value, &key_template())?;
        let cfg: Self = serde_json::from_value(value).map_err(|e| err("(file)", e.to_string()))?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// Writes the config as pretty JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::msg(format!("serialising the config: {e}")))?;
        gen_core::write_atomic(path, text.as_bytes())
    }

    /// Checks all of the config before anything trains: every stage's optimisation values,
    /// the model sections (through the model parsers, with unknown keys and keys the trainer
    /// sets refused) and the shapes that must agree across stages (text width and UNet
    /// cross-attention, VAE latent channels and UNet channels, image and latent sizes).
    pub fn validate(&self) -> Result<()> {
        self.check(Path::new("pretrain config"))
    }

    /// [`PretrainConfig::validate`] with errors naming `origin` (the file read, or
    /// `pretrain config`).
    fn check(&self, origin: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::Config { file: origin.to_path_buf(), key: key.into(), msg })
        };
        for (key, v) in [
            ("pool_size", self.pool_size),
            ("image_size", self.image_size as usize),
            ("supersample", self.supersample as usize),
            ("clip.projection_dim", self.clip.projection_dim),
        ] {
            if v == 0 {
                return bad(key, "must be positive".into());
            }
        }
        if self.max_text_len < 2 {
            return bad(
                "max_text_len",
                format!(
                    "{} (must hold at least the start and end tokens: >= 2)",
                    self.max_text_len
                ),
            );
        }
        for (name, s) in [
            ("clip", &self.clip.train),
            ("vae", &self.vae.train),
            ("unet", &self.unet.train),
            ("evaluator", &self.evaluator.train),
        ] {
            s.check(origin, &format!("{name}.train"), self.pool_size)?;
        }
        for (key, p, upper) in [
            ("unet.caption_dropout", self.unet.caption_dropout, false),
            ("unet.caption_part_dropout", self.unet.caption_part_dropout, true),
        ] {
            let ok = if upper { (0.0..=1.0).contains(&p) } else { (0.0..1.0).contains(&p) };
            if !ok {
                let range = if upper { "[0, 1]" } else { "[0, 1)" };
                return bad(key, format!("{p} (must be in {range})"));
            }
        }
        for (key, w) in
            [("vae.mse_weight", self.vae.mse_weight), ("vae.kl_weight", self.vae.kl_weight)]
        {
            if !(w.is_finite() && w >= 0.0) {
                return bad(key, format!("{w} (must be finite and >= 0)"));
            }
        }
        if self.evaluator.norm_groups == 0 {
            return bad("evaluator.norm_groups", "must be positive".into());
        }
        if self.evaluator.channels.is_empty()
            || self
                .evaluator
                .channels
                .iter()
                .any(|c| *c == 0 || c % self.evaluator.norm_groups != 0)
        {
            return bad(
                "evaluator.channels",
                format!(
                    "{:?} must be non-empty positive multiples of norm_groups {}",
                    self.evaluator.channels, self.evaluator.norm_groups
                ),
            );
        }
        self.check_models(origin)
    }

    /// The model sections: known keys only, parsed by the model parsers, and consistent
    /// across stages.
    fn check_models(&self, origin: &Path) -> Result<()> {
        use crate::stages::{clip_config_json, unet_config_json, vae_config_json};
        use gen_models::loading::{struct_fields, JsonConfig};
        use gen_models::unet::UNetConfig;
        use gen_models::vae::VaeConfig;
        let bad = |key: &str, msg: String| {
            Err(Error::Config { file: origin.to_path_buf(), key: key.into(), msg })
        };
        // what the trainer writes into each exported config (a user value would be overwritten)
        let mut bare = self.clone();
        bare.clip.text_config = json!({});
        bare.clip.vision_config = json!({});
        bare.vae.config = json!({});
        bare.unet.config = json!({});
        let clip_bare = clip_config_json(&bare);
        let keys = |v: &Value| -> Vec<String> {
            v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
        };
        let sections: [(&str, &Value, Vec<&str>, Vec<String>); 4] = [
            (
                "clip.text_config",
                &self.clip.text_config,
                CLIP_TEXT_KEYS.to_vec(),
                keys(&clip_bare["text_config"]),
            ),
            (
                "clip.vision_config",
                &self.clip.vision_config,
                CLIP_VISION_KEYS.to_vec(),
                keys(&clip_bare["vision_config"]),
            ),
            (
                "vae.config",
                &self.vae.config,
                struct_fields::<VaeConfig>().to_vec(),
                keys(&vae_config_json(&bare, 1.0)),
            ),
            (
                "unet.config",
                &self.unet.config,
                struct_fields::<UNetConfig>().to_vec(),
                keys(&unet_config_json(&bare)),
            ),
        ];
        for (section, value, fields, set_by_trainer) in &sections {
            let Some(obj) = value.as_object() else {
                return bad(section, format!("expected a JSON object, found {value}"));
            };
            let known: Vec<&str> =
                fields.iter().copied().filter(|f| !set_by_trainer.iter().any(|s| s == f)).collect();
            for k in obj.keys() {
                if set_by_trainer.contains(k) {
                    return bad(
                        &format!("{section}.{k}"),
                        "set by the trainer, not by the config (leave it out)".into(),
                    );
                }
                if !known.contains(&k.as_str()) {
                    return Err(gen_core::suggest::unknown_key(
                        origin,
                        &format!("{section}.{k}"),
                        known.iter().copied(),
                    ));
                }
            }
        }
        // the parsers' own checks, with errors naming the section
        let named = |section: &str| format!("{} {section}", origin.display());
        let clip = clip_config_json(self);
        let text = gen_models::clip::ClipTextConfig::from_json(&JsonConfig {
            path: named("clip.text_config").into(),
            value: clip["text_config"].clone(),
        })?;
        let vision = gen_models::clip::ClipVisionConfig::from_json(&JsonConfig {
            path: named("clip.vision_config").into(),
            value: clip["vision_config"].clone(),
        })?;
        let vae = VaeConfig::from_json(&vae_config_json(self, 1.0), &named("vae.config"))?;
        let unet = UNetConfig::from_json(&unet_config_json(self), &named("unet.config"))?;
        // across stages
        if text.max_position_embeddings < self.max_text_len {
            return bad(
                "clip.text_config.max_position_embeddings",
                format!(
                    "{} is shorter than max_text_len {}",
                    text.max_position_embeddings, self.max_text_len
                ),
            );
        }
        if vision.image_size != self.image_size as usize {
            return bad(
                "clip.vision_config.image_size",
                format!("{} differs from image_size {}", vision.image_size, self.image_size),
            );
        }
        if unet.cross_attention_dim != text.hidden_size {
            return bad(
                "unet.config.cross_attention_dim",
                format!(
                    "{} differs from the text encoder's hidden_size {} (clip.text_config)",
                    unet.cross_attention_dim, text.hidden_size
                ),
            );
        }
        for (key, c) in [
            ("unet.config.in_channels", unet.in_channels),
            ("unet.config.out_channels", unet.out_channels),
        ] {
            if c != vae.latent_channels {
                return bad(
                    key,
                    format!("{c} differs from the VAE's latent_channels {}", vae.latent_channels),
                );
            }
        }
        let down = 1usize << (vae.block_out_channels.len() - 1).min(16);
        if (self.image_size as usize).checked_rem(down) != Some(0) {
            return bad(
                "vae.config.block_out_channels",
                format!(
                    "{} blocks downsample by {down}, which does not divide image_size {}",
                    vae.block_out_channels.len(),
                    self.image_size
                ),
            );
        }
        let latent = self.image_size as usize / down;
        if let Some(s) = vae.sample_size.filter(|s| *s != self.image_size as usize) {
            return bad(
                "vae.config.sample_size",
                format!("{s} differs from image_size {}", self.image_size),
            );
        }
        if let Some(s) = unet.sample_size.filter(|s| *s != latent) {
            return bad(
                "unet.config.sample_size",
                format!("{s} differs from the latent size {latent} (image_size / {down})"),
            );
        }
        let unet_down = 1usize << (unet.block_out_channels.len() - 1).min(16);
        if latent.checked_rem(unet_down) != Some(0) {
            return bad(
                "unet.config.block_out_channels",
                format!("{} blocks downsample by {unet_down}, which does not divide the latent size {latent}", unet.block_out_channels.len()),
            );
        }
        Ok(())
    }
}

/// The `CLIPTextConfig` keys a training config may set (the rest are set by the trainer).
pub const CLIP_TEXT_KEYS: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
];

/// The `CLIPVisionConfig` keys a training config may set.
pub const CLIP_VISION_KEYS: &[&str] = &[
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
];

/// Sections whose keys are checked against the model parsers (see `check_models`).
const MODEL_SECTIONS: [&str; 4] =
    ["clip.text_config", "clip.vision_config", "vae.config", "unet.config"];

/// Every key a config may hold, as a JSON value of the config's shape (a config with every
/// optional field set, so that none is skipped when serialised).
fn key_template() -> Value {
    let mut full = PretrainConfig::real();
    for s in
        [&mut full.clip.train, &mut full.vae.train, &mut full.unet.train, &mut full.evaluator.train]
    {
        s.ema_decay = 0.5;
        s.max_grad_norm = Some(1.0);
    }
    serde_json::to_value(full).expect("the config serialises")
}

/// Refuses keys of `value` that `template` lacks, naming the nearest known key; the model
/// sections are left to `check_models`.
fn check_keys(file: &Path, at: &str, value: &Value, template: &Value) -> Result<()> {
    let (Some(obj), Some(known)) = (value.as_object(), template.as_object()) else {
        return Ok(());
    };
    for (k, v) in obj {
        let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
        let Some(t) = known.get(k) else {
            return Err(gen_core::suggest::unknown_key(
                file,
                &path,
                known.keys().map(String::as_str),
            ));
        };
        if !MODEL_SECTIONS.contains(&path.as_str()) {
            check_keys(file, &path, v, t)?;
        }
    }
    Ok(())
}

impl StageConfig {
    /// The AdamW settings of the stage (its learning rate is the schedule's peak).
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { lr: self.lr, weight_decay: self.weight_decay, ..Default::default() }
    }

    /// The learning-rate schedule: linear warm-up, then cosine decay to
    /// `lr * final_lr_fraction` at `steps`.
    pub fn schedule(&self) -> Result<Cosine> {
        Cosine::new(self.lr, self.warmup_steps, self.steps, self.lr * self.final_lr_fraction)
    }

    /// Checks the values of a stage (`at`: its key, e.g. `unet.train`).
    fn check(&self, origin: &Path, at: &str, pool_size: usize) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::Config { file: origin.to_path_buf(), key: format!("{at}.{key}"), msg })
        };
        for (key, v) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size as u64),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if v == 0 {
                return bad(key, "must be positive".into());
            }
        }
        if self.batch_size > pool_size {
            return bad("batch_size", format!("{} exceeds pool_size {pool_size}", self.batch_size));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} (must be finite and > 0)", self.lr));
        }
        if !(0.0..=1.0).contains(&self.final_lr_fraction) {
            return bad(
                "final_lr_fraction",
                format!("{} (must be in [0, 1])", self.final_lr_fraction),
            );
        }
        if let Some(g) = self.max_grad_norm.filter(|g| !(g.is_finite() && *g > 0.0)) {
            return bad("max_grad_norm", format!("{g} (must be finite and > 0, or null for none)"));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(
                "ema_decay",
                format!("{} (must be in [0, 1); 0 = no moving average)", self.ema_decay),
            );
        }
        if self.warmup_steps >= self.steps {
            return bad(
                "warmup_steps",
                format!("{} must be below steps {}", self.warmup_steps, self.steps),
            );
        }
        // what the optimizer and the schedule check themselves (their errors name the field)
        for res in [self.adamw().validate(), self.schedule().map(|_| ())] {
            match res {
                Ok(()) => {}
                Err(Error::Invalid { what, msg }) => return bad(&what, msg),
                Err(e) => return bad("(optimizer)", e.to_string()),
            }
        }
        Ok(())
    }
}
