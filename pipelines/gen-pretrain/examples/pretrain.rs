//! Driver of the embedded model's training run (release build recommended):
//!
//! ```text
//! cargo run --release -p gen-pretrain --example pretrain -- train --preset real --out /work/train-run
//! cargo run --release -p gen-pretrain --example pretrain -- export --out /work/train-run --dest weights/tiny-shapes
//! ```
//! The model card's measurements: `cargo run --release -p gen-eval --example measure`.
//! `train` resumes every stage from its latest checkpoint when the folder already holds a run.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_pretrain::{PretrainConfig, RunControl, Stage, TrainEvent, Trainer};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    gen_core::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().cloned().unwrap_or_default();
    match cmd.as_str() {
        "train" => train(&args),
        "export" => {
            let out = PathBuf::from(arg(&args, "--out").context("--out RUN_FOLDER")?);
            let dest = PathBuf::from(arg(&args, "--dest").context("--dest MODEL_FOLDER")?);
            let dtype = match arg(&args, "--dtype").as_deref().unwrap_or("f16") {
                "f16" => DType::F16,
                "f32" => DType::F32,
                d => bail!("--dtype {d}: expected f16 or f32"),
            };
            let r = gen_pretrain::export::export(&out, &dest, dtype)?;
            println!("{r:?}");
            let pipe = SdPipeline::load(&ModelSource::Local(dest.clone()), &LoadOptions::default())?;
            println!("loaded {}; unused keys: {:?}", dest.display(), pipe.unused_keys);
            Ok(())
        }
        _ => bail!("usage: pretrain train --preset tiny|real --out DIR [--stages evaluator,clip,vae,unet] [--seconds-per-stage N]\n       pretrain export --out DIR --dest MODEL [--dtype f16|f32]"),
    }
}

fn train(args: &[String]) -> Result<()> {
    let out = PathBuf::from(arg(args, "--out").context("--out RUN_FOLDER")?);
    let cfg = match arg(args, "--config") {
        Some(p) => PretrainConfig::load(&PathBuf::from(p))?,
        None => PretrainConfig::preset(&arg(args, "--preset").unwrap_or_else(|| "real".into()))?,
    };
    let stages: Vec<Stage> = match arg(args, "--stages") {
        Some(s) => s.split(',').map(Stage::parse).collect::<gen_core::Result<_>>()?,
        None => Stage::ALL.to_vec(),
    };
    let stop_after = arg(args, "--stop-after").map(|s| s.parse::<u64>()).transpose()?;
    let mut trainer = Trainer::new(cfg, &out, &Device::Cpu)?;
    let start = Instant::now();
    let mut last_print = Instant::now();
    let mut on_event = |e: &TrainEvent| {
        match e {
            TrainEvent::Step { stage, step, total_steps, loss, lr, grad_norm, seconds } => {
                if last_print.elapsed().as_secs_f64() > 20.0 || *step == 1 || step == total_steps {
                    println!("[{:7.1}s] {stage} {step}/{total_steps} loss {loss:.5} lr {lr:.2e} |g| {grad_norm:.3} ({seconds:.2} s/step)", start.elapsed().as_secs_f64());
                    last_print = Instant::now();
                }
            }
            other => println!("[{:7.1}s] {other:?}", start.elapsed().as_secs_f64()),
        }
        let _ = std::io::stdout().flush();
    };
    for s in stages {
        trainer.train(s, &RunControl { stop_after }, &mut on_event)?;
    }
    println!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
