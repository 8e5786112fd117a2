//! The evaluation pipeline: every measurement against the procedural world's ground truth. It
//! measures the other pipelines and may call them (it generates with gen-sample's `generate`,
//! exactly what `gen image` runs, and reads the world's test split through gen-pretrain's
//! data stream); no other pipeline depends on it.
//!
//! - [`session`]: `gen eval images` / `gen eval guidance`: prompt accuracy, tiny-FID with its
//!   real-vs-real baseline, saturation excess, clipped pixels and speed of a pipeline with CFG
//!   or APG on the test split; the report's JSON and CSV, the guidance sweep and its chart;
//! - [`metrics`]: the model card's measurements (VAE PSNR, evaluator accuracy, prompt accuracy
//!   of generated images) and the Fréchet distance of feature rows.
//!
//! The evaluator classifier itself is `gen_models::evaluator` (gen-pretrain trains it).

pub mod metrics;
pub mod session;

pub use metrics::{
    evaluator_accuracy, generation_accuracy, vae_psnr, GenerationReport, GenerationSettings,
    HeadAccuracy,
};
pub use session::{EvalConfig, EvalOutput, EvalReport, EvalSession};
