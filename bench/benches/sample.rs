//! `gen image` speed on the shipped tiny model (weights/tiny-shapes): seconds per 64×64 image,
//! end to end (text encoding + sampling + VAE decode to 8-bit images; model loading timed
//! separately), at `gen image`'s default settings: DPM++ 2M, 30 steps, CFG 7.5, f32,
//! batch-invariant sampling. Cases:
//! - batch 1: one image per `generate` call;
//! - batch 8: 8 images (8 different test-split captions) in one call with `--batch-size 8`;
//! - batch 8, whole batch: the same with `batch_invariant = false` (each UNet / VAE call takes
//!   the whole batch; images then differ from batch 1 in the last bits).
//!
//! The bar (issue #4): ≤ 1 s per image on 2 CPU cores. Take numbers on a quiet machine only.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench -p gen-bench --bench sample`. Environment:
//! `GEN_BENCH_REPS` timed runs per case (default 3, after one untimed warm-up run),
//! `GEN_BENCH_STEPS` (default 30), `GEN_MODEL` (default weights/tiny-shapes of this checkout).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use gen_bench::time_it;
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_sample::{generate, SampleConfig};

fn env_usize(k: &str, default: usize) -> usize {
    std::env::var(k).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() -> Result<()> {
    gen_core::tune_allocator();
    let reps = env_usize("GEN_BENCH_REPS", 3);
    let steps = env_usize("GEN_BENCH_STEPS", 30);
    let model = match std::env::var("GEN_MODEL") {
        Ok(m) if !m.is_empty() => PathBuf::from(m),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../weights/tiny-shapes"),
    };
    let t0 = Instant::now();
    let pipe = SdPipeline::load(&ModelSource::Local(model.clone()), &LoadOptions::default())
        .with_context(|| format!("loading {}", model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let world = gen_world::World::default();
    let prompts = (0..8)
        .map(|i| Ok(world.scene(gen_world::Split::Test, i)?.caption()))
        .collect::<Result<Vec<String>>>()?;
    let size = SampleConfig::native_size(&pipe);
    println!(
        "gen image speed: {} ({size}x{size}), DPM++ 2M {steps} steps, CFG 7.5, f32, {} threads; model load {load_s:.2} s; {reps} timed run(s) per case after 1 warm-up",
        model.display(),
        candle_core::utils::get_num_threads()
    );
    println!();
    println!("| case | images per call | wall per call, median (s) | wall per image (s) | CPU per image (s) | <= 1 s/image |");
    println!("|---|---|---|---|---|---|");
    let cases: [(&str, usize, bool); 3] =
        [("batch 1", 1, true), ("batch 8", 8, true), ("batch 8, whole batch", 8, false)];
    for (name, n, invariant) in cases {
        let mut cfg =
            SampleConfig::new(prompts[0].clone()).steps(steps).num_images(n).batch_size(n);
        cfg.prompts = prompts[..n].to_vec();
        cfg.batch_invariant = invariant;
        let t = time_it(1, reps, || {
            let imgs = generate(&pipe, &cfg, &mut |_| {})?;
            anyhow::ensure!(imgs.len() == n, "{} images, expected {n}", imgs.len());
            Ok(())
        })?;
        let per = t.median_ms / 1e3 / n as f64;
        println!(
            "| {name} | {n} | {:.3} | {per:.3} | {:.3} | {} |",
            t.median_ms / 1e3,
            t.cpu_median_ms / 1e3 / n as f64,
            if per <= 1.0 { "yes" } else { "no" }
        );
    }
    Ok(())
}
