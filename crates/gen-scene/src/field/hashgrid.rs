//! Multiresolution hash-grid encoding (instant-ngp) as a candle custom op with an analytic
//! backward pass to the table and to the positions.
//!
//! Level `l` (of `L`) has resolution `N_l = floor(N_min · b^l)` with growth
//! `b = exp((ln N_max − ln N_min) / (L − 1))`. A point `x ∈ [0, 1]³` is scaled to `x · N_l`; the
//! cell `c = floor(x · N_l)` (clamped to `0..N_l-1`, so `x = 1` lies in the last cell) has 8
//! integer corners in `0..=N_l`, each mapped to a table row:
//! - dense levels, where `(N_l + 1)³ ≤ T`: `i + (N_l+1)·(j + (N_l+1)·k)`;
//! - hashed levels: `(i·π₁ ⊕ j·π₂ ⊕ k·π₃) mod T` in wrapping `u32` arithmetic with
//!   `π = (1, 2654435761, 805459861)` (`T` is a power of two, so `mod T` is a mask).
//!
//! The level's `F` features are the trilinear interpolation of its 8 corner rows. The table has
//! shape `(L·T, F)`: level `l` owns rows `l·T .. (l+1)·T` (a dense level uses only the first
//! `(N_l+1)³` of them). The output `(N, L·F)` is level-major: column `l·F + f`.
//!
//! Points outside `[0, 1]³` are clamped per coordinate; the position gradient of a clamped
//! coordinate is zero (the encoding is constant there). The position gradient is the exact
//! derivative of the trilinear interpolation inside a cell (it jumps across cell faces).
//!
//! Backward to the table: each level's slice of the table gradient is accumulated by one task
//! over all points in order (levels run in parallel and own disjoint rows), so the result is the
//! same whatever the thread count. The op runs on the CPU (f32 or f64); other devices get an
//! error.

// Index loops mirror the formulas.
#![allow(clippy::needless_range_loop)]

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor,
};
use gen_core::{Error, Result, SeededRng};
use rayon::prelude::*;

use crate::real::Real;

/// The hash primes of instant-ngp (the first is 1 for cache coherence along x).
pub const PRIMES: [u32; 3] = [1, 2_654_435_761, 805_459_861];

/// Hash-grid hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HashGridConfig {
    /// Number of levels `L`.
    pub levels: usize,
    /// Features per level `F`.
    pub features: usize,
    /// `log2` of the per-level table size `T`.
    pub log2_table_size: u32,
    /// Coarsest resolution `N_min`.
    pub base_resolution: usize,
    /// Finest resolution `N_max`.
    pub max_resolution: usize,
}

impl HashGridConfig {
    /// instant-ngp's NeRF setting: 16 levels × 2 features, `T = 2^19`, resolutions 16..2048.
    pub fn instant_ngp() -> Self {
        Self {
            levels: 16,
            features: 2,
            log2_table_size: 19,
            base_resolution: 16,
            max_resolution: 2048,
        }
    }

    /// A small grid for single objects on a CPU: 12 levels × 2 features, `T = 2^16`,
    /// resolutions 8..256.
    pub fn small() -> Self {
        Self {
            levels: 12,
            features: 2,
            log2_table_size: 16,
            base_resolution: 8,
            max_resolution: 256,
        }
    }

    /// A tiny grid for tests: 4 levels × 2 features, `T = 2^8`, resolutions 2..16 (the two
    /// coarsest levels are dense, the two finest hashed).
    pub fn tiny() -> Self {
        Self { levels: 4, features: 2, log2_table_size: 8, base_resolution: 2, max_resolution: 16 }
    }

    /// Rows per level, `T`.
    pub fn table_size(&self) -> usize {
        1usize << self.log2_table_size
    }

    /// Per-level growth factor `b`.
    pub fn growth(&self) -> f64 {
        if self.levels <= 1 {
            return 1.0;
        }
        (((self.max_resolution as f64).ln() - (self.base_resolution as f64).ln())
            / (self.levels - 1) as f64)
            .exp()
    }

    /// Resolution `N_l` of level `l`.
    pub fn resolution(&self, l: usize) -> usize {
        // The small epsilon keeps N_max exact despite rounding in b^(L-1).
        ((self.base_resolution as f64 * self.growth().powi(l as i32)) + 1e-6).floor() as usize
    }

    /// Whether level `l` is indexed densely (`(N_l + 1)³ ≤ T`).
    pub fn is_dense(&self, l: usize) -> bool {
        (self.resolution(l) + 1).checked_pow(3).is_some_and(|n| n <= self.table_size())
    }

    /// Output features per point, `L · F`.
    pub fn out_dim(&self) -> usize {
        self.levels * self.features
    }

    /// Table shape `(L · T, F)`.
    pub fn table_shape(&self) -> (usize, usize) {
        (self.levels * self.table_size(), self.features)
    }

    /// Checks the sizes: at least one level and feature, `1 ≤ N_min ≤ N_max`, `T` between 2^2
    /// and 2^24.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("hash grid config", msg));
        if self.levels == 0 || self.features == 0 {
            return bad(format!("{} levels × {} features", self.levels, self.features));
        }
        if !(2..=24).contains(&self.log2_table_size) {
            return bad(format!("log2_table_size {} not in 2..=24", self.log2_table_size));
        }
        if self.base_resolution == 0
            || self.max_resolution < self.base_resolution
            || self.max_resolution > 1 << 20
        {
            return bad(format!(
                "resolutions N_min={} N_max={} (need 1 ≤ N_min ≤ N_max ≤ 2^20)",
                self.base_resolution, self.max_resolution
            ));
        }
        Ok(())
    }

    /// A table initialised uniformly in `[-1e-4, 1e-4]` (instant-ngp).
    pub fn init_table(&self, rng: &mut SeededRng, dtype: DType, device: &Device) -> Result<Tensor> {
        rng.rand_uniform(self.table_shape(), -1e-4, 1e-4, dtype, device)
    }

    fn level_params(&self) -> Vec<Level> {
        (0..self.levels)
            .map(|l| Level { res: self.resolution(l), dense: self.is_dense(l) })
            .collect()
    }
}

#[derive(Debug, Clone, Copy)]
struct Level {
    res: usize,
    dense: bool,
}

/// Table row (within the level) of integer corner `c`.
#[inline(always)]
fn corner_row(level: Level, mask: u32, c: [u32; 3]) -> usize {
    if level.dense {
        let s = level.res + 1;
        c[0] as usize + s * (c[1] as usize + s * c[2] as usize)
    } else {
        ((c[0].wrapping_mul(PRIMES[0])
            ^ c[1].wrapping_mul(PRIMES[1])
            ^ c[2].wrapping_mul(PRIMES[2]))
            & mask) as usize
    }
}

/// Cell and fractional position of one coordinate at resolution `res`; the third value is
/// `d frac / d x` (`res`, or 0 where the coordinate was clamped).
#[inline(always)]
fn locate<R: Real>(x: R, res: usize) -> (u32, R, R) {
    let xf = x.f64();
    let inside = (0.0..=1.0).contains(&xf);
    let xr = if inside {
        x
    } else if xf > 1.0 {
        R::c(1.0)
    } else {
        R::c(0.0)
    };
    let s = xr * R::c(res as f64);
    let cell = (s.floor().f64().max(0.0) as usize).min(res - 1);
    let dfdx = if inside { R::c(res as f64) } else { R::c(0.0) };
    (cell as u32, s - R::c(cell as f64), dfdx)
}

/// Corner rows (global, including the level offset) and trilinear weights of one point at one
/// level, plus the per-axis fractions and their derivative factors.
#[inline(always)]
fn corners<R: Real>(
    p: &[R],
    level: Level,
    mask: u32,
    offset: usize,
) -> ([usize; 8], [R; 8], [R; 3], [R; 3]) {
    let mut cell = [0u32; 3];
    let mut frac = [R::c(0.0); 3];
    let mut dfdx = [R::c(0.0); 3];
    for a in 0..3 {
        let (c, f, d) = locate(p[a], level.res);
        cell[a] = c;
        frac[a] = f;
        dfdx[a] = d;
    }
    let mut rows = [0usize; 8];
    let mut w = [R::c(0.0); 8];
    for k in 0..8 {
        let mut c = cell;
        let mut wk = R::c(1.0);
        for a in 0..3 {
            if (k >> a) & 1 == 1 {
                c[a] += 1;
                wk *= frac[a];
            } else {
                wk *= R::c(1.0) - frac[a];
            }
        }
        rows[k] = offset + corner_row(level, mask, c);
        w[k] = wk;
    }
    (rows, w, frac, dfdx)
}

fn forward_cpu<R: Real>(cfg: &HashGridConfig, points: &[R], table: &[R]) -> Vec<R> {
    let levels = cfg.level_params();
    let (t, f, lf) = (cfg.table_size(), cfg.features, cfg.out_dim());
    let mask = (t - 1) as u32;
    let n = points.len() / 3;
    let mut out = vec![R::c(0.0); n * lf];
    out.par_chunks_mut(lf).enumerate().for_each(|(i, o)| {
        let p = &points[3 * i..3 * i + 3];
        for (l, &level) in levels.iter().enumerate() {
            let (rows, w, _, _) = corners(p, level, mask, l * t);
            for k in 0..8 {
                let row = &table[rows[k] * f..rows[k] * f + f];
                for j in 0..f {
                    o[l * f + j] += w[k] * row[j];
                }
            }
        }
    });
    out
}

/// Gradients `(d points (N·3), d table (L·T·F))` for the output gradient `grad (N·L·F)`;
/// each is computed only when asked for (`want`).
fn backward_cpu<R: Real>(
    cfg: &HashGridConfig,
    points: &[R],
    table: &[R],
    grad: &[R],
    want: [bool; 2],
) -> (Option<Vec<R>>, Option<Vec<R>>) {
    let levels = cfg.level_params();
    let (t, f, lf) = (cfg.table_size(), cfg.features, cfg.out_dim());
    let mask = (t - 1) as u32;
    let n = points.len() / 3;
    // Table: one task per level, points in order → deterministic.
    let mut dtable = vec![R::c(0.0); if want[1] { table.len() } else { 0 }];
    dtable.par_chunks_mut(t * f).enumerate().for_each(|(l, dt)| {
        let level = levels[l];
        for i in 0..n {
            let g = &grad[i * lf + l * f..i * lf + l * f + f];
            if g.iter().all(|v| v.f64() == 0.0) {
                continue;
            }
            let (rows, w, _, _) = corners(&points[3 * i..3 * i + 3], level, mask, 0);
            for k in 0..8 {
                let r = &mut dt[rows[k] * f..rows[k] * f + f];
                for j in 0..f {
                    r[j] += w[k] * g[j];
                }
            }
        }
    });
    // Positions: d out / d x_a = Σ_k Σ_j g_j · table[k, j] · d w_k / d frac_a · d frac_a / d x_a.
    let mut dpoints = vec![R::c(0.0); if want[0] { points.len() } else { 0 }];
    dpoints.par_chunks_mut(3).enumerate().for_each(|(i, dp)| {
        let p = &points[3 * i..3 * i + 3];
        for (l, &level) in levels.iter().enumerate() {
            let g = &grad[i * lf + l * f..i * lf + l * f + f];
            let (rows, _, frac, dfdx) = corners(p, level, mask, l * t);
            for k in 0..8 {
                let row = &table[rows[k] * f..rows[k] * f + f];
                let mut gv = R::c(0.0);
                for j in 0..f {
                    gv += g[j] * row[j];
                }
                for a in 0..3 {
                    let mut dw = if (k >> a) & 1 == 1 { R::c(1.0) } else { R::c(-1.0) };
                    for b in 0..3 {
                        if b != a {
                            dw *= if (k >> b) & 1 == 1 { frac[b] } else { R::c(1.0) - frac[b] };
                        }
                    }
                    dp[a] += gv * dw * dfdx[a];
                }
            }
        }
    });
    (want[0].then_some(dpoints), want[1].then_some(dtable))
}

fn cpu_slice<'a, R: Real>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [R]> {
    let data = R::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("hash grid: {what} must be contiguous"),
    }
}

/// The candle op: `(points (N,3), table (L·T, F))` → features `(N, L·F)`.
struct HashGridOp {
    cfg: HashGridConfig,
}

impl HashGridOp {
    fn fwd_t<R: Real>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let points = cpu_slice::<R>(s1, l1, "points")?;
        let table = cpu_slice::<R>(s2, l2, "table")?;
        let out = forward_cpu(&self.cfg, points, table);
        Ok((R::to_cpu_storage_owned(out), Shape::from((points.len() / 3, self.cfg.out_dim()))))
    }

    /// Gradients for the inputs that take part in a graph (`track_op`); the position gradient
    /// is skipped when the points are constants (the usual case when rendering).
    fn bwd_t<R: Real>(
        &self,
        points: &Tensor,
        table: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let v = |t: &Tensor| t.flatten_all()?.to_vec1::<R>();
        let (p, t, g) = (v(points)?, v(table)?, v(grad)?);
        let want = [points.track_op(), table.track_op()];
        let (dp, dt) = backward_cpu(&self.cfg, &p, &t, &g, want);
        let dev = points.device();
        let dp = dp.map(|d| Tensor::from_vec(d, points.shape(), dev)).transpose()?;
        let dt = dt.map(|d| Tensor::from_vec(d, table.shape(), dev)).transpose()?;
        Ok((dp, dt))
    }
}

impl CustomOp2 for HashGridOp {
    fn name(&self) -> &'static str {
        "gen-scene-hash-grid"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.fwd_t::<f32>(s1, l1, s2, l2),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => self.fwd_t::<f64>(s1, l1, s2, l2),
            _ => candle_core::bail!(
                "hash grid: points {:?} and table {:?} must both be f32 or both f64",
                s1.dtype(),
                s2.dtype()
            ),
        }
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        match a1.dtype() {
            DType::F32 => self.bwd_t::<f32>(a1, a2, grad),
            DType::F64 => self.bwd_t::<f64>(a1, a2, grad),
            d => candle_core::bail!("hash grid backward: dtype {d:?} not supported"),
        }
    }
}

/// Hash-grid encoding. `points`: `(N, 3)` in `[0, 1]³` (clamped); `table`: `(L·T, F)` →
/// `(N, L·F)`, level-major. Gradients reach `table` and `points`. CPU only, f32 or f64.
pub fn encode(
    points: &Tensor,
    table: &Tensor,
    cfg: &HashGridConfig,
) -> candle_core::Result<Tensor> {
    cfg.validate().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    if points.rank() != 2 || points.dim(1)? != 3 {
        candle_core::bail!("hash grid: points have shape {:?}, expected (N, 3)", points.dims())
    }
    let (rows, f) = cfg.table_shape();
    if table.dims() != [rows, f] {
        candle_core::bail!(
            "hash grid: table has shape {:?}, expected ({rows}, {f}) for {cfg:?}",
            table.dims()
        )
    }
    if !points.device().is_cpu() || !table.device().is_cpu() {
        candle_core::bail!(
            "hash grid: only the CPU is supported (points on {:?})",
            points.device().location()
        )
    }
    points.contiguous()?.apply_op2(&table.contiguous()?, HashGridOp { cfg: *cfg })
}
