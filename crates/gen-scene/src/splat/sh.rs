//! View-dependent colour from real spherical harmonics (degree 0..3), as in 3DGS:
//! `rgb = max(0, 0.5 + Σ_k Y_k(d) f_k)` with `d` the unit direction from the camera centre to
//! the Gaussian mean (world frame), and the candle custom op with its analytic backward pass.

// Index loops mirror the matrix formulas; `!(x > y)` comparisons deliberately treat NaN as failing.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::real::Real;
use crate::splat::kernel::cpu_slice;

pub const SH_C0: f64 = 0.282_094_791_773_878_14;
pub const SH_C1: f64 = 0.488_602_511_902_919_9;
pub const SH_C2: [f64; 5] = [
    1.092_548_430_592_079_2,
    -1.092_548_430_592_079_2,
    0.315_391_565_252_520_05,
    -1.092_548_430_592_079_2,
    0.546_274_215_296_039_6,
];
pub const SH_C3: [f64; 7] = [
    -0.590_043_589_926_643_5,
    2.890_611_442_640_554,
    -0.457_045_799_464_465_8,
    0.373_176_332_590_115_4,
    -0.457_045_799_464_465_8,
    1.445_305_721_320_277,
    -0.590_043_589_926_643_5,
];

/// Number of SH coefficients of a degree: `(degree + 1)²`.
pub fn num_sh_coeffs(degree: usize) -> usize {
    (degree + 1) * (degree + 1)
}

/// The degree whose coefficient count is `k`, if any (1, 4, 9, 16 → 0..3).
pub fn sh_degree_of(k: usize) -> Option<usize> {
    (0..=3).find(|&d| num_sh_coeffs(d) == k)
}

/// SH basis values `y[0..k]` at the unit direction `d`, and their gradients wrt `d` if asked.
pub(crate) fn sh_basis<R: Real>(
    k: usize,
    d: [R; 3],
    y: &mut [R; 16],
    dy: Option<&mut [[R; 3]; 16]>,
) {
    let c = |v: f64| R::c(v);
    let [x, yy, z] = d;
    let zero = c(0.0);
    let mut g = [[zero; 3]; 16];
    y[0] = c(SH_C0);
    if k > 1 {
        let c1 = c(SH_C1);
        y[1] = -c1 * yy;
        y[2] = c1 * z;
        y[3] = -c1 * x;
        g[1] = [zero, -c1, zero];
        g[2] = [zero, zero, c1];
        g[3] = [-c1, zero, zero];
    }
    if k > 4 {
        let k2 = SH_C2.map(c);
        let (xx, y2, zz) = (x * x, yy * yy, z * z);
        y[4] = k2[0] * x * yy;
        y[5] = k2[1] * yy * z;
        y[6] = k2[2] * (c(2.0) * zz - xx - y2);
        y[7] = k2[3] * x * z;
        y[8] = k2[4] * (xx - y2);
        g[4] = [k2[0] * yy, k2[0] * x, zero];
        g[5] = [zero, k2[1] * z, k2[1] * yy];
        g[6] = [c(-2.0) * k2[2] * x, c(-2.0) * k2[2] * yy, c(4.0) * k2[2] * z];
        g[7] = [k2[3] * z, zero, k2[3] * x];
        g[8] = [c(2.0) * k2[4] * x, c(-2.0) * k2[4] * yy, zero];
    }
    if k > 9 {
        let k3 = SH_C3.map(c);
        let (xx, y2, zz) = (x * x, yy * yy, z * z);
        y[9] = k3[0] * yy * (c(3.0) * xx - y2);
        y[10] = k3[1] * x * yy * z;
        y[11] = k3[2] * yy * (c(4.0) * zz - xx - y2);
        y[12] = k3[3] * z * (c(2.0) * zz - c(3.0) * xx - c(3.0) * y2);
        y[13] = k3[4] * x * (c(4.0) * zz - xx - y2);
        y[14] = k3[5] * z * (xx - y2);
        y[15] = k3[6] * x * (xx - c(3.0) * y2);
        g[9] = [c(6.0) * k3[0] * x * yy, k3[0] * (c(3.0) * xx - c(3.0) * y2), zero];
        g[10] = [k3[1] * yy * z, k3[1] * x * z, k3[1] * x * yy];
        g[11] = [
            c(-2.0) * k3[2] * x * yy,
            k3[2] * (c(4.0) * zz - xx - c(3.0) * y2),
            c(8.0) * k3[2] * yy * z,
        ];
        g[12] = [
            c(-6.0) * k3[3] * x * z,
            c(-6.0) * k3[3] * yy * z,
            k3[3] * (c(6.0) * zz - c(3.0) * xx - c(3.0) * y2),
        ];
        g[13] = [
            k3[4] * (c(4.0) * zz - c(3.0) * xx - y2),
            c(-2.0) * k3[4] * x * yy,
            c(8.0) * k3[4] * x * z,
        ];
        g[14] = [c(2.0) * k3[5] * x * z, c(-2.0) * k3[5] * yy * z, k3[5] * (xx - y2)];
        g[15] = [k3[6] * (c(3.0) * xx - c(3.0) * y2), c(-6.0) * k3[6] * x * yy, zero];
    }
    if let Some(dy) = dy {
        *dy = g;
    }
}

fn direction<R: Real>(campos: [R; 3], mean: &[R]) -> ([R; 3], R) {
    let v = [mean[0] - campos[0], mean[1] - campos[1], mean[2] - campos[2]];
    let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    if n.f64() < 1e-12 {
        return ([R::c(0.0), R::c(0.0), R::c(1.0)], R::c(0.0));
    }
    ([v[0] / n, v[1] / n, v[2] / n], n)
}

/// Colours `N*3` from means `N*3` and coefficients `N*k*3`.
pub(crate) fn sh_cpu<R: Real>(campos: [R; 3], means: &[R], sh: &[R], k: usize) -> Vec<R> {
    let n = means.len() / 3;
    let mut out = vec![R::c(0.0); n * 3];
    out.par_chunks_mut(3).enumerate().with_min_len(256).for_each(|(i, o)| {
        let (d, _) = direction(campos, &means[i * 3..i * 3 + 3]);
        let mut y = [R::c(0.0); 16];
        sh_basis(k, d, &mut y, None);
        let f = &sh[i * k * 3..(i + 1) * k * 3];
        for ch in 0..3 {
            let mut acc = R::c(0.5);
            for (j, yj) in y.iter().enumerate().take(k) {
                acc += *yj * f[j * 3 + ch];
            }
            o[ch] = acc.maxr(R::c(0.0));
        }
    });
    out
}

/// Backward of [`sh_cpu`] → `(d means N*3, d sh N*k*3)`.
pub(crate) fn sh_bwd_cpu<R: Real>(
    campos: [R; 3],
    means: &[R],
    sh: &[R],
    k: usize,
    grad: &[R],
) -> (Vec<R>, Vec<R>) {
    let n = means.len() / 3;
    let mut dmeans = vec![R::c(0.0); n * 3];
    let mut dsh = vec![R::c(0.0); n * k * 3];
    dmeans.par_chunks_mut(3).zip(dsh.par_chunks_mut(k * 3)).enumerate().with_min_len(256).for_each(
        |(i, (dm, ds))| {
            let (d, norm) = direction(campos, &means[i * 3..i * 3 + 3]);
            let mut y = [R::c(0.0); 16];
            let mut dy = [[R::c(0.0); 3]; 16];
            sh_basis(k, d, &mut y, Some(&mut dy));
            let f = &sh[i * k * 3..(i + 1) * k * 3];
            let mut g = [R::c(0.0); 3];
            for ch in 0..3 {
                let mut acc = R::c(0.5);
                for j in 0..k {
                    acc += y[j] * f[j * 3 + ch];
                }
                // Clamped at 0 from below: no gradient where the value was negative.
                g[ch] = if acc.f64() < 0.0 { R::c(0.0) } else { grad[i * 3 + ch] };
            }
            let mut dd = [R::c(0.0); 3];
            for j in 0..k {
                let gy = g[0] * f[j * 3] + g[1] * f[j * 3 + 1] + g[2] * f[j * 3 + 2];
                for ch in 0..3 {
                    ds[j * 3 + ch] = y[j] * g[ch];
                }
                for a in 0..3 {
                    dd[a] += dy[j][a] * gy;
                }
            }
            if norm.f64() > 0.0 {
                let dot = d[0] * dd[0] + d[1] * dd[1] + d[2] * dd[2];
                for a in 0..3 {
                    dm[a] = (dd[a] - d[a] * dot) / norm;
                }
            }
        },
    );
    (dmeans, dsh)
}

/// Candle op: `(means (N,3), sh (N,K,3))` → colours `(N,3)`.
pub(crate) struct ShOp {
    pub campos: [f64; 3],
    pub k: usize,
}

impl ShOp {
    fn fwd_t<R: Real>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let means = cpu_slice::<R>(s1, l1, "means")?;
        let sh = cpu_slice::<R>(s2, l2, "sh")?;
        let n = means.len() / 3;
        let out = sh_cpu(self.campos.map(R::c), means, sh, self.k);
        Ok((R::to_cpu_storage_owned(out), Shape::from((n, 3))))
    }

    fn bwd_t<R: Real>(
        &self,
        means: &Tensor,
        sh: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let v = |t: &Tensor| t.flatten_all()?.to_vec1::<R>();
        let (m, s, g) = (v(means)?, v(sh)?, v(grad)?);
        let (dm, ds) = sh_bwd_cpu(self.campos.map(R::c), &m, &s, self.k, &g);
        let dev = means.device();
        Ok((Tensor::from_vec(dm, means.shape(), dev)?, Tensor::from_vec(ds, sh.shape(), dev)?))
    }
}

impl CustomOp2 for ShOp {
    fn name(&self) -> &'static str {
        "gen-scene-splat-sh"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => self.fwd_t::<f32>(s1, l1, s2, l2),
            CpuStorage::F64(_) => self.fwd_t::<f64>(s1, l1, s2, l2),
            other => candle_core::bail!(
                "splat SH colour: dtype {:?} not supported (f32 or f64)",
                candle_core::backend::BackendStorage::dtype(other)
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
        let (dm, ds) = match a1.dtype() {
            candle_core::DType::F32 => self.bwd_t::<f32>(a1, a2, grad)?,
            candle_core::DType::F64 => self.bwd_t::<f64>(a1, a2, grad)?,
            d => candle_core::bail!("splat SH colour backward: dtype {d:?} not supported"),
        };
        Ok((Some(dm), Some(ds)))
    }
}
