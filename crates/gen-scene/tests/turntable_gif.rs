//! Turntable cameras, rendering to a GIF and a contact sheet; the GIF is decoded here with a
//! separate LZW decoder (written from the GIF89a specification) to check every pixel.

use std::path::PathBuf;

use candle_core::{DType, Device};
use gen_core::SeededRng;
use gen_scene::export::gif::{encode_gif, lzw_encode, palette, GifConfig};
use gen_scene::splat::RandomSplatsConfig;
use gen_scene::turntable::{
    contact_sheet, orbit_cameras, write_turntable, Framing, TurntableConfig,
};
use gen_scene::Splats;
use glam::DVec3;
use image::{Rgb, RgbImage};

/// GIF LZW decoder (minimum code size 8).
fn lzw_decode(data: &[u8]) -> Vec<u8> {
    let (clear, eoi) = (256usize, 257usize);
    let mut table: Vec<Vec<u8>> = Vec::new();
    let reset = |t: &mut Vec<Vec<u8>>| {
        t.clear();
        t.extend((0..256).map(|i| vec![i as u8]));
        t.push(Vec::new());
        t.push(Vec::new());
    };
    reset(&mut table);
    let mut width = 9;
    let (mut bitpos, mut out, mut prev): (usize, Vec<u8>, Option<Vec<u8>>) = (0, Vec::new(), None);
    loop {
        let mut code = 0usize;
        for b in 0..width {
            let byte = data[(bitpos + b) / 8];
            code |= (((byte >> ((bitpos + b) % 8)) & 1) as usize) << b;
        }
        bitpos += width;
        if code == clear {
            reset(&mut table);
            width = 9;
            prev = None;
            continue;
        }
        if code == eoi {
            return out;
        }
        let entry = if code < table.len() {
            table[code].clone()
        } else {
            let p = prev.clone().expect("KwK code right after a clear");
            assert_eq!(code, table.len(), "code {code} past the table ({})", table.len());
            let mut e = p.clone();
            e.push(p[0]);
            e
        };
        out.extend_from_slice(&entry);
        if let Some(p) = prev {
            if table.len() < 4096 {
                let mut e = p;
                e.push(entry[0]);
                table.push(e);
            }
            if table.len() == 1 << width && width < 12 {
                width += 1;
            }
        }
        prev = Some(entry);
    }
}

/// (width, height, palette, loop count, per-frame (delay, indices)).
type DecodedGif = (u16, u16, Vec<u8>, Option<u16>, Vec<(u16, Vec<u8>)>);

/// Splits a GIF into (width, height, palette, loop count, per-frame (delay, indices)).
fn decode_gif(b: &[u8]) -> DecodedGif {
    assert_eq!(&b[0..6], b"GIF89a");
    let w = u16::from_le_bytes([b[6], b[7]]);
    let h = u16::from_le_bytes([b[8], b[9]]);
    assert_eq!(b[10] & 0x80, 0x80, "no global colour table");
    let size = 3 * (2usize << (b[10] & 7));
    let pal = b[13..13 + size].to_vec();
    let mut o = 13 + size;
    let (mut loops, mut frames, mut delay) = (None, Vec::new(), 0u16);
    let sub_blocks = |o: &mut usize| -> Vec<u8> {
        let mut data = Vec::new();
        loop {
            let n = b[*o] as usize;
            *o += 1;
            if n == 0 {
                return data;
            }
            data.extend_from_slice(&b[*o..*o + n]);
            *o += n;
        }
    };
    loop {
        match b[o] {
            0x21 => {
                let label = b[o + 1];
                o += 2;
                let data = sub_blocks(&mut o);
                if label == 0xFF && data.starts_with(b"NETSCAPE2.0") {
                    loops = Some(u16::from_le_bytes([data[12], data[13]]));
                } else if label == 0xF9 {
                    delay = u16::from_le_bytes([data[1], data[2]]);
                }
            }
            0x2C => {
                assert_eq!(u16::from_le_bytes([b[o + 5], b[o + 6]]), w);
                assert_eq!(u16::from_le_bytes([b[o + 7], b[o + 8]]), h);
                assert_eq!(b[o + 9] & 0x80, 0, "unexpected local colour table");
                o += 10;
                assert_eq!(b[o], 8, "LZW minimum code size");
                o += 1;
                let data = sub_blocks(&mut o);
                frames.push((delay, lzw_decode(&data)));
            }
            0x3B => {
                assert_eq!(o + 1, b.len(), "bytes after the trailer");
                return (w, h, pal, loops, frames);
            }
            other => panic!("unexpected block 0x{other:02x} at {o}"),
        }
    }
}

#[test]
fn lzw_round_trips_short_long_and_repetitive_data() {
    let mut rng = SeededRng::new(3);
    let cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![7],
        vec![0; 10_000],
        (0..20_000).map(|_| rng.below(256) as u8).collect(), // forces several table resets
        (0..30_000).map(|i| ((i / 7) % 5) as u8 * 40 + rng.below(3) as u8).collect(),
    ];
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(&lzw_decode(&lzw_encode(c)), c, "case {i}");
    }
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-scene-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn gif_pixels_are_the_nearest_palette_colours() {
    // Smooth gradient + flat grey: each decoded colour must be within one palette step.
    let img = RgbImage::from_fn(40, 24, |x, y| {
        if y < 12 {
            Rgb([(x * 6) as u8, (y * 20) as u8, 255 - (x * 6) as u8])
        } else {
            Rgb([100, 100, 100])
        }
    });
    let frames = vec![img.clone(), RgbImage::from_pixel(40, 24, Rgb([255, 0, 0]))];
    let cfg = GifConfig { delay_cs: 5, repeat: 0, dither: false };
    let bytes = encode_gif(&frames, &cfg).unwrap();
    let (w, h, pal, loops, dec) = decode_gif(&bytes);
    assert_eq!((w, h, loops, dec.len()), (40, 24, Some(0), 2));
    assert_eq!(pal.len(), 768);
    assert_eq!(pal.chunks(3).map(|c| [c[0], c[1], c[2]]).collect::<Vec<_>>(), palette());
    for (delay, idx) in &dec {
        assert_eq!(*delay, 5);
        assert_eq!(idx.len(), 40 * 24);
    }
    for (i, p) in img.pixels().enumerate() {
        let k = dec[0].1[i] as usize;
        for c in 0..3 {
            let err = (pal[3 * k + c] as i32 - p.0[c] as i32).abs();
            // Colour cube step 51 → nearest within 26; grey ramp step ~6.5.
            assert!(err <= 26, "pixel {i} channel {c}: {} vs {}", pal[3 * k + c], p.0[c]);
        }
    }
    assert!(dec[1].1.iter().all(|&k| pal[3 * k as usize..3 * k as usize + 3] == [255, 0, 0]));
    assert!(encode_gif(&[], &cfg).is_err());
    assert!(encode_gif(&[img, RgbImage::new(3, 3)], &cfg)
        .unwrap_err()
        .to_string()
        .contains("frame 1"));
}

#[test]
fn orbit_cameras_circle_the_centre_at_constant_distance() {
    let s = Splats::random(
        &RandomSplatsConfig { count: 10, ..Default::default() },
        &mut SeededRng::new(1),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let cfg = TurntableConfig {
        frames: 8,
        width: 40,
        height: 30,
        elevation_deg: 30.0,
        framing: Framing::Manual { center: [0.5, -0.2, 0.1], distance: 4.0 },
        ..Default::default()
    };
    let cams = orbit_cameras(&s, &cfg).unwrap();
    assert_eq!(cams.len(), 8);
    let c = DVec3::new(0.5, -0.2, 0.1);
    for cam in &cams {
        let d = cam.position() - c;
        assert!((d.length() - 4.0).abs() < 1e-9);
        // Elevation above the orbit plane (y up): sin(30°) · 4.
        assert!((d.y - 2.0).abs() < 1e-9);
        let (u, v, _) = cam.project(c).unwrap();
        assert!((u - 20.0).abs() < 1e-9 && (v - 15.0).abs() < 1e-9);
        // World up projects upwards in the image.
        let (_, v_up, _) = cam.project(c + DVec3::Y * 0.1).unwrap();
        assert!(v_up < 15.0);
    }
    // Opposite frames are opposite around the axis; consecutive ones 45° apart.
    let p = |i: usize| {
        let d = cams[i].position() - c;
        DVec3::new(d.x, 0.0, d.z).normalize()
    };
    assert!((p(0).dot(p(4)) + 1.0).abs() < 1e-9);
    assert!((p(0).dot(p(1)) - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-9);
    assert!(orbit_cameras(&s, &TurntableConfig { frames: 0, ..cfg }).is_err());
    assert!(orbit_cameras(&s, &TurntableConfig { up: [0.0; 3], ..cfg }).is_err());
}

#[test]
fn turntable_writes_a_looping_gif_and_a_contact_sheet() {
    let s = Splats::random(
        &RandomSplatsConfig {
            count: 60,
            extent: 0.5,
            log_scale_range: (-2.5, -1.8),
            logit_range: (1.0, 3.0),
            ..Default::default()
        },
        &mut SeededRng::new(9),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let cfg = TurntableConfig { frames: 5, width: 32, height: 24, ..Default::default() };
    let dir = tmp_dir("turntable");
    let (gif, png) = (dir.join("t.gif"), dir.join("t.png"));
    let frames = write_turntable(&s, &cfg, &gif, &png).unwrap();
    assert_eq!(frames.len(), 5);
    // The object is in view (auto framing): the centre differs from the white background,
    // and views from different sides differ.
    for f in &frames {
        let centre = f.get_pixel(16, 12);
        assert_ne!(centre, &Rgb([255, 255, 255]));
        assert_eq!(f.get_pixel(0, 0), &Rgb([255, 255, 255]), "object touches the corner");
    }
    assert_ne!(frames[0], frames[2]);
    let (w, h, _, loops, dec) = decode_gif(&std::fs::read(&gif).unwrap());
    assert_eq!((w, h, loops, dec.len()), (32, 24, Some(0), 5));
    let sheet = image::open(&png).unwrap().to_rgb8();
    // 5 frames → 3 columns × 2 rows with 2-pixel gaps.
    assert_eq!(sheet.dimensions(), (3 * 34 + 2, 2 * 26 + 2));
    assert_eq!(sheet.get_pixel(2 + 34 + 5, 2 + 26 + 7), frames[4].get_pixel(5, 7));
    assert_eq!(contact_sheet(&frames).unwrap(), sheet);
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
