//! Adaptive density control of Gaussian splats (Kerbl et al. 2023, §5; the DreamGaussian
//! schedule): clone small Gaussians and split large ones where the view-space positional
//! gradient is large, prune transparent and oversized ones, and periodically reset opacities.
//!
//! [`AdaptiveDensity`] packages all of this as a [`DensityStrategy`] (module [`strategy`]),
//! which the splat optimiser drives without knowing the loss. The pieces, for other drivers:
//! 1. after each `loss.backward()` of a [`crate::splat::render_with_probe`] render, call
//!    [`DensityStats::accumulate`] with the probe's gradient and the render's radii;
//! 2. at the steps where [`DensityConfig::densify_now`] holds, call [`densify_and_prune`]
//!    (a pure function of the splats, the statistics and a seeded generator) and then
//!    [`remap_optimizer`] so that the optimizer follows the new Gaussians;
//! 3. at the steps where [`DensityConfig::reset_opacity_now`] holds, call [`reset_opacity`].
//!
//! **Gradient units.** The probe gives d loss / d (pixel position). 3DGS thresholds the
//! gradient wrt normalised device coordinates (`x_ndc = 2 u / W − 1`), so the accumulated norm
//! here is `|(g_u · W/2, g_v · H/2)|` and the 3DGS threshold 2e-4 keeps its meaning.
//!
//! **Optimizer state.** gen-optim's [`Optim`] exposes its state only through
//! `save_state`/`load_state`, so [`remap_optimizer`] rebuilds the optimizer: it saves the old
//! state to a temporary safetensors file, re-indexes every per-Gaussian slot along the first
//! axis (surviving Gaussians keep their moments, new ones get zeros, as in 3DGS), writes that,
//! and loads it into a fresh [`Optim`] over the new variables with the same rule, group
//! configs (learning rates) and step options. Step counts are kept. The temporary file lives in
//! the system temp folder and is removed afterwards.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use gen_core::{Error, Result, SeededRng};
use gen_optim::{NamedVar, Optim, Optimizer, ParamGroup, UpdateRule};

use crate::splat::{SplatVars, Splats};

pub mod strategy;
pub use strategy::{
    AdaptiveDensity, DensityStrategy, FixedSet, RenderInfo, SplatParams, StrategyReport,
};

/// Names under which the splat fields are registered in the optimizer (one group each, in
/// this order — see [`splat_param_groups`]).
pub const PARAM_NAMES: [&str; 5] = ["means", "log_scales", "quats", "opacity_logits", "sh"];

/// Schedule and thresholds of density control. Defaults are 3DGS's (`OptimizationParams`)
/// except the step schedule, which is scaled for short fits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DensityConfig {
    /// First step (1-based, counting completed optimizer steps) at which densification runs.
    pub densify_from: u64,
    /// Densification stops after this step (pruning by opacity too).
    pub densify_until: u64,
    /// Densify every `interval` steps in `[densify_from, densify_until]`.
    pub interval: u64,
    /// Mean view-space gradient norm (NDC units, see the module docs) above which a Gaussian
    /// is cloned or split.
    pub grad_threshold: f64,
    /// A Gaussian whose largest scale is at most `percent_dense · extent` is cloned, a larger
    /// one is split.
    pub percent_dense: f64,
    /// Gaussians with opacity below this are pruned.
    pub min_opacity: f64,
    /// Prune Gaussians whose largest pixel radius since the last densification exceeds this
    /// (3DGS: 20 px). `None`: no screen-size pruning. Like the world-size rule, applied only
    /// after the first opacity reset ([`DensityConfig::size_pruning_now`]).
    pub max_screen_radius: Option<f64>,
    /// Prune Gaussians whose largest scale exceeds this fraction of the extent (3DGS: 0.1).
    /// `None`: no world-size pruning. Applied only after the first opacity reset (as in 3DGS
    /// and gsplat): without a reset, Gaussians grown large by the optimisation are the ones
    /// covering the object, and pruning them every round collapses long fits.
    pub max_world_scale: Option<f64>,
    /// Number of samples a split Gaussian is replaced by.
    pub split_count: usize,
    /// Scales of split samples are divided by this (3DGS: 0.8 · 2 = 1.6).
    pub split_scale_div: f64,
    /// Reset opacities to at most `reset_opacity` every this many steps (`0`: never); resets
    /// stop at `densify_until`.
    pub opacity_reset_interval: u64,
    /// The opacity reset value (3DGS: 0.01).
    pub reset_opacity: f64,
    /// Never grow beyond this many Gaussians (clones and splits are taken by decreasing
    /// gradient while they fit).
    pub max_gaussians: usize,
}

impl Default for DensityConfig {
    fn default() -> Self {
        Self {
            densify_from: 100,
            densify_until: 1500,
            interval: 100,
            grad_threshold: 2e-4,
            percent_dense: 0.01,
            min_opacity: 0.005,
            max_screen_radius: None,
            max_world_scale: Some(0.1),
            split_count: 2,
            split_scale_div: 1.6,
            opacity_reset_interval: 3000,
            reset_opacity: 0.01,
            max_gaussians: 200_000,
        }
    }
}

impl DensityConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, v: String| Err(Error::invalid(format!("density `{f}`"), v));
        if self.interval == 0 {
            return bad("interval", "0 (must be >= 1)".into());
        }
        if !(self.grad_threshold.is_finite() && self.grad_threshold >= 0.0) {
            return bad("grad_threshold", format!("{}", self.grad_threshold));
        }
        if !(self.percent_dense.is_finite() && self.percent_dense > 0.0) {
            return bad("percent_dense", format!("{}", self.percent_dense));
        }
        if !(0.0..1.0).contains(&self.min_opacity) {
            return bad("min_opacity", format!("{} (must be in [0, 1))", self.min_opacity));
        }
        if self.max_gaussians == 0 {
            return bad("max_gaussians", "0 (must be >= 1)".into());
        }
        if self.split_count < 1 {
            return bad("split_count", "0 (must be >= 1)".into());
        }
        if !(self.split_scale_div.is_finite() && self.split_scale_div > 0.0) {
            return bad("split_scale_div", format!("{}", self.split_scale_div));
        }
        if !(self.reset_opacity > 0.0 && self.reset_opacity < 1.0) {
            return bad("reset_opacity", format!("{} (must be in (0, 1))", self.reset_opacity));
        }
        Ok(())
    }

    /// Whether density control runs after optimizer step `step` (1-based).
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87 (MSRV 1.85)
    pub fn densify_now(&self, step: u64) -> bool {
        step >= self.densify_from
            && step <= self.densify_until
            && self.interval > 0
            && step % self.interval == 0
    }

    /// Whether the size rules (`max_screen_radius`, `max_world_scale`) prune at a
    /// densification after step `step`: only once opacity resets have started
    /// (`opacity_reset_interval > 0` and `step > opacity_reset_interval`).
    pub fn size_pruning_now(&self, step: u64) -> bool {
        self.opacity_reset_interval > 0 && step > self.opacity_reset_interval
    }

    /// Whether opacities are reset after optimizer step `step` (1-based).
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87 (MSRV 1.85)
    pub fn reset_opacity_now(&self, step: u64) -> bool {
        self.opacity_reset_interval > 0
            && step <= self.densify_until
            && step % self.opacity_reset_interval == 0
    }
}

/// Per-Gaussian statistics gathered between densifications.
#[derive(Debug, Clone, PartialEq)]
pub struct DensityStats {
    /// Sum over renders where the Gaussian was visible of its view-space gradient norm.
    pub grad_accum: Vec<f64>,
    /// Number of renders where the Gaussian was visible (radius > 0).
    pub visible: Vec<u32>,
    /// Largest pixel radius seen.
    pub max_radius: Vec<f64>,
}

impl DensityStats {
    pub fn new(n: usize) -> Self {
        Self { grad_accum: vec![0.0; n], visible: vec![0; n], max_radius: vec![0.0; n] }
    }

    pub fn len(&self) -> usize {
        self.grad_accum.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grad_accum.is_empty()
    }

    /// Adds one render: `probe_grad` is the `(N, 8)` gradient of the render probe, `radii` the
    /// `(N)` pixel radii ([`crate::splat::RenderOutput::radii`]), `(width, height)` the image size.
    pub fn accumulate(
        &mut self,
        probe_grad: &Tensor,
        radii: &Tensor,
        width: usize,
        height: usize,
    ) -> Result<()> {
        let n = self.len();
        if probe_grad.dims().len() != 2 || probe_grad.dim(0)? != n || probe_grad.dim(1)? < 2 {
            return Err(Error::invalid(
                "density probe gradient",
                format!("shape {:?}, want ({n}, 8)", probe_grad.dims()),
            ));
        }
        if radii.dims() != [n] {
            return Err(Error::invalid(
                "density radii",
                format!("shape {:?}, want ({n})", radii.dims()),
            ));
        }
        let g = probe_grad.narrow(1, 0, 2)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let r = radii.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let (sx, sy) = (0.5 * width as f64, 0.5 * height as f64);
        for i in 0..n {
            if r[i] > 0.0 {
                let norm = ((g[i][0] * sx).powi(2) + (g[i][1] * sy).powi(2)).sqrt();
                self.grad_accum[i] += norm;
                self.visible[i] += 1;
                self.max_radius[i] = self.max_radius[i].max(r[i]);
            }
        }
        Ok(())
    }

    /// Mean gradient norm per Gaussian (0 where never visible).
    pub fn mean_grad(&self) -> Vec<f64> {
        self.grad_accum
            .iter()
            .zip(&self.visible)
            .map(|(&g, &c)| if c > 0 { g / c as f64 } else { 0.0 })
            .collect()
    }

    /// The statistics re-indexed by `rows` (as in [`Densified::rows`]; `None` rows get zeros).
    pub fn remap(&self, rows: &[Option<usize>]) -> Self {
        let mut s = Self::new(rows.len());
        for (j, r) in rows.iter().enumerate() {
            if let Some(i) = *r {
                s.grad_accum[j] = self.grad_accum[i];
                s.visible[j] = self.visible[i];
                s.max_radius[j] = self.max_radius[i];
            }
        }
        s
    }
}

/// What [`densify_and_prune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DensityReport {
    pub before: usize,
    pub cloned: usize,
    pub split: usize,
    /// Gaussians removed by the pruning rules (split originals not counted).
    pub pruned: usize,
    pub after: usize,
}

/// Result of [`densify_and_prune`]: the new splats and, for every new row, the old row it
/// keeps the optimizer state of (`None`: a new Gaussian, zero moments).
#[derive(Debug, Clone)]
pub struct Densified {
    pub splats: Splats,
    pub rows: Vec<Option<usize>>,
    pub report: DensityReport,
}

/// Host copy of splat parameters in f64, one row per Gaussian.
struct Host {
    means: Vec<[f64; 3]>,
    log_scales: Vec<[f64; 3]>,
    quats: Vec<[f64; 4]>,
    logits: Vec<f64>,
    /// `K * 3` values per row.
    sh: Vec<Vec<f64>>,
    k: usize,
}

fn rows_of<const D: usize>(t: &Tensor) -> Result<Vec<[f64; D]>> {
    let v = t.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    Ok(v.into_iter()
        .map(|r| {
            let mut a = [0.0; D];
            a.copy_from_slice(&r);
            a
        })
        .collect())
}

impl Host {
    fn from_splats(s: &Splats) -> Result<Self> {
        let n = s.len();
        let k = s.sh.dim(1)?;
        Ok(Self {
            means: rows_of::<3>(&s.means)?,
            log_scales: rows_of::<3>(&s.log_scales)?,
            quats: rows_of::<4>(&s.quats)?,
            logits: s.opacity_logits.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            sh: s.sh.reshape((n, k * 3))?.to_dtype(DType::F64)?.to_vec2::<f64>()?,
            k,
        })
    }

    fn empty(k: usize) -> Self {
        Self { means: vec![], log_scales: vec![], quats: vec![], logits: vec![], sh: vec![], k }
    }

    fn push_row(&mut self, src: &Host, i: usize) {
        self.means.push(src.means[i]);
        self.log_scales.push(src.log_scales[i]);
        self.quats.push(src.quats[i]);
        self.logits.push(src.logits[i]);
        self.sh.push(src.sh[i].clone());
    }

    fn to_splats(&self, dtype: DType, device: &Device) -> Result<Splats> {
        let n = self.means.len();
        let flat = |v: Vec<f64>, shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
        };
        Ok(Splats {
            means: flat(self.means.concat(), &[n, 3])?,
            log_scales: flat(self.log_scales.concat(), &[n, 3])?,
            quats: flat(self.quats.concat(), &[n, 4])?,
            opacity_logits: flat(self.logits.clone(), &[n])?,
            sh: flat(self.sh.concat(), &[n, self.k, 3])?,
        })
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Rotation matrix (rows) of the quaternion `(w, x, y, z)`, normalised (identity if zero).
fn quat_matrix(q: [f64; 4]) -> [[f64; 3]; 3] {
    let n = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]).sqrt();
    let [w, x, y, z] =
        if n > 0.0 { [q[0] / n, q[1] / n, q[2] / n, q[3] / n] } else { [1.0, 0.0, 0.0, 0.0] };
    [
        [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
        [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
        [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
    ]
}

/// One round of 3DGS density control on `splats` with `stats` (same length):
///
/// 1. **clone** every Gaussian with mean gradient ≥ `grad_threshold` and largest scale
///    ≤ `percent_dense · extent` (an identical copy is appended);
/// 2. **split** every Gaussian with mean gradient ≥ `grad_threshold` and a larger scale into
///    `split_count` Gaussians with means sampled from it (`μ + R (s ⊙ ε)`, ε ~ N(0, I)),
///    scales `s / split_scale_div`, other parameters copied; the original is removed;
/// 3. **prune** (among the originals) opacity < `min_opacity`, pixel radius >
///    `max_screen_radius`, largest scale > `max_world_scale · extent`.
///
/// Pruned Gaussians are never cloned or split. New Gaussians come after the survivors, clones
/// first, then split samples in the order of their originals. `extent` is the scene radius
/// (3DGS: the camera spread). Deterministic given `rng`'s state.
pub fn densify_and_prune(
    splats: &Splats,
    stats: &DensityStats,
    cfg: &DensityConfig,
    extent: f64,
    rng: &mut SeededRng,
) -> Result<Densified> {
    cfg.validate()?;
    splats.validate()?;
    let n = splats.len();
    if stats.len() != n {
        return Err(Error::invalid(
            "density statistics",
            format!("{} entries for {n} Gaussians", stats.len()),
        ));
    }
    if !(extent.is_finite() && extent > 0.0) {
        return Err(Error::invalid("scene extent", format!("{extent}")));
    }
    let host = Host::from_splats(splats)?;
    let grads = stats.mean_grad();
    let max_scale: Vec<f64> =
        host.log_scales.iter().map(|s| s.iter().fold(f64::MIN, |m, v| m.max(v.exp()))).collect();
    let dense_limit = cfg.percent_dense * extent;
    let pruned: Vec<bool> = (0..n)
        .map(|i| {
            sigmoid(host.logits[i]) < cfg.min_opacity
                || cfg.max_screen_radius.is_some_and(|r| stats.max_radius[i] > r)
                || cfg.max_world_scale.is_some_and(|f| max_scale[i] > f * extent)
        })
        .collect();
    // Candidates for growth, largest gradient first when the cap binds.
    let mut clone_idx = Vec::new();
    let mut split_idx = Vec::new();
    for i in 0..n {
        if pruned[i] || grads[i] < cfg.grad_threshold || grads[i].is_nan() {
            continue;
        }
        if max_scale[i] <= dense_limit {
            clone_idx.push(i);
        } else {
            split_idx.push(i);
        }
    }
    // The cap: a clone adds one Gaussian, a split `split_count - 1`; candidates are taken in
    // order of decreasing gradient while they fit.
    let kept = pruned.iter().filter(|&&p| !p).count();
    let mut budget = cfg.max_gaussians.saturating_sub(kept);
    let split_cost = cfg.split_count - 1;
    if clone_idx.len() + split_idx.len() * split_cost > budget {
        let mut cands: Vec<(usize, bool)> = clone_idx
            .iter()
            .map(|&i| (i, false))
            .chain(split_idx.iter().map(|&i| (i, true)))
            .collect();
        cands.sort_by(|a, b| grads[b.0].total_cmp(&grads[a.0]).then(a.0.cmp(&b.0)));
        clone_idx.clear();
        split_idx.clear();
        for (i, split) in cands {
            let cost = if split { split_cost } else { 1 };
            if cost <= budget {
                budget -= cost;
                if split {
                    split_idx.push(i);
                } else {
                    clone_idx.push(i);
                }
            }
        }
        clone_idx.sort_unstable();
        split_idx.sort_unstable();
    }
    let is_split = {
        let mut v = vec![false; n];
        for &i in &split_idx {
            v[i] = true;
        }
        v
    };
    let mut out = Host::empty(host.k);
    let mut rows = Vec::new();
    for i in 0..n {
        if !pruned[i] && !is_split[i] {
            out.push_row(&host, i);
            rows.push(Some(i));
        }
    }
    for &i in &clone_idx {
        out.push_row(&host, i);
        rows.push(None);
    }
    let div_log = cfg.split_scale_div.ln();
    for &i in &split_idx {
        let r = quat_matrix(host.quats[i]);
        let s = host.log_scales[i].map(f64::exp);
        for _ in 0..cfg.split_count {
            let e = [rng.normal() as f64, rng.normal() as f64, rng.normal() as f64];
            let local = [s[0] * e[0], s[1] * e[1], s[2] * e[2]];
            out.push_row(&host, i);
            let m = out.means.last_mut().expect("row pushed");
            for (a, row) in r.iter().enumerate() {
                m[a] += row[0] * local[0] + row[1] * local[1] + row[2] * local[2];
            }
            let ls = out.log_scales.last_mut().expect("row pushed");
            for v in ls.iter_mut() {
                *v -= div_log;
            }
            rows.push(None);
        }
    }
    let report = DensityReport {
        before: n,
        cloned: clone_idx.len(),
        split: split_idx.len(),
        pruned: pruned.iter().filter(|&&p| p).count(),
        after: rows.len(),
    };
    Ok(Densified {
        splats: out.to_splats(splats.means.dtype(), splats.means.device())?,
        rows,
        report,
    })
}

/// 3DGS opacity reset: every opacity becomes `min(opacity, reset_opacity)` (as logits).
/// The optimizer's opacity moments should be zeroed too ([`remap_optimizer`] with
/// `zero = &["opacity_logits"]`).
pub fn reset_opacity(splats: &Splats, reset_opacity: f64) -> Result<Splats> {
    if !(reset_opacity > 0.0 && reset_opacity < 1.0) {
        return Err(Error::invalid(
            "reset opacity",
            format!("{reset_opacity} (must be in (0, 1))"),
        ));
    }
    let cap = (reset_opacity / (1.0 - reset_opacity)).ln();
    let logits = splats.opacity_logits.minimum(cap)?.to_dtype(splats.opacity_logits.dtype())?;
    Ok(Splats { opacity_logits: logits, ..splats.clone() })
}

/// One optimizer group per splat field, in [`PARAM_NAMES`] order, with `configs[i]` for field i.
pub fn splat_param_groups<C: Clone>(vars: &SplatVars, configs: [C; 5]) -> Vec<ParamGroup<C>> {
    vars.all()
        .into_iter()
        .zip(PARAM_NAMES)
        .zip(configs)
        .map(|((v, name), c)| ParamGroup::new(vec![NamedVar::new(name, v)], c))
        .collect()
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn tmp_state_path(tag: &str) -> PathBuf {
    let k = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("gen-scene-{tag}-{}-{k}.safetensors", std::process::id()))
}

/// Re-indexes a per-Gaussian tensor along axis 0: row `j` of the result is row `rows[j]` of `t`
/// (zeros for `None`).
pub fn remap_rows(t: &Tensor, rows: &[Option<usize>]) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let n_old = dims.first().copied().unwrap_or(0);
    let row_len: usize = dims.iter().skip(1).product();
    let flat = t.to_dtype(DType::F64)?.reshape((n_old, row_len))?.to_vec2::<f64>()?;
    let mut v = Vec::with_capacity(rows.len() * row_len);
    for r in rows {
        match *r {
            Some(i) if i < n_old => v.extend_from_slice(&flat[i]),
            Some(i) => {
                return Err(Error::invalid(
                    "row map",
                    format!("row {i} of a tensor with {n_old} rows"),
                ))
            }
            None => v.extend(std::iter::repeat_n(0.0, row_len)),
        }
    }
    let mut shape = dims;
    if shape.is_empty() {
        return Err(Error::invalid("row map", "a scalar has no rows"));
    }
    shape[0] = rows.len();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(t.dtype())?.to_device(t.device())?)
}

/// Reads an optimizer's state as a map (through a temporary file; see the module docs).
pub fn optimizer_state_map<R: UpdateRule>(opt: &Optim<R>) -> Result<HashMap<String, Tensor>> {
    let path = tmp_state_path("optim-save");
    let res = opt.save_state(&path).and_then(|_| {
        candle_core::safetensors::load(&path, &Device::Cpu)
            .map_err(|e| Error::msg(format!("reading back optimizer state: {e}")))
    });
    let _ = std::fs::remove_file(&path);
    res
}

/// Loads a state map (as from [`optimizer_state_map`]) into `opt` (through a temporary file).
pub fn load_optimizer_state_map<R: UpdateRule>(
    opt: &mut Optim<R>,
    map: &HashMap<String, Tensor>,
) -> Result<()> {
    let path = tmp_state_path("optim-load");
    let res = gen_optim::save_safetensors_atomic(map, &path).and_then(|_| opt.load_state(&path));
    let _ = std::fs::remove_file(&path);
    res
}

/// A fresh optimizer over `new_vars` (same rule, group configs — learning rates included — and
/// step options as `old`, which must have been built with [`splat_param_groups`]) whose state
/// follows the Gaussians: per-Gaussian slots are re-indexed with `rows` (see
/// [`Densified::rows`]; `None` rows get zero moments) and the slots of the fields named in
/// `zero` are zeroed. Step counts are kept.
pub fn remap_optimizer<R: UpdateRule + Clone>(
    old: &Optim<R>,
    new_vars: &SplatVars,
    rows: &[Option<usize>],
    zero: &[&str],
) -> Result<Optim<R>> {
    let old_groups = old.groups();
    let names_ok = old_groups.len() == PARAM_NAMES.len()
        && old_groups
            .iter()
            .zip(PARAM_NAMES)
            .all(|(g, n)| g.params.len() == 1 && g.params[0].name == n);
    if !names_ok {
        return Err(Error::invalid(
            "splat optimizer",
            "groups must be the five splat fields of splat_param_groups",
        ));
    }
    let n_old = old_groups[0].params[0].var.dim(0)?;
    let configs: Vec<R::Config> = old_groups.iter().map(|g| g.config.clone()).collect();
    let configs: [R::Config; 5] =
        configs.try_into().map_err(|_| Error::msg("five groups expected"))?;
    let mut map = optimizer_state_map(old)?;
    for (key, t) in map.iter_mut() {
        let Some((param, slot)) = key.split_once('.') else {
            continue;
        };
        if slot.starts_with("__") || t.rank() == 0 || t.dim(0)? != n_old {
            continue;
        }
        let remapped = remap_rows(t, rows)?;
        *t = if zero.contains(&param) { remapped.zeros_like()? } else { remapped };
    }
    let mut opt = Optim::new(old.rule().clone(), splat_param_groups(new_vars, configs))?
        .with_options(old.options().clone());
    load_optimizer_state_map(&mut opt, &map)?;
    Ok(opt)
}
