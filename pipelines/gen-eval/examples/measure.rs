//! The embedded model's measurements for its model card (release build recommended):
//!
//! ```text
//! cargo run --release -p gen-eval --example measure -- --dest weights/tiny-shapes [--prompts N] [--cfg W] [--steps N] [--test-images N] [--grid FILE.png]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use gen_eval::metrics::{
    evaluator_accuracy, generation_accuracy, image_grid, vae_psnr, GenerationSettings,
};
use gen_models::evaluator::Evaluator;
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_pretrain::data::WorldData;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    gen_core::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    measure(&args)
}

fn measure(args: &[String]) -> Result<()> {
    let dest = PathBuf::from(arg(args, "--dest").context("--dest MODEL_FOLDER")?);
    let n_prompts: usize = arg(args, "--prompts").map(|s| s.parse()).transpose()?.unwrap_or(48);
    let w: f64 = arg(args, "--cfg").map(|s| s.parse()).transpose()?.unwrap_or(7.5);
    let steps: usize = arg(args, "--steps").map(|s| s.parse()).transpose()?.unwrap_or(30);
    let n_test: usize = arg(args, "--test-images").map(|s| s.parse()).transpose()?.unwrap_or(256);
    let t0 = Instant::now();
    let pipe = SdPipeline::load(&ModelSource::Local(dest.clone()), &LoadOptions::default())?;
    let eval = Evaluator::load(&dest.join("evaluator"), &Device::Cpu)?;
    let size = eval.config().image_size as u32;
    let mut data = WorldData::new(size, 3, 1, &Device::Cpu)?;
    let psnr = vae_psnr(&pipe.vae, &mut data, n_test)?;
    println!("VAE PSNR on {n_test} test images: {psnr:.2} dB");
    let acc = evaluator_accuracy(&eval, &mut data, n_test)?;
    println!("evaluator on {n_test} real test images: {}", serde_json::to_string(&acc)?);
    let settings =
        GenerationSettings { prompts: n_prompts, steps, guidance_scale: w, seed: 0, batch: 16 };
    let (gacc, report, imgs) = generation_accuracy(&pipe, &eval, &mut data, &settings)?;
    println!("generated ({} prompts = captions of test samples 0..{n_prompts}, DDIM {steps} steps, CFG {w}, seed 0): {}", n_prompts, serde_json::to_string(&gacc)?);
    println!("generated: {}", serde_json::to_string(&report)?);
    if let Some(p) = arg(args, "--grid") {
        image_grid(&imgs, 8)?.save(&p)?;
        println!("grid: {p}");
    }
    println!(
        "{}",
        serde_json::json!({"vae_psnr_db": psnr, "evaluator_test": acc, "generation": gacc, "generation_report": report, "settings": settings})
    );
    println!("measured in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
