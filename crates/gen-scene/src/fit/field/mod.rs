//! Fitting a neural field ([`crate::field::CamField`]) to posed images, in the style of the splat fitter
//! ([`super::Trainer`]). Files: [`render`] (ray batches and whole images, with or without
//! gradients), [`optimizer`] (the loss-agnostic [`FieldOptimizer`]), [`trainer`] (photometric
//! fitting and checkpoints), [`output`] (the output-folder driver, exports, evaluation).
//!
//! [`FieldTrainer`] holds the field's parameters in a `VarMap`, one AdamW group over all of
//! them (instant-ngp's betas (0.9, 0.99), ε 1e-15; the rate decays log-linearly from `lr` to
//! `lr_final`) and an [`crate::field::OccupancyGrid`] for empty-space skipping. Each [`FieldTrainer::step`]
//! draws `rays_per_batch` random pixels from all training views (view and pixel uniform),
//! volume-renders them with stratified (jittered) samples ([`render_rays`], the same
//! quadrature as [`crate::field::render_volume`]), and minimises the MSE (or L1) to the pixels' colours plus,
//! optionally, `mask_weight ·` the MSE between the rendered opacity and the view's mask. Every
//! `occupancy_every` steps the occupancy grid is re-marked from the field's density.
//!
//! **Determinism and resume.** Initialisation uses generator stream 0 of the seed; the rays and
//! jitter of 0-based step `s` use stream `1 + s`. A checkpoint ([`FieldTrainer::save_checkpoint`],
//! one safetensors file written atomically) holds the parameters (`field.<name>`), the
//! optimizer state (`optim.*`), the occupancy flags, the step, the seed and the run's identity
//! ([`super::RunIdentity`]: a checkpoint of other views or another configuration is refused),
//! so [`FieldTrainer::resume`] continues bit-identically.
//!
//! [`fit_field`] drives a trainer with an output folder (config JSON, previews, checkpoints,
//! exports: a marching-cubes mesh of the density as `.glb` and `.obj` with vertex colours from
//! the field, and a volume-rendered turntable GIF + contact sheet).
//!
//! Measured quality and timings are in `bench/RESULTS.md`.

use gen_core::{DeviceChoice, Error, Result};
use serde_json::json;

use super::log_linear;
use crate::field::{FieldConfig, VolumeConfig};

pub mod optimizer;
pub mod output;
pub mod render;
pub mod trainer;

pub use crate::field::volume::Ray;
pub use optimizer::{FieldOptimStep, FieldOptimizer};
pub use output::{
    evaluate_field, export_field, field_mesh, field_turntable, fit_field, FieldExportSet,
    FieldFitEvent, FieldOutputs,
};
pub use render::{render_field_image, render_field_image_grad, render_rays, RaysOutput};
pub use trainer::{FieldStepInfo, FieldTrainer};

/// The photometric term of the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhotometricLoss {
    /// Mean squared error over the batch's colour channels.
    Mse,
    /// Mean absolute error.
    L1,
}

/// A [`FieldConfig`] preset by name: `tiny`, `small` or `base`.
pub fn field_preset(name: &str) -> Result<FieldConfig> {
    match name {
        "tiny" => Ok(FieldConfig::tiny()),
        "small" => Ok(FieldConfig::small()),
        "base" => Ok(FieldConfig::base()),
        _ => Err(Error::invalid("field preset", format!("{name:?} (tiny, small, base)"))),
    }
}

/// Everything that determines a field fit.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldFitConfig {
    pub field: FieldConfig,
    pub steps: u64,
    /// Samples per ray `K` (equal bins over the ray's span in the field's box).
    pub samples_per_ray: usize,
    /// Random pixels (rays) per step, drawn from all training views.
    pub rays_per_batch: usize,
    /// Learning rate at the first step, decaying log-linearly to `lr_final` at the last.
    pub lr: f64,
    pub lr_final: f64,
    pub loss: PhotometricLoss,
    /// Weight of `MSE(opacity, mask)` for rays from views with a mask (0: off).
    pub mask_weight: f64,
    /// Cells per axis of the occupancy grid.
    pub occupancy_res: usize,
    /// Re-mark the occupancy grid every this many steps (0: never; nothing is skipped).
    pub occupancy_every: u64,
    /// Density above which a cell counts as occupied.
    pub occupancy_threshold: f64,
    /// Background composited behind the field (should match the images').
    pub background: [f64; 3],
    /// Smallest camera depth sampled.
    pub near: f64,
    /// Checkpoint every this many steps (0: only at the end). Used by [`fit_field`].
    pub checkpoint_every: u64,
    /// Preview every this many steps (0: never). Used by [`fit_field`].
    pub preview_every: u64,
    pub seed: u64,
    /// Where the field lives and the optimisation runs (default: the CPU). Not part of the
    /// run's identity: a checkpoint resumes on any device.
    pub device: DeviceChoice,
}

impl Default for FieldFitConfig {
    fn default() -> Self {
        Self {
            field: FieldConfig::small(),
            steps: 1000,
            samples_per_ray: 64,
            rays_per_batch: 1024,
            lr: 1e-2,
            lr_final: 1e-3,
            loss: PhotometricLoss::Mse,
            mask_weight: 0.0,
            occupancy_res: 32,
            occupancy_every: 16,
            occupancy_threshold: 0.01,
            background: [1.0; 3],
            near: 0.01,
            checkpoint_every: 0,
            preview_every: 0,
            seed: 0,
            device: DeviceChoice::Cpu,
        }
    }
}

impl FieldFitConfig {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, v: String| Err(Error::invalid(format!("field fit `{f}`"), v));
        self.field.validate()?;
        if self.samples_per_ray == 0 {
            return bad("samples_per_ray", "0".into());
        }
        if self.rays_per_batch == 0 {
            return bad("rays_per_batch", "0".into());
        }
        for (f, v) in [("lr", self.lr), ("lr_final", self.lr_final)] {
            if !(v.is_finite() && v > 0.0) {
                return bad(f, format!("{v} (must be > 0)"));
            }
        }
        if !(self.mask_weight.is_finite() && self.mask_weight >= 0.0) {
            return bad("mask_weight", format!("{}", self.mask_weight));
        }
        if self.occupancy_res == 0 || self.occupancy_res > 256 {
            return bad("occupancy_res", format!("{} (1..=256)", self.occupancy_res));
        }
        if !self.occupancy_threshold.is_finite() {
            return bad("occupancy_threshold", format!("{}", self.occupancy_threshold));
        }
        self.volume_config().validate()
    }

    /// The volume renderer's options (samples, the field's box, near, background).
    pub fn volume_config(&self) -> VolumeConfig {
        VolumeConfig {
            samples_per_ray: self.samples_per_ray,
            bounds: self.field.bounds,
            near: self.near,
            background: self.background,
        }
    }

    /// The schedule of the [`FieldOptimizer`] under a [`FieldTrainer`].
    pub fn optim_config(&self) -> optimizer::FieldOptimConfig {
        optimizer::FieldOptimConfig {
            lr: self.lr,
            lr_final: self.lr_final,
            steps: self.steps,
            occupancy_res: self.occupancy_res,
            occupancy_every: self.occupancy_every,
            occupancy_threshold: self.occupancy_threshold,
        }
    }

    /// The learning rate before 0-based step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        log_linear(self.lr, self.lr_final, step, self.steps)
    }

    /// The configuration as JSON (written next to the outputs).
    pub fn to_json(&self) -> serde_json::Value {
        let f = &self.field;
        let g = &f.grid;
        json!({
            "representation": "field",
            "field": {
                "grid": {"levels": g.levels, "features": g.features,
                         "log2_table_size": g.log2_table_size,
                         "base_resolution": g.base_resolution,
                         "max_resolution": g.max_resolution},
                "hidden": f.hidden, "layers": f.layers,
                "density_activation": format!("{:?}", f.density_activation),
                "density_bias": f.density_bias,
                "bounds": {"min": f.bounds.min, "max": f.bounds.max},
                "norm_eps": f.norm_eps,
            },
            "steps": self.steps,
            "samples_per_ray": self.samples_per_ray,
            "rays_per_batch": self.rays_per_batch,
            "lr": self.lr, "lr_final": self.lr_final,
            "loss": format!("{:?}", self.loss),
            "mask_weight": self.mask_weight,
            "occupancy_res": self.occupancy_res,
            "occupancy_every": self.occupancy_every,
            "occupancy_threshold": self.occupancy_threshold,
            "background": self.background,
            "near": self.near,
            "checkpoint_every": self.checkpoint_every,
            "preview_every": self.preview_every,
            "seed": self.seed,
            "device": format!("{:?}", self.device),
        })
    }
}
