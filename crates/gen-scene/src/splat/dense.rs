//! A slow reference renderer built only from differentiable candle tensor ops: every Gaussian
//! is evaluated at every pixel, and composited in depth order. It follows the same rules as the
//! tile rasterizer (same culling, 1/255 skip, 0.99 clamp, early stop, tile membership), with the
//! discrete decisions taken on detached values, so its values and autodiff gradients check the
//! custom ops. Meant for tiny scenes (memory `O(N · H · W)`).

// Index loops mirror the matrix formulas; `!(x > y)` comparisons deliberately treat NaN as failing.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

use candle_core::{DType, Tensor};
use gen_core::Result;

use crate::camera::Camera;
use crate::splat::kernel::{tile_rect, CamParams};
use crate::splat::raster::{ALPHA_MAX, ALPHA_MIN, T_MIN};
use crate::splat::sh::{SH_C0, SH_C1, SH_C2, SH_C3};
use crate::splat::{project::LOW_PASS, project::NEAR, RenderConfig, Splats, TILE};

/// Column `i` of a `(N, C)` tensor as `(N)`.
fn col(t: &Tensor, i: usize) -> candle_core::Result<Tensor> {
    t.narrow(1, i, 1)?.squeeze(1)
}

/// SH colour `(N, 3)` from tensor ops (3DGS formula, clamped at 0).
pub fn sh_colors_dense(
    means: &Tensor,
    sh: &Tensor,
    campos: [f64; 3],
) -> candle_core::Result<Tensor> {
    let dev = means.device();
    let cp = Tensor::new(&campos, dev)?.to_dtype(means.dtype())?;
    let v = means.broadcast_sub(&cp)?;
    let d = v.broadcast_div(&v.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let (x, y, z) = (col(&d, 0)?, col(&d, 1)?, col(&d, 2)?);
    let k = sh.dim(1)?;
    let ones = x.ones_like()?;
    let mut basis = vec![(ones * SH_C0)?];
    if k > 1 {
        basis.push((&y * -SH_C1)?);
        basis.push((&z * SH_C1)?);
        basis.push((&x * -SH_C1)?);
    }
    if k > 4 {
        let (xx, yy, zz) = (x.sqr()?, y.sqr()?, z.sqr()?);
        basis.push(((&x * &y)? * SH_C2[0])?);
        basis.push(((&y * &z)? * SH_C2[1])?);
        basis.push((((&zz * 2.0)? - &xx)? - &yy)?.affine(SH_C2[2], 0.0)?);
        basis.push(((&x * &z)? * SH_C2[3])?);
        basis.push(((&xx - &yy)? * SH_C2[4])?);
        if k > 9 {
            basis.push(((&y * ((&xx * 3.0)? - &yy)?)? * SH_C3[0])?);
            basis.push((((&x * &y)? * &z)? * SH_C3[1])?);
            basis.push(((&y * (((&zz * 4.0)? - &xx)? - &yy)?)? * SH_C3[2])?);
            basis.push(((&z * (((&zz * 2.0)? - (&xx * 3.0)?)? - (&yy * 3.0)?)?)? * SH_C3[3])?);
            basis.push(((&x * (((&zz * 4.0)? - &xx)? - &yy)?)? * SH_C3[4])?);
            basis.push(((&z * (&xx - &yy)?)? * SH_C3[5])?);
            basis.push(((&x * (&xx - (&yy * 3.0)?)?)? * SH_C3[6])?);
        }
    }
    let basis = Tensor::stack(&basis, 1)?; // (N, K)
    let c = basis.unsqueeze(2)?.broadcast_mul(sh)?.sum(1)?;
    (c + 0.5)?.relu()
}

/// Dense reference render → `(rgb (H,W,3), alpha (H,W), depth (H,W))`, same conventions as
/// [`crate::splat::render`].
pub fn render_dense(
    splats: &Splats,
    camera: &Camera,
    cfg: &RenderConfig,
) -> Result<(Tensor, Tensor, Tensor)> {
    splats.validate()?;
    let cam = CamParams::from_camera(camera);
    let dt = splats.means.dtype();
    let dev = splats.means.device();
    let n = splats.len();
    let (w, h) = (cam.width, cam.height);
    let np = w * h;
    let wmat = Tensor::new(&cam.rot, dev)?.to_dtype(dt)?; // (3,3) row-major R
    let trans = Tensor::new(&cam.trans, dev)?.to_dtype(dt)?;
    let t = splats.means.matmul(&wmat.t()?)?.broadcast_add(&trans)?; // (N,3)
    let (tx, ty, tz) = (col(&t, 0)?, col(&t, 1)?, col(&t, 2)?);

    // Rotation from the normalised quaternion.
    let q = splats.quats.broadcast_div(&splats.quats.sqr()?.sum_keepdim(1)?.sqrt()?)?;
    let (qw, qx, qy, qz) = (col(&q, 0)?, col(&q, 1)?, col(&q, 2)?, col(&q, 3)?);
    let one = qw.ones_like()?;
    let two = |a: &Tensor, b: &Tensor| -> candle_core::Result<Tensor> { (a * b)? * 2.0 };
    let r = Tensor::stack(
        &[
            ((&one - two(&qy, &qy)?)? - two(&qz, &qz)?)?,
            (two(&qx, &qy)? - two(&qw, &qz)?)?,
            (two(&qx, &qz)? + two(&qw, &qy)?)?,
            (two(&qx, &qy)? + two(&qw, &qz)?)?,
            ((&one - two(&qx, &qx)?)? - two(&qz, &qz)?)?,
            (two(&qy, &qz)? - two(&qw, &qx)?)?,
            (two(&qx, &qz)? - two(&qw, &qy)?)?,
            (two(&qy, &qz)? + two(&qw, &qx)?)?,
            ((&one - two(&qx, &qx)?)? - two(&qy, &qy)?)?,
        ],
        1,
    )?
    .reshape((n, 3, 3))?;
    let s = splats.log_scales.exp()?.unsqueeze(1)?; // (N,1,3)
    let m = r.broadcast_mul(&s)?;
    let sigma = m.matmul(&m.transpose(1, 2)?)?;

    // Perspective Jacobian with the frustum clamp.
    let rx = (&tx / &tz)?.clamp(-cam.lim_neg[0], cam.lim_pos[0])?;
    let ry = (&ty / &tz)?.clamp(-cam.lim_neg[1], cam.lim_pos[1])?;
    let zero = tz.zeros_like()?;
    let inv_z = tz.recip()?;
    let j = Tensor::stack(
        &[
            (&inv_z * cam.fx)?,
            zero.clone(),
            ((&rx * &inv_z)? * -cam.fx)?,
            zero.clone(),
            (&inv_z * cam.fy)?,
            ((&ry * &inv_z)? * -cam.fy)?,
        ],
        1,
    )?
    .reshape((n, 2, 3))?;
    let tm = j.broadcast_matmul(&wmat)?;
    let cov = tm.matmul(&sigma)?.matmul(&tm.transpose(1, 2)?)?.reshape((n, 4))?;
    let a = (col(&cov, 0)? + LOW_PASS)?;
    let b = col(&cov, 1)?;
    let c = (col(&cov, 3)? + LOW_PASS)?;
    let det = ((&a * &c)? - b.sqr()?)?;
    let ca = (&c / &det)?;
    let cb = (b.neg()? / &det)?;
    let cc = (&a / &det)?;
    let u = ((&tx * &inv_z)? * cam.fx)?.affine(1.0, cam.cx)?;
    let v = ((&ty * &inv_z)? * cam.fy)?.affine(1.0, cam.cy)?;

    let colors = sh_colors_dense(&splats.means, &splats.sh, cam.campos)?;
    let opacity = (splats.opacity_logits.neg()?.exp()? + 1.0)?.recip()?;

    // Every Gaussian at every pixel centre.
    let px: Vec<f64> = (0..np).map(|p| (p % w) as f64 + 0.5).collect();
    let py: Vec<f64> = (0..np).map(|p| (p / w) as f64 + 0.5).collect();
    let px = Tensor::from_vec(px, (1, np), dev)?.to_dtype(dt)?;
    let py = Tensor::from_vec(py, (1, np), dev)?.to_dtype(dt)?;
    let dx = u.unsqueeze(1)?.broadcast_sub(&px)?; // (N,P)
    let dy = v.unsqueeze(1)?.broadcast_sub(&py)?;
    let power = ((dx.sqr()?.broadcast_mul(&ca.unsqueeze(1)?)?
        + dy.sqr()?.broadcast_mul(&cc.unsqueeze(1)?)?)?
        * -0.5)?
        .sub(&(&dx * &dy)?.broadcast_mul(&cb.unsqueeze(1)?)?)?;
    let alpha = power.exp()?.broadcast_mul(&opacity.unsqueeze(1)?)?.minimum(ALPHA_MAX)?;

    // Discrete decisions on detached values: culling, tile membership, skips, early stop.
    let f = |t: &Tensor| -> candle_core::Result<Vec<f64>> {
        t.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    };
    let (uv, vv, zv) = (f(&u)?, f(&v)?, f(&tz)?);
    let (av, cv, detv) = (f(&a)?, f(&c)?, f(&det)?);
    let (alpha_v, power_v) = (f(&alpha)?, f(&power)?);
    let mut rects = vec![None; n];
    for i in 0..n {
        if !(zv[i] > NEAR) || !(detv[i] > 0.0) {
            continue;
        }
        let mid = 0.5 * (av[i] + cv[i]);
        let lambda = mid + (mid * mid - detv[i]).max(0.1).sqrt();
        let radius = (3.0 * lambda.sqrt()).ceil();
        let rect = tile_rect(uv[i], vv[i], radius, cam.tiles_x, cam.tiles_y);
        if rect.0 < rect.1 && rect.2 < rect.3 {
            rects[i] = Some(rect);
        }
    }
    let mut order: Vec<usize> = (0..n).filter(|&i| rects[i].is_some()).collect();
    order.sort_by(|&i, &k| {
        zv[i].partial_cmp(&zv[k]).unwrap_or(std::cmp::Ordering::Equal).then(i.cmp(&k))
    });
    let mut mask = vec![0.0f64; n * np];
    for p in 0..np {
        let (tx_, ty_) = ((p % w) / TILE, (p / w) / TILE);
        let mut tr = 1.0;
        for &i in &order {
            let (x0, x1, y0, y1) = rects[i].unwrap_or_default();
            if !(x0..x1).contains(&tx_) || !(y0..y1).contains(&ty_) {
                continue;
            }
            let (al, pw) = (alpha_v[i * np + p], power_v[i * np + p]);
            if pw > 0.0 || al < ALPHA_MIN {
                continue;
            }
            if tr * (1.0 - al) < T_MIN {
                break;
            }
            tr *= 1.0 - al;
            mask[i * np + p] = 1.0;
        }
    }
    let alpha = (alpha * Tensor::from_vec(mask, (n, np), dev)?.to_dtype(dt)?)?;

    // Front-to-back compositing in depth order.
    let mut tr = Tensor::ones(np, dt, dev)?;
    let mut rgb = Tensor::zeros((np, 3), dt, dev)?;
    let mut depth = Tensor::zeros(np, dt, dev)?;
    for &i in &order {
        let al = alpha.get(i)?;
        let wgt = (&tr * &al)?;
        rgb = (rgb + wgt.unsqueeze(1)?.broadcast_mul(&colors.get(i)?.unsqueeze(0)?)?)?;
        depth = (depth + wgt.broadcast_mul(&tz.get(i)?)?)?;
        tr = (&tr * (1.0 - &al)?)?;
    }
    let bg = Tensor::new(&cfg.background, dev)?.to_dtype(dt)?.unsqueeze(0)?;
    let rgb = (rgb + tr.unsqueeze(1)?.broadcast_mul(&bg)?)?;
    let alpha_img = (1.0 - &tr)?;
    Ok((rgb.reshape((h, w, 3))?, alpha_img.reshape((h, w))?, depth.reshape((h, w))?))
}
