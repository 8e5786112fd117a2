//! Image-quality and prompt-alignment metrics of the evaluator (`gen eval`): pure functions on
//! 8-bit images, feature matrices and predicted labels. The evaluator network itself (which
//! produces the features and labels) lives elsewhere; nothing here is differentiable or used as
//! a reward.
//!
//! - **Saturation** ([`mean_saturation`], [`saturation_excess`]): mean HSV saturation
//!   `(max − min) / max` (0 for black) of sRGB object pixels. Object pixels come from the true
//!   coverage mask for renders ([`ObjectSelect::Mask`]) or, for generated images whose mask is
//!   unknown, from the distance to the background colour the caption names
//!   ([`ObjectSelect::Background`], [`ObjectSelect::for_prompt`]).
//! - **Colourfulness** ([`colourfulness`]): Hasler & Süsstrunk (2003),
//!   `σ_rgyb + 0.3 μ_rgyb` with `rg = R − G`, `yb = (R + G)/2 − B` on 0–255 values, population
//!   standard deviations.
//! - **Clipped pixels** ([`clipped_fraction`]): the fraction of channel values at the ends of
//!   the 8-bit range.
//! - **Fréchet distance** ([`frechet_distance`], [`GaussianStats`], [`real_vs_real`]): the FID
//!   formula on any N×D feature sets ("tiny-FID" on the evaluator's features).
//! - **Alignment** ([`alignment`]): per-attribute accuracy of predicted labels against the parsed
//!   prompt, confusion tables, and view accuracy with an angle tolerance.

use serde::Serialize;

use crate::caption::{parse_caption, View};
use crate::palette::{Background, Colour};
use crate::shapes::Shape;
use gen_core::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Images and object pixels
// ---------------------------------------------------------------------------------------------

/// A borrowed 8-bit sRGB image: `(H, W, 3)` row-major, interleaved RGB.
#[derive(Debug, Clone, Copy)]
pub struct ImageU8<'a> {
    pub width: usize,
    pub height: usize,
    pub rgb: &'a [u8],
}

impl<'a> ImageU8<'a> {
    /// Checks that `rgb` holds `height * width * 3` bytes.
    pub fn new(width: usize, height: usize, rgb: &'a [u8]) -> Result<Self> {
        if width == 0 || height == 0 || rgb.len() != width * height * 3 {
            return Err(Error::invalid(
                "image",
                format!(
                    "{width}×{height} RGB needs {} bytes, got {}",
                    width * height * 3,
                    rgb.len()
                ),
            ));
        }
        Ok(Self { width, height, rgb })
    }

    /// Borrows an [`image::RgbImage`].
    pub fn from_rgb_image(img: &'a image::RgbImage) -> Self {
        Self { width: img.width() as usize, height: img.height() as usize, rgb: img.as_raw() }
    }

    /// Number of pixels.
    pub fn pixels(&self) -> usize {
        self.width * self.height
    }

    fn pixel(&self, i: usize) -> [u8; 3] {
        [self.rgb[3 * i], self.rgb[3 * i + 1], self.rgb[3 * i + 2]]
    }
}

/// Default [`ObjectSelect::Background`] threshold: Euclidean sRGB distance in [0, 1] units
/// (≈ 31/255 on one channel). Every palette colour is more than 0.2 from every background.
pub const DEFAULT_BACKGROUND_THRESHOLD: f32 = 0.12;

/// Default number of erosions of a background-distance selection (one pixel of rim).
pub const DEFAULT_ERODE: u32 = 1;

/// Default [`ObjectSelect::Mask`] coverage: only fully covered pixels (no anti-aliased edge
/// pixels, which mix in the background colour).
pub const DEFAULT_MIN_COVERAGE: f32 = 1.0;

/// Which pixels of an image belong to the object.
#[derive(Debug, Clone, Copy)]
pub enum ObjectSelect<'a> {
    /// True per-pixel coverage `(H, W)` in [0, 1] (the renderer's mask); a pixel is object when
    /// its coverage is `>= min_coverage`.
    Mask { coverage: &'a [f32], min_coverage: f32 },
    /// For images without a mask: a pixel is object when its Euclidean distance from the
    /// background's sRGB colour (channels in [0, 1]) is `> threshold`, and then the selection
    /// is eroded `erode` times (a pixel stays when its 4 neighbours inside the image are
    /// object too), which drops the anti-aliased rim whose colour mixes in the background.
    Background { srgb8: [u8; 3], threshold: f32, erode: u32 },
}

impl ObjectSelect<'static> {
    /// Background-distance selection for the background a prompt names
    /// ("… on a grey background"), with [`DEFAULT_BACKGROUND_THRESHOLD`]. Errors when the
    /// prompt does not parse or names no background.
    pub fn for_prompt(prompt: &str) -> Result<Self> {
        let parts = parse_caption(prompt)?;
        let bg = parts.background.ok_or_else(|| {
            Error::invalid(
                "prompt",
                format!("{prompt:?} names no background colour; cannot segment the object"),
            )
        })?;
        Ok(Self::for_background(bg))
    }

    /// Background-distance selection for a known background, [`DEFAULT_BACKGROUND_THRESHOLD`]
    /// and [`DEFAULT_ERODE`].
    pub fn for_background(bg: Background) -> Self {
        ObjectSelect::Background {
            srgb8: bg.srgb8(),
            threshold: DEFAULT_BACKGROUND_THRESHOLD,
            erode: DEFAULT_ERODE,
        }
    }
}

impl<'a> ObjectSelect<'a> {
    /// The renderer's mask with [`DEFAULT_MIN_COVERAGE`].
    pub fn interior(coverage: &'a [f32]) -> Self {
        ObjectSelect::Mask { coverage, min_coverage: DEFAULT_MIN_COVERAGE }
    }
}

/// Per-pixel object flags `(H, W)` of `img` under `select`.
pub fn object_pixels(img: ImageU8<'_>, select: ObjectSelect<'_>) -> Result<Vec<bool>> {
    ImageU8::new(img.width, img.height, img.rgb)?;
    match select {
        ObjectSelect::Mask { coverage, min_coverage } => {
            if coverage.len() != img.pixels() {
                return Err(Error::invalid(
                    "object mask",
                    format!(
                        "{} values for a {}×{} image (expected {})",
                        coverage.len(),
                        img.width,
                        img.height,
                        img.pixels()
                    ),
                ));
            }
            Ok(coverage.iter().map(|&c| c >= min_coverage).collect())
        }
        ObjectSelect::Background { srgb8, threshold, erode } => {
            if !threshold.is_finite() || threshold < 0.0 {
                return Err(Error::invalid(
                    "background threshold",
                    format!("{threshold} (must be finite and >= 0)"),
                ));
            }
            let t2 = (threshold as f64) * (threshold as f64);
            let mut sel: Vec<bool> = (0..img.pixels())
                .map(|i| {
                    let p = img.pixel(i);
                    let d2: f64 =
                        (0..3).map(|c| ((p[c] as f64 - srgb8[c] as f64) / 255.0).powi(2)).sum();
                    d2 > t2
                })
                .collect();
            for _ in 0..erode {
                sel = erode4(&sel, img.width, img.height);
            }
            Ok(sel)
        }
    }
}

/// One 4-neighbour erosion of an `(H, W)` selection (neighbours outside the image do not erode).
fn erode4(sel: &[bool], w: usize, h: usize) -> Vec<bool> {
    (0..h * w)
        .map(|i| {
            let (y, x) = (i / w, i % w);
            sel[i]
                && (x == 0 || sel[i - 1])
                && (x + 1 == w || sel[i + 1])
                && (y == 0 || sel[i - w])
                && (y + 1 == h || sel[i + w])
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Saturation and colourfulness
// ---------------------------------------------------------------------------------------------

/// HSV saturation `(max − min) / max` of an 8-bit sRGB pixel (0 for black), as Python's
/// `colorsys.rgb_to_hsv` computes it.
pub fn hsv_saturation(p: [u8; 3]) -> f64 {
    let max = p[0].max(p[1]).max(p[2]) as f64;
    let min = p[0].min(p[1]).min(p[2]) as f64;
    if max == 0.0 {
        0.0
    } else {
        (max - min) / max
    }
}

/// Mean HSV saturation over the object pixels of one image; `None` when no pixel is selected.
pub fn mean_saturation(img: ImageU8<'_>, select: ObjectSelect<'_>) -> Result<Option<f64>> {
    let obj = object_pixels(img, select)?;
    let (sum, n) = obj
        .iter()
        .enumerate()
        .filter(|(_, &o)| o)
        .fold((0.0f64, 0usize), |(s, n), (i, _)| (s + hsv_saturation(img.pixel(i)), n + 1));
    Ok((n > 0).then(|| sum / n as f64))
}

/// Mean object saturation of a set of images.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SetSaturation {
    /// Mean of the per-image means (each image weighs the same); `None` if no image had object pixels.
    pub mean: Option<f64>,
    /// Per-image means, `None` for images with no object pixels (left out of `mean`).
    pub per_image: Vec<Option<f64>>,
    /// Number of images with no object pixels.
    pub empty: usize,
}

/// Mean object saturation of each image and of the set (mean of the per-image means).
pub fn set_saturation<'a>(images: &[(ImageU8<'a>, ObjectSelect<'a>)]) -> Result<SetSaturation> {
    let per_image = images
        .iter()
        .enumerate()
        .map(|(k, (img, sel))| {
            mean_saturation(*img, *sel).map_err(|e| Error::msg(format!("image {k}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let present: Vec<f64> = per_image.iter().flatten().copied().collect();
    let mean = (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64);
    Ok(SetSaturation { mean, empty: per_image.len() - present.len(), per_image })
}

/// Saturation excess of generated over real images of the same prompt(s).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SaturationExcess {
    pub generated: SetSaturation,
    pub real: SetSaturation,
    /// `generated.mean − real.mean` (positive: the generator over-saturates).
    pub excess: f64,
}

/// `mean sat(generated objects) − mean sat(real objects)`. Both sets must have at least one image
/// with object pixels. Generated images have no mask, so they use [`ObjectSelect::for_prompt`];
/// select the real renders of the same prompts **the same way** so that the segmentation's own
/// bias cancels (identical images then give exactly 0). Measured on 32² world renders: the
/// background-distance selection (threshold 0.12, one erosion) agrees with the true mask on
/// every non-edge pixel, and its mean object saturation differs from the true-mask interior's
/// by −0.0001 (−0.026 without the erosion, which leaves the background-tinted rim in).
pub fn saturation_excess<'a>(
    generated: &[(ImageU8<'a>, ObjectSelect<'a>)],
    real: &[(ImageU8<'a>, ObjectSelect<'a>)],
) -> Result<SaturationExcess> {
    let generated = set_saturation(generated)?;
    let real = set_saturation(real)?;
    let (Some(g), Some(r)) = (generated.mean, real.mean) else {
        return Err(Error::invalid(
            "saturation excess",
            format!(
                "no object pixels found in the {} set ({} generated, {} real images)",
                if generated.mean.is_none() { "generated" } else { "real" },
                generated.per_image.len(),
                real.per_image.len()
            ),
        ));
    };
    Ok(SaturationExcess { excess: g - r, generated, real })
}

/// Hasler–Süsstrunk colourfulness `sqrt(σ_rg² + σ_yb²) + 0.3 sqrt(μ_rg² + μ_yb²)` over the
/// selected pixels (all pixels when `select` is `None`), with `rg = R − G`, `yb = (R + G)/2 − B`
/// on 0–255 values and population (ddof 0) statistics. `None` when no pixel is selected.
pub fn colourfulness(img: ImageU8<'_>, select: Option<ObjectSelect<'_>>) -> Result<Option<f64>> {
    let obj = match select {
        Some(s) => object_pixels(img, s)?,
        None => {
            ImageU8::new(img.width, img.height, img.rgb)?;
            vec![true; img.pixels()]
        }
    };
    let vals: Vec<(f64, f64)> = (0..img.pixels())
        .filter(|&i| obj[i])
        .map(|i| {
            let [r, g, b] = img.pixel(i).map(|v| v as f64);
            (r - g, 0.5 * (r + g) - b)
        })
        .collect();
    if vals.is_empty() {
        return Ok(None);
    }
    let n = vals.len() as f64;
    let (mrg, myb) =
        (vals.iter().map(|v| v.0).sum::<f64>() / n, vals.iter().map(|v| v.1).sum::<f64>() / n);
    let vrg = vals.iter().map(|v| (v.0 - mrg).powi(2)).sum::<f64>() / n;
    let vyb = vals.iter().map(|v| (v.1 - myb).powi(2)).sum::<f64>() / n;
    Ok(Some((vrg + vyb).sqrt() + 0.3 * (mrg * mrg + myb * myb).sqrt()))
}

// ---------------------------------------------------------------------------------------------
// Clipped pixels
// ---------------------------------------------------------------------------------------------

/// Channel values counted as clipped: `v <= low` or `v >= high`.
///
/// [`ClipThresholds::EXACT`] (0 / 255) counts values the decoder's `clamp(0, 1)` pinned to the
/// ends of the range; [`ClipThresholds::LOOSE`] (≤ 1 / ≥ 254) also counts values that rounding
/// left one step away. No palette colour or background has a channel at ≤ 1 or ≥ 254, so real
/// renders have no clipped values except where lighting saturates a highlight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClipThresholds {
    pub low: u8,
    pub high: u8,
}

impl ClipThresholds {
    pub const EXACT: ClipThresholds = ClipThresholds { low: 0, high: 255 };
    pub const LOOSE: ClipThresholds = ClipThresholds { low: 1, high: 254 };
}

impl Default for ClipThresholds {
    fn default() -> Self {
        Self::EXACT
    }
}

/// Clipped channel values of a set of images.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClippedReport {
    /// Clipped channel values / all channel values, over every image.
    pub overall: f64,
    /// The same fraction per image.
    pub per_image: Vec<f64>,
    pub thresholds: ClipThresholds,
}

/// Fraction of channel values (H·W·3 per image) at or beyond the clip thresholds.
pub fn clipped_fraction(
    images: &[ImageU8<'_>],
    thresholds: ClipThresholds,
) -> Result<ClippedReport> {
    if images.is_empty() {
        return Err(Error::invalid("clipped fraction", "no images"));
    }
    if thresholds.low >= thresholds.high {
        return Err(Error::invalid(
            "clip thresholds",
            format!("low {} must be below high {}", thresholds.low, thresholds.high),
        ));
    }
    let (mut clipped, mut total) = (0usize, 0usize);
    let mut per_image = Vec::with_capacity(images.len());
    for (k, img) in images.iter().enumerate() {
        ImageU8::new(img.width, img.height, img.rgb)
            .map_err(|e| Error::msg(format!("image {k}: {e}")))?;
        let c = img.rgb.iter().filter(|&&v| v <= thresholds.low || v >= thresholds.high).count();
        per_image.push(c as f64 / img.rgb.len() as f64);
        clipped += c;
        total += img.rgb.len();
    }
    Ok(ClippedReport { overall: clipped as f64 / total as f64, per_image, thresholds })
}

// ---------------------------------------------------------------------------------------------
// Fréchet distance
// ---------------------------------------------------------------------------------------------

/// Mean and covariance of an N×D feature set.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianStats {
    /// Number of samples the statistics came from.
    pub n: usize,
    /// `(D,)`.
    pub mean: Vec<f64>,
    /// `(D, D)` row-major, unbiased (divides by N − 1, like `numpy.cov(rowvar=False)` in the
    /// standard FID code).
    pub cov: Vec<f64>,
}

impl GaussianStats {
    /// Statistics of `features`, N×D row-major (`features.len() == n * d`), N ≥ 2.
    pub fn from_features(features: &[f64], d: usize) -> Result<Self> {
        if d == 0 || !features.len().is_multiple_of(d) {
            return Err(Error::invalid(
                "features",
                format!("{} values do not form rows of dimension {d}", features.len()),
            ));
        }
        let n = features.len() / d;
        if n < 2 {
            return Err(Error::invalid(
                "features",
                format!("{n} samples; a covariance needs at least 2"),
            ));
        }
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "features",
                format!("non-finite value {} at row {}, column {}", features[i], i / d, i % d),
            ));
        }
        let mut mean = vec![0.0; d];
        for row in features.chunks_exact(d) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut cov = vec![0.0; d * d];
        let mut c = vec![0.0; d];
        for row in features.chunks_exact(d) {
            for j in 0..d {
                c[j] = row[j] - mean[j];
            }
            for i in 0..d {
                for j in i..d {
                    cov[i * d + j] += c[i] * c[j];
                }
            }
        }
        for i in 0..d {
            for j in i..d {
                let v = cov[i * d + j] / (n - 1) as f64;
                cov[i * d + j] = v;
                cov[j * d + i] = v;
            }
        }
        Ok(Self { n, mean, cov })
    }

    /// Feature dimension D.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }
}

/// Eigen-decomposition of a symmetric D×D row-major matrix: (eigenvalues ascending, eigenvectors
/// as columns of a row-major D×D matrix). The input is symmetrised first.
fn symmetric_eigen(a: &[f64], d: usize, what: &str) -> Result<(Vec<f64>, Vec<f64>)> {
    let m = faer::Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (a[i * d + j] + a[j * d + i]));
    let evd = m.self_adjoint_eigen(faer::Side::Lower).map_err(|e| {
        Error::msg(format!("eigen-decomposition of the {d}×{d} {what} failed: {e:?}"))
    })?;
    let s = evd.S().column_vector();
    let u = evd.U();
    let values = (0..d).map(|i| s[i]).collect();
    let mut vectors = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            vectors[i * d + j] = u[(i, j)];
        }
    }
    Ok((values, vectors))
}

/// `sqrt(Σ)` of a symmetric PSD D×D row-major matrix: `U diag(sqrt(max(λ, 0))) Uᵀ` from its
/// eigen-decomposition (negative round-off eigenvalues count as 0).
fn psd_sqrt(a: &[f64], d: usize, what: &str) -> Result<Vec<f64>> {
    let (l, u) = symmetric_eigen(a, d, what)?;
    let r: Vec<f64> = l.iter().map(|&l| l.max(0.0).sqrt()).collect();
    let mut s = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            s[i * d + j] = (0..d).map(|k| u[i * d + k] * r[k] * u[j * d + k]).sum();
        }
    }
    Ok(s)
}

/// `tr(sqrt(Σ1 Σ2))` for symmetric PSD covariances (D×D row-major).
///
/// `Σ1 Σ2` is similar to the symmetric PSD matrix `sqrt(Σ1) Σ2 sqrt(Σ1) = B Bᵀ` with
/// `B = sqrt(Σ1) sqrt(Σ2)`, so the trace is the sum of the square roots of that matrix's
/// eigenvalues, which are the squared singular values of `B`: the trace is `Σ σ_i(B)` (the
/// nuclear norm of `B`). Both square roots come from symmetric eigen-decompositions
/// (`psd_sqrt`); the trace from the singular values of `B`. Taking singular values of `B`
/// rather than square roots of the eigenvalues of `B Bᵀ` matters for near-singular
/// covariances: an eigenvalue of `B Bᵀ` near 0 carries an absolute error ~ ε‖B‖², which its
/// square root turns into ~ √ε‖B‖ (≈ 1e-7 each), while a singular value carries only ~ ε‖B‖.
/// Measured on the fixtures (rank-6 features plus 1e-5 noise, D = 16): the eigenvalue route
/// was 2.8e-7 (relative, of the Fréchet distance) from a 50-digit reference, scipy's `sqrtm`
/// 4.3e-7, and this route 3e-14; with N < D (singular covariances) this route was 7e-10 and
/// scipy 9e-9 off. No inverse and no complex square
/// root is involved, so singular covariances (N ≤ D) need no `eps·I` offset.
pub fn trace_sqrt_product(cov1: &[f64], cov2: &[f64], d: usize) -> Result<f64> {
    if cov1.len() != d * d || cov2.len() != d * d {
        return Err(Error::invalid(
            "covariances",
            format!("expected {d}×{d} = {} values, got {} and {}", d * d, cov1.len(), cov2.len()),
        ));
    }
    let s1 = psd_sqrt(cov1, d, "first covariance")?;
    let s2 = psd_sqrt(cov2, d, "second covariance")?;
    let b =
        faer::Mat::<f64>::from_fn(d, d, |i, j| (0..d).map(|k| s1[i * d + k] * s2[k * d + j]).sum());
    let sv = b
        .singular_values()
        .map_err(|e| Error::msg(format!("SVD of sqrt(Σ1) sqrt(Σ2) ({d}×{d}) failed: {e:?}")))?;
    Ok(sv.iter().sum())
}

/// Fréchet distance of two Gaussians: `|μ1 − μ2|² + tr(Σ1) + tr(Σ2) − 2 tr(sqrt(Σ1 Σ2))`
/// (see [`trace_sqrt_product`]).
pub fn frechet_distance_stats(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    let d = a.dim();
    if b.dim() != d {
        return Err(Error::invalid(
            "Fréchet distance",
            format!("feature dimensions differ: {d} vs {}", b.dim()),
        ));
    }
    let mean_term: f64 = a.mean.iter().zip(&b.mean).map(|(x, y)| (x - y) * (x - y)).sum();
    let tr1: f64 = (0..d).map(|i| a.cov[i * d + i]).sum();
    let tr2: f64 = (0..d).map(|i| b.cov[i * d + i]).sum();
    let cross = trace_sqrt_product(&a.cov, &b.cov, d)?;
    Ok(mean_term + tr1 + tr2 - 2.0 * cross)
}

/// Fréchet distance between two feature sets, N1×D and N2×D row-major (the FID formula).
pub fn frechet_distance(a: &[f64], b: &[f64], d: usize) -> Result<f64> {
    let sa = GaussianStats::from_features(a, d)
        .map_err(|e| Error::msg(format!("first feature set: {e}")))?;
    let sb = GaussianStats::from_features(b, d)
        .map_err(|e| Error::msg(format!("second feature set: {e}")))?;
    frechet_distance_stats(&sa, &sb)
}

/// The real-vs-real baseline printed beside tiny-FID.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RealVsReal {
    /// Fréchet distance between the two halves.
    pub fd: f64,
    /// Samples in each half.
    pub size: usize,
}

/// Fréchet distance between two disjoint subsets of one real feature set (N×D row-major):
/// the first `size` even-indexed rows against the first `size` odd-indexed rows (interleaving
/// keeps any ordering of the set out of the split). Fréchet distance is biased upwards at small
/// N, so compare it with a generated set of the same `size`. Needs `2 * size <= N`, `size >= 2`.
pub fn real_vs_real(features: &[f64], d: usize, size: usize) -> Result<RealVsReal> {
    if d == 0 || !features.len().is_multiple_of(d) {
        return Err(Error::invalid(
            "real features",
            format!("{} values do not form rows of dimension {d}", features.len()),
        ));
    }
    let n = features.len() / d;
    if size < 2 || 2 * size > n {
        return Err(Error::invalid(
            "real-vs-real size",
            format!("{size} per half needs 2 × {size} <= {n} real samples and size >= 2"),
        ));
    }
    let half = |parity: usize| -> Vec<f64> {
        (0..size)
            .flat_map(|k| features[(2 * k + parity) * d..(2 * k + parity + 1) * d].iter().copied())
            .collect()
    };
    Ok(RealVsReal { fd: frechet_distance(&half(0), &half(1), d)?, size })
}

// ---------------------------------------------------------------------------------------------
// Prompt alignment
// ---------------------------------------------------------------------------------------------

/// The evaluator's labels for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Predicted {
    pub shape: Shape,
    pub colour: Colour,
    pub view: Option<View>,
    pub background: Option<Background>,
}

/// What the image should show: the parsed prompt, and the true camera angles when the prompt
/// came from a world scene (needed for the tolerant view judgement).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub parts: crate::caption::CaptionParts,
    /// `(azimuth_deg, elevation_deg)` of the scene the prompt was written for.
    pub angles: Option<(f32, f32)>,
}

impl Target {
    /// Parses a prompt (see [`parse_caption`]).
    pub fn from_prompt(prompt: &str, angles: Option<(f32, f32)>) -> Result<Self> {
        Ok(Self { parts: parse_caption(prompt)?, angles })
    }
}

/// `correct / total`; `total` counts only images whose prompt names the attribute (and whose
/// prediction has it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
}

impl Accuracy {
    fn add(&mut self, ok: bool) {
        self.total += 1;
        self.correct += ok as usize;
    }

    /// `correct / total`, `None` when nothing was counted.
    pub fn value(&self) -> Option<f64> {
        (self.total > 0).then(|| self.correct as f64 / self.total as f64)
    }
}

/// Counts of (true label, predicted label): `counts[t][p]`, rows and columns in `labels` order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfusionTable {
    pub labels: Vec<String>,
    pub counts: Vec<Vec<usize>>,
}

impl ConfusionTable {
    fn new(labels: Vec<String>) -> Self {
        let n = labels.len();
        Self { labels, counts: vec![vec![0; n]; n] }
    }

    /// Sum of the diagonal over the sum of all counts (`None` if empty).
    pub fn accuracy(&self) -> Option<f64> {
        let total: usize = self.counts.iter().flatten().sum();
        let diag: usize = (0..self.labels.len()).map(|i| self.counts[i][i]).sum();
        (total > 0).then(|| diag as f64 / total as f64)
    }
}

/// How views are judged.
///
/// View words are ambiguous near bucket edges (a camera at azimuth 44° is "front" but looks
/// like one at 46°, "side"), so with [`ViewJudge::AngleTolerance`] a predicted view counts as
/// correct when it is the word of some camera within `±deg` (azimuth and elevation
/// independently) of the target's true angles. It needs [`Target::angles`]; targets without
/// angles fall back to the exact word. `deg` must be in [0, 45) so that at most two azimuth
/// buckets are in reach.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum ViewJudge {
    Exact,
    AngleTolerance { deg: f32 },
}

/// Default tolerance for [`ViewJudge::AngleTolerance`].
pub const DEFAULT_VIEW_TOLERANCE_DEG: f32 = 10.0;

/// Whether `predicted` is the view word of some camera within `±tol_deg` of
/// `(azimuth_deg, elevation_deg)`. The view buckets are axis-aligned in (azimuth, elevation) and
/// wider than `2 tol_deg`, so the words reachable are those at the corners and edge midpoints of
/// the tolerance rectangle.
pub fn view_within_tolerance(
    predicted: View,
    azimuth_deg: f32,
    elevation_deg: f32,
    tol_deg: f32,
) -> Result<bool> {
    if !(0.0..45.0).contains(&tol_deg) {
        return Err(Error::invalid("view tolerance", format!("{tol_deg}° (must be in [0, 45))")));
    }
    for da in [-tol_deg, 0.0, tol_deg] {
        for de in [-tol_deg, 0.0, tol_deg] {
            if View::from_angles(azimuth_deg + da, elevation_deg + de) == predicted {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Prompt-alignment report over a set of images.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlignmentReport {
    pub images: usize,
    pub shape: Accuracy,
    /// Full colour (hue and tone) — prompts naming a colour.
    pub colour: Accuracy,
    pub hue: Accuracy,
    /// Tone (plain/light/dark) — the attribute over-saturation damages ("light blue" → "blue").
    pub tone: Accuracy,
    /// Shape and full colour both right (prompts naming a colour).
    pub shape_and_colour: Accuracy,
    pub background: Accuracy,
    /// Exact view word.
    pub view_exact: Accuracy,
    /// View under the [`ViewJudge`] given.
    pub view: Accuracy,
    pub view_judge: ViewJudge,
    pub shape_confusion: ConfusionTable,
    /// Over the 24 colours, [`Colour::all`] order.
    pub colour_confusion: ConfusionTable,
    pub view_confusion: ConfusionTable,
}

/// Compares predictions with targets (one each per image, same order).
pub fn alignment(
    predicted: &[Predicted],
    targets: &[Target],
    judge: ViewJudge,
) -> Result<AlignmentReport> {
    if predicted.len() != targets.len() {
        return Err(Error::invalid(
            "alignment",
            format!("{} predictions for {} targets", predicted.len(), targets.len()),
        ));
    }
    if let ViewJudge::AngleTolerance { deg } = judge {
        view_within_tolerance(View::Front, 0.0, 0.0, deg)?;
    }
    let colours = Colour::all();
    let mut r = AlignmentReport {
        images: predicted.len(),
        shape: Accuracy::default(),
        colour: Accuracy::default(),
        hue: Accuracy::default(),
        tone: Accuracy::default(),
        shape_and_colour: Accuracy::default(),
        background: Accuracy::default(),
        view_exact: Accuracy::default(),
        view: Accuracy::default(),
        view_judge: judge,
        shape_confusion: ConfusionTable::new(
            Shape::ALL.iter().map(|s| s.name().to_string()).collect(),
        ),
        colour_confusion: ConfusionTable::new(colours.iter().map(|c| c.name()).collect()),
        view_confusion: ConfusionTable::new(
            View::ALL.iter().map(|v| v.name().to_string()).collect(),
        ),
    };
    let idx =
        |all: &[Shape], s: Shape| all.iter().position(|&x| x == s).expect("every shape is in ALL");
    for (p, t) in predicted.iter().zip(targets) {
        let truth = &t.parts;
        r.shape.add(p.shape == truth.shape);
        r.shape_confusion.counts[idx(&Shape::ALL, truth.shape)][idx(&Shape::ALL, p.shape)] += 1;
        if let Some(c) = truth.colour {
            r.colour.add(p.colour == c);
            r.hue.add(p.colour.hue == c.hue);
            r.tone.add(p.colour.tone == c.tone);
            r.shape_and_colour.add(p.colour == c && p.shape == truth.shape);
            let ci = |x: Colour| {
                colours.iter().position(|&y| y == x).expect("every colour is in Colour::all")
            };
            r.colour_confusion.counts[ci(c)][ci(p.colour)] += 1;
        }
        if let (Some(b), Some(pb)) = (truth.background, p.background) {
            r.background.add(pb == b);
        }
        if let (Some(v), Some(pv)) = (truth.view, p.view) {
            r.view_exact.add(pv == v);
            let vi =
                |x: View| View::ALL.iter().position(|&y| y == x).expect("every view is in ALL");
            r.view_confusion.counts[vi(v)][vi(pv)] += 1;
            let ok = match (judge, t.angles) {
                (ViewJudge::AngleTolerance { deg }, Some((az, el))) => {
                    view_within_tolerance(pv, az, el, deg)?
                }
                _ => pv == v,
            };
            r.view.add(ok);
        }
    }
    Ok(r)
}
