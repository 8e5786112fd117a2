//! A small animated GIF (GIF89a) encoder: fixed 256-colour palette (6×6×6 colour cube plus a
//! 40-level grey ramp) with 4×4 ordered dithering, variable-width LZW, and the `NETSCAPE2.0`
//! block for looping. Written here to avoid a new dependency; checked against Pillow by
//! `scripts/validate_exports.sh`.

use std::path::Path;

use gen_core::{write_atomic, Error, Result};
use image::RgbImage;

/// Options of [`encode_gif`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GifConfig {
    /// Delay between frames in hundredths of a second.
    pub delay_cs: u16,
    /// Number of repetitions; 0 = loop forever.
    pub repeat: u16,
    /// Ordered dithering (smoother gradients, slightly noisier flat areas).
    pub dither: bool,
}

impl Default for GifConfig {
    fn default() -> Self {
        Self { delay_cs: 8, repeat: 0, dither: true }
    }
}

const GREYS: usize = 40;

/// The fixed palette as 256 RGB triples.
pub fn palette() -> Vec<[u8; 3]> {
    let mut p = Vec::with_capacity(256);
    for r in 0..6u32 {
        for g in 0..6u32 {
            for b in 0..6u32 {
                p.push([(r * 51) as u8, (g * 51) as u8, (b * 51) as u8]);
            }
        }
    }
    for i in 0..GREYS as u32 {
        let v = ((i * 255 + (GREYS as u32 - 1) / 2) / (GREYS as u32 - 1)) as u8;
        p.push([v, v, v]);
    }
    p
}

const BAYER4: [[f32; 4]; 4] =
    [[0.0, 8.0, 2.0, 10.0], [12.0, 4.0, 14.0, 6.0], [3.0, 11.0, 1.0, 9.0], [15.0, 7.0, 13.0, 5.0]];

/// Palette index of pixel `px` at `(x, y)`.
fn quantize(px: [u8; 3], x: u32, y: u32, dither: bool) -> u8 {
    let t = if dither { (BAYER4[(y % 4) as usize][(x % 4) as usize] + 0.5) / 16.0 } else { 0.5 };
    let (mx, mn) = (px.iter().max().copied().unwrap_or(0), px.iter().min().copied().unwrap_or(0));
    if mx - mn < 6 {
        let v = px.iter().map(|&c| c as f32).sum::<f32>() / 3.0;
        let level = (v / 255.0 * (GREYS - 1) as f32 + t).floor().clamp(0.0, (GREYS - 1) as f32);
        return 216 + level as u8;
    }
    let l = |c: u8| ((c as f32 / 51.0 + t).floor().clamp(0.0, 5.0)) as u8;
    l(px[0]) * 36 + l(px[1]) * 6 + l(px[2])
}

/// LSB-first bit packer.
struct BitWriter {
    out: Vec<u8>,
    acc: u32,
    nbits: u32,
}

impl BitWriter {
    fn put(&mut self, code: u16, width: u32) {
        self.acc |= (code as u32) << self.nbits;
        self.nbits += width;
        while self.nbits >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.nbits -= 8;
        }
    }
    fn finish(mut self) -> Vec<u8> {
        if self.nbits > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// GIF LZW with 8-bit minimum code size: returns the packed code stream (before sub-blocking).
pub fn lzw_encode(indices: &[u8]) -> Vec<u8> {
    const CLEAR: u16 = 256;
    const EOI: u16 = 257;
    const MAX_CODE: u16 = 4095;
    let mut w = BitWriter { out: Vec::new(), acc: 0, nbits: 0 };
    // dict[prefix * 256 + byte] = code + 1 (0 = absent).
    let mut dict = vec![0u16; 4096 * 256];
    let mut width = 9u32;
    let mut next: u16 = 258;
    w.put(CLEAR, width);
    let Some((&first, rest)) = indices.split_first() else {
        w.put(EOI, width);
        return w.finish();
    };
    let mut prefix = first as u16;
    for &byte in rest {
        let slot = prefix as usize * 256 + byte as usize;
        if dict[slot] != 0 {
            prefix = dict[slot] - 1;
            continue;
        }
        w.put(prefix, width);
        // The decoder adds its entry one code later; it widens when its next free code
        // reaches 2^width, which is the encoder's `next` before this insertion.
        if next >= (1 << width) && width < 12 {
            width += 1;
        }
        if next >= MAX_CODE {
            w.put(CLEAR, width);
            dict.iter_mut().for_each(|v| *v = 0);
            width = 9;
            next = 258;
        } else {
            dict[slot] = next + 1;
            next += 1;
        }
        prefix = byte as u16;
    }
    w.put(prefix, width);
    if next >= (1 << width) && width < 12 {
        width += 1;
    }
    w.put(EOI, width);
    w.finish()
}

/// Encodes `frames` (all the same size, at most 65535 px wide and high) as a looping GIF.
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
    let mut out = Vec::new();
    out.extend_from_slice(b"GIF89a");
    out.extend_from_slice(&(w as u16).to_le_bytes());
    out.extend_from_slice(&(h as u16).to_le_bytes());
    out.extend_from_slice(&[0xF7, 0, 0]); // global table of 256 colours, 8-bit resolution
    for c in palette() {
        out.extend_from_slice(&c);
    }
    out.extend_from_slice(&[0x21, 0xFF, 0x0B]);
    out.extend_from_slice(b"NETSCAPE2.0");
    out.extend_from_slice(&[0x03, 0x01]);
    out.extend_from_slice(&cfg.repeat.to_le_bytes());
    out.push(0);
    for f in frames {
        // Graphic control: disposal "do not dispose", no transparency.
        out.extend_from_slice(&[0x21, 0xF9, 0x04, 0x04]);
        out.extend_from_slice(&cfg.delay_cs.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.push(0x2C);
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&(w as u16).to_le_bytes());
        out.extend_from_slice(&(h as u16).to_le_bytes());
        out.push(0);
        let idx: Vec<u8> =
            f.enumerate_pixels().map(|(x, y, p)| quantize(p.0, x, y, cfg.dither)).collect();
        out.push(8);
        for block in lzw_encode(&idx).chunks(255) {
            out.push(block.len() as u8);
            out.extend_from_slice(block);
        }
        out.push(0);
    }
    out.push(0x3B);
    Ok(out)
}

/// Writes `frames` to `path` as an animated GIF (atomically).
pub fn write_gif(frames: &[RgbImage], path: impl AsRef<Path>, cfg: &GifConfig) -> Result<()> {
    let path = path.as_ref();
    let bytes =
        encode_gif(frames, cfg).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}
