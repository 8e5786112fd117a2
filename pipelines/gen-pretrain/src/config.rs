//! The training configuration: one serde struct saved next to the outputs (`config.json` of the
//! run folder), with a tiny preset for tests and the real preset for the shipped model.
//!
//! Model architectures are kept as the JSON objects that become the exported `config.json`
//! files (diffusers / transformers field names), so what is trained is exactly what is shipped.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use gen_core::{Error, Result};

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

    /// Reads a config saved by [`PretrainConfig::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::Config {
            file: path.to_path_buf(),
            key: "(file)".into(),
            msg: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the config as pretty JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::msg(format!("serialising the config: {e}")))?;
        gen_core::write_atomic(path, text.as_bytes())
    }

    /// Checks the values that the model configs do not check themselves.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |what: &str, msg: String| Err(Error::invalid(format!("pretrain config `{what}`"), msg));
        if self.pool_size == 0 {
            return bad("pool_size", "must be positive".into());
        }
        for (name, s) in [
            ("clip", &self.clip.train),
            ("vae", &self.vae.train),
            ("unet", &self.unet.train),
            ("evaluator", &self.evaluator.train),
        ] {
            if s.steps == 0 || s.batch_size == 0 || s.checkpoint_every == 0 {
                return bad(
                    &format!("{name}.train"),
                    format!(
                        "steps {}, batch_size {} and checkpoint_every {} must be positive",
                        s.steps, s.batch_size, s.checkpoint_every
                    ),
                );
            }
            if s.batch_size > self.pool_size {
                return bad(
                    &format!("{name}.train.batch_size"),
                    format!("{} exceeds pool_size {}", s.batch_size, self.pool_size),
                );
            }
            if !(0.0..1.0).contains(&s.ema_decay) {
                return bad(
                    &format!("{name}.train.ema_decay"),
                    format!("{} (must be in [0, 1); 0 = no moving average)", s.ema_decay),
                );
            }
            if s.warmup_steps > s.steps {
                return bad(
                    &format!("{name}.train.warmup_steps"),
                    format!("{} exceeds steps {}", s.warmup_steps, s.steps),
                );
            }
        }
        if !(0.0..1.0).contains(&self.unet.caption_dropout) {
            return bad(
                "unet.caption_dropout",
                format!("{} (must be in [0, 1))", self.unet.caption_dropout),
            );
        }
        if !(0.0..=1.0).contains(&self.unet.caption_part_dropout) {
            return bad(
                "unet.caption_part_dropout",
                format!("{} (must be in [0, 1])", self.unet.caption_part_dropout),
            );
        }
        if self.evaluator.channels.is_empty()
            || self.evaluator.channels.iter().any(|c| c % self.evaluator.norm_groups != 0)
        {
            return bad(
                "evaluator.channels",
                format!(
                    "{:?} must be non-empty multiples of norm_groups {}",
                    self.evaluator.channels, self.evaluator.norm_groups
                ),
            );
        }
        Ok(())
    }
}
