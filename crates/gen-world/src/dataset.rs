//! Writing a range of samples to a folder: PNG images and masks, a metadata JSONL file with the
//! ground truth and captions, a contact sheet and the world config. Every file is written
//! atomically.
//!
//! Layout of `out/`:
//! - `images/{split}_{index:08}.png` — RGB image; `masks/{split}_{index:08}.png` — coverage mask
//!   (8-bit grey, 255 = pixel fully covered by the object);
//! - `metadata.jsonl` — one [`Record`] per line, in index order;
//! - `contact_sheet.png` — the first (up to) 256 images in a grid;
//! - `world.json` — the [`WorldConfig`] and the range written;
//! - `vocabulary.txt` — every caption token, one per line ([`crate::vocabulary`]).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::world::{Sample, Split, World, WorldConfig};
use gen_core::{write_atomic, Error, Result};

/// Most images shown on a contact sheet.
pub const CONTACT_SHEET_MAX: usize = 256;

/// Which samples to write.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub split: Split,
    /// First index written.
    pub start: u64,
    /// Number of samples (≥ 1).
    pub count: u64,
}

/// One line of `metadata.jsonl`: the ground truth of a sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Image path relative to the output folder.
    pub image: String,
    /// Mask path relative to the output folder.
    pub mask: String,
    pub split: Split,
    pub index: u64,
    pub seed: u64,
    pub caption: String,
    pub shape: String,
    /// Colour phrase as in the caption ("light blue").
    pub colour: String,
    pub hue: String,
    pub tone: String,
    pub albedo_srgb8: [u8; 3],
    pub background: String,
    pub background_srgb8: [u8; 3],
    pub view: String,
    pub azimuth_deg: f32,
    pub elevation_deg: f32,
    /// Object area as a fraction of the image (mean of the coverage mask).
    pub coverage: f32,
}

impl Record {
    fn new(s: &Sample, image: String, mask: String) -> Self {
        let sc = &s.scene;
        let tone = match sc.colour.tone {
            crate::palette::Tone::Plain => "plain",
            t => t.name(),
        };
        Record {
            image,
            mask,
            split: s.split,
            index: s.index,
            seed: s.seed,
            caption: s.caption.clone(),
            shape: sc.shape.name().into(),
            colour: sc.colour.name(),
            hue: sc.colour.hue.name().into(),
            tone: tone.into(),
            albedo_srgb8: sc.colour.srgb8(),
            background: sc.background.name().into(),
            background_srgb8: sc.background.srgb8(),
            view: sc.view().name().into(),
            azimuth_deg: sc.azimuth_deg,
            elevation_deg: sc.elevation_deg,
            coverage: s.image.coverage() / s.image.mask.len() as f32,
        }
    }
}

/// What [`write_dataset`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSummary {
    pub records: Vec<Record>,
    pub metadata: PathBuf,
    pub contact_sheet: PathBuf,
    /// Total time spent rendering (summed over samples, all threads), seconds.
    pub render_seconds: f64,
    /// Wall-clock time of the whole write, seconds.
    pub wall_seconds: f64,
}

fn png_bytes(img: image::DynamicImage, what: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    img.write_to(&mut Cursor::new(&mut buf), image::ImageFormat::Png)
        .map_err(|e| Error::msg(format!("cannot encode PNG {}: {e}", what.display())))?;
    Ok(buf)
}

/// Creates `dir` (and parents) and checks that files can be written in it.
fn prepare_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::invalid(
            "output folder",
            format!("{} exists and is not a folder", dir.display()),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(format!(".gen-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| Error::io(dir, e))?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))
}

/// A grid of the images (row-major, `ceil(sqrt(n))` columns, 2-pixel dark gaps).
pub fn contact_sheet(images: &[image::RgbImage]) -> Result<image::RgbImage> {
    let first = images.first().ok_or_else(|| Error::invalid("contact sheet", "no images"))?;
    let (w, h) = first.dimensions();
    if let Some(bad) = images.iter().find(|i| i.dimensions() != (w, h)) {
        return Err(Error::invalid(
            "contact sheet",
            format!("images differ in size: {:?} vs {:?}", (w, h), bad.dimensions()),
        ));
    }
    let n = images.len() as u32;
    let cols = (n as f64).sqrt().ceil() as u32;
    let rows = n.div_ceil(cols);
    let gap = 2;
    let mut sheet = image::RgbImage::from_pixel(
        cols * (w + gap) + gap,
        rows * (h + gap) + gap,
        image::Rgb([16, 16, 16]),
    );
    for (k, img) in images.iter().enumerate() {
        let (c, r) = (k as u32 % cols, k as u32 / cols);
        image::imageops::replace(
            &mut sheet,
            img,
            (gap + c * (w + gap)) as i64,
            (gap + r * (h + gap)) as i64,
        );
    }
    Ok(sheet)
}

/// Renders and writes `spec`'s samples to `out` (layout in the module docs). `progress` is
/// called with the number of samples finished so far (from worker threads).
pub fn write_dataset(
    world: &World,
    spec: &DatasetSpec,
    out: &Path,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<DatasetSummary> {
    if spec.count == 0 {
        return Err(Error::invalid("count", "0 (must be at least 1)"));
    }
    let end = spec
        .start
        .checked_add(spec.count)
        .filter(|&e| e <= crate::world::SPLIT_SIZE)
        .ok_or_else(|| {
            Error::invalid(
                "sample range",
                format!("start {} + count {} exceeds the split size 2^40", spec.start, spec.count),
            )
        })?;
    let wall = Instant::now();
    prepare_dir(out)?;
    prepare_dir(&out.join("images"))?;
    prepare_dir(&out.join("masks"))?;

    let done = AtomicU64::new(0);
    let results: Vec<(Record, f64, Option<image::RgbImage>)> = (spec.start..end)
        .into_par_iter()
        .map(|index| -> Result<_> {
            let t0 = Instant::now();
            let sample = world.sample(spec.split, index)?;
            let render_s = t0.elapsed().as_secs_f64();
            let name = format!("{}_{index:08}.png", spec.split);
            let (image_rel, mask_rel) = (format!("images/{name}"), format!("masks/{name}"));
            let rgb = sample.image.to_rgb8();
            let image_path = out.join(&image_rel);
            write_atomic(&image_path, &png_bytes(rgb.clone().into(), &image_path)?)?;
            let mask_path = out.join(&mask_rel);
            write_atomic(&mask_path, &png_bytes(sample.image.mask_to_luma8().into(), &mask_path)?)?;
            let keep = ((index - spec.start) as usize) < CONTACT_SHEET_MAX;
            progress(done.fetch_add(1, Ordering::Relaxed) + 1);
            Ok((Record::new(&sample, image_rel, mask_rel), render_s, keep.then_some(rgb)))
        })
        .collect::<Result<_>>()?;

    let mut jsonl = String::new();
    let mut thumbs = Vec::new();
    let mut render_seconds = 0.0;
    let mut records = Vec::with_capacity(results.len());
    for (rec, secs, thumb) in results {
        jsonl.push_str(
            &serde_json::to_string(&rec).map_err(|e| Error::msg(format!("metadata: {e}")))?,
        );
        jsonl.push('\n');
        render_seconds += secs;
        thumbs.extend(thumb);
        records.push(rec);
    }
    let metadata = out.join("metadata.jsonl");
    write_atomic(&metadata, jsonl.as_bytes())?;
    let contact = out.join("contact_sheet.png");
    write_atomic(&contact, &png_bytes(contact_sheet(&thumbs)?.into(), &contact)?)?;
    #[derive(Serialize)]
    struct RunInfo<'a> {
        world: &'a WorldConfig,
        dataset: &'a DatasetSpec,
    }
    let info = serde_json::to_string_pretty(&RunInfo { world: world.config(), dataset: spec })
        .map_err(|e| Error::msg(format!("world.json: {e}")))?;
    write_atomic(out.join("world.json"), info.as_bytes())?;
    let mut vocab = crate::caption::vocabulary().join("\n");
    vocab.push('\n');
    write_atomic(out.join("vocabulary.txt"), vocab.as_bytes())?;
    Ok(DatasetSummary {
        records,
        metadata,
        contact_sheet: contact,
        render_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
    })
}
