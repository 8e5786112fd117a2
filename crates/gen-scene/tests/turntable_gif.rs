//! Turntable cameras, rendering to a GIF and a contact sheet; the GIF is decoded with the
//! `image` crate (the encoder itself is tested in `export_gif.rs`).

use std::path::PathBuf;

use candle_core::{DType, Device};
use gen_core::SeededRng;
use gen_scene::splat::RandomSplatsConfig;
use gen_scene::turntable::{
    contact_sheet, orbit_cameras, write_turntable, Framing, TurntableConfig,
};
use gen_scene::Splats;
use glam::DVec3;
use image::codecs::gif::GifDecoder;
use image::{AnimationDecoder, Rgb};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-scene-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
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
    let dec = GifDecoder::new(std::io::Cursor::new(std::fs::read(&gif).unwrap())).unwrap();
    assert!(matches!(dec.loop_count(), image::metadata::LoopCount::Infinite));
    let dec = dec.into_frames().collect_frames().unwrap();
    assert_eq!(dec.len(), 5);
    assert!(dec.iter().all(|f| f.buffer().dimensions() == (32, 24)));
    let sheet = image::open(&png).unwrap().to_rgb8();
    // 5 frames → 3 columns × 2 rows with 2-pixel gaps.
    assert_eq!(sheet.dimensions(), (3 * 34 + 2, 2 * 26 + 2));
    assert_eq!(sheet.get_pixel(2 + 34 + 5, 2 + 26 + 7), frames[4].get_pixel(5, 7));
    assert_eq!(contact_sheet(&frames).unwrap(), sheet);
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
