//! Image <-> tensor conversion. Tensors are `(3, H, W)` or `(B, 3, H, W)` in [-1, 1] (the
//! convention of the VAE) unless a function says otherwise.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::{Error, Result};

/// Reads an image file into a `(3, H, W)` f32 tensor in [-1, 1].
pub fn load_image(path: impl AsRef<Path>, device: &Device) -> Result<Tensor> {
    let path = path.as_ref();
    let img = image::open(path)
        .map_err(|e| Error::msg(format!("cannot read image {}: {e}", path.display())))?;
    rgb_to_tensor(&img.to_rgb8(), device)
}

/// `(3, H, W)` f32 tensor in [-1, 1] from an RGB image.
pub fn rgb_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
    let t = Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .contiguous()?;
    Ok(t.to_device(device)?)
}

/// RGB image from a `(3, H, W)` tensor in [-1, 1] (values are clamped, then rounded).
pub fn tensor_to_rgb(t: &Tensor) -> Result<RgbImage> {
    let dims = t.dims();
    if dims.len() != 3 || dims[0] != 3 {
        return Err(Error::msg(format!("tensor_to_rgb: expected shape (3, H, W), found {dims:?}")));
    }
    let (h, w) = (dims[1], dims[2]);
    let t =
        ((t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?;
    let t = t.permute((1, 2, 0))?.flatten_all()?.to_vec1::<f32>()?;
    let raw: Vec<u8> = t.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, raw)
        .ok_or_else(|| Error::msg("tensor_to_rgb: buffer size mismatch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip_is_exact_on_u8() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([(x * 50) as u8, (y * 60) as u8, 255]));
        let t = rgb_to_tensor(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 4, 5]);
        let back = tensor_to_rgb(&t).unwrap();
        assert_eq!(back, img);
    }
}
