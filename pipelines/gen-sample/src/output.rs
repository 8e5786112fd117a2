//! Writing generated images: PNG files with the prompt, seed and full settings in text
//! chunks, written atomically, plus a grid and the config JSON.
//!
//! Layout chosen by [`save_outputs`] from the output path:
//! - `out.png` and one image: `out.png`.
//! - `out.png` and N > 1 images: the grid `out.png` (columns = ceil(sqrt(N))) and the images
//!   `out-000.png`, `out-001.png`, … beside it.
//! - any other path (no extension, or an existing folder): a folder with `image-000.png`, …,
//!   `grid.png` when N > 1, and `config.json` (the full resolved [`SampleConfig`]).
//!
//! Every image carries tEXt chunks (iTXt where a value is not Latin-1): `prompt`,
//! `negative_prompt`, `seed`, `image_index` (the random stream of the image), `sampler`,
//! `steps`, `guidance`, `size`, `model`, `parameters` (the config as JSON) and `Software`.

use std::io::Write;
use std::path::{Path, PathBuf};

use gen_core::{AtomicFile, Error, Result, StagedFiles};
use image::RgbImage;

use crate::config::SampleConfig;

/// PNG bytes of `img` with `text` as text chunks (tEXt when Latin-1, else iTXt).
pub fn encode_png(img: &RgbImage, text: &[(String, String)]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            let latin1 = v.chars().all(|c| (c as u32) < 256) && k.chars().all(|c| (c as u32) < 256);
            let r = if latin1 {
                enc.add_text_chunk(k.clone(), v.clone())
            } else {
                enc.add_itxt_chunk(k.clone(), v.clone())
            };
            r.map_err(|e| Error::msg(format!("PNG text chunk `{k}`: {e}")))?;
        }
        let mut w = enc.write_header().map_err(|e| Error::msg(format!("PNG header: {e}")))?;
        w.write_image_data(img.as_raw()).map_err(|e| Error::msg(format!("PNG data: {e}")))?;
        w.finish().map_err(|e| Error::msg(format!("PNG end: {e}")))?;
    }
    Ok(bytes)
}

/// Writes `img` with `text` chunks to `path` atomically.
pub fn save_png(path: &Path, img: &RgbImage, text: &[(String, String)]) -> Result<()> {
    let bytes = encode_png(img, text)?;
    let mut f = AtomicFile::create(path)?;
    f.write_all(&bytes).map_err(|e| Error::io(f.tmp_path(), e))?;
    f.commit()
}

/// The text chunks (tEXt, zTXt and iTXt, in that order) of a PNG file.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = dec
        .read_info()
        .map_err(|e| Error::msg(format!("{}: not a readable PNG: {e}", path.display())))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|c| (c.keyword.clone(), c.text.clone())).collect();
    for c in &info.compressed_latin1_text {
        out.push((
            c.keyword.clone(),
            c.get_text().map_err(|e| {
                Error::msg(format!("{}: zTXt `{}`: {e}", path.display(), c.keyword))
            })?,
        ));
    }
    for c in &info.utf8_text {
        out.push((
            c.keyword.clone(),
            c.get_text().map_err(|e| {
                Error::msg(format!("{}: iTXt `{}`: {e}", path.display(), c.keyword))
            })?,
        ));
    }
    Ok(out)
}

/// The images side by side in rows of `ceil(sqrt(N))`, with a 2-pixel black gap.
pub fn image_grid(images: &[RgbImage]) -> Result<RgbImage> {
    let first = images.first().ok_or_else(|| Error::invalid("image grid", "no images"))?;
    let (w, h) = first.dimensions();
    if images.iter().any(|i| i.dimensions() != (w, h)) {
        return Err(Error::invalid("image grid", "images of different sizes"));
    }
    let n = images.len() as u32;
    let cols = (n as f64).sqrt().ceil() as u32;
    let rows = n.div_ceil(cols);
    const GAP: u32 = 2;
    let mut grid = RgbImage::new(cols * w + (cols - 1) * GAP, rows * h + (rows - 1) * GAP);
    for (i, img) in images.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(&mut grid, img, (c * (w + GAP)) as i64, (r * (h + GAP)) as i64);
    }
    Ok(grid)
}

/// The text chunks of image `index` (`None`: the grid).
pub fn png_metadata(cfg: &SampleConfig, index: Option<usize>) -> Result<Vec<(String, String)>> {
    let guidance = serde_json::to_string(&cfg.guidance)
        .map_err(|e| Error::msg(format!("guidance to JSON: {e}")))?;
    let (w, h) = cfg.resolved_size()?;
    let prompt = match index {
        Some(i) => cfg.prompt_for(i).to_string(),
        None => cfg.prompts.join(" | "),
    };
    let mut t = vec![
        ("prompt".to_string(), prompt),
        ("negative_prompt".to_string(), cfg.negative_prompt.clone()),
        ("seed".to_string(), cfg.seed.to_string()),
    ];
    match index {
        Some(i) => t.push(("image_index".to_string(), i.to_string())),
        None => t.push(("images".to_string(), cfg.num_images.to_string())),
    }
    t.extend([
        ("sampler".to_string(), cfg.sampler.name().to_string()),
        ("steps".to_string(), cfg.steps.to_string()),
        ("guidance".to_string(), guidance),
        ("size".to_string(), format!("{w}x{h}")),
        ("model".to_string(), cfg.model.clone().unwrap_or_default()),
        ("parameters".to_string(), pixel_parameters(cfg)?),
        ("Software".to_string(), format!("gen-sample {}", env!("CARGO_PKG_VERSION"))),
    ]);
    Ok(t)
}

/// The sampling config as JSON without the settings that do not change the pixels (the batch
/// size: generation is batch-invariant), so an image's bytes depend only on what shaped it.
/// `config.json` keeps the whole config.
fn pixel_parameters(cfg: &SampleConfig) -> Result<String> {
    let mut v =
        serde_json::to_value(cfg).map_err(|e| Error::msg(format!("config to JSON: {e}")))?;
    if let Some(map) = v.as_object_mut() {
        map.remove("batch_size");
    }
    serde_json::to_string(&v).map_err(|e| Error::msg(format!("config to JSON: {e}")))
}

/// What [`save_outputs`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedOutputs {
    /// One file per image, in image order.
    pub images: Vec<PathBuf>,
    /// The grid, when more than one image was written.
    pub grid: Option<PathBuf>,
    /// `config.json`, in folder mode.
    pub config: Option<PathBuf>,
}

/// Where [`save_outputs`] will write `n` images for `out` (see the module docs). Errors for an
/// output file whose extension is not `.png`, and for a planned file that exists as a folder.
pub fn plan_outputs(out: &Path, n: usize) -> Result<SavedOutputs> {
    let plan = plan_paths(out, n)?;
    let mut files = plan.images.iter().chain(&plan.grid).chain(&plan.config);
    if let Some(folder) = files.find(|p| p.is_dir()) {
        return Err(Error::invalid(
            "output path",
            format!("{} is a folder, not a file", folder.display()),
        ));
    }
    Ok(plan)
}

fn plan_paths(out: &Path, n: usize) -> Result<SavedOutputs> {
    let ext = out.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") if !out.is_dir() => {
            if n == 1 {
                return Ok(SavedOutputs {
                    images: vec![out.to_path_buf()],
                    grid: None,
                    config: None,
                });
            }
            let stem = out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
            let dir = out.parent().unwrap_or(Path::new(""));
            let images = (0..n).map(|i| dir.join(format!("{stem}-{i:03}.png"))).collect();
            Ok(SavedOutputs { images, grid: Some(out.to_path_buf()), config: None })
        }
        Some(e) if !out.is_dir() => Err(Error::invalid(
            "output path",
            format!(
                "{}: unsupported extension `.{e}` (give a .png file or a folder)",
                out.display()
            ),
        )),
        _ => {
            let images = (0..n).map(|i| out.join(format!("image-{i:03}.png"))).collect();
            let grid = (n > 1).then(|| out.join("grid.png"));
            Ok(SavedOutputs { images, grid, config: Some(out.join("config.json")) })
        }
    }
}

/// Writes `images` (generated with the resolved `cfg`) to `out`, all files or none: they are
/// staged under temporary names and renamed together at the end.
pub fn save_outputs(out: &Path, images: &[RgbImage], cfg: &SampleConfig) -> Result<SavedOutputs> {
    if images.is_empty() {
        return Err(Error::invalid("outputs", "no images to save"));
    }
    let plan = plan_outputs(out, images.len())?;
    let mut staged = StagedFiles::new();
    for (i, (img, path)) in images.iter().zip(&plan.images).enumerate() {
        staged.add(path, &encode_png(img, &png_metadata(cfg, Some(i))?)?)?;
    }
    if let Some(g) = &plan.grid {
        staged.add(g, &encode_png(&image_grid(images)?, &png_metadata(cfg, None)?)?)?;
    }
    if let Some(c) = &plan.config {
        staged.add(c, cfg.to_json()?.as_bytes())?;
    }
    staged.commit()?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chunks_round_trip_latin1_and_utf8() {
        let dir = std::env::temp_dir().join(format!("gen-sample-png-{}", std::process::id()));
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 80, y as u8 * 100, 7]));
        let text = vec![
            ("prompt".to_string(), "a red cube".to_string()),
            ("note".to_string(), "ein Würfel → 立方体".to_string()),
        ];
        let path = dir.join("t.png");
        save_png(&path, &img, &text).unwrap();
        assert_eq!(read_png_text(&path).unwrap(), text);
        assert_eq!(image::open(&path).unwrap().to_rgb8(), img);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_plans() {
        let p = plan_outputs(Path::new("x/out.png"), 1).unwrap();
        assert_eq!(p.images, vec![PathBuf::from("x/out.png")]);
        let p = plan_outputs(Path::new("x/out.PNG"), 2).unwrap();
        assert_eq!(p.images, vec![PathBuf::from("x/out-000.png"), PathBuf::from("x/out-001.png")]);
        assert_eq!(p.grid, Some(PathBuf::from("x/out.PNG")));
        let p = plan_outputs(Path::new("x/run"), 2).unwrap();
        assert_eq!(p.images[1], PathBuf::from("x/run/image-001.png"));
        assert_eq!(p.config, Some(PathBuf::from("x/run/config.json")));
        assert!(plan_outputs(Path::new("x/out.jpg"), 1).unwrap_err().to_string().contains(".jpg"));
    }

    #[test]
    fn grid_places_images() {
        let imgs: Vec<RgbImage> =
            (0..3).map(|i| RgbImage::from_pixel(2, 2, image::Rgb([i * 100, 0, 0]))).collect();
        let g = image_grid(&imgs).unwrap();
        assert_eq!(g.dimensions(), (6, 6));
        assert_eq!(g.get_pixel(4, 0)[0], 100);
        assert_eq!(g.get_pixel(0, 4)[0], 200);
        assert_eq!(g.get_pixel(2, 0)[0], 0);
    }
}
