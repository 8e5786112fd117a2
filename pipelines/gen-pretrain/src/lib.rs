//! Training the embedded tiny Stable Diffusion (CLIP, VAE, UNet) and its evaluator from scratch
//! on the procedural world (gen-world), and exporting it as a diffusers pipeline folder. This
//! crate only trains: the evaluator's model is `gen_models::evaluator`, the measurements (`gen
//! eval`, the model card's numbers) are the gen-eval pipeline's.
//!
//! - [`config`]: the serde training config with `tiny` (tests) and `real` presets;
//! - [`data`]: batches streamed from the world (rendered on first use, kept in memory);
//! - [`runner`]: the shared AdamW loop with events, metrics CSV, loss-curve PNG, atomic
//!   checkpoints and bit-exact resume;
//! - [`stages`]: the CLIP, VAE, UNet and evaluator objectives and the [`Trainer`];
//! - [`export`]: the diffusers folder (`model_index.json`, `text_encoder/`, `tokenizer/`, `unet/`,
//!   `vae/`, `scheduler/`, plus `clip/` and `evaluator/`);

pub mod config;
pub mod data;
pub mod export;
pub mod params;
pub mod runner;
pub mod stages;
pub mod tokenizer;

pub use config::{ClipStage, EvaluatorStage, PretrainConfig, StageConfig, UnetStage, VaeStage};
pub use runner::{RunControl, StageOutcome, TrainEvent};
pub use stages::{Stage, Trainer};
