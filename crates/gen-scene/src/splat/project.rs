//! Per-Gaussian projection (EWA splatting, as in 3DGS) and its analytic backward pass, plus the
//! candle custom op that wraps them.
//!
//! Packed output per Gaussian, `PROJ_DIM = 8` values:
//! `[u, v, conic_a, conic_b, conic_c, depth, radius, 0]` — the 2D mean in pixels, the inverse
//! 2D covariance `[[a, b], [b, c]]`, the camera-space depth, the pixel radius
//! `ceil(3 sqrt(λ_max))` (0 = culled; not differentiable) and a reserved slot.

// Index loops mirror the matrix formulas; `!(x > y)` comparisons deliberately treat NaN as failing.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::real::Real;
use crate::splat::kernel::{cpu_slice, tile_rect, CamParams};

/// Values per Gaussian in the packed projection output.
pub const PROJ_DIM: usize = 8;
/// Near plane: Gaussians with camera depth at or below this are culled.
pub const NEAR: f64 = 0.01;
/// Low-pass filter added to the diagonal of the 2D covariance.
pub const LOW_PASS: f64 = 0.3;

type M3<R> = [[R; 3]; 3];

/// Rotation matrix of a unit quaternion `(w, x, y, z)`.
pub(crate) fn quat_rot<R: Real>(q: [R; 4]) -> M3<R> {
    let [w, x, y, z] = q;
    let one = R::c(1.0);
    let two = R::c(2.0);
    [
        [one - two * (y * y + z * z), two * (x * y - w * z), two * (x * z + w * y)],
        [two * (x * y + w * z), one - two * (x * x + z * z), two * (y * z - w * x)],
        [two * (x * z - w * y), two * (y * z + w * x), one - two * (x * x + y * y)],
    ]
}

/// Normalises a quaternion; a zero quaternion becomes the identity (with norm 0 reported).
pub(crate) fn quat_normalize<R: Real>(q: [R; 4]) -> ([R; 4], R) {
    let n = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]).sqrt();
    if n.f64() < 1e-12 {
        return ([R::c(1.0), R::c(0.0), R::c(0.0), R::c(0.0)], R::c(0.0));
    }
    ([q[0] / n, q[1] / n, q[2] / n, q[3] / n], n)
}

/// Everything the forward projection computes for one Gaussian; the backward pass recomputes it.
struct Fwd<R> {
    t: [R; 3],
    qn: [R; 4],
    qnorm: R,
    rq: M3<R>,
    s: [R; 3],
    m: M3<R>,
    sigma: M3<R>,
    /// J W (2×3).
    tm: [[R; 3]; 2],
    /// Whether x/z (y/z) was clamped to the frustum margin, and the clamped ratios.
    clamped: [bool; 2],
    ratio: [R; 2],
    cov: [R; 3],
    det: R,
}

fn forward_one<R: Real>(
    cam: &CamParams<R>,
    mean: [R; 3],
    logs: [R; 3],
    quat: [R; 4],
) -> Option<Fwd<R>> {
    let w = &cam.rot;
    let mut t = [R::c(0.0); 3];
    for i in 0..3 {
        t[i] = w[i][0] * mean[0] + w[i][1] * mean[1] + w[i][2] * mean[2] + cam.trans[i];
    }
    if !(t[2].f64() > NEAR) {
        return None;
    }
    let (qn, qnorm) = quat_normalize(quat);
    let rq = quat_rot(qn);
    let s = [logs[0].exp(), logs[1].exp(), logs[2].exp()];
    let mut m = [[R::c(0.0); 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = rq[i][j] * s[j];
        }
    }
    let mut sigma = [[R::c(0.0); 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            sigma[i][j] = m[i][0] * m[j][0] + m[i][1] * m[j][1] + m[i][2] * m[j][2];
        }
    }
    // Perspective Jacobian with the 3DGS/gsplat frustum clamp of x/z and y/z.
    let tz = t[2];
    let mut clamped = [false; 2];
    let mut ratio = [R::c(0.0); 2];
    for k in 0..2 {
        let r = t[k] / tz;
        let (lo, hi) = (-cam.lim_neg[k], cam.lim_pos[k]);
        ratio[k] = if r < lo {
            clamped[k] = true;
            lo
        } else if r > hi {
            clamped[k] = true;
            hi
        } else {
            r
        };
    }
    let (fx, fy) = (cam.fx, cam.fy);
    let j = [[fx / tz, R::c(0.0), -fx * ratio[0] / tz], [R::c(0.0), fy / tz, -fy * ratio[1] / tz]];
    let mut tm = [[R::c(0.0); 3]; 2];
    for r in 0..2 {
        for c in 0..3 {
            tm[r][c] = j[r][0] * w[0][c] + j[r][1] * w[1][c] + j[r][2] * w[2][c];
        }
    }
    // cov = Tm Σ Tmᵀ + low-pass.
    let mut ts = [[R::c(0.0); 3]; 2];
    for r in 0..2 {
        for c in 0..3 {
            ts[r][c] = tm[r][0] * sigma[0][c] + tm[r][1] * sigma[1][c] + tm[r][2] * sigma[2][c];
        }
    }
    let dot = |a: &[R; 3], b: &[R; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    let cov = [
        dot(&ts[0], &tm[0]) + R::c(LOW_PASS),
        dot(&ts[0], &tm[1]),
        dot(&ts[1], &tm[1]) + R::c(LOW_PASS),
    ];
    let det = cov[0] * cov[2] - cov[1] * cov[1];
    if !(det.f64() > 0.0) {
        return None;
    }
    Some(Fwd { t, qn, qnorm, rq, s, m, sigma, tm, clamped, ratio, cov, det })
}

/// Projects one Gaussian; writes the packed `PROJ_DIM` values (all zero when culled).
pub(crate) fn project_one<R: Real>(
    cam: &CamParams<R>,
    mean: [R; 3],
    logs: [R; 3],
    quat: [R; 4],
    out: &mut [R],
) {
    out.iter_mut().for_each(|v| *v = R::c(0.0));
    let Some(f) = forward_one(cam, mean, logs, quat) else {
        return;
    };
    let [a, b, c] = f.cov;
    let conic = [c / f.det, -b / f.det, a / f.det];
    let mid = R::c(0.5) * (a + c);
    let lambda = mid + (mid * mid - f.det).maxr(R::c(0.1)).sqrt();
    let radius = (R::c(3.0) * lambda.sqrt()).ceil();
    let u = cam.fx * f.t[0] / f.t[2] + cam.cx;
    let v = cam.fy * f.t[1] / f.t[2] + cam.cy;
    if !(u.f64().is_finite() && v.f64().is_finite() && radius.f64().is_finite()) {
        return;
    }
    let (x0, x1, y0, y1) = tile_rect(u.f64(), v.f64(), radius.f64(), cam.tiles_x, cam.tiles_y);
    if x0 >= x1 || y0 >= y1 {
        return;
    }
    out[0] = u;
    out[1] = v;
    out[2] = conic[0];
    out[3] = conic[1];
    out[4] = conic[2];
    out[5] = f.t[2];
    out[6] = radius;
}

/// Gradients of one Gaussian's mean, log-scale and quaternion from the gradient `g` of its
/// packed projection (`g[0..6]` = u, v, conic a, b, c, depth; radius has no gradient).
pub(crate) fn project_one_bwd<R: Real>(
    cam: &CamParams<R>,
    mean: [R; 3],
    logs: [R; 3],
    quat: [R; 4],
    g: &[R],
) -> ([R; 3], [R; 3], [R; 4]) {
    let zero = R::c(0.0);
    let Some(f) = forward_one(cam, mean, logs, quat) else {
        return ([zero; 3], [zero; 3], [zero; 4]);
    };
    let (fx, fy) = (cam.fx, cam.fy);
    let [tx, ty, tz] = f.t;
    let [a, b, c] = f.cov;
    // conic K = [[c, -b], [-b, a]] / det; dL/dcov = -K G K with G the symmetric conic gradient.
    let k = [[c / f.det, -b / f.det], [-b / f.det, a / f.det]];
    let gk = [[g[2], R::c(0.5) * g[3]], [R::c(0.5) * g[3], g[4]]];
    let mut kg = [[zero; 2]; 2];
    for i in 0..2 {
        for j in 0..2 {
            kg[i][j] = k[i][0] * gk[0][j] + k[i][1] * gk[1][j];
        }
    }
    let mut dcov = [[zero; 2]; 2];
    for i in 0..2 {
        for j in 0..2 {
            dcov[i][j] = -(kg[i][0] * k[0][j] + kg[i][1] * k[1][j]);
        }
    }
    // cov = Tm Σ Tmᵀ: dTm = 2 dcov Tm Σ, dΣ = Tmᵀ dcov Tm.
    let tm = &f.tm;
    let mut tms = [[zero; 3]; 2];
    for r in 0..2 {
        for cc in 0..3 {
            tms[r][cc] =
                tm[r][0] * f.sigma[0][cc] + tm[r][1] * f.sigma[1][cc] + tm[r][2] * f.sigma[2][cc];
        }
    }
    let mut dtm = [[zero; 3]; 2];
    for r in 0..2 {
        for cc in 0..3 {
            dtm[r][cc] = R::c(2.0) * (dcov[r][0] * tms[0][cc] + dcov[r][1] * tms[1][cc]);
        }
    }
    let mut dsig = [[zero; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            let mut acc = zero;
            for r in 0..2 {
                for q in 0..2 {
                    acc += tm[r][i] * dcov[r][q] * tm[q][j];
                }
            }
            dsig[i][j] = acc;
        }
    }
    // Tm = J W: dJ = dTm Wᵀ.
    let w = &cam.rot;
    let mut dj = [[zero; 3]; 2];
    for r in 0..2 {
        for i in 0..3 {
            dj[r][i] = dtm[r][0] * w[i][0] + dtm[r][1] * w[i][1] + dtm[r][2] * w[i][2];
        }
    }
    let mut dt = [zero; 3];
    let tz2 = tz * tz;
    dt[2] += -fx / tz2 * dj[0][0] - fy / tz2 * dj[1][1];
    for (kk, fk) in [fx, fy].into_iter().enumerate() {
        // J[kk][2] = -f * ratio / tz with ratio = t_k / tz unless clamped.
        let gj = dj[kk][2];
        if f.clamped[kk] {
            dt[2] += fk * f.ratio[kk] / tz2 * gj;
        } else {
            dt[kk] += -fk / tz2 * gj;
            dt[2] += R::c(2.0) * fk * f.t[kk] / (tz2 * tz) * gj;
        }
    }
    // 2D mean and depth.
    dt[0] += fx / tz * g[0];
    dt[2] += -fx * tx / tz2 * g[0];
    dt[1] += fy / tz * g[1];
    dt[2] += -fy * ty / tz2 * g[1];
    dt[2] += g[5];
    let mut dmean = [zero; 3];
    for i in 0..3 {
        dmean[i] = w[0][i] * dt[0] + w[1][i] * dt[1] + w[2][i] * dt[2];
    }
    // Σ = M Mᵀ: dM = 2 dΣ M; M = Rq diag(s).
    let mut dm = [[zero; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            dm[i][j] = R::c(2.0)
                * (dsig[i][0] * f.m[0][j] + dsig[i][1] * f.m[1][j] + dsig[i][2] * f.m[2][j]);
        }
    }
    let mut dlogs = [zero; 3];
    let mut dr = [[zero; 3]; 3];
    for j in 0..3 {
        let mut ds = zero;
        for i in 0..3 {
            ds += dm[i][j] * f.rq[i][j];
            dr[i][j] = dm[i][j] * f.s[j];
        }
        dlogs[j] = ds * f.s[j];
    }
    let dquat = quat_rot_bwd(f.qn, f.qnorm, &dr);
    (dmean, dlogs, dquat)
}

/// Gradient of the unnormalised quaternion from the gradient of its rotation matrix.
pub(crate) fn quat_rot_bwd<R: Real>(qn: [R; 4], qnorm: R, g: &M3<R>) -> [R; 4] {
    let zero = R::c(0.0);
    if qnorm.f64() == 0.0 {
        return [zero; 4];
    }
    let [w, x, y, z] = qn;
    let two = R::c(2.0);
    let dw =
        two * (-z * g[0][1] + y * g[0][2] + z * g[1][0] - x * g[1][2] - y * g[2][0] + x * g[2][1]);
    let dx = two
        * (y * g[0][1] + z * g[0][2] + y * g[1][0] - two * x * g[1][1] - w * g[1][2]
            + z * g[2][0]
            + w * g[2][1]
            - two * x * g[2][2]);
    let dy = two
        * (-two * y * g[0][0] + x * g[0][1] + w * g[0][2] + x * g[1][0] + z * g[1][2]
            - w * g[2][0]
            + z * g[2][1]
            - two * y * g[2][2]);
    let dz = two
        * (-two * z * g[0][0] - w * g[0][1] + x * g[0][2] + w * g[1][0] - two * z * g[1][1]
            + y * g[1][2]
            + x * g[2][0]
            + y * g[2][1]);
    let gq = [dw, dx, dy, dz];
    // Through q̂ = q / |q|.
    let d = qn[0] * gq[0] + qn[1] * gq[1] + qn[2] * gq[2] + qn[3] * gq[3];
    [
        (gq[0] - qn[0] * d) / qnorm,
        (gq[1] - qn[1] * d) / qnorm,
        (gq[2] - qn[2] * d) / qnorm,
        (gq[3] - qn[3] * d) / qnorm,
    ]
}

fn arr<R: Real, const K: usize>(s: &[R], i: usize) -> [R; K] {
    std::array::from_fn(|k| s[i * K + k])
}

/// CPU projection of all Gaussians. `means`, `logs`: `N*3`; `quats`: `N*4` → `N*PROJ_DIM`.
pub(crate) fn project_cpu<R: Real>(
    cam: &CamParams<R>,
    means: &[R],
    logs: &[R],
    quats: &[R],
) -> Vec<R> {
    let n = means.len() / 3;
    let mut out = vec![R::c(0.0); n * PROJ_DIM];
    out.par_chunks_mut(PROJ_DIM).enumerate().with_min_len(256).for_each(|(i, o)| {
        project_one(cam, arr(means, i), arr(logs, i), arr(quats, i), o);
    });
    out
}

/// CPU projection backward → `(d means N*3, d logs N*3, d quats N*4)`. Culled Gaussians
/// (`radius == 0` in `proj`) get zero gradients.
pub(crate) fn project_bwd_cpu<R: Real>(
    cam: &CamParams<R>,
    means: &[R],
    logs: &[R],
    quats: &[R],
    proj: &[R],
    grad: &[R],
) -> (Vec<R>, Vec<R>, Vec<R>) {
    let n = means.len() / 3;
    let res: Vec<([R; 3], [R; 3], [R; 4])> = (0..n)
        .into_par_iter()
        .with_min_len(256)
        .map(|i| {
            if proj[i * PROJ_DIM + 6].f64() <= 0.0 {
                let z = R::c(0.0);
                return ([z; 3], [z; 3], [z; 4]);
            }
            project_one_bwd(
                cam,
                arr(means, i),
                arr(logs, i),
                arr(quats, i),
                &grad[i * PROJ_DIM..(i + 1) * PROJ_DIM],
            )
        })
        .collect();
    let mut dm = Vec::with_capacity(n * 3);
    let mut dl = Vec::with_capacity(n * 3);
    let mut dq = Vec::with_capacity(n * 4);
    for (a, b, c) in res {
        dm.extend_from_slice(&a);
        dl.extend_from_slice(&b);
        dq.extend_from_slice(&c);
    }
    (dm, dl, dq)
}

/// Candle op: `(means (N,3), log_scales (N,3), quats (N,4))` → packed projection `(N, 8)`.
/// The backward pass returns gradients for all three inputs.
pub(crate) struct ProjectOp {
    pub cam: CamParams<f64>,
}

impl ProjectOp {
    fn fwd_t<R: Real>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let means = cpu_slice::<R>(s1, l1, "means")?;
        let logs = cpu_slice::<R>(s2, l2, "log_scales")?;
        let quats = cpu_slice::<R>(s3, l3, "quats")?;
        let n = means.len() / 3;
        let out = project_cpu(&self.cam.cast::<R>(), means, logs, quats);
        Ok((R::to_cpu_storage_owned(out), Shape::from((n, PROJ_DIM))))
    }

    fn bwd_t<R: Real>(
        &self,
        means: &Tensor,
        logs: &Tensor,
        quats: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let v = |t: &Tensor| t.flatten_all()?.to_vec1::<R>();
        let (m, l, q, p, g) = (v(means)?, v(logs)?, v(quats)?, v(res)?, v(grad)?);
        let (dm, dl, dq) = project_bwd_cpu(&self.cam.cast::<R>(), &m, &l, &q, &p, &g);
        let dev = means.device();
        Ok((
            Tensor::from_vec(dm, means.shape(), dev)?,
            Tensor::from_vec(dl, logs.shape(), dev)?,
            Tensor::from_vec(dq, quats.shape(), dev)?,
        ))
    }
}

impl CustomOp3 for ProjectOp {
    fn name(&self) -> &'static str {
        "gen-scene-splat-project"
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
                "splat projection: dtype {:?} not supported (f32 or f64)",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    }

    // The backward pass runs on the CPU for every device for now; a CUDA kernel can take its
    // place beside `cpu_fwd` without changing the graph.
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dm, dl, dq) = match a1.dtype() {
            candle_core::DType::F32 => self.bwd_t::<f32>(a1, a2, a3, res, grad)?,
            candle_core::DType::F64 => self.bwd_t::<f64>(a1, a2, a3, res, grad)?,
            d => candle_core::bail!("splat projection backward: dtype {d:?} not supported"),
        };
        Ok((Some(dm), Some(dl), Some(dq)))
    }
}
