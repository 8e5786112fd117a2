//! Text-to-image and image-to-image sampling on Stable-Diffusion-family models with the
//! project's guidance (CFG, APG, CFG-rescale, guidance intervals from `gen-diffusion`).
//!
//! Guidance convention: `D = u + w (c - u)`, `w = 1` is no guidance (see `gen_diffusion`).
//!
//! ```no_run
//! use gen_diffusion::ApgConfig;
//! use gen_models::pipeline::{ModelSource, SdPipeline, LoadOptions};
//! use gen_sample::{generate, save_outputs, SampleConfig, Sampler};
//! # fn main() -> gen_core::Result<()> {
//! let pipe = SdPipeline::load(&ModelSource::parse("weights/tiny-shapes")?, &LoadOptions::default())?;
//! let cfg = SampleConfig::new("a red cube").apg(ApgConfig::paper(7.5)).sampler(Sampler::DpmPp2m).steps(20).seed(1);
//! let images = generate(&pipe, &cfg, &mut |_| {})?;
//! save_outputs("out.png".as_ref(), &images, &cfg.resolve(&pipe)?)?;
//! # Ok(()) }
//! ```
//!
//! Determinism: image `i` takes every random number it needs (initial noise, stochastic step
//! noise) from `SeededRng::fork(seed, i)`, so on the CPU the same config gives the same bytes,
//! whatever the batch size.

pub mod config;
pub mod generate;
pub mod lora;
pub mod output;

pub use config::{
    apg_norm_threshold_for, memory_estimate, InitImage, MemoryEstimate, Precision, SampleConfig,
    Sampler,
};
pub use generate::{build_scheduler, generate, prompt_warnings, Progress};
pub use lora::{apply_loras, LoraSpec};
pub use output::{
    encode_png, image_grid, plan_outputs, read_png_text, save_outputs, save_png, SavedOutputs,
};
