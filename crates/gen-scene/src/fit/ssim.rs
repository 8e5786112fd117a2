//! Structural similarity (Wang et al. 2004) from differentiable candle ops, as 3DGS uses it:
//! an 11×11 Gaussian window with σ = 1.5, zero padding ("same" size), `C1 = 0.01²`,
//! `C2 = 0.03²`, mean over channels and pixels.
//!
//! The separable window is applied as two matrix products with banded matrices
//! (`blur(x) = G_H · x · G_Wᵀ` per channel), whose gradients candle gets right (no conv2d or
//! pooling backward is involved; see the candle notes on those).

use candle_core::{DType, Device, Tensor};
use gen_core::{Error, Result};

/// Window size of [`ssim`].
pub const WINDOW: usize = 11;
/// Window standard deviation of [`ssim`].
pub const SIGMA: f64 = 1.5;

/// Normalised 1D Gaussian window of `size` taps.
pub fn gaussian_window(size: usize, sigma: f64) -> Vec<f64> {
    let c = (size / 2) as f64;
    let w: Vec<f64> =
        (0..size).map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp()).collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|v| v / s).collect()
}

/// `(n, n)` matrix `M` with `(M x)_i = Σ_k w_k x_{i+k−r}` (zero outside `0..n`).
fn band_matrix(n: usize, w: &[f64], dtype: DType, device: &Device) -> Result<Tensor> {
    let r = w.len() / 2;
    let mut m = vec![0.0f64; n * n];
    for i in 0..n {
        for (k, &wk) in w.iter().enumerate() {
            let j = i as isize + k as isize - r as isize;
            if (0..n as isize).contains(&j) {
                m[i * n + j as usize] = wk;
            }
        }
    }
    Ok(Tensor::from_vec(m, (n, n), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
}

/// Precomputed blur matrices for one image size (reuse across steps).
#[derive(Debug, Clone)]
pub struct Ssim {
    gh: Tensor,
    gwt: Tensor,
    height: usize,
    width: usize,
}

impl Ssim {
    /// SSIM for `(height, width)` images of `dtype` on `device`.
    pub fn new(height: usize, width: usize, dtype: DType, device: &Device) -> Result<Self> {
        if height == 0 || width == 0 {
            return Err(Error::invalid("ssim image size", format!("{height}x{width}")));
        }
        let w = gaussian_window(WINDOW, SIGMA);
        Ok(Self {
            gh: band_matrix(height, &w, dtype, device)?,
            gwt: band_matrix(width, &w, dtype, device)?.t()?.contiguous()?,
            height,
            width,
        })
    }

    /// Gaussian-windowed blur of `(C, H, W)` images.
    fn blur(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.gh.broadcast_matmul(x)?.broadcast_matmul(&self.gwt)?)
    }

    /// Mean SSIM of two `(H, W, C)` images (scalar tensor); differentiable in both.
    pub fn ssim(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (h, w) = (self.height, self.width);
        if a.dims().len() != 3 || a.dims()[..2] != [h, w] || a.dims() != b.dims() {
            return Err(Error::invalid(
                "ssim inputs",
                format!("shapes {:?} and {:?} (want equal ({h}, {w}, C))", a.dims(), b.dims()),
            ));
        }
        let a = a.permute((2, 0, 1))?.contiguous()?;
        let b = b.permute((2, 0, 1))?.contiguous()?;
        let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
        let mu1 = self.blur(&a)?;
        let mu2 = self.blur(&b)?;
        let mu1_sq = mu1.sqr()?;
        let mu2_sq = mu2.sqr()?;
        let mu12 = (&mu1 * &mu2)?;
        let s1 = (self.blur(&a.sqr()?)? - &mu1_sq)?;
        let s2 = (self.blur(&b.sqr()?)? - &mu2_sq)?;
        let s12 = (self.blur(&(&a * &b)?)? - &mu12)?;
        let num = (mu12.affine(2.0, c1)? * s12.affine(2.0, c2)?)?;
        let den = ((mu1_sq + mu2_sq)?.affine(1.0, c1)? * (s1 + s2)?.affine(1.0, c2)?)?;
        Ok((num / den)?.mean_all()?)
    }
}

/// Mean SSIM of two `(H, W, C)` images (builds the window matrices each call; see [`Ssim`]).
pub fn ssim(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = a.dims();
    if d.len() != 3 {
        return Err(Error::invalid("ssim input", format!("shape {d:?} (want (H, W, C))")));
    }
    Ssim::new(d[0], d[1], a.dtype(), a.device())?.ssim(a, b)
}
