//! Fitting Gaussian splats (and, in [`field`], neural fields) to posed images.
//!
//! The pieces, one job per file:
//! - [`optimizer`]: [`SplatOptimizer`], loss-agnostic — it renders a camera, takes any
//!   objective of the render (a photometric loss, or a gradient on the image through
//!   [`image_gradient_loss`]), steps AdamW with one group per field (learning rates as in
//!   DreamGaussian / 3DGS, the means' rate decaying log-linearly) and drives a
//!   [`crate::density::DensityStrategy`] that never sees the loss;
//! - [`trainer`]: [`Trainer`], 3DGS-style photometric reconstruction on that optimiser: each
//!   step renders one view (a seeded permutation per epoch) and takes the loss
//!   `(1 − λ) L1 + λ (1 − SSIM)` (3DGS, λ = 0.2; plus an optional L1 between the rendered alpha
//!   and the view's mask), with [`crate::density::AdaptiveDensity`] as the strategy;
//! - [`config`]: what determines a fit ([`FitConfig`]) and the initial splats;
//! - [`checkpoint`]: the checkpoint entries every fitter shares; [`eval`]: held-out scores;
//!   [`run`]: the output-folder driver [`fit`] and its events; [`export`](mod@export): the final exports;
//!   [`view`]: posed images; [`dataset`]: transforms.json folders; [`ssim`](mod@ssim).
//!
//! **Determinism and resume.** All randomness is drawn from generators forked from the seed
//! and the step number (initialisation: stream 0; the view order of epoch `e`: stream `1 + e`;
//! densification after step `s`: stream `2⁴⁰ + s`), so the generator state is implied by
//! `(seed, step)`. A checkpoint ([`Trainer::save_checkpoint`], one safetensors file written
//! atomically) holds the splats, the optimizer state, the density statistics, the step, the
//! seed and the run's identity ([`RunIdentity`]: a checkpoint of another object, data set or
//! configuration is refused); [`Trainer::resume`] continues bit-identically to an
//! uninterrupted run.
//!
//! Measured quality and timings are in `bench/RESULTS.md`.

pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod eval;
pub mod export;
pub mod field;
pub mod optimizer;
pub mod run;
pub mod ssim;
pub mod trainer;
pub mod view;

pub use config::{init_splats, FitConfig, InitConfig, InitRegion, LearningRates};
pub use eval::{evaluate, psnr, EvalReport};
pub use export::{export, ExportSet};
pub use optimizer::{image_gradient_loss, OptimStep, SplatOptimizer};
pub use run::{fit, to_rgb8, FitEvent, FitOutputs};
pub use ssim::{ssim, Ssim};
pub use trainer::{StepInfo, Trainer};
pub use view::PosedImage;

pub(crate) use checkpoint::{checkpoint_map, CheckpointFile, CHECKPOINT_FILE};
pub use checkpoint::{data_fingerprint, RunIdentity};
pub(crate) use config::log_linear;
pub(crate) use export::parse_export_list;
pub(crate) use run::{optimizer_state_bytes, run_fit, FitLoop, RunEvent, Schedule};
pub(crate) use view::validate_training_views;
