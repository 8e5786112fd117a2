//! Behaviour of the world as a whole: determinism, splits, captions, silhouettes, masks,
//! lighting and colours, dataset writing.

use gen_world::palette::{hue_distance, rgb_to_hsv};
use gen_world::{
    parse_caption, write_dataset, Background, Colour, DatasetSpec, Hue, Rendered, Scene, Shape,
    Split, Tone, View, World, WorldConfig,
};

fn small_world(size: u32) -> World {
    World::new(WorldConfig { image_size: size, ..WorldConfig::default() }).unwrap()
}

fn scene(shape: Shape, az: f32, el: f32) -> Scene {
    Scene {
        shape,
        colour: Colour::new(Hue::Red, Tone::Plain),
        background: Background::Grey,
        azimuth_deg: az,
        elevation_deg: el,
    }
}

/// Soft intersection over union of two coverage masks.
fn iou(a: &Rendered, b: &Rendered) -> f32 {
    let inter: f32 = a.mask.iter().zip(&b.mask).map(|(x, y)| x.min(*y)).sum();
    let union: f32 = a.mask.iter().zip(&b.mask).map(|(x, y)| x.max(*y)).sum();
    inter / union
}

#[test]
fn same_index_gives_identical_bytes_other_index_differs() {
    let w = small_world(32);
    let a = w.sample(Split::Test, 17).unwrap();
    let b = w.sample(Split::Test, 17).unwrap();
    assert_eq!(a.image.to_rgb8().as_raw(), b.image.to_rgb8().as_raw());
    let bits = |r: &Rendered| r.rgb.iter().chain(&r.mask).map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.image), bits(&b.image));
    assert_eq!(a.caption, b.caption);
    let c = w.sample(Split::Test, 18).unwrap();
    assert_ne!(a.image.to_rgb8().as_raw(), c.image.to_rgb8().as_raw());
    // The scene does not depend on the image size (only the rendering does).
    assert_eq!(small_world(16).scene(Split::Test, 17).unwrap(), a.scene);
}

#[test]
fn splits_have_disjoint_seeds_and_different_scenes() {
    for (i, a) in Split::ALL.iter().enumerate() {
        for b in &Split::ALL[i + 1..] {
            let (ra, rb) = (
                a.seed_base()..a.seed_base() + gen_world::SPLIT_SIZE,
                b.seed_base()..b.seed_base() + gen_world::SPLIT_SIZE,
            );
            assert!(ra.end <= rb.start || rb.end <= ra.start, "{a} and {b} overlap");
        }
    }
    assert!(Split::Train.seed(gen_world::SPLIT_SIZE).is_err());
    let w = World::default();
    let scenes = |s: Split| (0..300).map(|i| w.scene(s, i).unwrap()).collect::<Vec<_>>();
    let (train, val, test) = (scenes(Split::Train), scenes(Split::Validation), scenes(Split::Test));
    for x in &train {
        assert!(!val.contains(x) && !test.contains(x));
    }
    for x in &val {
        assert!(!test.contains(x));
    }
    let e = "dev".parse::<Split>().unwrap_err().to_string();
    assert!(e.contains("train, validation, test"), "{e}");
}

#[test]
fn sampled_parameters_cover_their_ranges() {
    let w = World::default();
    let scenes: Vec<Scene> = (0..2000).map(|i| w.scene(Split::Train, i).unwrap()).collect();
    for s in Shape::ALL {
        let n = scenes.iter().filter(|x| x.shape == s).count();
        assert!((300..=500).contains(&n), "{s:?}: {n} of 2000");
    }
    assert_eq!(scenes.iter().map(|x| x.colour).collect::<std::collections::HashSet<_>>().len(), 24);
    assert_eq!(
        scenes.iter().map(|x| x.background).collect::<std::collections::HashSet<_>>().len(),
        4
    );
    for v in View::ALL {
        assert!(scenes.iter().filter(|x| x.view() == v).count() > 150, "{v:?} is rare");
    }
    assert!(scenes.iter().all(
        |x| (0.0..360.0).contains(&x.azimuth_deg) && (-10.0..=60.0).contains(&x.elevation_deg)
    ));
}

#[test]
fn captions_match_ground_truth_and_parse_back() {
    let w = World::default();
    for i in 0..300 {
        let sc = w.scene(Split::Validation, i).unwrap();
        let cap = sc.caption();
        let p = parse_caption(&cap).unwrap();
        assert_eq!(p.shape, sc.shape, "{cap}");
        assert_eq!(p.colour, Some(sc.colour), "{cap}");
        assert_eq!(p.background, Some(sc.background), "{cap}");
        assert_eq!(p.view, Some(View::from_angles(sc.azimuth_deg, sc.elevation_deg)), "{cap}");
        assert!(
            cap.contains(&format!(" {} ", sc.shape.name()))
                && cap.contains(&sc.colour.name())
                && cap.ends_with(" view"),
            "{cap}"
        );
    }
    let s = w.sample(Split::Validation, 3).unwrap();
    assert_eq!(s.caption, s.scene.caption());
}

#[test]
fn silhouettes_of_shapes_are_distinct() {
    let w = small_world(48);
    let cams =
        [(20.0, 30.0), (110.0, 5.0), (250.0, 50.0), (0.0, -10.0), (45.0, 60.0), (160.0, 20.0)];
    let mut worst = 0f32;
    for (az, el) in cams {
        let r: Vec<Rendered> = Shape::ALL.iter().map(|&s| w.render(&scene(s, az, el))).collect();
        for i in 0..r.len() {
            for j in i + 1..r.len() {
                let v = iou(&r[i], &r[j]);
                eprintln!(
                    "az {az} el {el}: {:?} vs {:?}: IoU {v:.3}",
                    Shape::ALL[i],
                    Shape::ALL[j]
                );
                worst = worst.max(v);
                assert!(
                    v < 0.8,
                    "az {az} el {el}: {:?} vs {:?} IoU {v}",
                    Shape::ALL[i],
                    Shape::ALL[j]
                );
            }
        }
    }
    eprintln!("worst IoU {worst}");
}

#[test]
fn torus_has_a_hole_seen_from_above_and_others_do_not() {
    let w = small_world(48);
    for s in Shape::ALL {
        let r = w.render(&scene(s, 30.0, 60.0));
        let centre = r.mask[24 * 48 + 24];
        if s == Shape::Torus {
            assert_eq!(centre, 0.0, "torus centre should show the background");
        } else {
            assert_eq!(centre, 1.0, "{s:?} centre should be object");
        }
    }
}

#[test]
fn mask_coverage_is_sane_and_matches_the_analytic_sphere_area() {
    let w = small_world(64);
    // Perspective silhouette of a sphere of radius r at distance d: a disk of radius
    // f r / sqrt(d² - r²) pixels.
    let r = w.render(&scene(Shape::Sphere, 77.0, 12.0));
    let cfg = w.config();
    let cam = w.camera(77.0, 12.0);
    let rad = gen_world::shapes::SPHERE_RADIUS;
    let rho = cam.focal_px() * rad / (cfg.camera_distance.powi(2) - rad * rad).sqrt();
    let expected = std::f32::consts::PI * rho * rho;
    let got = r.coverage();
    assert!(
        (got - expected).abs() / expected < 0.01,
        "sphere area {got} px vs analytic {expected}"
    );

    for i in 0..40 {
        let s = w.sample(Split::Train, i).unwrap();
        let m = &s.image.mask;
        assert!(m.iter().all(|v| (0.0..=1.0).contains(v)));
        let frac = s.image.coverage() / m.len() as f32;
        assert!((0.08..0.6).contains(&frac), "{}: coverage {frac}", s.caption);
        // Anti-aliasing: the silhouette has partially covered pixels; borders are background.
        assert!(m.iter().any(|&v| v > 0.0 && v < 1.0), "{}: no edge pixels", s.caption);
        let n = 64;
        for k in 0..n {
            for idx in [k, (n - 1) * n + k, k * n, k * n + n - 1] {
                assert_eq!(m[idx], 0.0, "{}: object touches the border", s.caption);
            }
        }
        // Pixels without object show exactly the background colour.
        let bg = s.scene.background.srgb8();
        let img = s.image.to_rgb8();
        for (p, &c) in img.pixels().zip(m) {
            if c == 0.0 {
                assert_eq!(p.0, bg);
            }
        }
    }
}

/// Horizontal offset (pixels) of the brightest object pixels (top 3 %, by luminance) from the
/// mask centroid: positive when the lit side is on the right of the image.
fn lit_side_offset(r: &Rendered) -> f32 {
    let mut px: Vec<(f32, f32)> = Vec::new(); // (luminance, x)
    for y in 0..r.height {
        for x in 0..r.width {
            if r.mask[(y * r.width + x) as usize] == 1.0 {
                let [pr, pg, pb] = r.pixel(x, y);
                px.push((0.2126 * pr + 0.7152 * pg + 0.0722 * pb, x as f32 + 0.5));
            }
        }
    }
    let centroid = px.iter().map(|p| p.1).sum::<f32>() / px.len() as f32;
    px.sort_by(|a, b| b.0.total_cmp(&a.0));
    let top = &px[..(px.len() * 3 / 100).max(3)];
    top.iter().map(|p| p.1).sum::<f32>() / top.len() as f32 - centroid
}

#[test]
fn light_is_fixed_in_the_world_frame() {
    // The default light comes from azimuth 35°: seen from azimuth 0 it is on the camera's
    // right (+Y is image right), seen from azimuth 180 on the left, from 35 straight on.
    let w = small_world(48);
    let front = lit_side_offset(&w.render(&scene(Shape::Sphere, 0.0, 0.0)));
    let back = lit_side_offset(&w.render(&scene(Shape::Sphere, 180.0, 0.0)));
    let facing = lit_side_offset(&w.render(&scene(Shape::Sphere, 35.0, 0.0)));
    eprintln!("lit-side offsets: front {front}, back {back}, facing light {facing}");
    assert!(front > 3.0, "front {front}");
    assert!(back < -3.0, "back {back}");
    assert!(facing.abs() < 1.0, "facing {facing}");
    // The object is brighter (in linear RGB) seen from the light's side than from the opposite side.
    let object_mean = |r: &Rendered| {
        let (mut sum, mut n) = (0.0, 0.0);
        for (k, &m) in r.mask.iter().enumerate() {
            if m == 1.0 {
                sum += r.rgb[3 * k..3 * k + 3]
                    .iter()
                    .map(|&v| gen_world::palette::srgb_to_linear(v))
                    .sum::<f32>();
                n += 3.0;
            }
        }
        sum / n
    };
    let lit = object_mean(&w.render(&scene(Shape::Sphere, 35.0, 0.0)));
    let unlit = object_mean(&w.render(&scene(Shape::Sphere, 215.0, 0.0)));
    eprintln!(
        "mean linear object value: seen from the light side {lit}, from the opposite side {unlit}"
    );
    assert!(lit > 1.5 * unlit, "{lit} vs {unlit}");
}

#[test]
fn brightest_object_pixels_have_the_named_albedo() {
    let w = small_world(32);
    for colour in Colour::all() {
        // A sphere seen from the light's direction: its brightest pixels face the light.
        let sc = Scene {
            shape: Shape::Sphere,
            colour,
            background: Background::Grey,
            azimuth_deg: 35.0,
            elevation_deg: 50.0,
        };
        let r = w.render(&sc);
        let mut px: Vec<[f32; 3]> = (0..r.height)
            .flat_map(|y| (0..r.width).map(move |x| (x, y)))
            .filter(|&(x, y)| r.mask[(y * r.width + x) as usize] == 1.0)
            .map(|(x, y)| r.pixel(x, y))
            .collect();
        px.sort_by(|a, b| b.iter().sum::<f32>().total_cmp(&a.iter().sum::<f32>()));
        let top = &px[..(px.len() / 20).max(3)];
        let mean = [0, 1, 2].map(|k| top.iter().map(|p| p[k]).sum::<f32>() / top.len() as f32);
        let albedo = colour.srgb();
        let (h_px, h_al) = (rgb_to_hsv(mean), rgb_to_hsv(albedo));
        assert!(
            hue_distance(h_px[0], h_al[0]) < 4.0,
            "{}: hue {} vs {}",
            colour.name(),
            h_px[0],
            h_al[0]
        );
        for k in 0..3 {
            assert!(
                (mean[k] - albedo[k]).abs() < 0.03,
                "{}: brightest {mean:?} vs albedo {albedo:?}",
                colour.name()
            );
        }
        // Nothing is brighter than the albedo (no clipping/over-exposure by the shading).
        assert!(px.iter().all(|p| (0..3).all(|k| p[k] <= albedo[k] + 1e-3)), "{}", colour.name());
    }
}

#[test]
fn bad_config_and_ranges_give_clear_errors() {
    let e = World::new(WorldConfig { image_size: 0, ..WorldConfig::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("image_size"), "{e}");
    let e = World::new(WorldConfig { supersample: 0, ..WorldConfig::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("supersample"), "{e}");
    let e = World::default().sample(Split::Train, u64::MAX).unwrap_err().to_string();
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn image_tensor_has_vae_layout() {
    let s = small_world(16).sample(Split::Train, 0).unwrap();
    let t = s.image.to_tensor(&candle_core::Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 16, 16]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // Channel 0, pixel (x 5, y 7) equals 2 r - 1.
    assert!((v[7 * 16 + 5] - (2.0 * s.image.pixel(5, 7)[0] - 1.0)).abs() < 1e-6);
}

#[test]
fn dataset_folder_is_complete_and_bad_outputs_fail_clearly() {
    let dir = std::env::temp_dir().join(format!("gen-world-dataset-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let w = small_world(24);
    let spec = DatasetSpec { split: Split::Test, start: 10, count: 5 };
    let seen = std::sync::atomic::AtomicU64::new(0);
    let sum = write_dataset(&w, &spec, &dir, &|n| {
        seen.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(seen.into_inner(), 5);
    let lines: Vec<gen_world::Record> = std::fs::read_to_string(dir.join("metadata.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines, sum.records);
    for (k, rec) in lines.iter().enumerate() {
        assert_eq!(rec.index, 10 + k as u64);
        let s = w.sample(Split::Test, rec.index).unwrap();
        assert_eq!(rec.caption, s.caption);
        let img = image::open(dir.join(&rec.image)).unwrap().to_rgb8();
        assert_eq!(img, s.image.to_rgb8(), "PNG must hold the exact rendered bytes");
        let mask = image::open(dir.join(&rec.mask)).unwrap().to_luma8();
        assert_eq!(mask, s.image.mask_to_luma8());
    }
    let sheet = image::open(dir.join("contact_sheet.png")).unwrap();
    assert_eq!((sheet.width(), sheet.height()), (3 * 26 + 2, 2 * 26 + 2));
    assert!(dir.join("world.json").exists());
    let vocab = std::fs::read_to_string(dir.join("vocabulary.txt")).unwrap();
    for rec in &lines {
        for tok in gen_world::tokenize(&rec.caption) {
            assert!(vocab.lines().any(|w| w == tok), "{tok:?} missing from vocabulary.txt");
        }
    }
    // No temporary files left behind.
    for sub in ["", "images", "masks"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            assert!(!e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
        }
    }

    let e = write_dataset(&w, &DatasetSpec { count: 0, ..spec }, &dir, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("count"), "{e}");
    let file = dir.join("metadata.jsonl");
    let e = write_dataset(&w, &spec, &file, &|_| {}).unwrap_err().to_string();
    assert!(e.contains("metadata.jsonl") && e.contains("not a folder"), "{e}");
    let e = write_dataset(&w, &spec, &file.join("sub"), &|_| {}).unwrap_err().to_string();
    assert!(e.contains("metadata.jsonl"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
