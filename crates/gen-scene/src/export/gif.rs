//! Animated GIF (GIF89a) export through the `image` crate's GIF encoder
//! (`image::codecs::gif::GifEncoder`, which uses the `gif` crate): each frame gets its own
//! 256-colour palette from NeuQuant colour quantisation, frames are LZW-compressed by the
//! `gif` crate, and the `NETSCAPE2.0` block sets the loop count.

use std::path::Path;

use gen_core::{write_atomic, Error, Result};
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, DynamicImage, Frame, RgbImage};

/// Options of [`encode_gif`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GifConfig {
    /// Delay between frames in hundredths of a second.
    pub delay_cs: u16,
    /// Number of repetitions; 0 = loop forever.
    pub repeat: u16,
    /// NeuQuant sampling speed in `1..=30`: 1 (the default) learns each frame's palette from
    /// every pixel (closest colours, slowest); higher values learn from a sample, faster but
    /// with larger colour errors, worst on small frames and rare colours.
    pub speed: i32,
}

impl Default for GifConfig {
    fn default() -> Self {
        Self { delay_cs: 8, repeat: 0, speed: 1 }
    }
}

/// Encodes `frames` (all the same size, at most 65535 px wide and high) as an animated GIF.
pub fn encode_gif(frames: &[RgbImage], cfg: &GifConfig) -> Result<Vec<u8>> {
    let first =
        frames.first().ok_or_else(|| Error::invalid("GIF frames", "no frames to encode"))?;
    let (w, h) = first.dimensions();
    if w == 0 || h == 0 || w > 65535 || h > 65535 {
        return Err(Error::invalid("GIF frames", format!("frame size {w}x{h} (1..=65535)")));
    }
    if let Some(i) = frames.iter().position(|f| f.dimensions() != (w, h)) {
        return Err(Error::invalid(
            "GIF frames",
            format!("frame {i} is {:?}, frame 0 is {w}x{h}", frames[i].dimensions()),
        ));
    }
    if !(1..=30).contains(&cfg.speed) {
        return Err(Error::invalid("GIF speed", format!("{} (want 1..=30)", cfg.speed)));
    }
    let enc_err = |e: image::ImageError| Error::msg(format!("GIF encoding failed: {e}"));
    let delay = Delay::from_numer_denom_ms(u32::from(cfg.delay_cs) * 10, 1);
    let mut out = Vec::new();
    {
        let mut enc = GifEncoder::new_with_speed(&mut out, cfg.speed);
        let repeat = if cfg.repeat == 0 { Repeat::Infinite } else { Repeat::Finite(cfg.repeat) };
        enc.set_repeat(repeat).map_err(enc_err)?;
        for f in frames {
            let rgba = DynamicImage::ImageRgb8(f.clone()).into_rgba8();
            enc.encode_frame(Frame::from_parts(rgba, 0, 0, delay)).map_err(enc_err)?;
        }
        // Dropping the encoder writes the GIF trailer.
    }
    Ok(out)
}

/// Writes `frames` to `path` as an animated GIF (atomically).
pub fn write_gif(frames: &[RgbImage], path: impl AsRef<Path>, cfg: &GifConfig) -> Result<()> {
    let path = path.as_ref();
    let bytes =
        encode_gif(frames, cfg).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}
