//! Shared pieces of the splat kernels: camera parameters in kernel form, tile geometry and
//! storage access.

use candle_core::{CpuStorage, Layout};

use crate::camera::Camera;
use crate::real::Real;

/// Tile side in pixels.
pub const TILE: usize = 16;

/// Camera data as the kernels use it (row-major arrays, one float type).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CamParams<R> {
    /// World-to-camera rotation, row-major.
    pub rot: [[R; 3]; 3],
    pub trans: [R; 3],
    /// Camera centre in world coordinates (for SH view directions).
    pub campos: [R; 3],
    pub fx: R,
    pub fy: R,
    pub cx: R,
    pub cy: R,
    /// Frustum margins for the Jacobian clamp: x/z ∈ [-lim_neg[0], lim_pos[0]], likewise y/z.
    pub lim_pos: [R; 2],
    pub lim_neg: [R; 2],
    pub width: usize,
    pub height: usize,
    pub tiles_x: usize,
    pub tiles_y: usize,
}

impl CamParams<f64> {
    pub fn from_camera(cam: &Camera) -> Self {
        let k = &cam.intrinsics;
        let r = cam.rotation; // glam is column-major: r.col(j)[i] = R[i][j].
        let rot = std::array::from_fn(|i| std::array::from_fn(|j| r.col(j)[i]));
        let t = cam.translation;
        let c = cam.position();
        let (w, h) = (k.width as f64, k.height as f64);
        let tan_x = 0.5 * w / k.fx;
        let tan_y = 0.5 * h / k.fy;
        Self {
            rot,
            trans: [t.x, t.y, t.z],
            campos: [c.x, c.y, c.z],
            fx: k.fx,
            fy: k.fy,
            cx: k.cx,
            cy: k.cy,
            lim_pos: [(w - k.cx) / k.fx + 0.3 * tan_x, (h - k.cy) / k.fy + 0.3 * tan_y],
            lim_neg: [k.cx / k.fx + 0.3 * tan_x, k.cy / k.fy + 0.3 * tan_y],
            width: k.width,
            height: k.height,
            tiles_x: k.width.div_ceil(TILE),
            tiles_y: k.height.div_ceil(TILE),
        }
    }

    pub fn cast<R: Real>(&self) -> CamParams<R> {
        let c = |v: f64| R::c(v);
        CamParams {
            rot: self.rot.map(|row| row.map(c)),
            trans: self.trans.map(c),
            campos: self.campos.map(c),
            fx: c(self.fx),
            fy: c(self.fy),
            cx: c(self.cx),
            cy: c(self.cy),
            lim_pos: self.lim_pos.map(c),
            lim_neg: self.lim_neg.map(c),
            width: self.width,
            height: self.height,
            tiles_x: self.tiles_x,
            tiles_y: self.tiles_y,
        }
    }
}

/// Tiles `[x0, x1) × [y0, y1)` holding every pixel centre within `radius` (in each axis) of
/// `(u, v)`. Pixel `j` has its centre at `j + 0.5`.
pub(crate) fn tile_rect(
    u: f64,
    v: f64,
    radius: f64,
    tiles_x: usize,
    tiles_y: usize,
) -> (usize, usize, usize, usize) {
    let t = TILE as f64;
    let lo = |p: f64, n: usize| floor_index((p - 0.5 - radius) / t, n);
    let hi = |p: f64, n: usize| floor_index_plus_one((p - 0.5 + radius) / t, n);
    (lo(u, tiles_x), hi(u, tiles_x), lo(v, tiles_y), hi(v, tiles_y))
}

/// `floor(x).clamp(0, n)` as an index (NaN gives 0), without a libm `floor` call (the x86-64
/// baseline has no rounding instruction).
#[inline(always)]
pub(crate) fn floor_index(x: f64, n: usize) -> usize {
    if x > 0.0 {
        (x as usize).min(n) // truncation is floor for x > 0; `as` saturates
    } else {
        0
    }
}

/// `(floor(x) + 1).clamp(0, n)` as an index (NaN gives 0), without a libm `floor` call.
#[inline(always)]
pub(crate) fn floor_index_plus_one(x: f64, n: usize) -> usize {
    if x >= 0.0 {
        (x as usize).saturating_add(1).min(n)
    } else {
        0
    }
}

/// The contiguous slice of a CPU storage described by `layout`.
pub(crate) fn cpu_slice<'a, R: Real>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [R]> {
    let data = s
        .as_slice::<R>()
        .map_err(|e| candle_core::Error::Msg(format!("splat op input `{what}`: {e}")))?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("splat op input `{what}` must be contiguous"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index helpers equal the `floor`/`clamp` formulas they replace.
    #[test]
    fn floor_index_helpers_match_floor_clamp() {
        let xs: [f64; 19] = [
            -1e300, -7.5, -1.0, -0.999, -0.5, -1e-300, -0.0, 0.0, 1e-300, 0.3, 0.999, 1.0, 1.5,
            3.0, 3.999, 4.0, 4.5, 7.0, 1e300,
        ];
        for n in [0usize, 1, 4, 5] {
            for &x in &xs {
                let lo = x.floor().clamp(0.0, n as f64) as usize;
                let hi = (x.floor() + 1.0).clamp(0.0, n as f64) as usize;
                assert_eq!(floor_index(x, n), lo, "floor_index({x}, {n})");
                assert_eq!(floor_index_plus_one(x, n), hi, "floor_index_plus_one({x}, {n})");
            }
            for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let lo = x.floor().clamp(0.0, n as f64) as usize;
                let hi = (x.floor() + 1.0).clamp(0.0, n as f64) as usize;
                assert_eq!((floor_index(x, n), floor_index_plus_one(x, n)), (lo, hi), "{x}");
            }
        }
    }
}
