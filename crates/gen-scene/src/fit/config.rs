//! What determines a splat fit: learning rates, initialisation, density control, the loss
//! weights, the device and the seed.

use candle_core::{DType, Device, Tensor};
use gen_core::{DeviceChoice, Error, Result, SeededRng};
use serde_json::json;

use crate::density::DensityConfig;
use crate::splat::Splats;

/// Learning rates per parameter group (DreamGaussian's `configs/image.yaml` values).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearningRates {
    /// Means: exponential decay from `means_init` to `means_final` over the run (world units).
    pub means_init: f64,
    pub means_final: f64,
    /// SH colour coefficients.
    pub colour: f64,
    pub opacity: f64,
    /// Log-scales.
    pub scales: f64,
    /// Quaternions.
    pub rotation: f64,
}

impl Default for LearningRates {
    fn default() -> Self {
        Self {
            means_init: 1e-3,
            means_final: 2e-5,
            colour: 0.01,
            opacity: 0.05,
            scales: 0.005,
            rotation: 0.005,
        }
    }
}

impl LearningRates {
    /// The means' rate before step `step` (0-based) of `total`: log-linear interpolation.
    pub fn means_at(&self, step: u64, total: u64) -> f64 {
        log_linear(self.means_init, self.means_final, step, total)
    }
}

/// The rate before 0-based step `step` of `total` decaying log-linearly from `init` (first step)
/// to `last` (last step). Shared by the splat and field fitters.
pub(crate) fn log_linear(init: f64, last: f64, step: u64, total: u64) -> f64 {
    let t = if total <= 1 { 0.0 } else { (step as f64 / (total - 1) as f64).clamp(0.0, 1.0) };
    (init.ln() * (1.0 - t) + last.ln() * t).exp()
}

/// Where the initial Gaussians are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitRegion {
    /// Uniform in the axis-aligned box.
    Box { min: [f64; 3], max: [f64; 3] },
    /// Uniform in the ball.
    Sphere { center: [f64; 3], radius: f64 },
}

impl InitRegion {
    /// Centre and radius of a ball containing the region (the scene extent for density
    /// control).
    pub fn bounding_ball(&self) -> ([f64; 3], f64) {
        match *self {
            InitRegion::Box { min, max } => {
                let c = [0, 1, 2].map(|a| 0.5 * (min[a] + max[a]));
                let r = (0..3).map(|a| (0.5 * (max[a] - min[a])).powi(2)).sum::<f64>().sqrt();
                (c, r)
            }
            InitRegion::Sphere { center, radius } => (center, radius),
        }
    }
}

/// Initial Gaussians.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitConfig {
    pub count: usize,
    pub region: InitRegion,
    /// Initial scale (isotropic standard deviation, world units).
    pub scale: f64,
    /// Initial opacity (3DGS: 0.1).
    pub opacity: f64,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            count: 2000,
            region: InitRegion::Sphere { center: [0.0; 3], radius: 1.0 },
            scale: 0.05,
            opacity: 0.1,
        }
    }
}

/// Everything that determines a fit.
#[derive(Debug, Clone, PartialEq)]
pub struct FitConfig {
    pub steps: u64,
    pub lr: LearningRates,
    /// SH degree of the colour (0..=3).
    pub sh_degree: usize,
    /// λ of `(1 − λ) L1 + λ (1 − SSIM)`.
    pub ssim_weight: f64,
    /// Weight of `L1(alpha, mask)` for views with a mask (0: off).
    pub mask_weight: f64,
    pub density: DensityConfig,
    /// Background colour of the renders (sRGB in [0, 1]); should match the images'.
    pub background: [f64; 3],
    pub init: InitConfig,
    /// Scene radius for density control; `None`: the radius of the init region.
    pub extent: Option<f64>,
    /// Write a checkpoint every this many steps (0: only at the end). Used by
    /// [`fit()`](super::fit()).
    pub checkpoint_every: u64,
    /// Write a preview image every this many steps (0: never). Used by
    /// [`fit()`](super::fit()).
    pub preview_every: u64,
    pub seed: u64,
    /// Where the splats live and the optimisation runs (default: the CPU). Not part of the
    /// run's identity: a checkpoint resumes on any device.
    pub device: DeviceChoice,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            lr: LearningRates::default(),
            sh_degree: 0,
            ssim_weight: 0.2,
            mask_weight: 0.0,
            density: DensityConfig::default(),
            background: [1.0; 3],
            init: InitConfig::default(),
            extent: None,
            checkpoint_every: 0,
            preview_every: 0,
            seed: 0,
            device: DeviceChoice::Cpu,
        }
    }
}

impl FitConfig {
    /// Checks the values; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, v: String| Err(Error::invalid(format!("fit `{f}`"), v));
        if self.sh_degree > 3 {
            return bad("sh_degree", format!("{} (0..=3)", self.sh_degree));
        }
        if !(0.0..=1.0).contains(&self.ssim_weight) {
            return bad("ssim_weight", format!("{} (must be in [0, 1])", self.ssim_weight));
        }
        if !(self.mask_weight.is_finite() && self.mask_weight >= 0.0) {
            return bad("mask_weight", format!("{}", self.mask_weight));
        }
        let l = &self.lr;
        for (f, v) in [
            ("lr.means_init", l.means_init),
            ("lr.means_final", l.means_final),
            ("lr.colour", l.colour),
            ("lr.opacity", l.opacity),
            ("lr.scales", l.scales),
            ("lr.rotation", l.rotation),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(f, format!("{v} (must be > 0)"));
            }
        }
        if self.init.count == 0 {
            return bad("init.count", "0".into());
        }
        if !(self.init.scale > 0.0 && self.init.opacity > 0.0 && self.init.opacity < 1.0) {
            return bad("init", format!("scale {} opacity {}", self.init.scale, self.init.opacity));
        }
        if let Some(e) = self.extent {
            if !(e.is_finite() && e > 0.0) {
                return bad("extent", format!("{e}"));
            }
        }
        self.density.validate()
    }

    /// The configuration as JSON (written next to the outputs).
    pub fn to_json(&self) -> serde_json::Value {
        let d = &self.density;
        let region = match self.init.region {
            InitRegion::Box { min, max } => json!({"box": {"min": min, "max": max}}),
            InitRegion::Sphere { center, radius } => {
                json!({"sphere": {"center": center, "radius": radius}})
            }
        };
        json!({
            "steps": self.steps,
            "lr": {
                "means_init": self.lr.means_init, "means_final": self.lr.means_final,
                "colour": self.lr.colour, "opacity": self.lr.opacity,
                "scales": self.lr.scales, "rotation": self.lr.rotation,
            },
            "sh_degree": self.sh_degree,
            "ssim_weight": self.ssim_weight,
            "mask_weight": self.mask_weight,
            "density": {
                "densify_from": d.densify_from, "densify_until": d.densify_until,
                "interval": d.interval, "grad_threshold": d.grad_threshold,
                "percent_dense": d.percent_dense, "min_opacity": d.min_opacity,
                "max_screen_radius": d.max_screen_radius, "max_world_scale": d.max_world_scale,
                "split_count": d.split_count, "split_scale_div": d.split_scale_div,
                "opacity_reset_interval": d.opacity_reset_interval,
                "reset_opacity": d.reset_opacity, "max_gaussians": d.max_gaussians,
            },
            "background": self.background,
            "init": {"count": self.init.count, "region": region,
                     "scale": self.init.scale, "opacity": self.init.opacity},
            "extent": self.extent,
            "checkpoint_every": self.checkpoint_every,
            "preview_every": self.preview_every,
            "seed": self.seed,
            "device": format!("{:?}", self.device),
        })
    }
}

/// Random initial splats in `cfg.init.region` (generator stream 0 of the seed), drawn on the
/// host and placed on `device`.
pub fn init_splats(cfg: &FitConfig, dtype: DType, device: &Device) -> Result<Splats> {
    let n = cfg.init.count;
    let mut rng = SeededRng::fork(cfg.seed, 0);
    let mut means = Vec::with_capacity(n * 3);
    for _ in 0..n {
        let p = match cfg.init.region {
            InitRegion::Box { min, max } => {
                [0, 1, 2].map(|a| min[a] + (max[a] - min[a]) * rng.uniform() as f64)
            }
            InitRegion::Sphere { center, radius } => loop {
                let q = [0, 1, 2].map(|_| 2.0 * rng.uniform() as f64 - 1.0);
                if q.iter().map(|v| v * v).sum::<f64>() <= 1.0 {
                    break [0, 1, 2].map(|a| center[a] + radius * q[a]);
                }
            },
        };
        means.extend(p.map(|v| v as f32));
    }
    let k = crate::splat::num_sh_coeffs(cfg.sh_degree);
    // Colours start grey-ish with a little noise (DC coefficient of a random colour).
    let mut sh = vec![0f32; n * k * 3];
    for i in 0..n {
        for c in 0..3 {
            let rgb = rng.uniform() as f64;
            sh[(i * k) * 3 + c] = ((rgb - 0.5) / 0.282_094_79) as f32;
        }
    }
    let dev = Device::Cpu;
    let t = |v: Vec<f32>, s: &[usize]| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, s, &dev)?.to_dtype(dtype)?.to_device(device)?)
    };
    let logit = (cfg.init.opacity / (1.0 - cfg.init.opacity)).ln() as f32;
    let mut quats = vec![0f32; n * 4];
    for i in 0..n {
        quats[i * 4] = 1.0;
    }
    Ok(Splats {
        means: t(means, &[n, 3])?,
        log_scales: t(vec![cfg.init.scale.ln() as f32; n * 3], &[n, 3])?,
        quats: t(quats, &[n, 4])?,
        opacity_logits: t(vec![logit; n], &[n])?,
        sh: t(sh, &[n, k, 3])?,
    })
}
