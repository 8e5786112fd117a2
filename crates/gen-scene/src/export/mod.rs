//! Exporters and importers: 3DGS `.ply` (read and write), `.glb` (splats with
//! `KHR_gaussian_splatting`, triangle meshes), Wavefront `.obj` and animated GIF.
//!
//! Every writer goes through [`gen_core::write_atomic`], so a failed export never leaves a
//! half-written file. Values are checked before writing: a NaN or infinite parameter is an
//! error naming the field and the Gaussian (or vertex) index.
//!
//! Empty inputs: a `.ply` with zero Gaussians is valid and written (`element vertex 0`); glTF
//! forbids accessors with zero elements, so [`glb::splats_to_glb`] and [`glb::mesh_to_glb`]
//! refuse empty inputs with an error; [`obj::mesh_to_obj`] writes a comment-only file for an
//! empty mesh.

pub mod gif;
pub mod glb;
pub mod obj;
pub mod ply;

use candle_core::{DType, Device, Tensor};
use gen_core::{Error, Result, ResultExt};

use crate::splat::{num_sh_coeffs, Splats};

/// Host-side copy of splat parameters in f32, Gaussian-major (the layout the file formats use).
///
/// Same meaning as [`Splats`]: pre-activation values (log scales, opacity logits,
/// unnormalised `(w, x, y, z)` quaternions) and SH coefficients `sh[i][k][c]` stored flat as
/// `sh[(i * k_count + k) * 3 + c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SplatArrays {
    pub means: Vec<[f32; 3]>,
    pub log_scales: Vec<[f32; 3]>,
    pub quats: Vec<[f32; 4]>,
    pub opacity_logits: Vec<f32>,
    /// `(N, K, 3)` flattened, `K = (degree+1)²`.
    pub sh: Vec<f32>,
    pub sh_degree: usize,
}

impl SplatArrays {
    /// Copies `splats` (any float dtype, any device) to the host as f32. f64 values are
    /// rounded to f32: the file formats store f32.
    pub fn from_splats(splats: &Splats) -> Result<Self> {
        splats.validate()?;
        let degree = splats.sh_degree()?;
        let host = |t: &Tensor, name: &str| -> Result<Vec<f32>> {
            t.to_device(&Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .ctx(format!("splat `{name}` to host"))
        };
        let means = host(&splats.means, "means")?;
        let log_scales = host(&splats.log_scales, "log_scales")?;
        let quats = host(&splats.quats, "quats")?;
        let opacity_logits = host(&splats.opacity_logits, "opacity_logits")?;
        let sh = host(&splats.sh, "sh")?;
        let out = Self {
            means: means.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect(),
            log_scales: log_scales.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect(),
            quats: quats.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect(),
            opacity_logits,
            sh,
            sh_degree: degree,
        };
        out.check_finite()?;
        Ok(out)
    }

    /// Number of Gaussians.
    pub fn len(&self) -> usize {
        self.means.len()
    }

    pub fn is_empty(&self) -> bool {
        self.means.is_empty()
    }

    /// SH coefficients per channel, `(degree+1)²`.
    pub fn sh_coeffs(&self) -> usize {
        num_sh_coeffs(self.sh_degree)
    }

    /// SH coefficient `k` of channel `c` of Gaussian `i`.
    pub fn sh_at(&self, i: usize, k: usize, c: usize) -> f32 {
        self.sh[(i * self.sh_coeffs() + k) * 3 + c]
    }

    /// Display colour from the DC term, `clamp(0.5 + 0.28209479 * f_dc, 0, 1)`.
    pub fn dc_color(&self, i: usize) -> [f32; 3] {
        let mut c = [0.0; 3];
        for (ch, v) in c.iter_mut().enumerate() {
            *v = (0.5 + SH_C0 * self.sh_at(i, 0, ch)).clamp(0.0, 1.0);
        }
        c
    }

    /// Checks lengths and that every value is finite; the error names the field and index.
    pub fn check_finite(&self) -> Result<()> {
        let n = self.len();
        let k = self.sh_coeffs();
        if self.log_scales.len() != n
            || self.quats.len() != n
            || self.opacity_logits.len() != n
            || self.sh.len() != n * k * 3
        {
            return Err(Error::invalid(
                "splat arrays",
                format!(
                    "inconsistent lengths: {n} means, {} log_scales, {} quats, {} opacities, {} SH values (want {})",
                    self.log_scales.len(),
                    self.quats.len(),
                    self.opacity_logits.len(),
                    self.sh.len(),
                    n * k * 3
                ),
            ));
        }
        let bad = |field: &str, i: usize, v: f32| {
            Error::invalid(
                format!("splat `{field}`"),
                format!("Gaussian {i} has a non-finite value {v}"),
            )
        };
        for i in 0..n {
            for &v in &self.means[i] {
                if !v.is_finite() {
                    return Err(bad("means", i, v));
                }
            }
            for &v in &self.log_scales[i] {
                if !v.is_finite() {
                    return Err(bad("log_scales", i, v));
                }
            }
            for &v in &self.quats[i] {
                if !v.is_finite() {
                    return Err(bad("quats", i, v));
                }
            }
            let q = self.quats[i];
            if q.iter().all(|&v| v == 0.0) {
                return Err(Error::invalid(
                    "splat `quats`",
                    format!("Gaussian {i} has a zero quaternion (no rotation can be recovered)"),
                ));
            }
            if !self.opacity_logits[i].is_finite() {
                return Err(bad("opacity_logits", i, self.opacity_logits[i]));
            }
            for &v in &self.sh[i * k * 3..(i + 1) * k * 3] {
                if !v.is_finite() {
                    return Err(bad("sh", i, v));
                }
            }
        }
        Ok(())
    }

    /// Back to a [`Splats`] of f32 tensors on `device`.
    pub fn to_splats(&self, device: &Device) -> Result<Splats> {
        let n = self.len();
        let k = self.sh_coeffs();
        let flat3 = |v: &[[f32; 3]]| v.iter().flatten().copied().collect::<Vec<f32>>();
        let splats = Splats {
            means: Tensor::from_vec(flat3(&self.means), (n, 3), device)?,
            log_scales: Tensor::from_vec(flat3(&self.log_scales), (n, 3), device)?,
            quats: Tensor::from_vec(
                self.quats.iter().flatten().copied().collect::<Vec<f32>>(),
                (n, 4),
                device,
            )?,
            opacity_logits: Tensor::from_vec(self.opacity_logits.clone(), n, device)?,
            sh: Tensor::from_vec(self.sh.clone(), (n, k, 3), device)?,
        };
        Ok(splats)
    }
}

/// The degree-0 SH basis constant `1 / (2 sqrt(pi))`.
pub const SH_C0: f32 = 0.282_094_8;

/// Logistic sigmoid.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
