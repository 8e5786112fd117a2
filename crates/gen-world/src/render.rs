//! The analytic, anti-aliased renderer: one primitive, Lambertian light fixed in the world frame
//! plus ambient, a plain background; `s x s` supersampling on a regular grid inside each pixel.
//!
//! Shading happens in linear RGB: `albedo_lin * (ambient + (1 - ambient) * max(0, n · l))`, so
//! the brightest possible object pixel (normal facing the light) equals the named albedo
//! exactly. Diffuse shading is view-independent: a 3D asset with the colours baked in can match
//! every view. Subsamples are averaged in linear RGB, then encoded to sRGB.

use glam::Vec3;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::camera::OrbitCamera;
use crate::palette::{linear_to_srgb, srgb_to_linear};
use crate::shapes::Shape;

/// The light: a direction fixed in the world frame plus ambient.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Lighting {
    /// Unit vector from the object towards the light, world frame.
    pub to_light: [f32; 3],
    /// Ambient fraction in [0, 1): unlit surfaces get `ambient * albedo` (linear).
    pub ambient: f32,
}

impl Default for Lighting {
    /// Light from azimuth 35°, elevation 50° (above, in front and to the right as seen from the
    /// front camera at azimuth 0, whose image right is world +Y),
    /// ambient 0.3.
    fn default() -> Self {
        let (az, el) = (35f32.to_radians(), 50f32.to_radians());
        Self { to_light: [el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], ambient: 0.3 }
    }
}

/// What to draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenderInput {
    pub shape: Shape,
    /// Object albedo, sRGB in [0, 1].
    pub albedo: [f32; 3],
    /// Background colour, sRGB in [0, 1].
    pub background: [f32; 3],
    pub camera: OrbitCamera,
    pub lighting: Lighting,
    /// Subsamples per pixel along each axis (1 = no anti-aliasing; 3 = 9 rays per pixel).
    pub supersample: u32,
}

/// A rendered image with its object mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub width: u32,
    pub height: u32,
    /// `(H, W, 3)` row-major, sRGB in [0, 1].
    pub rgb: Vec<f32>,
    /// `(H, W)` row-major: fraction of each pixel's subsamples that hit the object, in [0, 1].
    pub mask: Vec<f32>,
}

impl Rendered {
    /// The image as 8-bit sRGB (`round(255 v)`).
    pub fn to_rgb8(&self) -> image::RgbImage {
        let raw = self.rgb.iter().map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
        image::RgbImage::from_raw(self.width, self.height, raw).expect("buffer is H*W*3")
    }

    /// The mask as an 8-bit grey image (`round(255 coverage)`).
    pub fn mask_to_luma8(&self) -> image::GrayImage {
        let raw = self.mask.iter().map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
        image::GrayImage::from_raw(self.width, self.height, raw).expect("buffer is H*W")
    }

    /// The sRGB value of pixel `(x, y)`.
    pub fn pixel(&self, x: u32, y: u32) -> [f32; 3] {
        let i = 3 * (y as usize * self.width as usize + x as usize);
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// Object area in pixels (sum of the coverage mask).
    pub fn coverage(&self) -> f32 {
        self.mask.iter().sum()
    }

    /// The image as a `(3, H, W)` f32 tensor in [-1, 1] (the VAE's convention) on `device`.
    pub fn to_tensor(&self, device: &candle_core::Device) -> gen_core::Result<candle_core::Tensor> {
        let (h, w) = (self.height as usize, self.width as usize);
        let data: Vec<f32> = self.rgb.iter().map(|&v| 2.0 * v - 1.0).collect();
        let t = candle_core::Tensor::from_vec(data, (h, w, 3), &candle_core::Device::Cpu)?
            .permute((2, 0, 1))?
            .contiguous()?;
        Ok(t.to_device(device)?)
    }
}

/// Renders one primitive (rows in parallel with rayon; deterministic).
pub fn render(input: &RenderInput) -> Rendered {
    let cam = &input.camera;
    let rays = cam.rays();
    let (w, h) = (cam.width as usize, cam.height as usize);
    let s = input.supersample.max(1);
    let n_sub = (s * s) as f32;
    let albedo = input.albedo.map(srgb_to_linear);
    let bg = input.background.map(srgb_to_linear);
    let light = Vec3::from(input.lighting.to_light).normalize();
    let ambient = input.lighting.ambient;

    let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..h)
        .into_par_iter()
        .map(|y| {
            let mut rgb = vec![0f32; 3 * w];
            let mut mask = vec![0f32; w];
            for x in 0..w {
                let mut acc = [0f32; 3];
                let mut hits = 0u32;
                for sy in 0..s {
                    for sx in 0..s {
                        let u = x as f32 + (sx as f32 + 0.5) / s as f32;
                        let v = y as f32 + (sy as f32 + 0.5) / s as f32;
                        let ray = rays.ray(u, v);
                        let c = match input.shape.intersect(&ray) {
                            Some(hit) => {
                                hits += 1;
                                let shade =
                                    ambient + (1.0 - ambient) * hit.normal.dot(light).max(0.0);
                                albedo.map(|a| a * shade)
                            }
                            None => bg,
                        };
                        for k in 0..3 {
                            acc[k] += c[k];
                        }
                    }
                }
                for k in 0..3 {
                    rgb[3 * x + k] = linear_to_srgb(acc[k] / n_sub);
                }
                mask[x] = hits as f32 / n_sub;
            }
            (rgb, mask)
        })
        .collect();

    let mut rgb = Vec::with_capacity(3 * w * h);
    let mut mask = Vec::with_capacity(w * h);
    for (r, m) in rows {
        rgb.extend(r);
        mask.extend(m);
    }
    Rendered { width: cam.width, height: cam.height, rgb, mask }
}
