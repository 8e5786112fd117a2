//! transforms.json (Blender / nerfstudio) loading on tiny folders written by the test:
//! intrinsics, the OpenGL camera-to-world → OpenCV world-to-camera conversion, alpha
//! compositing, and clear errors.

use std::path::{Path, PathBuf};

use anyhow::Result;
use gen_scene::fit::dataset::load_transforms;
use glam::DVec3;
use serde_json::json;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-fit-dataset-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("train")).unwrap();
    d
}

/// A 4×3 RGBA image: left column transparent, the rest opaque red; pixel (1, 0) half alpha.
fn write_rgba(path: &Path) {
    let mut img = image::RgbaImage::new(4, 3);
    for (x, _y, p) in img.enumerate_pixels_mut() {
        *p = if x == 0 { image::Rgba([0, 255, 0, 0]) } else { image::Rgba([255, 0, 0, 255]) };
    }
    img.put_pixel(1, 0, image::Rgba([255, 0, 0, 128]));
    img.save(path).unwrap();
}

/// OpenGL camera-to-world for a camera at `eye` looking at the origin with world +z up.
fn gl_c2w(eye: [f64; 3]) -> Vec<Vec<f64>> {
    let e = DVec3::from(eye);
    let back = e.normalize(); // OpenGL z axis points backwards
    let right = DVec3::Z.cross(back).normalize();
    let up = back.cross(right);
    vec![
        vec![right.x, up.x, back.x, e.x],
        vec![right.y, up.y, back.y, e.y],
        vec![right.z, up.z, back.z, e.z],
        vec![0.0, 0.0, 0.0, 1.0],
    ]
}

fn write_json(dir: &Path, v: &serde_json::Value) {
    std::fs::write(dir.join("transforms.json"), serde_json::to_string_pretty(v).unwrap()).unwrap();
}

#[test]
fn loads_cameras_and_composites_alpha() -> Result<()> {
    let dir = tmp_dir("ok");
    write_rgba(&dir.join("train/r_0.png"));
    write_rgba(&dir.join("train/r_1.png"));
    let angle_x = 0.8f64;
    write_json(
        &dir,
        &json!({
            "camera_angle_x": angle_x,
            "frames": [
                {"file_path": "./train/r_0", "transform_matrix": gl_c2w([4.0, 0.0, 0.0])},
                {"file_path": "train/r_1.png", "transform_matrix": gl_c2w([0.0, 3.0, 1.0])},
            ]
        }),
    );
    let views = load_transforms(&dir, [0.0, 0.0, 1.0])?;
    assert_eq!(views.len(), 2);
    let k = views[0].camera.intrinsics;
    let f = 2.0 / (0.5 * angle_x).tan();
    assert_eq!((k.width, k.height), (4, 3));
    assert!((k.fx - f).abs() < 1e-9 && (k.fy - f).abs() < 1e-9);
    assert!((k.cx - 2.0).abs() < 1e-12 && (k.cy - 1.5).abs() < 1e-12);
    // Camera 0 at +4x looking at the origin: the origin is straight ahead at depth 4, world
    // +z (up) appears up in the image (smaller v) and world +y appears to the right (looking
    // along -x with +z up, right = (-x) × z = +y; gen-world's front camera agrees).
    let cam = views[0].camera;
    let to_cam = |p: DVec3| cam.rotation * p + cam.translation;
    let o = to_cam(DVec3::ZERO);
    assert!(o.x.abs() < 1e-12 && o.y.abs() < 1e-12 && (o.z - 4.0).abs() < 1e-12, "{o}");
    let up = to_cam(DVec3::Z);
    assert!(up.y < -0.9, "world up must map to image up (OpenCV y down): {up}");
    let right = to_cam(DVec3::Y);
    assert!(right.x > 0.9, "{right}");
    // Camera 1: centre at (0, 3, 1).
    let c1 = &views[1].camera;
    let centre = -(c1.rotation.transpose() * c1.translation);
    assert!((centre - DVec3::new(0.0, 3.0, 1.0)).length() < 1e-9, "{centre}");
    // Pixels: transparent → background (blue), opaque → red, half → mix; mask = alpha.
    let rgb = views[0].rgb.to_vec3::<f32>()?;
    assert_eq!(rgb[0][0], vec![0.0, 0.0, 1.0]);
    assert_eq!(rgb[2][3], vec![1.0, 0.0, 0.0]);
    let a = 128.0 / 255.0;
    assert!((rgb[0][1][0] - a).abs() < 1e-6 && (rgb[0][1][2] - (1.0 - a)).abs() < 1e-6);
    let mask = views[0].mask.as_ref().expect("alpha gives a mask").to_vec2::<f32>()?;
    assert_eq!(mask[1][0], 0.0);
    assert_eq!(mask[1][1], 1.0);
    Ok(())
}

#[test]
fn nerfstudio_intrinsics_per_file() -> Result<()> {
    let dir = tmp_dir("ns");
    write_rgba(&dir.join("train/a.png"));
    write_json(
        &dir,
        &json!({
            "fl_x": 5.0, "fl_y": 6.0, "cx": 2.1, "cy": 1.4, "w": 4, "h": 3,
            "frames": [{"file_path": "train/a.png", "transform_matrix": gl_c2w([0.0, 5.0, 0.0])}]
        }),
    );
    let v = load_transforms(dir.join("transforms.json"), [1.0; 3])?;
    let k = v[0].camera.intrinsics;
    assert_eq!((k.fx, k.fy, k.cx, k.cy), (5.0, 6.0, 2.1, 1.4));
    Ok(())
}

fn load_err(name: &str, v: serde_json::Value, with_image: bool) -> String {
    let dir = tmp_dir(name);
    if with_image {
        write_rgba(&dir.join("train/r_0.png"));
    }
    write_json(&dir, &v);
    match load_transforms(&dir, [1.0; 3]) {
        Ok(_) => panic!("{name}: expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn clear_errors() {
    let good = gl_c2w([4.0, 0.0, 0.0]);
    let e = load_err(
        "missing-file",
        json!({"camera_angle_x": 0.8, "frames": [{"file_path": "train/nope", "transform_matrix": good}]}),
        true,
    );
    assert!(e.contains("frame 0") && e.contains("nope.png") && e.contains("not found"), "{e}");
    let e = load_err(
        "short-matrix",
        json!({"camera_angle_x": 0.8, "frames": [{"file_path": "train/r_0", "transform_matrix": [[1, 0, 0, 0]]}]}),
        true,
    );
    assert!(e.contains("transform_matrix") && e.contains("1 rows"), "{e}");
    let e = load_err(
        "scaled-matrix",
        json!({"camera_angle_x": 0.8, "frames": [{"file_path": "train/r_0",
               "transform_matrix": [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 1]]}]}),
        true,
    );
    assert!(e.contains("not a rotation"), "{e}");
    let e = load_err(
        "no-intrinsics",
        json!({"frames": [{"file_path": "train/r_0", "transform_matrix": good}]}),
        true,
    );
    assert!(e.contains("camera_angle_x") && e.contains("fl_x"), "{e}");
    let e = load_err("no-frames", json!({"camera_angle_x": 0.8}), true);
    assert!(e.contains("frames"), "{e}");
    let e = load_err(
        "no-path",
        json!({"camera_angle_x": 0.8, "frames": [{"transform_matrix": good}]}),
        true,
    );
    assert!(e.contains("file_path"), "{e}");
    let e = load_err(
        "size",
        json!({"camera_angle_x": 0.8, "w": 8, "frames": [{"file_path": "train/r_0", "transform_matrix": good}]}),
        true,
    );
    assert!(e.contains("`w` = 8"), "{e}");
    let dir = tmp_dir("absent");
    let e = load_transforms(&dir, [1.0; 3]).unwrap_err().to_string();
    assert!(e.contains("transforms.json"), "{e}");
}

/// Round trip: renders of a splat scene written as RGBA PNGs with OpenGL camera-to-world
/// matrices load back into cameras under which the same scene renders the same pixels.
#[test]
fn written_renders_round_trip_through_transforms_json() -> Result<()> {
    use candle_core::{DType, Device};
    use gen_core::SeededRng;
    use gen_scene::splat::{render, RandomSplatsConfig, RenderConfig, Splats};
    use gen_scene::{Camera, Intrinsics};
    let target = Splats::random(
        &RandomSplatsConfig {
            count: 10,
            extent: 0.5,
            log_scale_range: (-1.8, -1.3),
            logit_range: (1.0, 3.0),
            ..Default::default()
        },
        &mut SeededRng::new(4),
        DType::F32,
        &Device::Cpu,
    )?;
    let dir = tmp_dir("roundtrip");
    let k = Intrinsics::from_fov_y(0.8, 20, 16)?;
    let black = RenderConfig { background: [0.0; 3] };
    let mut frames = Vec::new();
    let mut cams = Vec::new();
    for i in 0..3 {
        let a = i as f64 * 2.0;
        let eye = DVec3::new(3.0 * a.cos(), 3.0 * a.sin(), 0.5 + i as f64 * 0.4);
        let cam = Camera::look_at(k, eye, DVec3::ZERO, DVec3::Z)?;
        let out = render(&target, &cam, &black)?;
        // Premultiplied colour on black → straight RGBA.
        let rgb = out.rgb.to_vec3::<f32>()?;
        let alpha = out.alpha.to_vec2::<f32>()?;
        let mut img = image::RgbaImage::new(20, 16);
        for (x, y, p) in img.enumerate_pixels_mut() {
            let a = alpha[y as usize][x as usize];
            let c = &rgb[y as usize][x as usize];
            let s = |v: f32| {
                ((if a > 0.0 { v / a } else { 0.0 }).clamp(0.0, 1.0) * 255.0).round() as u8
            };
            *p = image::Rgba([s(c[0]), s(c[1]), s(c[2]), (a * 255.0).round() as u8]);
        }
        img.save(dir.join(format!("train/f{i}.png")))?;
        let r = cam.rotation; // rows: right, down, forward
        let (right, down, fwd) = (r.row(0), r.row(1), r.row(2));
        let c = -(r.transpose() * cam.translation);
        frames.push(json!({
            "file_path": format!("train/f{i}"),
            "transform_matrix": [
                [right.x, -down.x, -fwd.x, c.x],
                [right.y, -down.y, -fwd.y, c.y],
                [right.z, -down.z, -fwd.z, c.z],
                [0.0, 0.0, 0.0, 1.0],
            ]
        }));
        cams.push(cam);
    }
    write_json(
        &dir,
        &json!({"fl_x": k.fx, "fl_y": k.fy, "cx": k.cx, "cy": k.cy, "w": 20, "h": 16, "frames": frames}),
    );
    let bg = [0.2, 0.5, 0.9];
    let views = load_transforms(&dir, bg)?;
    for (v, cam) in views.iter().zip(&cams) {
        assert!(v.camera.rotation.abs_diff_eq(cam.rotation, 1e-12));
        assert!((v.camera.translation - cam.translation).abs().max_element() < 1e-12);
        let again = render(&target, &v.camera, &RenderConfig { background: bg })?;
        let d = (again.rgb - &v.rgb)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // 8-bit quantisation of colour and alpha.
        assert!(d < 2.5 / 255.0, "render vs loaded image: max diff {d}");
        let m = (again.alpha - v.mask.as_ref().unwrap())?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(m <= 0.5 / 255.0 + 1e-6, "{m}");
    }
    Ok(())
}
