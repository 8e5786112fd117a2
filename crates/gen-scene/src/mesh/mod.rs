//! Meshing of density fields: sample a [`DensityField`] on a regular grid, extract the
//! iso-surface with marching cubes ([`marching_cubes`]), colour the vertices from the field
//! and take normals from the density gradient.
//!
//! [`SplatDensity`] is the density of Gaussian splats, `d(x) = Σ_i sigmoid(o_i) G_i(x)` with
//! `G_i(x) = exp(-½ (x-μ_i)ᵀ Σ_i⁻¹ (x-μ_i))` (DreamGaussian's extraction), evaluated block by
//! block with only the Gaussians whose 3σ box touches the block. A neural field plugs in by
//! implementing [`DensityField`].

pub mod marching_cubes;
pub mod splat_density;

use std::path::Path;

use gen_core::{Error, Result};
use rayon::prelude::*;

pub use marching_cubes::marching_cubes;
pub use splat_density::{SplatDensity, SplatDensityConfig};

/// A scalar density with an optional colour, queried at world points.
pub trait DensityField: Sync {
    /// Density at `p` (larger = more inside).
    fn density(&self, p: [f64; 3]) -> f64;

    /// Display colour (sRGB-ish, `[0, 1]`) at `p`; grey by default.
    fn color(&self, _p: [f64; 3]) -> [f32; 3] {
        [0.7, 0.7, 0.7]
    }

    /// Samples the field on `grid` (x fastest, then y, then z). The default evaluates every
    /// point in parallel; fields with locality (splats) override it, and a neural field should
    /// override it to evaluate batches of points as one tensor (e.g. one z-slab at a time).
    fn sample_grid(&self, grid: &Grid) -> Result<Vec<f32>> {
        grid.validate()?;
        let [nx, ny, _] = grid.dims;
        let mut out = vec![0f32; grid.len()];
        out.par_chunks_mut(nx * ny).enumerate().for_each(|(k, slab)| {
            for j in 0..ny {
                for i in 0..nx {
                    slab[j * nx + i] = self.density(grid.point(i, j, k)) as f32;
                }
            }
        });
        Ok(out)
    }
}

/// A regular grid of sample points: `dims[a]` samples along axis `a` from `min[a]` to `max[a]`
/// inclusive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grid {
    pub min: [f64; 3],
    pub max: [f64; 3],
    pub dims: [usize; 3],
}

impl Grid {
    /// A cube grid of `res` samples per axis over `[min, max]³`.
    pub fn cube(min: f64, max: f64, res: usize) -> Self {
        Self { min: [min; 3], max: [max; 3], dims: [res; 3] }
    }

    /// A grid over the box `[lo, hi]` grown by `pad` (a fraction of its largest side) on every
    /// side, with cubic cells and `res` samples along the longest axis (at least 2 per axis).
    pub fn around(lo: [f64; 3], hi: [f64; 3], res: usize, pad: f64) -> Result<Self> {
        let side = (0..3).map(|a| hi[a] - lo[a]).fold(0f64, f64::max);
        if !(side.is_finite() && side > 0.0 && pad >= 0.0 && res >= 2) {
            return Err(Error::invalid(
                "mesh grid",
                format!("box {lo:?}..{hi:?}, res {res}, pad {pad}"),
            ));
        }
        let margin = pad * side;
        let step = (side + 2.0 * margin) / (res - 1) as f64;
        let mut g = Self { min: [0.0; 3], max: [0.0; 3], dims: [0; 3] };
        for a in 0..3 {
            let centre = 0.5 * (lo[a] + hi[a]);
            let n = (((hi[a] - lo[a] + 2.0 * margin) / step).ceil() as usize + 1).max(2);
            let half = 0.5 * step * (n - 1) as f64;
            g.min[a] = centre - half;
            g.max[a] = centre + half;
            g.dims[a] = n;
        }
        g.validate()?;
        Ok(g)
    }

    /// At least 2 samples per axis, finite bounds with `min < max`, at most 2^31 points.
    pub fn validate(&self) -> Result<()> {
        for a in 0..3 {
            if self.dims[a] < 2 {
                return Err(Error::invalid(
                    "mesh grid",
                    format!("{} samples along axis {a} (need at least 2)", self.dims[a]),
                ));
            }
            if !(self.min[a].is_finite() && self.max[a].is_finite() && self.min[a] < self.max[a]) {
                return Err(Error::invalid(
                    "mesh grid",
                    format!("bounds {}..{} along axis {a}", self.min[a], self.max[a]),
                ));
            }
        }
        if self.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 31) {
            return Err(Error::invalid(
                "mesh grid",
                format!("{:?} samples is too many", self.dims),
            ));
        }
        Ok(())
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Spacing along each axis.
    pub fn step(&self) -> [f64; 3] {
        std::array::from_fn(|a| (self.max[a] - self.min[a]) / (self.dims[a] - 1) as f64)
    }

    /// World position of sample `(i, j, k)`.
    pub fn point(&self, i: usize, j: usize, k: usize) -> [f64; 3] {
        let s = self.step();
        [
            self.min[0] + i as f64 * s[0],
            self.min[1] + j as f64 * s[1],
            self.min[2] + k as f64 * s[2],
        ]
    }

    /// Flat index of sample `(i, j, k)`.
    pub fn index(&self, i: usize, j: usize, k: usize) -> usize {
        (k * self.dims[1] + j) * self.dims[0] + i
    }
}

/// An indexed triangle mesh with per-vertex normals and display colours in `[0, 1]`.
/// Triangles are counter-clockwise seen from outside (the side the normals point to).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TriMesh {
    pub positions: Vec<[f32; 3]>,
    pub normals: Vec<[f32; 3]>,
    pub colors: Vec<[f32; 3]>,
    pub indices: Vec<[u32; 3]>,
}

impl TriMesh {
    /// Checks matching lengths, finite values, unit normals, colours in `[0, 1]` and indices
    /// in range; errors name the vertex or triangle.
    pub fn validate(&self) -> Result<()> {
        let n = self.positions.len();
        if self.normals.len() != n || self.colors.len() != n {
            return Err(Error::invalid(
                "mesh",
                format!(
                    "{n} positions but {} normals and {} colours",
                    self.normals.len(),
                    self.colors.len()
                ),
            ));
        }
        for i in 0..n {
            if self.positions[i].iter().any(|v| !v.is_finite()) {
                return Err(Error::invalid(
                    "mesh",
                    format!("vertex {i} position {:?} is not finite", self.positions[i]),
                ));
            }
            let len2: f32 = self.normals[i].iter().map(|v| v * v).sum();
            let unit = (len2 - 1.0).abs() < 1e-3;
            if !unit {
                return Err(Error::invalid(
                    "mesh",
                    format!("vertex {i} normal {:?} is not unit length", self.normals[i]),
                ));
            }
            if self.colors[i].iter().any(|&v| !(0.0..=1.0).contains(&v)) {
                return Err(Error::invalid(
                    "mesh",
                    format!("vertex {i} colour {:?} is outside [0, 1]", self.colors[i]),
                ));
            }
        }
        for (t, tri) in self.indices.iter().enumerate() {
            if tri.iter().any(|&v| v as usize >= n) {
                return Err(Error::invalid(
                    "mesh",
                    format!("triangle {t} {tri:?} indexes past {n} vertices"),
                ));
            }
        }
        Ok(())
    }

    /// Total surface area.
    pub fn area(&self) -> f64 {
        self.indices
            .iter()
            .map(|t| {
                let p = |v: u32| glam::DVec3::from(self.positions[v as usize].map(|c| c as f64));
                let (a, b, c) = (p(t[0]), p(t[1]), p(t[2]));
                0.5 * (b - a).cross(c - a).length()
            })
            .sum()
    }
}

/// Options of [`extract_mesh`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeshConfig {
    /// Sampling grid.
    pub grid: Grid,
    /// Iso-level: the surface is where the density crosses it (DreamGaussian uses 1 for splat
    /// density).
    pub threshold: f64,
}

/// Samples `field` on `cfg.grid`, runs marching cubes at `cfg.threshold`, colours vertices
/// with [`DensityField::color`] and sets normals to the normalised negative density gradient
/// (central differences on the grid, interpolated along the cut edge).
pub fn extract_mesh(field: &dyn DensityField, cfg: &MeshConfig) -> Result<TriMesh> {
    if !cfg.threshold.is_finite() {
        return Err(Error::invalid("mesh threshold", format!("{}", cfg.threshold)));
    }
    let values = field.sample_grid(&cfg.grid)?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "density field",
            format!("non-finite density {} at grid sample {i}", values[i]),
        ));
    }
    let mut mesh = marching_cubes(&values, &cfg.grid, cfg.threshold as f32)?;
    let colors: Vec<[f32; 3]> = mesh
        .positions
        .par_iter()
        .map(|p| {
            let c = field.color(p.map(|v| v as f64));
            c.map(|v| if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 })
        })
        .collect();
    mesh.colors = colors;
    Ok(mesh)
}

/// Writes `mesh` as `.glb` or `.obj` depending on the extension of `path`.
pub fn write_mesh(mesh: &TriMesh, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()) {
        Some(e) if e == "glb" => crate::export::glb::mesh_to_glb(mesh, path),
        Some(e) if e == "obj" => crate::export::obj::mesh_to_obj(mesh, path),
        _ => Err(Error::invalid(
            "mesh output",
            format!("{}: extension must be .glb or .obj", path.display()),
        )),
    }
}
