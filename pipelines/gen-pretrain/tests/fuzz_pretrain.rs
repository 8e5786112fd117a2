//! Seeded mutation tests of what `gen train` reads: the training config and a stage's
//! checkpoint files (`latest.json`, `state.json`, `model.safetensors`,
//! `optimizer.safetensors`). Every mutated file gives a clean error or a valid result — no
//! panic, no abort.

use std::path::{Path, PathBuf};

use candle_core::Device;
use gen_core::fuzz::run_cases;
use gen_pretrain::{PretrainConfig, RunControl, Stage, Trainer};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-pretrain-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn fuzz_training_config() {
    for (name, cfg) in [("tiny", PretrainConfig::tiny()), ("real", PretrainConfig::real())] {
        let base = serde_json::to_string_pretty(&cfg).unwrap();
        let (_, err) =
            run_cases(&format!("{name} config"), base.as_bytes(), 400, |b| -> anyhow::Result<()> {
                PretrainConfig::from_json_str(Path::new("c.json"), std::str::from_utf8(b)?)?;
                Ok(())
            });
        assert!(err > 200, "{err}");
    }
}

/// A stage folder with a mutated checkpoint file is resumed for one step.
#[test]
fn fuzz_stage_checkpoints() -> anyhow::Result<()> {
    let mut cfg = PretrainConfig::tiny();
    cfg.evaluator.train.steps = 8;
    cfg.evaluator.train.ema_decay = 0.9;
    cfg.evaluator.channels = vec![4, 8];
    let good = tmp("checkpoint-good");
    Trainer::new(cfg.clone(), &good, &Device::Cpu)?.train(
        Stage::Evaluator,
        &RunControl { stop_after: Some(3) },
        &mut |_| {},
    )?;
    let stage = good.join("evaluator");
    let ck = "ckpt-00000003";
    let run = tmp("checkpoint-mutated");
    for file in [
        "latest.json".to_string(),
        format!("{ck}/state.json"),
        format!("{ck}/model.safetensors"),
        format!("{ck}/optimizer.safetensors"),
        format!("{ck}/ema.safetensors"),
    ] {
        let base = std::fs::read(stage.join(&file))?;
        run_cases(&file, &base, 60, |b| -> anyhow::Result<()> {
            let _ = std::fs::remove_dir_all(&run);
            copy_dir(&good, &run)?;
            std::fs::write(run.join("evaluator").join(&file), b)?;
            let mut t = Trainer::new(cfg.clone(), &run, &Device::Cpu)?;
            t.train(Stage::Evaluator, &RunControl { stop_after: Some(4) }, &mut |_| {})?;
            Ok(())
        });
    }
    let _ = std::fs::remove_dir_all(&run);
    std::fs::remove_dir_all(&good)?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}
