//! Tile-based compositing of projected Gaussians (forward and backward) on the CPU, and the
//! candle custom op wrapping them.
//!
//! Forward: each Gaussian is listed in every 16×16 tile its radius touches; each tile's list is
//! sorted by depth (ties by index); every pixel composites its tile's list front to back with
//! `alpha = min(0.99, opacity * exp(power))`, skipping `alpha < 1/255` and `power > 0`, and
//! stops before a Gaussian that would bring the transmittance `T` below 1e-4. The final `T`
//! and the number of list entries up to the last contributor are kept per pixel.
//!
//! Backward: each pixel replays its list back to front from the last contributor, recovering
//! `T` by division by `1 - alpha`. Gradients go to a per-list-entry buffer (every entry belongs
//! to one tile, so tiles run in parallel with rayon and never share a slot); the buffer is then
//! reduced per Gaussian in a fixed order, so the result does not depend on the thread count.
//!
//! Where the 0.99 clamp is active the backward pass gives no gradient to the opacity and the
//! Gaussian's shape (the exact derivative of the forward pass, as gsplat does; the original
//! 3DGS CUDA backward passes the gradient through as if unclamped). `depth` is the
//! alpha-weighted sum `Σ T_i α_i z_i` (gsplat's "D" mode; divide by alpha for "ED").

// Index loops mirror the matrix formulas; `!(x > y)` comparisons deliberately treat NaN as failing.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::real::Real;
use crate::splat::kernel::{cpu_slice, tile_rect, CamParams, TILE};
use crate::splat::project::PROJ_DIM;

/// Values per pixel in the packed raster output: `[r, g, b, alpha, depth]`.
pub const OUT_DIM: usize = 5;
pub const ALPHA_MIN: f64 = 1.0 / 255.0;
pub const ALPHA_MAX: f64 = 0.99;
pub const T_MIN: f64 = 1e-4;
/// Gradient slots per list entry: u, v, conic a, b, c, depth, r, g, b, d(opacity).
const GDIM: usize = 10;

/// Per-tile depth-sorted Gaussian lists: tile `t` holds `ids[offsets[t]..offsets[t+1]]`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Binning {
    pub offsets: Vec<usize>,
    pub ids: Vec<u32>,
}

pub(crate) fn bin<R: Real>(cam: &CamParams<R>, proj: &[R]) -> Binning {
    let n = proj.len() / PROJ_DIM;
    let ntiles = cam.tiles_x * cam.tiles_y;
    let mut entries: Vec<(u32, R, u32)> = Vec::new();
    for i in 0..n {
        let p = &proj[i * PROJ_DIM..(i + 1) * PROJ_DIM];
        if p[6].f64() <= 0.0 {
            continue;
        }
        let (x0, x1, y0, y1) =
            tile_rect(p[0].f64(), p[1].f64(), p[6].f64(), cam.tiles_x, cam.tiles_y);
        for ty in y0..y1 {
            for tx in x0..x1 {
                entries.push(((ty * cam.tiles_x + tx) as u32, p[5], i as u32));
            }
        }
    }
    entries.par_sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then(a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
            .then(a.2.cmp(&b.2))
    });
    let mut offsets = vec![0usize; ntiles + 1];
    for e in &entries {
        offsets[e.0 as usize + 1] += 1;
    }
    for t in 0..ntiles {
        offsets[t + 1] += offsets[t];
    }
    Binning {
        offsets,
        ids: entries.into_iter().map(|e| e.2).collect(),
    }
}

/// One Gaussian as the compositing loop reads it.
#[derive(Clone, Copy)]
struct Splat2d<R> {
    u: R,
    v: R,
    a: R,
    b: R,
    c: R,
    depth: R,
    opacity: R,
    /// Below this power, `opacity * exp(power) < 1/255` for sure (a margin of 1e-3 below the
    /// exact bound), so `exp` can be skipped; the exact test still follows.
    power_floor: R,
    /// Half the smallest eigenvalue of the conic, less 1%: `power <= -lmin_half * |d|²`.
    lmin_half: R,
    color: [R; 3],
}

fn sigmoid<R: Real>(x: R) -> R {
    R::c(1.0) / (R::c(1.0) + (-x).exp())
}

fn gather<R: Real>(ids: &[u32], proj: &[R], colors: &[R], logits: &[R]) -> Vec<Splat2d<R>> {
    ids.iter()
        .map(|&i| {
            let i = i as usize;
            let p = &proj[i * PROJ_DIM..(i + 1) * PROJ_DIM];
            let opacity = sigmoid(logits[i]);
            let power_floor = (R::c(ALPHA_MIN) / opacity).ln() - R::c(1e-3);
            let (a, b, c) = (p[2], p[3], p[4]);
            let half_diff = R::c(0.5) * (a - c);
            let lmin = R::c(0.5) * (a + c) - (half_diff * half_diff + b * b).sqrt();
            let lmin_half = (R::c(0.5 * 0.99) * lmin).maxr(R::c(0.0));
            Splat2d {
                u: p[0],
                v: p[1],
                a,
                b,
                c,
                depth: p[5],
                opacity,
                power_floor,
                lmin_half,
                color: [colors[i * 3], colors[i * 3 + 1], colors[i * 3 + 2]],
            }
        })
        .collect()
}

/// `(alpha, gaussian value, raw opacity*G)` at pixel offset `(dx, dy) = mean - pixel`, or `None`
/// when skipped.
#[inline(always)]
fn eval<R: Real>(g: &Splat2d<R>, px: R, py: R) -> Option<(R, R, R, R, R)> {
    let dx = g.u - px;
    let dy = g.v - py;
    let power = R::c(-0.5) * (g.a * dx * dx + g.c * dy * dy) - g.b * dx * dy;
    if power > R::c(0.0) || power < g.power_floor {
        return None;
    }
    let gv = power.exp();
    let raw = g.opacity * gv;
    let alpha = raw.minr(R::c(ALPHA_MAX));
    if alpha < R::c(ALPHA_MIN) {
        return None;
    }
    Some((alpha, gv, raw, dx, dy))
}

/// Side of the pixel blocks a tile is split into for culling.
const SUB: usize = 4;

/// A block of pixels `[x0, x1) × [y0, y1)` of a tile and the tile-list indices (ascending) of
/// the Gaussians that can reach `alpha >= 1/255` somewhere in it.
struct Block {
    x0: usize,
    x1: usize,
    y0: usize,
    y1: usize,
    list: Vec<u32>,
}

/// The blocks of tile `t` with their Gaussian lists. A Gaussian is left out of a block only when
/// the bound `power <= -lmin/2 |d|²` (d: distance from its mean to the block's pixel centres)
/// is below its power floor, so no pixel of the block would have used it: the result is
/// the same as testing every pixel against the whole tile list, only faster.
fn tile_blocks<R: Real>(
    gs: &[Splat2d<R>],
    cam_w: usize,
    cam_h: usize,
    tiles_x: usize,
    t: usize,
) -> Vec<Block> {
    let (tx, ty) = (t % tiles_x, t / tiles_x);
    let (x0, y0) = (tx * TILE, ty * TILE);
    let (x1, y1) = ((x0 + TILE).min(cam_w), (y0 + TILE).min(cam_h));
    let mut blocks = Vec::with_capacity((TILE / SUB) * (TILE / SUB));
    for by in (y0..y1).step_by(SUB) {
        for bx in (x0..x1).step_by(SUB) {
            blocks.push(Block {
                x0: bx,
                x1: (bx + SUB).min(x1),
                y0: by,
                y1: (by + SUB).min(y1),
                list: Vec::new(),
            });
        }
    }
    let nbx = (x1 - x0).div_ceil(SUB);
    let nby = (y1 - y0).div_ceil(SUB);
    let zero = R::c(0.0);
    for (j, g) in gs.iter().enumerate() {
        if g.power_floor >= zero {
            continue; // alpha < 1/255 even at the mean.
        }
        // Block range of the disc where the bound allows power >= floor (all blocks if the
        // conic is degenerate), then the exact distance test per block.
        let (cx0, cx1, cy0, cy1) = if g.lmin_half > zero {
            let r = (g.power_floor.f64() / -g.lmin_half.f64()).sqrt();
            let (u, v) = (g.u.f64(), g.v.f64());
            let lo = |p: f64, o: usize, n: usize| {
                ((p - r - 0.5 - o as f64) / SUB as f64)
                    .floor()
                    .clamp(0.0, n as f64) as usize
            };
            let hi = |p: f64, o: usize, n: usize| {
                (((p + r - 0.5 - o as f64) / SUB as f64).floor() + 1.0).clamp(0.0, n as f64)
                    as usize
            };
            (
                lo(u, x0, nbx),
                hi(u, x0, nbx),
                lo(v, y0, nby),
                hi(v, y0, nby),
            )
        } else {
            (0, nbx, 0, nby)
        };
        for byi in cy0..cy1 {
            for bxi in cx0..cx1 {
                let b = &mut blocks[byi * nbx + bxi];
                let (rx0, rx1) = (R::c(b.x0 as f64 + 0.5), R::c(b.x1 as f64 - 0.5));
                let (ry0, ry1) = (R::c(b.y0 as f64 + 0.5), R::c(b.y1 as f64 - 0.5));
                let dx = (rx0 - g.u).maxr(g.u - rx1).maxr(zero);
                let dy = (ry0 - g.v).maxr(g.v - ry1).maxr(zero);
                if -(g.lmin_half * (dx * dx + dy * dy)) >= g.power_floor {
                    b.list.push(j as u32);
                }
            }
        }
    }
    blocks
}

/// One pixel's forward result: (pixel index, packed output, final T, contributor count).
type PixelOut<R> = (usize, [R; OUT_DIM], R, u32);

/// Forward output: packed image `H*W*OUT_DIM`, final transmittance and contributor counts per pixel.
pub(crate) struct RasterFwd<R> {
    pub image: Vec<R>,
    pub final_t: Vec<R>,
    pub n_contrib: Vec<u32>,
}

pub(crate) fn raster_fwd<R: Real>(
    cam: &CamParams<R>,
    bins: &Binning,
    proj: &[R],
    colors: &[R],
    logits: &[R],
    bg: [R; 3],
) -> RasterFwd<R> {
    let (w, h) = (cam.width, cam.height);
    let ntiles = cam.tiles_x * cam.tiles_y;
    let per_tile: Vec<Vec<PixelOut<R>>> = (0..ntiles)
        .into_par_iter()
        .map(|t| {
            let gs = gather(
                &bins.ids[bins.offsets[t]..bins.offsets[t + 1]],
                proj,
                colors,
                logits,
            );
            let mut res = Vec::with_capacity(TILE * TILE);
            for b in tile_blocks(&gs, w, h, cam.tiles_x, t) {
                for y in b.y0..b.y1 {
                    for x in b.x0..b.x1 {
                        let (px, py) = (R::c(x as f64 + 0.5), R::c(y as f64 + 0.5));
                        let mut tr = R::c(1.0);
                        let mut col = [R::c(0.0); 3];
                        let mut dep = R::c(0.0);
                        let mut last = 0u32;
                        for &j in &b.list {
                            let g = &gs[j as usize];
                            let Some((alpha, ..)) = eval(g, px, py) else {
                                continue;
                            };
                            let next_t = tr * (R::c(1.0) - alpha);
                            if next_t < R::c(T_MIN) {
                                break;
                            }
                            let wgt = alpha * tr;
                            for ch in 0..3 {
                                col[ch] += wgt * g.color[ch];
                            }
                            dep += wgt * g.depth;
                            tr = next_t;
                            last = j + 1;
                        }
                        let out = [
                            col[0] + tr * bg[0],
                            col[1] + tr * bg[1],
                            col[2] + tr * bg[2],
                            R::c(1.0) - tr,
                            dep,
                        ];
                        res.push((y * w + x, out, tr, last));
                    }
                }
            }
            res
        })
        .collect();
    let mut image = vec![R::c(0.0); w * h * OUT_DIM];
    let mut final_t = vec![R::c(1.0); w * h];
    let mut n_contrib = vec![0u32; w * h];
    for tile in per_tile {
        for (pix, out, tr, last) in tile {
            image[pix * OUT_DIM..(pix + 1) * OUT_DIM].copy_from_slice(&out);
            final_t[pix] = tr;
            n_contrib[pix] = last;
        }
    }
    RasterFwd {
        image,
        final_t,
        n_contrib,
    }
}

/// Gradients of the rasterizer inputs: `(d proj N*PROJ_DIM, d colors N*3, d logits N)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn raster_bwd<R: Real>(
    cam: &CamParams<R>,
    bins: &Binning,
    proj: &[R],
    colors: &[R],
    logits: &[R],
    bg: [R; 3],
    final_t: &[R],
    n_contrib: &[u32],
    grad: &[R],
) -> (Vec<R>, Vec<R>, Vec<R>) {
    let (w, h) = (cam.width, cam.height);
    let ntiles = cam.tiles_x * cam.tiles_y;
    let zero = R::c(0.0);
    let one = R::c(1.0);
    let mut entry_grads = vec![zero; bins.ids.len() * GDIM];
    // Split the entry buffer into one disjoint slice per tile.
    let mut slices: Vec<(usize, &mut [R])> = Vec::with_capacity(ntiles);
    let mut rest: &mut [R] = &mut entry_grads;
    for t in 0..ntiles {
        let len = (bins.offsets[t + 1] - bins.offsets[t]) * GDIM;
        let (head, tail) = rest.split_at_mut(len);
        slices.push((t, head));
        rest = tail;
    }
    slices.into_par_iter().for_each(|(t, eg)| {
        if eg.is_empty() {
            return;
        }
        let gs = gather(
            &bins.ids[bins.offsets[t]..bins.offsets[t + 1]],
            proj,
            colors,
            logits,
        );
        for b in tile_blocks(&gs, w, h, cam.tiles_x, t) {
            for y in b.y0..b.y1 {
                for x in b.x0..b.x1 {
                    let pix = y * w + x;
                    let n = n_contrib[pix];
                    if n == 0 {
                        continue;
                    }
                    // Block entries up to the last contributor.
                    let upto = b.list.partition_point(|&j| j < n);
                    let go = &grad[pix * OUT_DIM..(pix + 1) * OUT_DIM];
                    let (gc, ga, gd) = ([go[0], go[1], go[2]], go[3], go[4]);
                    let (px, py) = (R::c(x as f64 + 0.5), R::c(y as f64 + 0.5));
                    let t_final = final_t[pix];
                    let mut tr = t_final;
                    // Colour (and depth) of everything behind the current entry, background included.
                    let mut acc = bg;
                    let mut acc_d = zero;
                    for &j in b.list[..upto].iter().rev() {
                        let j = j as usize;
                        let g = &gs[j];
                        let Some((alpha, gv, raw, dx, dy)) = eval(g, px, py) else {
                            continue;
                        };
                        let one_m = one - alpha;
                        tr /= one_m;
                        let wgt = alpha * tr;
                        let e = &mut eg[j * GDIM..(j + 1) * GDIM];
                        for ch in 0..3 {
                            e[6 + ch] += wgt * gc[ch];
                        }
                        e[5] += wgt * gd;
                        let mut dalpha = gd * (g.depth - acc_d);
                        for ch in 0..3 {
                            dalpha += gc[ch] * (g.color[ch] - acc[ch]);
                        }
                        dalpha = dalpha * tr + ga * t_final / one_m;
                        for ch in 0..3 {
                            acc[ch] = alpha * g.color[ch] + one_m * acc[ch];
                        }
                        acc_d = alpha * g.depth + one_m * acc_d;
                        if raw < R::c(ALPHA_MAX) {
                            // alpha = opacity * G, G = exp(power).
                            e[9] += gv * dalpha;
                            let dpow = g.opacity * dalpha * gv;
                            e[2] += R::c(-0.5) * dx * dx * dpow;
                            e[3] += -dx * dy * dpow;
                            e[4] += R::c(-0.5) * dy * dy * dpow;
                            e[0] += -(g.a * dx + g.b * dy) * dpow;
                            e[1] += -(g.b * dx + g.c * dy) * dpow;
                        }
                    }
                }
            }
        }
    });
    let n = proj.len() / PROJ_DIM;
    let mut gproj = vec![zero; n * PROJ_DIM];
    let mut gcol = vec![zero; n * 3];
    let mut gop = vec![zero; n];
    for (k, &id) in bins.ids.iter().enumerate() {
        let i = id as usize;
        let e = &entry_grads[k * GDIM..(k + 1) * GDIM];
        for s in 0..6 {
            gproj[i * PROJ_DIM + s] += e[s];
        }
        for ch in 0..3 {
            gcol[i * 3 + ch] += e[6 + ch];
        }
        gop[i] += e[9];
    }
    let glogit = gop.iter().zip(logits).map(|(&g, &l)| {
        let o = sigmoid(l);
        g * o * (one - o)
    });
    (gproj, gcol, glogit.collect())
}

/// What the forward pass keeps for the backward pass.
struct State {
    bins: Binning,
    final_t: Vec<f64>,
    n_contrib: Vec<u32>,
}

/// Candle op: `(proj (N,8), colors (N,3), opacity logits (N))` → `(H, W, 5)` packed
/// `[r, g, b, alpha, depth]`. Backward gives gradients for all three inputs.
pub(crate) struct RasterOp {
    pub cam: CamParams<f64>,
    pub background: [f64; 3],
    state: Mutex<Option<State>>,
}

impl RasterOp {
    pub fn new(cam: CamParams<f64>, background: [f64; 3]) -> Self {
        Self {
            cam,
            background,
            state: Mutex::new(None),
        }
    }

    fn fwd_t<R: Real>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let proj = cpu_slice::<R>(s1, l1, "projection")?;
        let colors = cpu_slice::<R>(s2, l2, "colors")?;
        let logits = cpu_slice::<R>(s3, l3, "opacity logits")?;
        let cam = self.cam.cast::<R>();
        let bins = bin(&cam, proj);
        let f = raster_fwd(&cam, &bins, proj, colors, logits, self.background.map(R::c));
        let state = State {
            bins,
            final_t: f.final_t.iter().map(|v| v.f64()).collect(),
            n_contrib: f.n_contrib,
        };
        *self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("splat raster state poisoned".into()))? =
            Some(state);
        Ok((
            R::to_cpu_storage_owned(f.image),
            Shape::from((self.cam.height, self.cam.width, OUT_DIM)),
        ))
    }

    fn bwd_t<R: Real>(
        &self,
        proj: &Tensor,
        colors: &Tensor,
        logits: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let v = |t: &Tensor| t.flatten_all()?.to_vec1::<R>();
        let (p, c, l, g) = (v(proj)?, v(colors)?, v(logits)?, v(grad)?);
        let cam = self.cam.cast::<R>();
        let bg = self.background.map(R::c);
        let guard = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("splat raster state poisoned".into()))?;
        let (dp, dc, dl) = match guard.as_ref() {
            Some(s) => {
                let ft: Vec<R> = s.final_t.iter().map(|&x| R::c(x)).collect();
                raster_bwd(&cam, &s.bins, &p, &c, &l, bg, &ft, &s.n_contrib, &g)
            }
            None => {
                // No saved state (should not happen): recompute the forward pass.
                let bins = bin(&cam, &p);
                let f = raster_fwd(&cam, &bins, &p, &c, &l, bg);
                raster_bwd(&cam, &bins, &p, &c, &l, bg, &f.final_t, &f.n_contrib, &g)
            }
        };
        let dev = proj.device();
        Ok((
            Tensor::from_vec(dp, proj.shape(), dev)?,
            Tensor::from_vec(dc, colors.shape(), dev)?,
            Tensor::from_vec(dl, logits.shape(), dev)?,
        ))
    }
}

impl CustomOp3 for RasterOp {
    fn name(&self) -> &'static str {
        "gen-scene-splat-rasterize"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => self.fwd_t::<f32>(s1, l1, s2, l2, s3, l3),
            CpuStorage::F64(_) => self.fwd_t::<f64>(s1, l1, s2, l2, s3, l3),
            other => candle_core::bail!(
                "splat rasterizer: dtype {:?} not supported (f32 or f64)",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    }

    // Runs on the CPU for every device for now; a CUDA kernel can sit beside `cpu_fwd` later.
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dp, dc, dl) = match a1.dtype() {
            candle_core::DType::F32 => self.bwd_t::<f32>(a1, a2, a3, grad)?,
            candle_core::DType::F64 => self.bwd_t::<f64>(a1, a2, a3, grad)?,
            d => candle_core::bail!("splat rasterizer backward: dtype {d:?} not supported"),
        };
        Ok((Some(dp), Some(dc), Some(dl)))
    }
}
