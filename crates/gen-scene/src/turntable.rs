//! Turntable views of splats: `N` cameras on a circular orbit around the object, rendered with
//! the tile rasterizer ([`crate::splat::render`]), saved as a looping animated GIF and a PNG
//! contact sheet.

use std::path::Path;

use candle_core::{DType, Device};
use gen_core::{write_atomic, Error, Result};
use glam::DVec3;
use image::{ImageEncoder, Rgb, RgbImage};

use crate::camera::{Camera, Intrinsics, Orbit};
use crate::export::gif::{encode_gif, GifConfig};
use crate::splat::{render, RenderConfig, Splats};

/// Where the orbit is centred and how far the cameras are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Framing {
    /// Centre on the median of the means; distance so that a sphere holding 95% of the means
    /// (plus 3σ of the median Gaussian) fills the view, times `margin`.
    Auto { margin: f64 },
    /// Explicit orbit centre and camera distance.
    Manual { center: [f64; 3], distance: f64 },
}

/// Options of [`render_turntable`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TurntableConfig {
    /// Number of views (≥ 1), at azimuths `360° · i / frames`.
    pub frames: usize,
    pub width: usize,
    pub height: usize,
    /// Vertical field of view in degrees.
    pub fov_y_deg: f64,
    /// Camera elevation above the orbit plane, in degrees.
    pub elevation_deg: f64,
    /// World up direction (the orbit axis); glTF convention is +Y.
    pub up: [f64; 3],
    pub framing: Framing,
    pub render: RenderConfig,
    pub gif: GifConfig,
}

impl Default for TurntableConfig {
    fn default() -> Self {
        Self {
            frames: 24,
            width: 128,
            height: 128,
            fov_y_deg: 40.0,
            elevation_deg: 20.0,
            up: [0.0, 1.0, 0.0],
            framing: Framing::Auto { margin: 1.1 },
            render: RenderConfig { background: [1.0; 3] },
            gif: GifConfig::default(),
        }
    }
}

/// The orbit cameras of `cfg` around `splats`.
pub fn orbit_cameras(splats: &Splats, cfg: &TurntableConfig) -> Result<Vec<Camera>> {
    if cfg.frames == 0 {
        return Err(Error::invalid("turntable frames", "0 (need at least 1)"));
    }
    let fov = cfg.fov_y_deg.to_radians();
    let k = Intrinsics::from_fov_y(fov, cfg.width, cfg.height)?;
    let up = DVec3::from(cfg.up).try_normalize().ok_or_else(|| {
        Error::invalid("turntable up", format!("{:?} is not a direction", cfg.up))
    })?;
    let (center, distance) = match cfg.framing {
        Framing::Manual { center, distance } => {
            if !(distance > 0.0 && distance.is_finite()) || center.iter().any(|v| !v.is_finite()) {
                return Err(Error::invalid(
                    "turntable framing",
                    format!("centre {center:?}, distance {distance}"),
                ));
            }
            (DVec3::from(center), distance)
        }
        Framing::Auto { margin } => {
            if !(margin > 0.0 && margin.is_finite()) {
                return Err(Error::invalid("turntable margin", format!("{margin}")));
            }
            auto_frame(
                splats,
                fov.min(2.0 * ((cfg.width as f64 / cfg.height as f64) * (0.5 * fov).tan()).atan()),
                margin,
            )?
        }
    };
    let orbit = Orbit {
        target: center.to_array(),
        up: up.to_array(),
        front: up.any_orthonormal_vector().to_array(),
        distance,
        azimuth: 0.0,
        elevation: cfg.elevation_deg.to_radians(),
    };
    (0..cfg.frames)
        .map(|i| {
            let azimuth = std::f64::consts::TAU * i as f64 / cfg.frames as f64;
            Orbit { azimuth, ..orbit }.camera(k)
        })
        .collect()
}

fn auto_frame(splats: &Splats, fov: f64, margin: f64) -> Result<(DVec3, f64)> {
    let a = crate::export::SplatArrays::from_splats(splats)?;
    if a.is_empty() {
        return Ok((DVec3::ZERO, 3.0));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let center = DVec3::new(
        median(a.means.iter().map(|m| m[0] as f64).collect()),
        median(a.means.iter().map(|m| m[1] as f64).collect()),
        median(a.means.iter().map(|m| m[2] as f64).collect()),
    );
    let mut d: Vec<f64> =
        a.means.iter().map(|m| (DVec3::from(m.map(|v| v as f64)) - center).length()).collect();
    d.sort_by(f64::total_cmp);
    let r95 = d[((d.len() - 1) as f64 * 0.95).round() as usize];
    let sigma = median(
        a.log_scales
            .iter()
            .map(|s| (s.iter().copied().fold(f32::MIN, f32::max) as f64).exp())
            .collect(),
    );
    let radius = (r95 + 3.0 * sigma).max(1e-3);
    Ok((center, margin * radius / (0.5 * fov).sin()))
}

/// Renders the turntable views as RGB images (colours clamped to `[0, 1]`, rounded).
pub fn render_turntable(splats: &Splats, cfg: &TurntableConfig) -> Result<Vec<RgbImage>> {
    let cams = orbit_cameras(splats, cfg)?;
    cams.iter()
        .enumerate()
        .map(|(i, cam)| {
            let out = render(splats, cam, &cfg.render)
                .map_err(|e| Error::msg(format!("turntable view {i}: {e}")))?;
            let rgb = out
                .rgb
                .detach()
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let raw: Vec<u8> = rgb
                .iter()
                .map(|v| if v.is_finite() { (v.clamp(0.0, 1.0) * 255.0).round() as u8 } else { 0 })
                .collect();
            RgbImage::from_raw(cfg.width as u32, cfg.height as u32, raw)
                .ok_or_else(|| Error::msg(format!("turntable view {i}: image size mismatch")))
        })
        .collect()
}

/// Tiles `frames` row by row into a near-square grid with a 2-pixel grey gap.
pub fn contact_sheet(frames: &[RgbImage]) -> Result<RgbImage> {
    let first = frames.first().ok_or_else(|| Error::invalid("contact sheet", "no frames"))?;
    let (w, h) = first.dimensions();
    if let Some(i) = frames.iter().position(|f| f.dimensions() != (w, h)) {
        return Err(Error::invalid(
            "contact sheet",
            format!("frame {i} size differs from frame 0"),
        ));
    }
    let n = frames.len() as u32;
    let cols = (n as f64).sqrt().ceil() as u32;
    let rows = n.div_ceil(cols);
    let gap = 2;
    let mut sheet =
        RgbImage::from_pixel(cols * (w + gap) + gap, rows * (h + gap) + gap, Rgb([128, 128, 128]));
    for (i, f) in frames.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(
            &mut sheet,
            f,
            (gap + c * (w + gap)) as i64,
            (gap + r * (h + gap)) as i64,
        );
    }
    Ok(sheet)
}

/// PNG bytes of an RGB image.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    image::codecs::png::PngEncoder::new(&mut buf)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::msg(format!("PNG encoding failed: {e}")))?;
    Ok(buf)
}

/// Renders the turntable and writes the looping GIF to `gif_path` and the contact sheet PNG to
/// `sheet_path` (both atomically). Returns the frames.
pub fn write_turntable(
    splats: &Splats,
    cfg: &TurntableConfig,
    gif_path: impl AsRef<Path>,
    sheet_path: impl AsRef<Path>,
) -> Result<Vec<RgbImage>> {
    let frames = render_turntable(splats, cfg)?;
    let gif = encode_gif(&frames, &cfg.gif)?;
    let sheet = png_bytes(&contact_sheet(&frames)?)?;
    write_atomic(gif_path, &gif)?;
    write_atomic(sheet_path, &sheet)?;
    Ok(frames)
}
