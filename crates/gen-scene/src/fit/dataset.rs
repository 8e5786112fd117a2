//! Posed images from a folder with a `transforms.json` in the Blender / nerfstudio convention.
//!
//! Intrinsics: either `camera_angle_x` (horizontal field of view, radians; square pixels,
//! centred principal point) or `fl_x` (optionally `fl_y`, `cx`, `cy`, `w`, `h`), at the top level or per
//! frame. Frames: `file_path` (relative to the folder; a path without extension gets `.png`)
//! and `transform_matrix`, a 4×4 **camera-to-world** matrix in the **OpenGL** camera
//! convention (x right, y up, z backwards). It is converted to our OpenCV world-to-camera
//! extrinsics by flipping the camera's y and z axes and inverting: `R = (R_c2w · diag(1,−1,−1))ᵀ`,
//! `T = −R t_c2w`. Images with an alpha channel are composited over the background and the
//! alpha becomes the view's mask.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use gen_core::{Error, Result};
use glam::{DMat3, DVec3};
use serde_json::Value;

use super::PosedImage;
use crate::camera::{Camera, Intrinsics};

fn err(file: &Path, msg: impl std::fmt::Display) -> Error {
    Error::msg(format!("{}: {msg}", file.display()))
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// Reads `dir/transforms.json` (or the JSON file `path` itself) and its images; `background`
/// (sRGB in [0, 1]) is composited behind transparent pixels.
pub fn load_transforms(path: impl AsRef<Path>, background: [f64; 3]) -> Result<Vec<PosedImage>> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(Error::invalid(
            "dataset",
            format!(
                "{} does not exist (want a folder with transforms.json, or the JSON file)",
                path.display()
            ),
        ));
    }
    let json_path: PathBuf =
        if path.is_dir() { path.join("transforms.json") } else { path.to_path_buf() };
    let dir = json_path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
    let root: Value =
        serde_json::from_str(&text).map_err(|e| err(&json_path, format!("not valid JSON: {e}")))?;
    let frames = root
        .get("frames")
        .and_then(Value::as_array)
        .ok_or_else(|| err(&json_path, "missing `frames` array"))?;
    if frames.is_empty() {
        return Err(err(&json_path, "`frames` is empty"));
    }
    let mut out = Vec::with_capacity(frames.len());
    for (i, frame) in frames.iter().enumerate() {
        let at = |msg: String| err(&json_path, format!("frame {i}: {msg}"));
        let file = frame
            .get("file_path")
            .and_then(Value::as_str)
            .ok_or_else(|| at("missing `file_path`".into()))?;
        let mut img_path = dir.join(file);
        if img_path.extension().is_none() {
            img_path.set_extension("png");
        }
        if !img_path.is_file() {
            return Err(at(format!("image {} not found", img_path.display())));
        }
        let img = image::open(&img_path)
            .map_err(|e| at(format!("cannot read image {}: {e}", img_path.display())))?;
        let has_alpha = img.color().has_alpha();
        let rgba = img.to_rgba32f();
        let (w, h) = (rgba.width() as usize, rgba.height() as usize);
        let k = intrinsics(&root, frame, w, h).map_err(&at)?;
        let m = matrix(frame).map_err(&at)?;
        let camera = opengl_c2w_to_camera(&m, k).map_err(|e| at(format!("{e}")))?;
        let mut rgb = Vec::with_capacity(w * h * 3);
        let mut mask = Vec::with_capacity(w * h);
        for p in rgba.pixels() {
            let a = p[3] as f64;
            for c in 0..3 {
                rgb.push((p[c] as f64 * a + background[c] * (1.0 - a)) as f32);
            }
            mask.push(a as f32);
        }
        out.push(PosedImage {
            camera,
            rgb: Tensor::from_vec(rgb, (h, w, 3), &Device::Cpu)?,
            mask: if has_alpha {
                Some(Tensor::from_vec(mask, (h, w), &Device::Cpu)?)
            } else {
                None
            },
        });
    }
    Ok(out)
}

/// Intrinsics from the frame's or the file's fields, for an image of `w`×`h` pixels.
fn intrinsics(
    root: &Value,
    frame: &Value,
    w: usize,
    h: usize,
) -> std::result::Result<Intrinsics, String> {
    let get = |key: &str| num(frame, key).or_else(|| num(root, key));
    for (key, size) in [("w", w), ("h", h)] {
        if let Some(v) = get(key) {
            if (v - size as f64).abs() > 0.5 {
                return Err(format!("`{key}` = {v} but the image is {w}x{h}"));
            }
        }
    }
    let (fx, fy) = if let Some(fx) = get("fl_x") {
        (fx, get("fl_y").unwrap_or(fx))
    } else if let Some(ax) = get("camera_angle_x") {
        if !(ax > 0.0 && ax < std::f64::consts::PI) {
            return Err(format!("`camera_angle_x` = {ax} is not in (0, pi)"));
        }
        let f = 0.5 * w as f64 / (0.5 * ax).tan();
        (f, f)
    } else {
        return Err("missing intrinsics: need `camera_angle_x` or `fl_x`".into());
    };
    let k = Intrinsics {
        fx,
        fy,
        cx: get("cx").unwrap_or(0.5 * w as f64),
        cy: get("cy").unwrap_or(0.5 * h as f64),
        width: w,
        height: h,
    };
    k.validate().map_err(|e| e.to_string())?;
    Ok(k)
}

/// The frame's `transform_matrix` as rows.
fn matrix(frame: &Value) -> std::result::Result<[[f64; 4]; 4], String> {
    let rows = frame
        .get("transform_matrix")
        .ok_or("missing `transform_matrix`")?
        .as_array()
        .ok_or("`transform_matrix` is not an array")?;
    if rows.len() != 4 {
        return Err(format!("`transform_matrix` has {} rows, want 4", rows.len()));
    }
    let mut m = [[0.0; 4]; 4];
    for (r, row) in rows.iter().enumerate() {
        let row = row
            .as_array()
            .filter(|a| a.len() == 4)
            .ok_or_else(|| format!("`transform_matrix` row {r} is not 4 numbers"))?;
        for (c, v) in row.iter().enumerate() {
            m[r][c] = v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                format!("`transform_matrix`[{r}][{c}] = {v} is not a finite number")
            })?;
        }
    }
    Ok(m)
}

/// Our camera from an OpenGL camera-to-world matrix (rows) and intrinsics.
pub fn opengl_c2w_to_camera(m: &[[f64; 4]; 4], k: Intrinsics) -> Result<Camera> {
    // Columns of the c2w rotation are the camera axes in world coordinates; OpenCV's y and z
    // axes are OpenGL's negated.
    let right = DVec3::new(m[0][0], m[1][0], m[2][0]);
    let down = -DVec3::new(m[0][1], m[1][1], m[2][1]);
    let forward = -DVec3::new(m[0][2], m[1][2], m[2][2]);
    let centre = DVec3::new(m[0][3], m[1][3], m[2][3]);
    // World-to-camera rotation: rows right, down, forward (glam is column-major).
    let rotation = DMat3::from_cols(right, down, forward).transpose();
    let translation = -(rotation * centre);
    Camera::new(k, rotation, translation).map_err(|e| {
        Error::msg(format!("`transform_matrix` rotation block is not a rotation ({e})"))
    })
}

/// A camera from intrinsics and world-to-camera extrinsics given as plain arrays: `rotation`
/// rows (the camera's right, down and forward axes in world coordinates) and `translation`
/// (`t = R p + T`), OpenCV convention. For callers that do not use glam.
pub fn camera_from_extrinsics(
    k: Intrinsics,
    rotation: [[f64; 3]; 3],
    translation: [f64; 3],
) -> Result<Camera> {
    let [r0, r1, r2] = rotation.map(DVec3::from);
    Camera::new(k, DMat3::from_cols(r0, r1, r2).transpose(), DVec3::from(translation))
}

/// Splits `views` into training and held-out views: `min(holdout, n / 2)` frames evenly spaced
/// (frame `(j n + n / 2) / m mod n` for `j < m`) are held out, the rest train, both in order.
pub fn split_holdout(views: Vec<PosedImage>, holdout: usize) -> (Vec<PosedImage>, Vec<PosedImage>) {
    let n = views.len();
    let m = holdout.min(n / 2);
    let held: Vec<usize> = (0..m).map(|j| (j * n + n / 2) / m.max(1) % n).collect();
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    for (i, v) in views.into_iter().enumerate() {
        if held.contains(&i) {
            heldout.push(v);
        } else {
            train.push(v);
        }
    }
    (train, heldout)
}

/// Mean distance of the views' camera centres from the world origin (0 for no views).
pub fn mean_camera_distance(views: &[PosedImage]) -> f64 {
    views
        .iter()
        .map(|v| (v.camera.rotation.transpose() * v.camera.translation).length())
        .sum::<f64>()
        / views.len().max(1) as f64
}
