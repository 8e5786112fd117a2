//! The animated GIF encoder, checked by decoding its output with the `image` crate's GIF
//! decoder: frame count, size, delay, loop count and the colour error against the input.

use gen_scene::export::gif::{encode_gif, write_gif, GifConfig};
use image::codecs::gif::GifDecoder;
use image::metadata::LoopCount;
use image::{AnimationDecoder, Delay, Rgb, RgbImage};

/// Decodes a GIF into (loop count, per-frame (delay, RGB image)).
fn decode(bytes: &[u8]) -> (LoopCount, Vec<(Delay, RgbImage)>) {
    let d = GifDecoder::new(std::io::Cursor::new(bytes)).unwrap();
    let loops = d.loop_count();
    let frames = d.into_frames().collect_frames().unwrap();
    let frames = frames
        .into_iter()
        .map(|f| {
            assert_eq!((f.left(), f.top()), (0, 0));
            (f.delay(), image::DynamicImage::ImageRgba8(f.into_buffer()).to_rgb8())
        })
        .collect();
    (loops, frames)
}

/// Mean and largest absolute channel difference.
fn colour_error(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
    assert_eq!(a.dimensions(), b.dimensions());
    let d: Vec<u8> = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as i32 - y as i32).unsigned_abs() as u8)
        .collect();
    (d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64, *d.iter().max().unwrap())
}

/// The NETSCAPE2.0 application block's loop count, read from the bytes.
fn netscape_loops(bytes: &[u8]) -> Option<u16> {
    let at = bytes.windows(11).position(|w| w == b"NETSCAPE2.0")?;
    let b = &bytes[at + 11..at + 15];
    assert_eq!(&b[0..2], &[3, 1], "NETSCAPE sub-block");
    Some(u16::from_le_bytes([b[2], b[3]]))
}

fn gradient(w: u32, h: u32, shift: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        if y < h / 2 {
            Rgb([
                (x * 255 / (w - 1)) as u8,
                ((y * 2 * 255) / h) as u8,
                (255 - x * 255 / w + shift) as u8,
            ])
        } else {
            Rgb([100, 100, 100])
        }
    })
}

#[test]
fn gif_frames_decode_close_to_the_input() {
    let frames = vec![
        gradient(40, 24, 0),
        RgbImage::from_pixel(40, 24, Rgb([255, 0, 0])),
        gradient(40, 24, 30),
    ];
    let cfg = GifConfig { delay_cs: 5, repeat: 0, ..Default::default() };
    let bytes = encode_gif(&frames, &cfg).unwrap();
    assert_eq!(&bytes[0..6], b"GIF89a");
    assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), 40);
    assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 24);
    assert_eq!(netscape_loops(&bytes), Some(0), "loop forever");
    let (loops, dec) = decode(&bytes);
    assert!(matches!(loops, LoopCount::Infinite));
    assert_eq!(dec.len(), 3);
    for ((delay, img), src) in dec.iter().zip(&frames) {
        assert_eq!(delay.numer_denom_ms(), (50, 1));
        assert_eq!(img.dimensions(), (40, 24));
        let (mean, max) = colour_error(img, src);
        // NeuQuant builds a 256-colour palette per frame; with the default speed 1 these
        // frames measured mean 4.7–5.1 and max 40–46 (a fixed 6×6×6 cube would allow up to 25
        // everywhere but averages far worse on smooth content).
        assert!(mean <= 8.0 && max <= 64, "colour error mean {mean:.2}, max {max}");
    }
    // A flat frame and the flat half of the gradients come back exactly.
    assert!(dec[1].1.pixels().all(|p| *p == Rgb([255, 0, 0])));
    assert_eq!(dec[0].1.get_pixel(7, 20), &Rgb([100, 100, 100]));

    // A finite repeat count is written as such.
    let bytes = encode_gif(&frames[..1], &GifConfig { repeat: 3, ..cfg }).unwrap();
    assert_eq!(netscape_loops(&bytes), Some(3));
    assert!(matches!(decode(&bytes).0, LoopCount::Finite(n) if n.get() == 3));
}

#[test]
fn bad_gif_inputs_are_refused() {
    let cfg = GifConfig::default();
    let img = gradient(40, 24, 0);
    assert!(encode_gif(&[], &cfg).unwrap_err().to_string().contains("no frames"));
    let e = encode_gif(&[img.clone(), RgbImage::new(3, 3)], &cfg).unwrap_err().to_string();
    assert!(e.contains("frame 1"), "{e}");
    let e = encode_gif(&[RgbImage::new(70_000, 1)], &cfg).unwrap_err().to_string();
    assert!(e.contains("70000x1"), "{e}");
    let e = encode_gif(std::slice::from_ref(&img), &GifConfig { speed: 0, ..cfg })
        .unwrap_err()
        .to_string();
    assert!(e.contains("speed"), "{e}");
    let dir = std::env::temp_dir().join(format!("gen-scene-gif-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = write_gif(&[], dir.join("e.gif"), &cfg).unwrap_err().to_string();
    assert!(e.contains("e.gif"), "{e}");
    assert!(!dir.join("e.gif").exists());
    write_gif(&[img], dir.join("ok.gif"), &cfg).unwrap();
    assert_eq!(decode(&std::fs::read(dir.join("ok.gif")).unwrap()).1.len(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
