//! Density and colour of Gaussian splats as a [`DensityField`].

use gen_core::{Error, Result};
use glam::{DMat3, DQuat, DVec3};
use rayon::prelude::*;

use super::{DensityField, Grid};
use crate::export::{sigmoid, SplatArrays};
use crate::splat::Splats;

/// Options of [`SplatDensity`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplatDensityConfig {
    /// Gaussians are evaluated out to this many standard deviations (3 = the rasterizer's
    /// cut-off); beyond it they contribute zero.
    pub cutoff_sigmas: f64,
    /// Gaussians with opacity below this are ignored.
    pub min_opacity: f64,
    /// Samples per block edge in [`DensityField::sample_grid`].
    pub block: usize,
}

impl Default for SplatDensityConfig {
    fn default() -> Self {
        Self { cutoff_sigmas: 3.0, min_opacity: 1.0 / 255.0, block: 16 }
    }
}

#[derive(Debug, Clone, Copy)]
struct Gauss {
    mean: DVec3,
    /// World-to-local rotation (`Rᵀ`).
    rot_t: DMat3,
    inv_scale: DVec3,
    opacity: f64,
    color: [f32; 3],
    /// Axis-aligned half extent of the cut-off ellipsoid.
    half: DVec3,
}

impl Gauss {
    /// `opacity * exp(-½ m²)` inside the cut-off, 0 outside.
    fn eval(&self, p: DVec3, cutoff2: f64) -> f64 {
        let d = (self.rot_t * (p - self.mean)) * self.inv_scale;
        let m2 = d.length_squared();
        if m2 > cutoff2 {
            0.0
        } else {
            self.opacity * (-0.5 * m2).exp()
        }
    }
}

/// `d(x) = Σ_i sigmoid(o_i) exp(-½ (x-μ_i)ᵀ Σ_i⁻¹ (x-μ_i))`, colour = weighted mean of the
/// DC colours (nearest Gaussian where all weights vanish).
#[derive(Debug, Clone)]
pub struct SplatDensity {
    gauss: Vec<Gauss>,
    cfg: SplatDensityConfig,
    /// Uniform bucket grid for point queries.
    origin: DVec3,
    cell: f64,
    cells: [usize; 3],
    buckets: Vec<Vec<u32>>,
}

impl SplatDensity {
    pub fn new(splats: &Splats, cfg: SplatDensityConfig) -> Result<Self> {
        Self::from_arrays(&SplatArrays::from_splats(splats)?, cfg)
    }

    pub fn from_arrays(a: &SplatArrays, cfg: SplatDensityConfig) -> Result<Self> {
        a.check_finite()?;
        if !(cfg.cutoff_sigmas > 0.0 && cfg.cutoff_sigmas.is_finite()) || cfg.block == 0 {
            return Err(Error::invalid(
                "splat density config",
                format!(
                    "cutoff_sigmas {} must be > 0 and block {} ≥ 1",
                    cfg.cutoff_sigmas, cfg.block
                ),
            ));
        }
        let mut gauss = Vec::with_capacity(a.len());
        for i in 0..a.len() {
            let opacity = sigmoid(a.opacity_logits[i]) as f64;
            if opacity < cfg.min_opacity {
                continue;
            }
            let q = a.quats[i].map(|v| v as f64);
            let rot = DMat3::from_quat(DQuat::from_xyzw(q[1], q[2], q[3], q[0]).normalize());
            let scale = DVec3::from(a.log_scales[i].map(|v| (v as f64).exp()));
            if !(scale.min_element() > 0.0 && scale.is_finite()) {
                return Err(Error::invalid(
                    "splat density",
                    format!("Gaussian {i}: scale {scale} is not positive and finite"),
                ));
            }
            // Σ = R S² Rᵀ; the box half extent along axis a is cutoff * sqrt(Σ_aa).
            let cov = rot * DMat3::from_diagonal(scale * scale) * rot.transpose();
            let half = DVec3::new(cov.x_axis.x, cov.y_axis.y, cov.z_axis.z).map(f64::sqrt)
                * cfg.cutoff_sigmas;
            gauss.push(Gauss {
                mean: DVec3::from(a.means[i].map(|v| v as f64)),
                rot_t: rot.transpose(),
                inv_scale: scale.recip(),
                opacity,
                color: a.dc_color(i),
                half,
            });
        }
        let (mut lo, mut hi) = (DVec3::splat(f64::INFINITY), DVec3::splat(f64::NEG_INFINITY));
        for g in &gauss {
            lo = lo.min(g.mean - g.half);
            hi = hi.max(g.mean + g.half);
        }
        let (origin, cell, cells) = if gauss.is_empty() {
            (DVec3::ZERO, 1.0, [1, 1, 1])
        } else {
            let extent = (hi - lo).max_element().max(1e-9);
            let mut halves: Vec<f64> = gauss.iter().map(|g| g.half.max_element()).collect();
            halves.sort_by(f64::total_cmp);
            let cell = (extent / 64.0).max(halves[halves.len() / 2]);
            let cells = ((hi - lo) / cell).to_array().map(|v| (v.ceil() as usize).clamp(1, 256));
            (lo, cell, cells)
        };
        let mut buckets = vec![Vec::new(); cells[0] * cells[1] * cells[2]];
        for (gi, g) in gauss.iter().enumerate() {
            let a = Self::cell_coords(origin, cell, cells, g.mean - g.half);
            let b = Self::cell_coords(origin, cell, cells, g.mean + g.half);
            for z in a[2]..=b[2] {
                for y in a[1]..=b[1] {
                    for x in a[0]..=b[0] {
                        buckets[(z * cells[1] + y) * cells[0] + x].push(gi as u32);
                    }
                }
            }
        }
        Ok(Self { gauss, cfg, origin, cell, cells, buckets })
    }

    /// Axis-aligned box holding every kept Gaussian's cut-off ellipsoid, `None` when no
    /// Gaussian is kept. Use it with [`Grid::around`] to mesh the whole object.
    pub fn bounds(&self) -> Option<([f64; 3], [f64; 3])> {
        if self.gauss.is_empty() {
            return None;
        }
        let (mut lo, mut hi) = (DVec3::splat(f64::INFINITY), DVec3::splat(f64::NEG_INFINITY));
        for g in &self.gauss {
            lo = lo.min(g.mean - g.half);
            hi = hi.max(g.mean + g.half);
        }
        Some((lo.to_array(), hi.to_array()))
    }

    /// Number of Gaussians kept (opacity at least `min_opacity`).
    pub fn len(&self) -> usize {
        self.gauss.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gauss.is_empty()
    }

    fn cell_coords(origin: DVec3, cell: f64, cells: [usize; 3], p: DVec3) -> [usize; 3] {
        let c = (p - origin) / cell;
        std::array::from_fn(|a| (c[a].floor().max(0.0) as usize).min(cells[a] - 1))
    }

    fn candidates(&self, p: DVec3) -> &[u32] {
        if self.gauss.is_empty() {
            return &[];
        }
        let rel = (p - self.origin) / self.cell;
        for a in 0..3 {
            if rel[a] < 0.0 || rel[a] >= self.cells[a] as f64 {
                return &[];
            }
        }
        let c = Self::cell_coords(self.origin, self.cell, self.cells, p);
        &self.buckets[(c[2] * self.cells[1] + c[1]) * self.cells[0] + c[0]]
    }
}

impl DensityField for SplatDensity {
    fn density(&self, p: [f64; 3]) -> f64 {
        let p = DVec3::from(p);
        let c2 = self.cfg.cutoff_sigmas * self.cfg.cutoff_sigmas;
        self.candidates(p).iter().map(|&i| self.gauss[i as usize].eval(p, c2)).sum()
    }

    fn color(&self, p: [f64; 3]) -> [f32; 3] {
        let pv = DVec3::from(p);
        let c2 = self.cfg.cutoff_sigmas * self.cfg.cutoff_sigmas;
        let mut acc = [0f64; 3];
        let mut wsum = 0.0;
        for &i in self.candidates(pv) {
            let g = &self.gauss[i as usize];
            let w = g.eval(pv, c2);
            for (a, &c) in acc.iter_mut().zip(&g.color) {
                *a += w * c as f64;
            }
            wsum += w;
        }
        if wsum > 1e-12 {
            return acc.map(|v| (v / wsum) as f32);
        }
        // Nearest mean (rare: vertices sit where the density equals the threshold).
        self.gauss
            .iter()
            .min_by(|a, b| {
                (a.mean - pv).length_squared().total_cmp(&(b.mean - pv).length_squared())
            })
            .map(|g| g.color)
            .unwrap_or([0.7; 3])
    }

    /// Block-wise evaluation: each `block³` block of samples only visits the Gaussians whose
    /// cut-off box overlaps the block.
    fn sample_grid(&self, grid: &Grid) -> Result<Vec<f32>> {
        grid.validate()?;
        let [nx, ny, nz] = grid.dims;
        let b = self.cfg.block;
        let nb = [nx.div_ceil(b), ny.div_ceil(b), nz.div_ceil(b)];
        let c2 = self.cfg.cutoff_sigmas * self.cfg.cutoff_sigmas;
        let blocks: Vec<(usize, Vec<f32>)> = (0..nb[0] * nb[1] * nb[2])
            .into_par_iter()
            .map(|bi| {
                let (bx, by, bz) = (bi % nb[0], (bi / nb[0]) % nb[1], bi / (nb[0] * nb[1]));
                let lo = [bx * b, by * b, bz * b];
                let hi = [(lo[0] + b).min(nx), (lo[1] + b).min(ny), (lo[2] + b).min(nz)];
                let plo = DVec3::from(grid.point(lo[0], lo[1], lo[2]));
                let phi = DVec3::from(grid.point(hi[0] - 1, hi[1] - 1, hi[2] - 1));
                let near: Vec<&Gauss> = self
                    .gauss
                    .iter()
                    .filter(|g| {
                        (g.mean + g.half).cmpge(plo).all() && (g.mean - g.half).cmple(phi).all()
                    })
                    .collect();
                let mut vals =
                    Vec::with_capacity((hi[0] - lo[0]) * (hi[1] - lo[1]) * (hi[2] - lo[2]));
                for k in lo[2]..hi[2] {
                    for j in lo[1]..hi[1] {
                        for i in lo[0]..hi[0] {
                            let p = DVec3::from(grid.point(i, j, k));
                            vals.push(near.iter().map(|g| g.eval(p, c2)).sum::<f64>() as f32);
                        }
                    }
                }
                (bi, vals)
            })
            .collect();
        let mut out = vec![0f32; grid.len()];
        for (bi, vals) in blocks {
            let (bx, by, bz) = (bi % nb[0], (bi / nb[0]) % nb[1], bi / (nb[0] * nb[1]));
            let lo = [bx * b, by * b, bz * b];
            let hi = [(lo[0] + b).min(nx), (lo[1] + b).min(ny), (lo[2] + b).min(nz)];
            let mut it = vals.into_iter();
            for k in lo[2]..hi[2] {
                for j in lo[1]..hi[1] {
                    for i in lo[0]..hi[0] {
                        out[grid.index(i, j, k)] = it.next().unwrap_or(0.0);
                    }
                }
            }
        }
        Ok(out)
    }
}
