//! 3D Gaussian splats (Kerbl et al. 2023, "3D Gaussian Splatting for Real-Time Radiance Field
//! Rendering") and their differentiable tile-based rasterizer as candle custom ops.
//!
//! [`render`] chains three ops, each recorded with `apply_op*` so `loss.backward()` reaches
//! every splat parameter:
//! 1. projection `(means, log_scales, quats)` → packed `(N, 8)` 2D Gaussians
//!    ([`project::PROJ_DIM`] documents the layout);
//! 2. SH colour `(means, sh)` → `(N, 3)`;
//! 3. rasterization `(projection, colours, opacity logits)` → packed `(H, W, 5)` image.
//!
//! The kernels run on the CPU (rayon) in f32 or f64; the backward passes are analytic.
//! Other devices are refused with a clear error until their kernels exist. A GPU path adds
//! `cuda_fwd`/`metal_fwd` to the three ops and makes their `bwd` call device ops instead of
//! copying to the host; the rasterizer's saved state (tile lists, final transmittance,
//! contributor counts) then lives in device buffers. The tile layout (16×16 tiles, lists sorted
//! by depth, one list per tile) is the one GPU rasterizers use.
//!
//! Results are deterministic on the CPU: the backward pass accumulates into one slot per
//! (tile, Gaussian) list entry and reduces in a fixed order, whatever the thread count.
//! [`dense::render_dense`] is a slow pure-tensor version of the same rules, for tests.

pub mod dense;
pub(crate) mod kernel;
pub mod project;
pub mod raster;
pub mod sh;

use candle_core::{DType, Device, Tensor, Var};
use gen_core::{Error, Result, ResultExt, SeededRng};

use crate::camera::Camera;
pub use kernel::TILE;
pub use sh::{num_sh_coeffs, sh_degree_of};

/// Splat parameters, all pre-activation, one dtype (f32 or f64), on the CPU.
///
/// - `means`: `(N, 3)` world positions;
/// - `log_scales`: `(N, 3)` log of the standard deviations along the local axes;
/// - `quats`: `(N, 4)` rotations `(w, x, y, z)`, normalised on use;
/// - `opacity_logits`: `(N)`, opacity = sigmoid(logit);
/// - `sh`: `(N, K, 3)` spherical-harmonic colour coefficients, `K = (degree+1)²`, degree 0..3;
///   `sh[:, 0, :]` is the DC term (`rgb = 0.5 + 0.28209479 * f_dc` at degree 0).
#[derive(Debug, Clone)]
pub struct Splats {
    pub means: Tensor,
    pub log_scales: Tensor,
    pub quats: Tensor,
    pub opacity_logits: Tensor,
    pub sh: Tensor,
}

/// Options of [`Splats::random`].
#[derive(Debug, Clone, Copy)]
pub struct RandomSplatsConfig {
    pub count: usize,
    pub sh_degree: usize,
    /// Means uniform in `[-extent, extent]³`.
    pub extent: f32,
    /// Log-scales uniform in this range.
    pub log_scale_range: (f32, f32),
    /// Opacity logits uniform in this range.
    pub logit_range: (f32, f32),
    /// Standard deviation of the SH coefficients.
    pub sh_std: f32,
}

impl Default for RandomSplatsConfig {
    fn default() -> Self {
        Self {
            count: 100,
            sh_degree: 0,
            extent: 1.0,
            log_scale_range: (-3.0, -1.5),
            logit_range: (-1.0, 2.0),
            sh_std: 0.5,
        }
    }
}

impl Splats {
    /// Random splats from an explicit seeded generator (tests, benchmarks, initialisation).
    pub fn random(
        cfg: &RandomSplatsConfig,
        rng: &mut SeededRng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let n = cfg.count;
        if cfg.sh_degree > 3 {
            return Err(Error::invalid(
                "sh_degree",
                format!("{} (supported: 0..=3)", cfg.sh_degree),
            ));
        }
        let k = num_sh_coeffs(cfg.sh_degree);
        Ok(Self {
            means: rng.rand_uniform((n, 3), -cfg.extent, cfg.extent, dtype, device)?,
            log_scales: rng.rand_uniform(
                (n, 3),
                cfg.log_scale_range.0,
                cfg.log_scale_range.1,
                dtype,
                device,
            )?,
            quats: rng.randn((n, 4), dtype, device)?,
            opacity_logits: rng.rand_uniform(
                n,
                cfg.logit_range.0,
                cfg.logit_range.1,
                dtype,
                device,
            )?,
            sh: (rng.randn((n, k, 3), dtype, device)? * cfg.sh_std as f64)?,
        })
    }

    /// Number of Gaussians.
    /// Copies of the fields cut from any autograd graph.
    pub fn detach(&self) -> Splats {
        Splats {
            means: self.means.detach(),
            log_scales: self.log_scales.detach(),
            quats: self.quats.detach(),
            opacity_logits: self.opacity_logits.detach(),
            sh: self.sh.detach(),
        }
    }

    pub fn len(&self) -> usize {
        self.means.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// SH degree implied by the coefficient count.
    pub fn sh_degree(&self) -> Result<usize> {
        let k = self.sh.dims().get(1).copied().unwrap_or(0);
        sh_degree_of(k).ok_or_else(|| {
            Error::invalid(
                "splat sh",
                format!("{k} coefficients per channel is not (degree+1)² for a degree in 0..=3"),
            )
        })
    }

    /// Checks shapes, dtypes and device.
    pub fn validate(&self) -> Result<()> {
        let n = self.len();
        let expect = |name: &str, t: &Tensor, shape: &[usize]| -> Result<()> {
            if t.dims() != shape {
                return Err(Error::Shape {
                    file: "splats".into(),
                    key: name.into(),
                    expected: shape.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            if t.dtype() != self.means.dtype() {
                return Err(Error::invalid(
                    format!("splat `{name}` dtype"),
                    format!("{:?}, but means are {:?}", t.dtype(), self.means.dtype()),
                ));
            }
            if !t.device().is_cpu() {
                return Err(Error::invalid(
                    format!("splat `{name}` device"),
                    "the splat kernels run on the CPU only so far; move the tensors to the CPU",
                ));
            }
            Ok(())
        };
        if !matches!(self.means.dtype(), DType::F32 | DType::F64) {
            return Err(Error::invalid(
                "splat dtype",
                format!("{:?} (f32 or f64)", self.means.dtype()),
            ));
        }
        expect("means", &self.means, &[n, 3])?;
        expect("log_scales", &self.log_scales, &[n, 3])?;
        expect("quats", &self.quats, &[n, 4])?;
        expect("opacity_logits", &self.opacity_logits, &[n])?;
        let k = self.sh.dims().get(1).copied().unwrap_or(0);
        expect("sh", &self.sh, &[n, k, 3])?;
        self.sh_degree()?;
        Ok(())
    }
}

/// Trainable splat parameters as candle `Var`s (same fields and shapes as [`Splats`]).
#[derive(Debug, Clone)]
pub struct SplatVars {
    pub means: Var,
    pub log_scales: Var,
    pub quats: Var,
    pub opacity_logits: Var,
    pub sh: Var,
}

impl SplatVars {
    /// Variables initialised with copies of `splats`.
    pub fn new(splats: &Splats) -> Result<Self> {
        splats.validate()?;
        Ok(Self {
            means: Var::from_tensor(&splats.means)?,
            log_scales: Var::from_tensor(&splats.log_scales)?,
            quats: Var::from_tensor(&splats.quats)?,
            opacity_logits: Var::from_tensor(&splats.opacity_logits)?,
            sh: Var::from_tensor(&splats.sh)?,
        })
    }

    /// The current values as [`Splats`] (tensors tracked for backward).
    pub fn splats(&self) -> Splats {
        Splats {
            means: self.means.as_tensor().clone(),
            log_scales: self.log_scales.as_tensor().clone(),
            quats: self.quats.as_tensor().clone(),
            opacity_logits: self.opacity_logits.as_tensor().clone(),
            sh: self.sh.as_tensor().clone(),
        }
    }

    /// All variables, in the order means, log_scales, quats, opacity_logits, sh (e.g. for an
    /// optimiser; per-group learning rates take them one by one).
    pub fn all(&self) -> Vec<Var> {
        vec![
            self.means.clone(),
            self.log_scales.clone(),
            self.quats.clone(),
            self.opacity_logits.clone(),
            self.sh.clone(),
        ]
    }
}

/// Options of [`render`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenderConfig {
    /// Colour behind the splats (not differentiated).
    pub background: [f64; 3],
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self { background: [0.0; 3] }
    }
}

/// Output of [`render`]. Images are **height-major, channels last**.
#[derive(Debug, Clone)]
pub struct RenderOutput {
    /// `(H, W, 3)` colour, background composited.
    pub rgb: Tensor,
    /// `(H, W)` accumulated opacity `1 - T_final`.
    pub alpha: Tensor,
    /// `(H, W)` alpha-weighted depth `Σ T_i α_i z_i` (not normalised; divide by `alpha` for the
    /// expected depth of the covered part).
    pub depth: Tensor,
    /// `(N, 8)` packed projection ([`project::PROJ_DIM`]); column 6 is the pixel radius, 0 when
    /// the Gaussian was culled. (candle drops gradients of intermediate tensors; for
    /// screen-space gradients use [`render_with_probe`].)
    pub projection: Tensor,
}

impl RenderOutput {
    /// Colour as `(3, H, W)`.
    pub fn rgb_chw(&self) -> Result<Tensor> {
        Ok(self.rgb.permute((2, 0, 1))?)
    }

    /// Pixel radii `(N)`; 0 for culled Gaussians.
    pub fn radii(&self) -> Result<Tensor> {
        Ok(self.projection.narrow(1, 6, 1)?.squeeze(1)?.detach())
    }
}

/// View-dependent colours `(N, 3)` of `means` `(N, 3)` with SH coefficients `sh` `(N, K, 3)` seen
/// from `camera`: `max(0, 0.5 + Σ_k Y_k(d) sh[:, k, :])`, `d` the unit direction from the camera
/// centre to the mean. Differentiable wrt `means` and `sh`; this is what [`render`] uses.
pub fn sh_colors(means: &Tensor, sh: &Tensor, camera: &Camera) -> Result<Tensor> {
    let n = means.dim(0)?;
    let k = sh.dims().get(1).copied().unwrap_or(0);
    if means.dims() != [n, 3] || sh.dims() != [n, k, 3] || sh_degree_of(k).is_none() {
        return Err(Error::invalid(
            "sh_colors shapes",
            format!(
                "means {:?} and sh {:?} (want (N,3) and (N,K,3), K in 1,4,9,16)",
                means.dims(),
                sh.dims()
            ),
        ));
    }
    let campos = kernel::CamParams::from_camera(camera).campos;
    means.contiguous()?.apply_op2(&sh.contiguous()?, sh::ShOp { campos, k }).ctx("splat SH colour")
}

/// Renders `splats` from `camera` with the tile rasterizer. Differentiable wrt every field of
/// `splats` (gradients flow through the camera-independent parameters only).
pub fn render(splats: &Splats, camera: &Camera, cfg: &RenderConfig) -> Result<RenderOutput> {
    render_impl(splats, camera, cfg, None)
}

/// [`render`] with a screen-space gradient probe (the "viewspace points" of 3DGS): `probe` is
/// an `(N, 8)` tensor of zeros, normally a `Var`, added to the packed projection before
/// rasterization. It changes no value, and after `loss.backward()` its gradient is
/// d loss / d (2D mean, conic, depth) per Gaussian (columns 0..2: screen-space means), which
/// density control thresholds. candle keeps gradients of variables only, hence the probe.
pub fn render_with_probe(
    splats: &Splats,
    camera: &Camera,
    cfg: &RenderConfig,
    probe: &Tensor,
) -> Result<RenderOutput> {
    let n = splats.len();
    if probe.dims() != [n, project::PROJ_DIM] || probe.dtype() != splats.means.dtype() {
        return Err(Error::invalid(
            "render probe",
            format!(
                "shape {:?} dtype {:?}, want ({n}, {}) {:?}",
                probe.dims(),
                probe.dtype(),
                project::PROJ_DIM,
                splats.means.dtype()
            ),
        ));
    }
    render_impl(splats, camera, cfg, Some(probe))
}

fn render_impl(
    splats: &Splats,
    camera: &Camera,
    cfg: &RenderConfig,
    probe: Option<&Tensor>,
) -> Result<RenderOutput> {
    splats.validate()?;
    let cam = kernel::CamParams::from_camera(camera);
    let k = splats.sh.dim(1)?;
    let means = splats.means.contiguous()?;
    let projection = means
        .apply_op3(
            &splats.log_scales.contiguous()?,
            &splats.quats.contiguous()?,
            project::ProjectOp { cam },
        )
        .ctx("splat projection")?;
    let colors = means
        .apply_op2(&splats.sh.contiguous()?, sh::ShOp { campos: cam.campos, k })
        .ctx("splat SH colour")?;
    let raster_in = match probe {
        Some(p) => (&projection + p)?,
        None => projection.clone(),
    };
    let packed = raster_in
        .apply_op3(
            &colors,
            &splats.opacity_logits.contiguous()?,
            raster::RasterOp::new(cam, cfg.background),
        )
        .ctx("splat rasterization")?;
    Ok(RenderOutput {
        rgb: packed.narrow(2, 0, 3)?,
        alpha: packed.narrow(2, 3, 1)?.squeeze(2)?,
        depth: packed.narrow(2, 4, 1)?.squeeze(2)?,
        projection,
    })
}
