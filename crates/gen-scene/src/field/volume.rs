//! Differentiable volume rendering of a [`RadianceField`] inside an axis-aligned box, with
//! empty-space skipping through an [`OccupancyGrid`].
//!
//! Rays: pixel `(i, j)` shoots from the camera centre through its centre `(j + ½, i + ½)`
//! (OpenCV convention, [`crate::camera`]); the ray is parameterised by camera depth `z`
//! (`d = Rᵀ ((u − cx)/fx, (v − cy)/fy, 1)`), so `depth` is directly comparable with the splat
//! renderer's. The ray is clipped to the box (slab test) and to `z ≥ near`; rays that miss get
//! the background only.
//!
//! Samples: `K` equal bins over `[z_near, z_far]`; sample `k` sits at the bin's centre, or at a
//! uniformly jittered position in it (stratified sampling, when an rng is given) and represents
//! the whole bin: `δ_k = |d| · (z_far − z_near) / K` (world length). Then, with
//! `s_k = σ_k δ_k`: `α_k = 1 − e^{−s_k}`, `T_k = exp(−Σ_{j<k} s_j)` (an exclusive cumulative
//! sum, so gradients never divide by `1 − α`), `w_k = T_k α_k`, and
//! `C = Σ w_k c_k + T_K · bg`, `opacity = 1 − T_K`, `depth = Σ w_k z_k` (alpha-weighted, not
//! normalised: divide by opacity for the expected depth of the hit).
//!
//! Empty-space skipping: samples whose occupancy cell is empty are not evaluated and contribute
//! `σ = 0` (α = 0, transmittance unchanged). With a grid that covers every cell where the field
//! has density, the image is the same as without skipping.

use candle_core::{DType, Device, Tensor};
use gen_core::{Error, Result, SeededRng};

use crate::camera::Camera;

/// A field that volume rendering can query.
pub trait RadianceField {
    /// Density and colour at world points: `points (M, 3)` → `(σ (M), rgb (M, 3))`, both in
    /// [`Self::dtype`] on [`Self::device`].
    fn query(&self, points: &Tensor) -> candle_core::Result<(Tensor, Tensor)>;
    fn dtype(&self) -> DType;
    fn device(&self) -> Device;
}

/// An axis-aligned box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aabb {
    pub min: [f64; 3],
    pub max: [f64; 3],
}

impl Aabb {
    /// The cube `[-half, half]³`.
    pub fn cube(half: f64) -> Self {
        Self { min: [-half; 3], max: [half; 3] }
    }

    /// Finite bounds with `min < max` on every axis.
    pub fn validate(&self) -> Result<()> {
        if (0..3).all(|a| {
            self.min[a].is_finite() && self.max[a].is_finite() && self.min[a] < self.max[a]
        }) {
            Ok(())
        } else {
            Err(Error::invalid(
                "bounding box",
                format!("{:?}..{:?} is empty or not finite", self.min, self.max),
            ))
        }
    }

    /// Ray-box intersection `[t0, t1]` of `o + t d` (slab test); `None` on a miss.
    pub fn intersect(&self, o: [f64; 3], d: [f64; 3]) -> Option<(f64, f64)> {
        let (mut t0, mut t1) = (f64::NEG_INFINITY, f64::INFINITY);
        for a in 0..3 {
            if d[a] == 0.0 {
                if o[a] < self.min[a] || o[a] > self.max[a] {
                    return None;
                }
                continue;
            }
            let (ta, tb) = ((self.min[a] - o[a]) / d[a], (self.max[a] - o[a]) / d[a]);
            t0 = t0.max(ta.min(tb));
            t1 = t1.min(ta.max(tb));
        }
        (t1 > t0).then_some((t0, t1))
    }
}

/// Options of [`render_volume`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VolumeConfig {
    /// Samples per ray `K`.
    pub samples_per_ray: usize,
    /// Box the samples are taken in (usually the field's bounds).
    pub bounds: Aabb,
    /// Smallest camera depth sampled.
    pub near: f64,
    /// Background colour composited behind the field.
    pub background: [f64; 3],
}

impl VolumeConfig {
    /// `samples_per_ray` samples in `bounds`, near 0.01, black background.
    pub fn new(samples_per_ray: usize, bounds: Aabb) -> Self {
        Self { samples_per_ray, bounds, near: 0.01, background: [0.0; 3] }
    }

    pub fn validate(&self) -> Result<()> {
        if self.samples_per_ray == 0
            || self.near.is_nan()
            || self.near < 0.0
            || self.background.iter().any(|v| !v.is_finite())
        {
            return Err(Error::invalid(
                "volume render config",
                format!(
                    "{} samples per ray, near {}, background {:?}",
                    self.samples_per_ray, self.near, self.background
                ),
            ));
        }
        self.bounds.validate()
    }
}

/// Rendered images.
#[derive(Debug, Clone)]
pub struct VolumeOutput {
    /// `(H, W, 3)`.
    pub rgb: Tensor,
    /// `(H, W)`: `1 − T_K`.
    pub opacity: Tensor,
    /// `(H, W)`: `Σ w_k z_k`.
    pub depth: Tensor,
    /// Samples the field was queried at (after skipping).
    pub samples_evaluated: usize,
    /// Samples inside the box before skipping.
    pub samples_total: usize,
}

/// A coarse bit grid over a box marking the cells where the field may have density.
#[derive(Debug, Clone, PartialEq)]
pub struct OccupancyGrid {
    pub bounds: Aabb,
    /// Cells per axis.
    pub res: usize,
    /// `res³` flags, x fastest.
    pub occupied: Vec<bool>,
}

impl OccupancyGrid {
    /// A grid with every cell occupied (skips nothing).
    pub fn full(bounds: Aabb, res: usize) -> Result<Self> {
        bounds.validate()?;
        if res == 0 || res > 1024 {
            return Err(Error::invalid(
                "occupancy grid",
                format!("resolution {res} not in 1..=1024"),
            ));
        }
        Ok(Self { bounds, res, occupied: vec![true; res * res * res] })
    }

    /// Re-marks the cells from the field's density (no gradients): a cell is occupied when the
    /// density at any of its 8 corners or its centre exceeds `threshold`; the result is then
    /// dilated by one cell so that thin features between the probes are kept. Call it every
    /// few optimisation steps. Returns the occupied fraction.
    pub fn update(&mut self, field: &dyn RadianceField, threshold: f64) -> Result<f64> {
        let r = self.res;
        let (lo, hi) = (self.bounds.min, self.bounds.max);
        let at = |a: usize, t: f64| lo[a] + (hi[a] - lo[a]) * t / r as f64;
        let c = r + 1;
        let mut pts = Vec::with_capacity(3 * (c * c * c + r * r * r));
        for k in 0..c {
            for j in 0..c {
                for i in 0..c {
                    pts.extend([at(0, i as f64), at(1, j as f64), at(2, k as f64)]);
                }
            }
        }
        for k in 0..r {
            for j in 0..r {
                for i in 0..r {
                    pts.extend([
                        at(0, i as f64 + 0.5),
                        at(1, j as f64 + 0.5),
                        at(2, k as f64 + 0.5),
                    ]);
                }
            }
        }
        let n = pts.len() / 3;
        let t = Tensor::from_vec(pts, (n, 3), &field.device())?.to_dtype(field.dtype())?;
        let mut sigma = Vec::with_capacity(n);
        for chunk in 0..n.div_ceil(1 << 16) {
            let len = (n - chunk * (1 << 16)).min(1 << 16);
            let (s, _) = field.query(&t.narrow(0, chunk * (1 << 16), len)?)?;
            sigma.extend(s.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        let hot = |v: f64| v > threshold || v.is_nan();
        let mut marked = vec![false; r * r * r];
        for k in 0..r {
            for j in 0..r {
                for i in 0..r {
                    let centre = c * c * c + (k * r + j) * r + i;
                    let mut any = hot(sigma[centre]);
                    for q in 0..8 {
                        let (di, dj, dk) = (q & 1, (q >> 1) & 1, q >> 2);
                        any |= hot(sigma[((k + dk) * c + j + dj) * c + i + di]);
                    }
                    marked[(k * r + j) * r + i] = any;
                }
            }
        }
        // Dilate by one cell (26-neighbourhood).
        for k in 0..r {
            for j in 0..r {
                for i in 0..r {
                    let mut any = false;
                    for dk in -1i64..=1 {
                        for dj in -1i64..=1 {
                            for di in -1i64..=1 {
                                let (x, y, z) = (i as i64 + di, j as i64 + dj, k as i64 + dk);
                                if [x, y, z].iter().all(|&v| v >= 0 && v < r as i64) {
                                    any |= marked[((z as usize * r) + y as usize) * r + x as usize];
                                }
                            }
                        }
                    }
                    self.occupied[(k * r + j) * r + i] = any;
                }
            }
        }
        Ok(self.occupied_fraction())
    }

    /// Fraction of occupied cells.
    pub fn occupied_fraction(&self) -> f64 {
        self.occupied.iter().filter(|&&b| b).count() as f64 / self.occupied.len() as f64
    }

    /// Whether the cell containing `p` is occupied (points outside the box: not occupied).
    pub fn is_occupied(&self, p: [f64; 3]) -> bool {
        let mut idx = [0usize; 3];
        for a in 0..3 {
            let t = (p[a] - self.bounds.min[a]) / (self.bounds.max[a] - self.bounds.min[a]);
            if !(0.0..=1.0).contains(&t) {
                return false;
            }
            idx[a] = ((t * self.res as f64) as usize).min(self.res - 1);
        }
        self.occupied[(idx[2] * self.res + idx[1]) * self.res + idx[0]]
    }
}

/// A ray `o + z d` parameterised by camera depth `z` (`d` has unit camera-z component, as in
/// [`render_volume`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ray {
    pub origin: [f64; 3],
    pub dir: [f64; 3],
}

impl Ray {
    /// The ray through the centre of pixel (row `i`, column `j`) of `camera`.
    pub fn through_pixel(camera: &Camera, i: usize, j: usize) -> Self {
        Self::through_camera_dir(camera, pixel_dir(camera, i, j))
    }

    /// The ray along camera-frame direction `dc`.
    fn through_camera_dir(camera: &Camera, dc: glam::DVec3) -> Self {
        Self {
            origin: camera.position().to_array(),
            dir: (camera.rotation.transpose() * dc).to_array(),
        }
    }
}

/// Camera-frame direction `((u − cx)/fx, (v − cy)/fy, 1)` through the centre of pixel `(i, j)`.
fn pixel_dir(camera: &Camera, i: usize, j: usize) -> glam::DVec3 {
    let k = &camera.intrinsics;
    glam::DVec3::new((j as f64 + 0.5 - k.cx) / k.fx, (i as f64 + 0.5 - k.cy) / k.fy, 1.0)
}

/// A batch of rays composited by [`march_rays`].
pub(crate) struct MarchedRays {
    /// `(R, 3)`: `Σ w_k c_k + T_K · bg`.
    pub(crate) rgb: Tensor,
    /// `(R)`: `1 − T_K`.
    pub(crate) opacity: Tensor,
    /// `(R, K)`: `w_k = T_k α_k`.
    pub(crate) weights: Tensor,
    /// `R · K` sample depths `z_k`, ray-major (0 for rays that miss the box).
    pub(crate) depths: Vec<f64>,
    pub(crate) samples_evaluated: usize,
    pub(crate) samples_total: usize,
}

/// The quadrature of the module docs over `rays`, each with the world length of its direction
/// (`δ_k = |d| · bin`): samples in the box beyond `cfg.near`, skipping empty `occupancy` cells,
/// jittered with `jitter` (drawn ray by ray, bin by bin) or at bin centres, one field query for
/// all of them. Shared by [`render_volume`] and [`crate::fit::field::render_rays`].
pub(crate) fn march_rays(
    field: &dyn RadianceField,
    rays: &[(Ray, f64)],
    cfg: &VolumeConfig,
    occupancy: Option<&OccupancyGrid>,
    mut jitter: Option<&mut SeededRng>,
) -> Result<MarchedRays> {
    cfg.validate()?;
    let (nrays, k) = (rays.len(), cfg.samples_per_ray);
    let (dtype, device) = (field.dtype(), field.device());
    // Packed sample positions, and for every (ray, bin) the packed index or `pad` (= skipped).
    let mut pts: Vec<f64> = Vec::new();
    let mut slot: Vec<u32> = vec![u32::MAX; nrays * k];
    let mut delta = vec![0f64; nrays * k];
    let mut zs = vec![0f64; nrays * k];
    let mut total = 0usize;
    for (r, (ray, dlen)) in rays.iter().enumerate() {
        let (o, d) = (ray.origin, ray.dir);
        let Some((t0, t1)) = cfg.bounds.intersect(o, d) else {
            continue;
        };
        let t0 = t0.max(cfg.near);
        if t1 <= t0 {
            continue;
        }
        let bin = (t1 - t0) / k as f64;
        for s in 0..k {
            let xi = match jitter.as_deref_mut() {
                Some(g) => g.uniform() as f64,
                None => 0.5,
            };
            let z = t0 + (s as f64 + xi) * bin;
            let p = [o[0] + z * d[0], o[1] + z * d[1], o[2] + z * d[2]];
            let e = r * k + s;
            delta[e] = bin * dlen;
            zs[e] = z;
            total += 1;
            if occupancy.is_some_and(|g| !g.is_occupied(p)) {
                continue;
            }
            slot[e] = (pts.len() / 3) as u32;
            pts.extend(p);
        }
    }
    let m = pts.len() / 3;
    let pad = m as u32;
    let slot: Vec<u32> = slot.into_iter().map(|s| if s == u32::MAX { pad } else { s }).collect();
    let (sigma_p, rgb_p) = if m > 0 {
        let t = Tensor::from_vec(pts, (m, 3), &device)?.to_dtype(dtype)?;
        let (s, c) = field.query(&t)?;
        if s.dims() != [m] || c.dims() != [m, 3] {
            return Err(Error::invalid(
                "radiance field",
                format!(
                    "query of {m} points returned σ {:?} and rgb {:?}, expected ({m}) and ({m}, 3)",
                    s.dims(),
                    c.dims()
                ),
            ));
        }
        (
            Tensor::cat(&[s, Tensor::zeros(1, dtype, &device)?], 0)?,
            Tensor::cat(&[c, Tensor::zeros((1, 3), dtype, &device)?], 0)?,
        )
    } else {
        (Tensor::zeros(1, dtype, &device)?, Tensor::zeros((1, 3), dtype, &device)?)
    };
    let idx = Tensor::from_vec(slot, nrays * k, &device)?;
    let sigma = sigma_p.index_select(&idx, 0)?.reshape((nrays, k))?;
    let rgb = rgb_p.index_select(&idx, 0)?.reshape((nrays, k, 3))?;
    let delta = Tensor::from_vec(delta, (nrays, k), &device)?.to_dtype(dtype)?;
    let sd = (sigma * delta)?;
    let cum = sd.cumsum(1)?;
    let trans = (cum.sub(&sd)?.neg()?).exp()?;
    let alpha = (1.0 - sd.neg()?.exp()?)?;
    let wts = (trans * alpha)?;
    let t_final = sd.sum(1)?.neg()?.exp()?; // (R)
    let bg = Tensor::new(&cfg.background, &device)?.to_dtype(dtype)?.unsqueeze(0)?;
    let color = wts
        .unsqueeze(2)?
        .broadcast_mul(&rgb)?
        .sum(1)?
        .add(&t_final.unsqueeze(1)?.broadcast_mul(&bg)?)?;
    Ok(MarchedRays {
        rgb: color,
        opacity: (1.0 - &t_final)?,
        weights: wts,
        depths: zs,
        samples_evaluated: m,
        samples_total: total,
    })
}

/// Renders `field` from `camera`. With `occupancy`, samples in empty cells are skipped; with
/// `jitter`, sample positions are stratified-random within their bins (else bin centres).
/// Outputs are differentiable w.r.t. whatever the field's outputs depend on.
pub fn render_volume(
    field: &dyn RadianceField,
    camera: &Camera,
    cfg: &VolumeConfig,
    occupancy: Option<&OccupancyGrid>,
    jitter: Option<&mut SeededRng>,
) -> Result<VolumeOutput> {
    let (w, h) = (camera.width(), camera.height());
    let mut rays = Vec::with_capacity(w * h);
    for i in 0..h {
        for j in 0..w {
            let dc = pixel_dir(camera, i, j);
            rays.push((Ray::through_camera_dir(camera, dc), dc.length()));
        }
    }
    let out = march_rays(field, &rays, cfg, occupancy, jitter)?;
    let zs = Tensor::from_vec(out.depths, (w * h, cfg.samples_per_ray), &field.device())?
        .to_dtype(field.dtype())?;
    let depth = (out.weights * zs)?.sum(1)?;
    Ok(VolumeOutput {
        rgb: out.rgb.reshape((h, w, 3))?,
        opacity: out.opacity.reshape((h, w))?,
        depth: depth.reshape((h, w))?,
        samples_evaluated: out.samples_evaluated,
        samples_total: out.samples_total,
    })
}
