//! `gen dataset`: writes samples of the shapes world to a folder.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use gen_world::{write_dataset, DatasetSpec, Split, World, WorldConfig};
use indicatif::{ProgressBar, ProgressStyle};

use super::flags::{at_least_one, whole_u64};

/// Bytes kept per sample until the metadata is written (its record, metadata line and timing).
const BYTES_PER_RECORD: f64 = 1024.0;

/// Refuses a `--count` × `--size` whose memory estimate exceeds what the machine has: every
/// sample's record is kept until metadata.jsonl is written, the first 256 images for the
/// contact sheet, and each worker thread renders one supersampled image (f32 RGBA and
/// coverage) and its PNGs at a time.
fn check_memory(args: &DatasetArgs, supersample: u32) -> anyhow::Result<()> {
    let px = (args.size as f64).powi(2);
    let records = args.count as f64 * BYTES_PER_RECORD;
    let sheet = (args.count.min(256) as f64) * px * 3.0 * 2.0;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let render = threads * px * (supersample as f64).powi(2) * 4.0 * 5.0 + threads * px * 8.0;
    gen_core::memory::check_fits_here(
        &format!("--count {} --size {}", args.count, args.size),
        records + sheet + render,
        &format!(
            "estimate: {} for the sample records, {} for the contact sheet and the renders",
            gen_core::memory::format_bytes(records),
            gen_core::memory::format_bytes(sheet + render)
        ),
    )?;
    Ok(())
}

const EXAMPLES: &str = "\
Writes OUT/images/*.png, OUT/masks/*.png (object coverage), OUT/metadata.jsonl (caption, shape,
colour, background, view, camera angles, coverage per sample), OUT/contact_sheet.png,
OUT/world.json (the world's settings) and OUT/vocabulary.txt (every caption token). Samples are a
pure function of (split, index): the same command always writes the same bytes.

Examples:
  gen dataset --split test --count 64 --out out/test64
  gen dataset --split train --start 1000 --count 500 --out out/train --size 128";

/// Render samples of the procedural shapes world.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct DatasetArgs {
    /// Split: train, validation or test (disjoint seed ranges).
    #[arg(long, value_parser = parse_split)]
    pub split: Split,
    /// Number of samples to write (at least 1).
    #[arg(long, allow_negative_numbers = true, value_parser = at_least_one)]
    pub count: usize,
    /// First sample index (a whole number >= 0).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true, value_parser = whole_u64)]
    pub start: u64,
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Image width and height in pixels.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(8..=1024))]
    pub size: u32,
}

fn parse_split(s: &str) -> Result<Split, String> {
    s.parse().map_err(|e: gen_core::Error| e.to_string())
}

pub fn run(args: DatasetArgs) -> anyhow::Result<()> {
    let world = World::new(WorldConfig { image_size: args.size, ..WorldConfig::default() })?;
    check_memory(&args, WorldConfig::default().supersample)?;
    let spec = DatasetSpec { split: args.split, start: args.start, count: args.count as u64 };
    let bar = ProgressBar::new(args.count as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} samples ({elapsed}, eta {eta})")
            .expect("valid template"),
    );
    let summary =
        write_dataset(&world, &spec, &args.out, &|n| bar.set_position(n)).with_context(|| {
            format!(
                "writing {} samples of split {} to {}",
                args.count,
                args.split,
                args.out.display()
            )
        })?;
    bar.finish_and_clear();
    let n = summary.records.len() as f64;
    println!(
        "wrote {} samples ({}x{}) to {} in {:.2} s; {:.2} ms per render (summed over threads)",
        summary.records.len(),
        args.size,
        args.size,
        args.out.display(),
        summary.wall_seconds,
        1e3 * summary.render_seconds / n
    );
    println!("metadata: {}", summary.metadata.display());
    println!("contact sheet: {}", summary.contact_sheet.display());
    Ok(())
}
