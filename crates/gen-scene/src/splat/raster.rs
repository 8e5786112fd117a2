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
//! Speed (the same results, up to float rounding): binning sorts the visible Gaussians once by
//! depth and fills the tile lists by a counting sort. Each tile is split into 4×4-pixel blocks,
//! and a Gaussian enters a block's list only if its exponent can reach the alpha floor there
//! (disc bound, then the exact maximum over the block, `max_power_in_rect`); the blocks are
//! kept from the forward pass for the backward pass. The 16 pixels of a block run as lanes with
//! no branches (a skipped Gaussian has alpha 0, which changes nothing), so the loops vectorise;
//! f32 uses a polynomial `exp` (a few ulp) for that, f64 keeps libm's. The tile kernels are also
//! built for AVX2 and picked at run time; they do the same operations in the same order (no
//! FMA), so the results are identical either way.
//!
//! Where the 0.99 clamp is active the backward pass gives no gradient to the opacity and the
//! Gaussian's shape (the exact derivative of the forward pass, as gsplat does; the original
//! 3DGS CUDA backward passes the gradient through as if unclamped). `depth` is the
//! alpha-weighted sum `Σ T_i α_i z_i` (gsplat's "D" mode; divide by alpha for "ED").

// Index loops mirror the matrix formulas; `!(x > y)` comparisons deliberately treat NaN as failing.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

use std::any::Any;
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

/// Tile lists of the projected Gaussians `proj` (`N*PROJ_DIM`; radius 0 = culled): the visible
/// Gaussians are sorted once by (depth, index), then a counting sort by tile keeps that order
/// inside every tile's list.
pub(crate) fn bin<R: Real>(cam: &CamParams<R>, proj: &[R]) -> Binning {
    let n = proj.len() / PROJ_DIM;
    let ntiles = cam.tiles_x * cam.tiles_y;
    let depth = |i: u32| proj[i as usize * PROJ_DIM + 5];
    let mut order: Vec<u32> =
        (0..n as u32).filter(|&i| !(proj[i as usize * PROJ_DIM + 6].f64() <= 0.0)).collect();
    order.par_sort_unstable_by(|&a, &b| {
        depth(a).partial_cmp(&depth(b)).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
    });
    let rects: Vec<(usize, usize, usize, usize)> = order
        .iter()
        .map(|&i| {
            let p = &proj[i as usize * PROJ_DIM..(i as usize + 1) * PROJ_DIM];
            tile_rect(p[0].f64(), p[1].f64(), p[6].f64(), cam.tiles_x, cam.tiles_y)
        })
        .collect();
    let mut offsets = vec![0usize; ntiles + 1];
    for &(x0, x1, y0, y1) in &rects {
        for ty in y0..y1 {
            for tx in x0..x1 {
                offsets[ty * cam.tiles_x + tx + 1] += 1;
            }
        }
    }
    for t in 0..ntiles {
        offsets[t + 1] += offsets[t];
    }
    let mut cursor = offsets.clone();
    let mut ids = vec![0u32; offsets[ntiles]];
    for (&i, &(x0, x1, y0, y1)) in order.iter().zip(&rects) {
        for ty in y0..y1 {
            for tx in x0..x1 {
                let c = &mut cursor[ty * cam.tiles_x + tx];
                ids[*c] = i;
                *c += 1;
            }
        }
    }
    Binning { offsets, ids }
}

/// One Gaussian as the compositing loop reads it.
#[derive(Clone, Copy)]
pub(crate) struct Splat2d<R> {
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
    /// Half the largest eigenvalue of the conic: `power >= -lmax_half * |d|²`.
    lmax_half: R,
    /// `b / c` and `b / a` (edge maximisers of [`max_power_in_rect`]; 0 if not positive definite).
    b_over_c: R,
    b_over_a: R,
    color: [R; 3],
}

fn sigmoid<R: Real>(x: R) -> R {
    R::c(1.0) / (R::c(1.0) + (-x).exp())
}

/// The compositing form of every Gaussian (`proj` `N*PROJ_DIM`, `colors` `N*3`, `logits` `N`),
/// computed once per pass rather than once per tile-list entry.
pub(crate) fn prepare<R: Real>(proj: &[R], colors: &[R], logits: &[R]) -> Vec<Splat2d<R>> {
    (0..logits.len())
        .map(|i| {
            let p = &proj[i * PROJ_DIM..(i + 1) * PROJ_DIM];
            let opacity = sigmoid(logits[i]);
            let power_floor = (R::c(ALPHA_MIN) / opacity).ln() - R::c(1e-3);
            let (a, b, c) = (p[2], p[3], p[4]);
            let half_diff = R::c(0.5) * (a - c);
            let lmin = R::c(0.5) * (a + c) - (half_diff * half_diff + b * b).sqrt();
            let lmin_half = (R::c(0.5 * 0.99) * lmin).maxr(R::c(0.0));
            let lmax = R::c(0.5) * (a + c) + (half_diff * half_diff + b * b).sqrt();
            let pd = a > R::c(0.0) && c > R::c(0.0) && a * c > b * b;
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
                lmax_half: R::c(0.5) * lmax,
                b_over_c: if pd { b / c } else { R::c(0.0) },
                b_over_a: if pd { b / a } else { R::c(0.0) },
                color: [colors[i * 3], colors[i * 3 + 1], colors[i * 3 + 2]],
            }
        })
        .collect()
}

/// The prepared Gaussians of one tile list, in list order.
fn gather<R: Real>(ids: &[u32], splats: &[Splat2d<R>]) -> Vec<Splat2d<R>> {
    ids.iter().map(|&i| splats[i as usize]).collect()
}

/// Side of the pixel blocks a tile is split into for culling.
const SUB: usize = 4;

/// A block of pixels `[x0, x1) × [y0, y1)` of a tile and the tile-list indices (ascending) of
/// the Gaussians that can reach `alpha >= 1/255` somewhere in it.
pub(crate) struct Block {
    x0: usize,
    x1: usize,
    y0: usize,
    y1: usize,
    list: Vec<u32>,
}

/// The blocks of tile `t` with their Gaussian lists. A Gaussian is left out of a block only when
/// the bound `power <= -lmin/2 |d|²` (d: distance from its mean to the block's pixel centres)
/// or the exact maximum of its exponent over the block ([`max_power_in_rect`]) is below its
/// power floor, so no pixel of the block would have used it: the result is the same as
/// testing every pixel against the whole tile list, only faster.
#[inline(always)]
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
    // Lane `l` tests block `l` (at most LANES blocks per tile), so that the tests of one
    // Gaussian against all the blocks of its tile run together and without branches.
    let zero = R::c(0.0);
    let mut rect = [[zero; LANES]; 4]; // pixel-centre bounds x0, x1, y0, y1
    let mut valid = [false; LANES];
    for (l, b) in blocks.iter().enumerate() {
        rect[0][l] = R::c(b.x0 as f64 + 0.5);
        rect[1][l] = R::c(b.x1 as f64 - 0.5);
        rect[2][l] = R::c(b.y0 as f64 + 0.5);
        rect[3][l] = R::c(b.y1 as f64 - 0.5);
        valid[l] = true;
    }
    let mut keep = [false; LANES];
    for (j, g) in gs.iter().enumerate() {
        if g.power_floor >= zero {
            continue; // alpha < 1/255 even at the mean.
        }
        for l in 0..LANES {
            let (rx0, rx1, ry0, ry1) = (rect[0][l], rect[1][l], rect[2][l], rect[3][l]);
            // Disc bound (smallest eigenvalue) at the nearest pixel centre of the block.
            let dx = (rx0 - g.u).maxr(g.u - rx1).maxr(zero);
            let dy = (ry0 - g.v).maxr(g.v - ry1).maxr(zero);
            let disc = -(g.lmin_half * (dx * dx + dy * dy)) >= g.power_floor;
            // Whole block inside by the largest eigenvalue at the farthest pixel centre, or
            // else the exact test (blocks at the footprint's edge).
            let fx = (g.u - rx0).maxr(rx1 - g.u);
            let fy = (g.v - ry0).maxr(ry1 - g.v);
            let quick = -(g.lmax_half * (fx * fx + fy * fy)) >= g.power_floor;
            let exact = max_power_in_rect(g, (g.u - rx1, g.u - rx0), (g.v - ry1, g.v - ry0))
                >= g.power_floor;
            keep[l] = valid[l] & disc & (quick | exact);
        }
        for (l, b) in blocks.iter_mut().enumerate() {
            if keep[l] {
                b.list.push(j as u32);
            }
        }
    }
    blocks
}

/// Pixels of one block, composited together as SIMD-friendly lanes (lane `l` is pixel
/// `(x0 + l % SUB, y0 + l / SUB)` of its block).
const LANES: usize = SUB * SUB;
/// Half a block (two pixel rows), the unit the backward pass skips when a Gaussian misses it.
const HALF: usize = LANES / 2;
// `tile_blocks` tests the blocks of a tile as lanes.
const _: () = assert!((TILE / SUB) * (TILE / SUB) <= LANES);

/// The float types the compositing lanes run in, with the `exp` they use.
pub(crate) trait LaneReal: Real {
    /// `exp(x)`, called for `x <= 0` (larger inputs give a finite value that is not used).
    fn exp_lane(self) -> Self;
}

impl LaneReal for f64 {
    #[inline(always)]
    fn exp_lane(self) -> f64 {
        self.exp()
    }
}

impl LaneReal for f32 {
    #[inline(always)]
    fn exp_lane(self) -> f32 {
        exp_f32(self)
    }
}

/// `exp(x)` for `x <= 0` in plain f32 arithmetic, so that loops over lanes vectorise (libm's
/// `expf` is a scalar call). Inputs are clamped to `[-80, 0]`; there the relative error is a
/// few ulp (checked against f64 `exp` in the unit tests). NaN stays NaN.
/// Cody–Waite reduction `x = n ln2 + r`, `|r| <= ln2/2`, degree-7 Taylor polynomial for `e^r`,
/// and `2^n` built from its exponent bits.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 355/512, exact in 9 bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = if x < -80.0 { -80.0 } else { x };
    let x = if x > 0.0 { 0.0 } else { x };
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    p * scale
}

/// Pairwise sum of the lanes (a fixed order, so results do not depend on the thread count).
#[inline(always)]
fn hsum<R: Real>(v: &[R; LANES]) -> R {
    let mut h = [R::c(0.0); LANES / 2];
    for i in 0..LANES / 2 {
        h[i] = v[i] + v[i + LANES / 2];
    }
    let mut q = [R::c(0.0); LANES / 4];
    for i in 0..LANES / 4 {
        q[i] = h[i] + h[i + LANES / 4];
    }
    (q[0] + q[2]) + (q[1] + q[3])
}

/// Pixel centres and indices of a block's lanes; lanes outside the image are not `valid`.
struct Lanes<R> {
    px: [R; LANES],
    py: [R; LANES],
    pix: [usize; LANES],
    valid: [bool; LANES],
}

fn lanes<R: Real>(b: &Block, width: usize) -> Lanes<R> {
    let mut ln = Lanes {
        px: [R::c(0.0); LANES],
        py: [R::c(0.0); LANES],
        pix: [0; LANES],
        valid: [false; LANES],
    };
    for l in 0..LANES {
        let (x, y) = (b.x0 + l % SUB, b.y0 + l / SUB);
        ln.px[l] = R::c(x as f64 + 0.5);
        ln.py[l] = R::c(y as f64 + 0.5);
        ln.valid[l] = x < b.x1 && y < b.y1;
        if ln.valid[l] {
            ln.pix[l] = y * width + x;
        }
    }
    ln
}

/// Power of the Gaussian's exponent at the lane's pixel, and the offset `(dx, dy) = mean - pixel`.
#[inline(always)]
fn power<R: Real>(g: &Splat2d<R>, px: R, py: R) -> (R, R, R) {
    let dx = g.u - px;
    let dy = g.v - py;
    (R::c(-0.5) * (g.a * dx * dx + g.c * dy * dy) - g.b * dx * dy, dx, dy)
}

/// The alpha of Gaussian `g` at a lane's pixel, or 0 where the pixel skips it (`power > 0`,
/// `alpha < 1/255`; NaN fails the skip tests, as in the reference; `power` below the floor
/// implies `alpha < 1/255` by a margin of 1e-3 in the exponent, far above rounding, so that
/// test is left to the culling), together with `G = exp(power)`, `opacity * G` and the offset.
/// A zero alpha changes nothing in either pass (`T (1 - 0) = T`, weight 0), which lets every
/// lane run the same instructions.
#[inline(always)]
fn lane_alpha<R: LaneReal>(g: &Splat2d<R>, px: R, py: R) -> (R, R, R, R, R) {
    let (pw, dx, dy) = power(g, px, py);
    let gv = pw.exp_lane();
    let raw = g.opacity * gv;
    let alpha = raw.minr(R::c(ALPHA_MAX));
    let skip = (pw > R::c(0.0)) | (alpha < R::c(ALPHA_MIN));
    (if skip { R::c(0.0) } else { alpha }, gv, raw, dx, dy)
}

/// Front-to-back compositing of one block; pushes one [`PixelOut`] per pixel in the image.
#[inline(always)]
fn fwd_block<R: LaneReal>(
    gs: &[Splat2d<R>],
    b: &Block,
    width: usize,
    bg: [R; 3],
    out: &mut Vec<PixelOut<R>>,
) {
    let ln = lanes::<R>(b, width);
    let (zero, one) = (R::c(0.0), R::c(1.0));
    // A live lane's T is >= T_MIN > 0. A lane that stopped (or lies outside the image) keeps
    // -T < 0, so that it stops again at every later Gaussian and composites nothing more.
    let mut tr = ln.valid.map(|v| if v { one } else { -one });
    let mut col = [[zero; LANES]; 3];
    let mut dep = [zero; LANES];
    let mut last = [0u32; LANES];
    for &j in &b.list {
        let g = &gs[j as usize];
        for l in 0..LANES {
            let (alpha, ..) = lane_alpha(g, ln.px[l], ln.py[l]);
            let t = tr[l];
            let next_t = t * (one - alpha);
            let stop = next_t < R::c(T_MIN);
            let alpha = if stop { zero } else { alpha };
            let wgt = alpha * t;
            for ch in 0..3 {
                col[ch][l] += wgt * g.color[ch];
            }
            dep[l] += wgt * g.depth;
            let dead = if t > zero { -t } else { t };
            tr[l] = if stop { dead } else { next_t };
            last[l] = if alpha > zero { j + 1 } else { last[l] };
        }
        if tr.iter().all(|&t| !(t > zero)) {
            break;
        }
    }
    let tr = tr.map(|t| if t > zero { t } else { -t });
    for l in 0..LANES {
        if ln.valid[l] {
            out.push((
                ln.pix[l],
                [
                    col[0][l] + tr[l] * bg[0],
                    col[1][l] + tr[l] * bg[1],
                    col[2][l] + tr[l] * bg[2],
                    one - tr[l],
                    dep[l],
                ],
                tr[l],
                last[l],
            ));
        }
    }
}

/// What the backward pass reads per pixel.
struct PixelIn<'a, R> {
    width: usize,
    bg: [R; 3],
    final_t: &'a [R],
    n_contrib: &'a [u32],
    grad: &'a [R],
}

/// Back-to-front replay of one block, adding each list entry's gradient (summed over the
/// block's pixels) to its slot of `eg` (`GDIM` values per entry of the tile list).
#[inline(always)]
fn bwd_block<R: LaneReal>(gs: &[Splat2d<R>], b: &Block, inp: &PixelIn<R>, eg: &mut [R]) {
    let ln = lanes::<R>(b, inp.width);
    let (zero, one) = (R::c(0.0), R::c(1.0));
    let mut nc = [0u32; LANES];
    let mut tr = [one; LANES];
    let mut gc = [[zero; LANES]; 3];
    let mut ga = [zero; LANES];
    let mut gd = [zero; LANES];
    for l in 0..LANES {
        if ln.valid[l] {
            let pix = ln.pix[l];
            nc[l] = inp.n_contrib[pix];
            tr[l] = inp.final_t[pix];
            let go = &inp.grad[pix * OUT_DIM..(pix + 1) * OUT_DIM];
            for ch in 0..3 {
                gc[ch][l] = go[ch];
            }
            ga[l] = go[3];
            gd[l] = go[4];
        }
    }
    let nmax = nc.iter().copied().max().unwrap_or(0);
    if nmax == 0 {
        return;
    }
    let t_final = tr;
    // Colour (and depth) of everything behind the current entry, background included.
    let mut acc = inp.bg.map(|c| [c; LANES]);
    let mut acc_d = [zero; LANES];
    let upto = b.list.partition_point(|&j| j < nmax);
    for &j in b.list[..upto].iter().rev() {
        let g = &gs[j as usize];
        // Alphas first; entries after a pixel's last contributor did not take part there.
        let mut al = [zero; LANES];
        let mut gvs = [zero; LANES];
        let mut raws = [zero; LANES];
        let mut dxs = [zero; LANES];
        let mut dys = [zero; LANES];
        for l in 0..LANES {
            let (alpha, gv, raw, dx, dy) = lane_alpha(g, ln.px[l], ln.py[l]);
            al[l] = if j < nc[l] { alpha } else { zero };
            (gvs[l], raws[l], dxs[l], dys[l]) = (gv, raw, dx, dy);
        }
        // Per-lane gradient terms: u, v, conic a, b, c, depth, r, g, b, opacity. A half block
        // where the Gaussian takes part nowhere changes nothing (alpha 0) and is skipped.
        let mut s = [[zero; LANES]; GDIM];
        let mut any = false;
        for h in 0..2 {
            let half = &al[h * HALF..(h + 1) * HALF];
            if half.iter().fold(false, |acc, &a| acc | (a > zero)) {
                any = true;
            } else {
                continue;
            }
            for i in 0..HALF {
                let l = h * HALF + i;
                let (alpha, gv, raw, dx, dy) = (al[l], gvs[l], raws[l], dxs[l], dys[l]);
                let one_m = one - alpha;
                let t_here = tr[l] / one_m;
                let wgt = alpha * t_here;
                let mut dalpha = gd[l] * (g.depth - acc_d[l]);
                for ch in 0..3 {
                    dalpha += gc[ch][l] * (g.color[ch] - acc[ch][l]);
                }
                dalpha = dalpha * t_here + ga[l] * t_final[l] / one_m;
                tr[l] = t_here;
                for ch in 0..3 {
                    acc[ch][l] = alpha * g.color[ch] + one_m * acc[ch][l];
                    s[6 + ch][l] = wgt * gc[ch][l];
                }
                acc_d[l] = alpha * g.depth + one_m * acc_d[l];
                s[5][l] = wgt * gd[l];
                // alpha = opacity * G, G = exp(power); no gradient where the 0.99 clamp is active.
                let unclamped = (alpha > zero) & (raw < R::c(ALPHA_MAX));
                let dpow = g.opacity * dalpha * gv;
                let terms = [
                    -(g.a * dx + g.b * dy) * dpow,
                    -(g.b * dx + g.c * dy) * dpow,
                    R::c(-0.5) * dx * dx * dpow,
                    -dx * dy * dpow,
                    R::c(-0.5) * dy * dy * dpow,
                ];
                for k in 0..5 {
                    s[k][l] = if unclamped { terms[k] } else { zero };
                }
                s[9][l] = if unclamped { gv * dalpha } else { zero };
            }
        }
        if any {
            let e = &mut eg[j as usize * GDIM..(j as usize + 1) * GDIM];
            for k in 0..GDIM {
                e[k] += hsum(&s[k]);
            }
        }
    }
}

/// The largest exponent `power(dx, dy) = -(a dx² + 2b dx dy + c dy²) / 2` of `g` over offsets
/// `dx ∈ [dx0, dx1]`, `dy ∈ [dy0, dy1]` (mean minus pixel centre over a block), exactly: 0 if
/// the mean lies inside, else the best point of the four edges (the exponent is concave, so
/// each edge has its maximum at the clamped stationary point, from the precomputed `b / c`
/// and `b / a`). Returns 0 (keep) for a conic that is not positive definite. Branch-free, so
/// that it vectorises over the blocks of a tile.
#[inline(always)]
fn max_power_in_rect<R: Real>(g: &Splat2d<R>, (dx0, dx1): (R, R), (dy0, dy1): (R, R)) -> R {
    let zero = R::c(0.0);
    let inside = !(dx0 > zero) & !(dx1 < zero) & !(dy0 > zero) & !(dy1 < zero);
    let pd = (g.a > zero) & (g.c > zero) & (g.a * g.c > g.b * g.b);
    let pw = |dx: R, dy: R| R::c(-0.5) * (g.a * dx * dx + g.c * dy * dy) - g.b * dx * dy;
    let clamp = |x: R, lo: R, hi: R| x.maxr(lo).minr(hi);
    let e0 = pw(dx0, clamp(-(g.b_over_c * dx0), dy0, dy1));
    let e1 = pw(dx1, clamp(-(g.b_over_c * dx1), dy0, dy1));
    let e2 = pw(clamp(-(g.b_over_a * dy0), dx0, dx1), dy0);
    let e3 = pw(clamp(-(g.b_over_a * dy1), dx0, dx1), dy1);
    let best = e0.maxr(e1).maxr(e2.maxr(e3));
    if inside | !pd {
        zero
    } else {
        best
    }
}

/// One pixel's forward result: (pixel index, packed output, final T, contributor count).
type PixelOut<R> = (usize, [R; OUT_DIM], R, u32);

/// Forward pass of tile `t`: its pixels and its blocks (kept for the backward pass).
#[inline(always)]
fn fwd_tile_impl<R: LaneReal>(
    cam: &CamParams<R>,
    bins: &Binning,
    splats: &[Splat2d<R>],
    bg: [R; 3],
    t: usize,
) -> (Vec<PixelOut<R>>, Vec<Block>) {
    let gs = gather(&bins.ids[bins.offsets[t]..bins.offsets[t + 1]], splats);
    let mut res = Vec::with_capacity(TILE * TILE);
    let blocks = tile_blocks(&gs, cam.width, cam.height, cam.tiles_x, t);
    for b in &blocks {
        fwd_block(&gs, b, cam.width, bg, &mut res);
    }
    (res, blocks)
}

/// Backward pass of tile `t` (with its blocks from the forward pass) into its entry slots `eg`.
#[inline(always)]
fn bwd_tile_impl<R: LaneReal>(
    bins: &Binning,
    splats: &[Splat2d<R>],
    blocks: &[Block],
    inp: &PixelIn<R>,
    t: usize,
    eg: &mut [R],
) {
    let gs = gather(&bins.ids[bins.offsets[t]..bins.offsets[t + 1]], splats);
    for b in blocks {
        bwd_block(&gs, b, inp, eg);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fwd_tile_avx2<R: LaneReal>(
    cam: &CamParams<R>,
    bins: &Binning,
    splats: &[Splat2d<R>],
    bg: [R; 3],
    t: usize,
) -> (Vec<PixelOut<R>>, Vec<Block>) {
    fwd_tile_impl(cam, bins, splats, bg, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bwd_tile_avx2<R: LaneReal>(
    bins: &Binning,
    splats: &[Splat2d<R>],
    blocks: &[Block],
    inp: &PixelIn<R>,
    t: usize,
    eg: &mut [R],
) {
    bwd_tile_impl(bins, splats, blocks, inp, t, eg)
}

/// Whether the wider-vector builds of the tile kernels can run here. They execute the same
/// float operations in the same order (no FMA), so results are identical either way.
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn fwd_tile<R: LaneReal>(
    cam: &CamParams<R>,
    bins: &Binning,
    splats: &[Splat2d<R>],
    bg: [R; 3],
    t: usize,
) -> (Vec<PixelOut<R>>, Vec<Block>) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { fwd_tile_avx2(cam, bins, splats, bg, t) };
    }
    fwd_tile_impl(cam, bins, splats, bg, t)
}

fn bwd_tile<R: LaneReal>(
    bins: &Binning,
    splats: &[Splat2d<R>],
    blocks: &[Block],
    inp: &PixelIn<R>,
    t: usize,
    eg: &mut [R],
) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { bwd_tile_avx2(bins, splats, blocks, inp, t, eg) };
    }
    bwd_tile_impl(bins, splats, blocks, inp, t, eg)
}

/// Forward output: packed image `H*W*OUT_DIM`, final transmittance and contributor counts per
/// pixel, and each tile's blocks.
pub(crate) struct RasterFwd<R> {
    pub image: Vec<R>,
    pub final_t: Vec<R>,
    pub n_contrib: Vec<u32>,
    pub blocks: Vec<Vec<Block>>,
}

/// Forward pass over prepared Gaussians ([`prepare`]).
pub(crate) fn raster_fwd<R: LaneReal>(
    cam: &CamParams<R>,
    bins: &Binning,
    splats: &[Splat2d<R>],
    bg: [R; 3],
) -> RasterFwd<R> {
    let (w, h) = (cam.width, cam.height);
    let ntiles = cam.tiles_x * cam.tiles_y;
    let per_tile: Vec<(Vec<PixelOut<R>>, Vec<Block>)> =
        (0..ntiles).into_par_iter().map(|t| fwd_tile(cam, bins, splats, bg, t)).collect();
    let mut image = vec![R::c(0.0); w * h * OUT_DIM];
    let mut final_t = vec![R::c(1.0); w * h];
    let mut n_contrib = vec![0u32; w * h];
    let mut blocks = Vec::with_capacity(ntiles);
    for (tile, tile_blocks) in per_tile {
        for (pix, out, tr, last) in tile {
            image[pix * OUT_DIM..(pix + 1) * OUT_DIM].copy_from_slice(&out);
            final_t[pix] = tr;
            n_contrib[pix] = last;
        }
        blocks.push(tile_blocks);
    }
    RasterFwd { image, final_t, n_contrib, blocks }
}

/// Gradients of the rasterizer inputs: `(d proj N*PROJ_DIM, d colors N*3, d logits N)`, from
/// the forward pass's prepared Gaussians, blocks, final transmittance and contributor counts.
#[allow(clippy::too_many_arguments)]
pub(crate) fn raster_bwd<R: LaneReal>(
    cam: &CamParams<R>,
    bins: &Binning,
    splats: &[Splat2d<R>],
    blocks: &[Vec<Block>],
    bg: [R; 3],
    final_t: &[R],
    n_contrib: &[u32],
    grad: &[R],
) -> (Vec<R>, Vec<R>, Vec<R>) {
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
    let inp = PixelIn { width: cam.width, bg, final_t, n_contrib, grad };
    slices.into_par_iter().for_each(|(t, eg)| {
        if !eg.is_empty() {
            bwd_tile(bins, splats, &blocks[t], &inp, t, eg);
        }
    });
    let n = splats.len();
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
    // d opacity / d logit = o (1 - o).
    let glogit = gop.iter().zip(splats).map(|(&g, s)| g * s.opacity * (one - s.opacity));
    (gproj, gcol, glogit.collect())
}

/// What the forward pass keeps for the backward pass (in the op's float type).
struct State<R> {
    bins: Binning,
    splats: Vec<Splat2d<R>>,
    blocks: Vec<Vec<Block>>,
    final_t: Vec<R>,
    n_contrib: Vec<u32>,
}

/// Candle op: `(proj (N,8), colors (N,3), opacity logits (N))` → `(H, W, 5)` packed
/// `[r, g, b, alpha, depth]`. Backward gives gradients for all three inputs.
pub(crate) struct RasterOp {
    pub cam: CamParams<f64>,
    pub background: [f64; 3],
    /// A `State<f32>` or `State<f64>`.
    state: Mutex<Option<Box<dyn Any + Send>>>,
}

impl RasterOp {
    pub fn new(cam: CamParams<f64>, background: [f64; 3]) -> Self {
        Self { cam, background, state: Mutex::new(None) }
    }

    fn fwd_t<R: LaneReal>(
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
        let splats = prepare(proj, colors, logits);
        let f = raster_fwd(&cam, &bins, &splats, self.background.map(R::c));
        let state =
            State { bins, splats, blocks: f.blocks, final_t: f.final_t, n_contrib: f.n_contrib };
        *self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("splat raster state poisoned".into()))? =
            Some(Box::new(state));
        Ok((
            R::to_cpu_storage_owned(f.image),
            Shape::from((self.cam.height, self.cam.width, OUT_DIM)),
        ))
    }

    fn bwd_t<R: LaneReal>(
        &self,
        proj: &Tensor,
        colors: &Tensor,
        logits: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let g = grad.flatten_all()?.to_vec1::<R>()?;
        let cam = self.cam.cast::<R>();
        let bg = self.background.map(R::c);
        let guard = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("splat raster state poisoned".into()))?;
        let (dp, dc, dl) = match guard.as_ref().and_then(|s| s.downcast_ref::<State<R>>()) {
            Some(s) => {
                raster_bwd(&cam, &s.bins, &s.splats, &s.blocks, bg, &s.final_t, &s.n_contrib, &g)
            }
            None => {
                // No saved state (should not happen): recompute the forward pass.
                let v = |t: &Tensor| t.flatten_all()?.to_vec1::<R>();
                let (p, c, l) = (v(proj)?, v(colors)?, v(logits)?);
                let bins = bin(&cam, &p);
                let splats = prepare(&p, &c, &l);
                let f = raster_fwd(&cam, &bins, &splats, bg);
                raster_bwd(&cam, &bins, &splats, &f.blocks, bg, &f.final_t, &f.n_contrib, &g)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorisable f32 `exp` against f64 `exp` over the range the rasterizer uses (and
    /// the clamped tail), within 3 f32 ulp relative.
    #[test]
    fn exp_f32_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = 0.0f32;
        while x > -80.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x -= 1.3e-4;
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst relative error {worst:.3e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-200.0), exp_f32(-80.0));
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// The exact block bound is an upper bound of the exponent at every point of the block
    /// (random conics and blocks, checked on a fine grid), and is reached (within rounding).
    #[test]
    fn max_power_in_rect_bounds_the_block() {
        let mut rng = gen_core::SeededRng::new(7);
        let mut uni = |lo: f64, hi: f64| -> f64 {
            let t = rng
                .rand_uniform(
                    1,
                    lo as f32,
                    hi as f32,
                    candle_core::DType::F64,
                    &candle_core::Device::Cpu,
                )
                .unwrap();
            t.to_vec1::<f64>().unwrap()[0]
        };
        for _ in 0..200 {
            // Conic from a random rotation and variances.
            let (th, s1, s2) = (uni(0.0, 3.2), uni(0.2, 5.0), uni(0.2, 5.0));
            let (c, s) = (th.cos(), th.sin());
            let (i1, i2) = (1.0 / (s1 * s1), 1.0 / (s2 * s2));
            let g = Splat2d {
                u: uni(-8.0, 8.0),
                v: uni(-8.0, 8.0),
                a: c * c * i1 + s * s * i2,
                b: c * s * (i1 - i2),
                c: s * s * i1 + c * c * i2,
                depth: 1.0,
                opacity: 0.5,
                power_floor: -5.0,
                lmin_half: 0.0,
                lmax_half: 0.0,
                b_over_c: c * s * (i1 - i2) / (s * s * i1 + c * c * i2),
                b_over_a: c * s * (i1 - i2) / (c * c * i1 + s * s * i2),
                color: [0.0; 3],
            };
            let (x0, y0) = (uni(-4.0, 2.0), uni(-4.0, 2.0));
            let (x1, y1) = (x0 + uni(0.0, 3.0), y0 + uni(0.0, 3.0));
            let m = max_power_in_rect(&g, (g.u - x1, g.u - x0), (g.v - y1, g.v - y0));
            let mut grid_max = f64::NEG_INFINITY;
            for i in 0..=60 {
                for k in 0..=60 {
                    let px = x0 + (x1 - x0) * i as f64 / 60.0;
                    let py = y0 + (y1 - y0) * k as f64 / 60.0;
                    let (dx, dy) = (g.u - px, g.v - py);
                    let p = -0.5 * (g.a * dx * dx + g.c * dy * dy) - g.b * dx * dy;
                    assert!(p <= m + 1e-12, "grid point above the bound: {p} > {m}");
                    grid_max = grid_max.max(p);
                }
            }
            // The grid misses the exact maximiser by at most a cell.
            assert!(
                m - grid_max < 0.05 * (1.0 + m.abs()),
                "bound {m} far above grid max {grid_max}"
            );
        }
    }

    /// The pairwise lane sum adds every lane once.
    #[test]
    fn hsum_adds_every_lane() {
        let v: [f64; LANES] = std::array::from_fn(|i| (1u64 << i) as f64);
        assert_eq!(hsum(&v), ((1u64 << LANES) - 1) as f64);
    }
}
