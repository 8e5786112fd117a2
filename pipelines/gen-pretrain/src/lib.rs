//! Training the embedded tiny Stable Diffusion (CLIP, VAE, UNet) and its evaluator from scratch
//! on the procedural world (gen-world), and exporting it as a diffusers pipeline folder.
//!
//! - [`config`]: the serde training config with `tiny` (tests) and `real` presets;
//! - [`data`]: batches streamed from the world (rendered on first use, kept in memory);
//! - [`runner`]: the shared AdamW loop with events, metrics CSV, loss-curve PNG, atomic
//!   checkpoints and bit-exact resume;
//! - [`stages`]: the CLIP, VAE, UNet and evaluator objectives and the [`Trainer`];
//! - [`evaluator`]: the shape/colour/view classifier (its own weights; never a reward);
//! - [`export`]: the diffusers folder (`model_index.json`, `text_encoder/`, `tokenizer/`, `unet/`,
//!   `vae/`, `scheduler/`, plus `clip/` and `evaluator/`);
//! - [`metrics`]: measurements on the test split (VAE PSNR, evaluator accuracy, prompt accuracy
//!   of generated images).
//! - [`eval`]: `gen eval`: prompt accuracy, tiny-FID with its real-vs-real baseline, saturation
//!   excess, clipped pixels and speed of a pipeline with CFG or APG on the test split.

pub mod config;
pub mod data;
pub mod eval;
pub mod evaluator;
pub mod export;
pub mod metrics;
pub mod params;
pub mod plot;
pub mod runner;
pub mod stages;
pub mod tokenizer;

pub use config::{ClipStage, EvaluatorStage, PretrainConfig, StageConfig, UnetStage, VaeStage};
pub use runner::{RunControl, StageOutcome, TrainEvent};
pub use stages::{Stage, Trainer};
