//! End-to-end tests of the training pipeline on the tiny preset: every stage's loss falls,
//! a killed-and-resumed run is bit-identical to an uninterrupted one, and the exported folder
//! loads through gen-models' `SdPipeline::load` with every key used and the trained weights
//! (gen-eval's tests measure such a model).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_pretrain::params::bitwise_equal;
use gen_pretrain::runner::latest_weights;
use gen_pretrain::{PretrainConfig, RunControl, Stage, TrainEvent, Trainer};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-pretrain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

#[test]
fn tiny_run_losses_fall_and_export_loads() -> anyhow::Result<()> {
    let out = tmp("run");
    let dev = Device::Cpu;
    let cfg = PretrainConfig::tiny();
    let mut trainer = Trainer::new(cfg.clone(), &out, &dev)?;
    let mut events = Vec::new();
    let results =
        trainer.run(&Stage::ALL, &RunControl::default(), &mut |e| events.push(e.clone()))?;
    let mut drops = Vec::new();
    for (stage, o) in &results {
        assert!(o.finished, "{stage:?}");
        let n = o.losses.len();
        assert!(n >= 20, "{stage:?}: {n} steps");
        let (first, last) = (mean(&o.losses[..5]), mean(&o.losses[n - 5..]));
        eprintln!("{stage:?}: loss {first:.4} -> {last:.4} in {n} steps, {:.1} s", o.seconds);
        drops.push((*stage, first, last));
        let dir = trainer.stage_dir(*stage);
        assert!(dir.join("metrics.csv").exists() && dir.join("loss.png").exists());
        let csv = std::fs::read_to_string(dir.join("metrics.csv"))?;
        assert_eq!(csv.lines().count(), n + 1, "{stage:?}: one CSV row per step plus the header");
    }
    for (stage, first, last) in drops {
        // a working stage lowers its loss clearly within its 30 tiny steps
        assert!(last < 0.9 * first, "{stage:?}: loss {first} -> {last}");
    }
    assert!(events
        .iter()
        .any(|e| matches!(e, TrainEvent::Checkpoint { stage, step: 30, .. } if stage == "unet")));
    assert!(events.iter().filter(|e| matches!(e, TrainEvent::Step { .. })).count() == 4 * 30);
    // optimizer-state accounting: AdamW keeps two f32 moments per trained parameter
    let params: HashMap<String, usize> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::StageStart { stage, params, .. } => Some((stage.clone(), *params)),
            _ => None,
        })
        .collect();
    let mut ends = 0;
    for e in &events {
        if let TrainEvent::StageEnd { stage, optimizer_state_bytes, .. } = e {
            assert_eq!(
                optimizer_state_bytes.iter().sum::<usize>(),
                2 * 4 * params[stage],
                "{stage}: AdamW state bytes"
            );
            ends += 1;
        }
    }
    assert_eq!(ends, 4);

    // export in f32: the pipeline loads with every key used and exactly the trained UNet
    let dest = out.join("export");
    let report = gen_pretrain::export::export(&out, &dest, DType::F32)?;
    assert!(report.evaluator && report.scaling_factor.is_finite() && report.scaling_factor > 0.0);
    let pipe = SdPipeline::load(&ModelSource::Local(dest.clone()), &LoadOptions::default())?;
    assert!(pipe.unused_keys.is_empty(), "unused keys: {:?}", pipe.unused_keys);
    assert!((pipe.vae_config.scaling_factor - report.scaling_factor).abs() < 1e-12);
    assert_eq!(pipe.max_text_len(), cfg.max_text_len);
    let exported = load(&dest.join("unet/diffusion_pytorch_model.safetensors"));
    let trained = load(&latest_weights(&out.join("unet"))?);
    assert!(bitwise_equal(&exported, &trained)?);
    let te = load(&dest.join("text_encoder/model.safetensors"));
    assert!(!te.is_empty() && te.keys().all(|k| k.starts_with("text_model.")));
    // the pipeline's UNet computes with the trained weights
    let x = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu)?;
    let ctx = Tensor::randn(0f32, 1.0, (1, cfg.max_text_len, 16), &Device::Cpu)?;
    let t = Tensor::new(&[500f32], &Device::Cpu)?;
    let direct = {
        let w =
            gen_models::loading::SafetensorsWeights::open(&[latest_weights(&out.join("unet"))?])?;
        let ucfg = gen_models::unet::UNetConfig::from_file(dest.join("unet/config.json"))?;
        gen_models::unet::UNet2DConditionModel::new(w.var_builder(DType::F32, &Device::Cpu), &ucfg)?
    };
    let a = pipe.unet.forward(&x, &t, &ctx)?.flatten_all()?.to_vec1::<f32>()?;
    let b = direct.forward(&x, &t, &ctx)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b);

    // tokenizer: known words, [UNK] for others, bos/eos/padding
    let tok = &pipe.tokenizer;
    assert_eq!(tok.unknown_words("a shiny red cube")?, vec!["shiny".to_string()]);
    let enc = tok.encode("a red cube", cfg.max_text_len)?;
    let id = |w: &str| tok.token_to_id(w).unwrap();
    assert_eq!(&enc.ids[..5], &[0, id("a"), id("red"), id("cube"), 1]);
    assert!(enc.ids[5..].iter().all(|&i| i == 1));
    assert!(tok.known_words().contains(&"torus".to_string()));

    // f16 export loads too
    let dest16 = out.join("export16");
    gen_pretrain::export::export(&out, &dest16, DType::F16)?;
    let p16 = SdPipeline::load(&ModelSource::Local(dest16.clone()), &LoadOptions::default())?;
    assert!(p16.unused_keys.is_empty());

    std::fs::remove_dir_all(&out)?;
    Ok(())
}

/// Runs `stage` of the tiny config in `out` (8 steps, a checkpoint every 4), stopping after
/// `stop` steps when given (as if killed right after that checkpoint).
fn run_tiny(out: &Path, stage: Stage, stop: Option<u64>) -> anyhow::Result<()> {
    let mut trainer = Trainer::new(tiny8(), out, &Device::Cpu)?;
    if stage == Stage::Unet {
        trainer.run(&[Stage::Clip, Stage::Vae], &RunControl::default(), &mut |_| {})?;
    }
    trainer.train(stage, &RunControl { stop_after: stop }, &mut |_| {})?;
    Ok(())
}

/// The tiny config with 8 steps per stage and a checkpoint every 4; the UNet keeps a moving
/// average of its weights.
fn tiny8() -> PretrainConfig {
    let mut cfg = PretrainConfig::tiny();
    for s in
        [&mut cfg.vae.train, &mut cfg.unet.train, &mut cfg.clip.train, &mut cfg.evaluator.train]
    {
        s.steps = 8;
        s.checkpoint_every = 4;
        s.warmup_steps = 2;
    }
    cfg.unet.train.ema_decay = 0.9;
    cfg
}

/// A moving average of the weights switched on in a started stage starts from the weights at
/// that checkpoint, then is what the stage exports (`latest_weights`); the trained parameters
/// themselves continue exactly as without it.
#[test]
fn weight_average_started_mid_stage() -> anyhow::Result<()> {
    let out = tmp("ema-mid-stage");
    let mut cfg = tiny8();
    cfg.unet.train.ema_decay = 0.0;
    let mut t = Trainer::new(cfg.clone(), &out, &Device::Cpu)?;
    t.run(&[Stage::Clip, Stage::Vae], &RunControl::default(), &mut |_| {})?;
    t.train(Stage::Unet, &RunControl { stop_after: Some(4) }, &mut |_| {})?;
    let at4 = load(&latest_weights(&out.join("unet"))?);
    // a straight run without the average, for the parameters
    let plain = tmp("ema-mid-stage-plain");
    let mut t = Trainer::new(cfg.clone(), &plain, &Device::Cpu)?;
    t.run(&[Stage::Clip, Stage::Vae, Stage::Unet], &RunControl::default(), &mut |_| {})?;
    cfg.unet.train.ema_decay = 0.5;
    let mut t = Trainer::new(cfg, &out, &Device::Cpu)?;
    let mut notes = Vec::new();
    t.train(Stage::Unet, &RunControl::default(), &mut |e| {
        if let TrainEvent::Note { message, .. } = e {
            notes.push(message.clone())
        }
    })?;
    assert!(notes.iter().any(|m| m.contains("starts at step 4")), "{notes:?}");
    let (ck, st) = gen_pretrain::runner::latest_checkpoint(&out.join("unet"))?.unwrap();
    assert_eq!(st.ema_updates, Some(4));
    assert_eq!(latest_weights(&out.join("unet"))?, ck.join("ema.safetensors"));
    let avg = load(&ck.join("ema.safetensors"));
    let params = load(&ck.join("model.safetensors"));
    let plain_params = load(&latest_weights(&plain.join("unet"))?);
    assert!(bitwise_equal(&params, &plain_params)?, "the average must not change the training");
    // decays 0.1, 2/11, 0.25, 4/13 over steps 5..8: the step-8 weights weigh 0.69, the step-4
    // ones 0.0014, so the average is off both but much nearer the last weights
    let (mut to_old, mut to_new, mut span) = (0.0f64, 0.0f64, 0.0f64);
    for (k, a) in &avg {
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let o = at4[k].flatten_all()?.to_vec1::<f32>()?;
        let n = params[k].flatten_all()?.to_vec1::<f32>()?;
        for i in 0..a.len() {
            to_old += (a[i] - o[i]).abs() as f64;
            to_new += (a[i] - n[i]).abs() as f64;
            span += (n[i] - o[i]).abs() as f64;
        }
    }
    assert!(span > 0.0 && to_new > 0.0 && to_new < 0.5 * to_old, "{to_old} {to_new} {span}");
    std::fs::remove_dir_all(&out)?;
    std::fs::remove_dir_all(&plain)?;
    Ok(())
}

/// A started UNet stage may change its caption-part dropout (the caption mix) and continue;
/// its caption dropout (the CFG unconditional rate) may not change.
#[test]
fn started_unet_may_change_its_caption_part_dropout() -> anyhow::Result<()> {
    let out = tmp("part-dropout-change");
    run_tiny(&out, Stage::Unet, Some(4))?;
    let mut cfg = tiny8();
    cfg.unet.caption_part_dropout = 0.3;
    let mut t = Trainer::new(cfg.clone(), &out, &Device::Cpu)?;
    let o = t.train(Stage::Unet, &RunControl::default(), &mut |_| {})?;
    assert!(o.finished && o.step == 8, "{o:?}");
    assert_eq!(PretrainConfig::load(&out.join("config.json"))?.unet.caption_part_dropout, 0.3);
    let mut other = cfg.clone();
    other.unet.caption_dropout = 0.2;
    let e = Trainer::new(other, &out, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("stage `unet` changed"), "{e}");
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

/// Final weights (with the moving average, if any), optimizer state and logged `step,loss`
/// lines of a stage that ran `steps` steps.
type FinalState = (HashMap<String, Tensor>, HashMap<String, Tensor>, String);

fn final_state(out: &Path, stage: Stage, steps: u64) -> anyhow::Result<FinalState> {
    let (ck, st) = gen_pretrain::runner::latest_checkpoint(&out.join(stage.name()))?.unwrap();
    assert_eq!(st.step, steps);
    let mut weights = load(&ck.join("model.safetensors"));
    if st.ema_updates.is_some() {
        for (k, v) in load(&ck.join("ema.safetensors")) {
            weights.insert(format!("ema.{k}"), v);
        }
    }
    let csv = std::fs::read_to_string(out.join(stage.name()).join("metrics.csv"))?;
    // losses without the timing column
    let losses: Vec<String> =
        csv.lines().map(|l| l.split(',').take(2).collect::<Vec<_>>().join(",")).collect();
    Ok((weights, load(&ck.join("optimizer.safetensors")), losses.join("\n")))
}

/// The tiny config with 16 steps per stage and a checkpoint every 5; the UNet and the
/// evaluator keep a moving average of their weights.
fn tiny16() -> PretrainConfig {
    let mut cfg = PretrainConfig::tiny();
    for s in
        [&mut cfg.vae.train, &mut cfg.unet.train, &mut cfg.clip.train, &mut cfg.evaluator.train]
    {
        s.steps = 16;
        s.checkpoint_every = 5;
        s.warmup_steps = 2;
    }
    cfg.unet.train.ema_decay = 0.9;
    cfg.evaluator.train.ema_decay = 0.8;
    cfg
}

/// Every stage stopped after 7, 10 or 13 of its 16 steps (checkpoints every 5: the stops are
/// a multiple of it, and steps past one) and resumed by a new `Trainer`, as after a restart,
/// ends bit-identical to an uninterrupted run: weights, moving average, optimizer state and
/// logged losses. (Resuming the UNet used to differ from step 10 on: its text-encoding cache
/// batched whatever prompts a step was missing, and a prompt's encoding depended on its
/// batch-mates in the last bits.)
#[test]
fn resume_at_any_step_is_bit_identical() -> anyhow::Result<()> {
    let cfg = tiny16();
    let straight = tmp("resume-straight");
    Trainer::new(cfg.clone(), &straight, &Device::Cpu)?.run(
        &Stage::ALL,
        &RunControl::default(),
        &mut |_| {},
    )?;
    for stage in Stage::ALL {
        let want = final_state(&straight, stage, 16)?;
        for stop in [7u64, 10, 13] {
            let b = tmp(&format!("resumed-{}-{stop}", stage.name()));
            std::fs::create_dir_all(&b)?;
            // the UNet trains on the CLIP text encoder and the VAE of the straight run
            if stage == Stage::Unet {
                for dep in ["clip", "vae"] {
                    copy_dir(&straight.join(dep), &b.join(dep))?;
                }
            }
            Trainer::new(cfg.clone(), &b, &Device::Cpu)?.train(
                stage,
                &RunControl { stop_after: Some(stop) },
                &mut |_| {},
            )?;
            let (_, st) = gen_pretrain::runner::latest_checkpoint(&b.join(stage.name()))?.unwrap();
            assert_eq!(st.step, stop, "{stage:?}: a stop writes its checkpoint");
            // a new Trainer (as after a restart) resumes from `stop` to 16
            let mut events = Vec::new();
            Trainer::new(cfg.clone(), &b, &Device::Cpu)?.train(
                stage,
                &RunControl::default(),
                &mut |e| events.push(e.clone()),
            )?;
            assert!(events.iter().any(
                |e| matches!(e, TrainEvent::StageStart { start_step, .. } if *start_step == stop)
            ));
            let (w, o, l) = final_state(&b, stage, 16)?;
            assert!(bitwise_equal(&want.0, &w)?, "{stage:?} resumed at {stop}: weights differ");
            assert!(
                bitwise_equal(&want.1, &o)?,
                "{stage:?} resumed at {stop}: optimizer state differs"
            );
            assert_eq!(want.2, l, "{stage:?} resumed at {stop}: logged losses differ");
            std::fs::remove_dir_all(&b)?;
        }
    }
    std::fs::remove_dir_all(&straight)?;
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

#[test]
fn config_round_trips_and_rejects_bad_values() -> anyhow::Result<()> {
    let dir = tmp("cfg");
    std::fs::create_dir_all(&dir)?;
    let p = dir.join("config.json");
    let cfg = PretrainConfig::real();
    cfg.save(&p)?;
    assert_eq!(PretrainConfig::load(&p)?, cfg);
    let mut bad = PretrainConfig::tiny();
    bad.unet.train.batch_size = 1000;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("unet.train.batch_size") && e.contains("pool_size"), "{e}");
    let mut bad = PretrainConfig::tiny();
    bad.vae.train.ema_decay = 1.0;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("vae.train.ema_decay"), "{e}");
    // a different config in an existing run folder is refused
    let out = dir.join("run");
    Trainer::new(PretrainConfig::tiny(), &out, &Device::Cpu)?;
    let mut other = PretrainConfig::tiny();
    other.seed += 1;
    let e = Trainer::new(other, &out, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("different training config") && e.contains("seed"), "{e}");
    // a stage that has not started may change (fewer steps for the stages still to come) ...
    let mut t = Trainer::new(PretrainConfig::tiny(), &out, &Device::Cpu)?;
    t.train(Stage::Evaluator, &RunControl::default(), &mut |_| {})?;
    let mut shorter = PretrainConfig::tiny();
    shorter.vae.train.steps = 20;
    Trainer::new(shorter.clone(), &out, &Device::Cpu)?;
    assert_eq!(PretrainConfig::load(&out.join("config.json"))?, shorter);
    assert_eq!(PretrainConfig::load(&out.join("config.prev-1.json"))?, PretrainConfig::tiny());
    // ... but not one with a checkpoint
    let mut changed = shorter.clone();
    changed.evaluator.train.lr *= 2.0;
    let e = Trainer::new(changed, &out, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("stage `evaluator` changed"), "{e}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A stage with a checkpoint may change its step count (and nothing else): it continues from
/// its checkpoint on the new total's schedule; fewer steps than it already ran is an error.
#[test]
fn running_stage_may_change_its_step_count() -> anyhow::Result<()> {
    let out = tmp("steps-change");
    let cfg = PretrainConfig::tiny();
    let mut t = Trainer::new(cfg.clone(), &out, &Device::Cpu)?;
    t.train(Stage::Evaluator, &RunControl { stop_after: Some(20) }, &mut |_| {})?;
    // longer: resumes at 20 and runs to the new total
    let mut longer = cfg.clone();
    longer.evaluator.train.steps = cfg.evaluator.train.steps + 10;
    let mut t = Trainer::new(longer.clone(), &out, &Device::Cpu)?;
    let mut notes = Vec::new();
    let o = t.train(Stage::Evaluator, &RunControl::default(), &mut |e| {
        if let TrainEvent::Note { message, .. } = e {
            notes.push(message.clone())
        }
    })?;
    assert!(o.finished && o.step == longer.evaluator.train.steps, "{o:?}");
    assert!(notes.iter().any(|m| m.contains("resuming at step 20")), "{notes:?}");
    let csv = std::fs::read_to_string(out.join("evaluator").join("metrics.csv"))?;
    assert_eq!(
        csv.lines().count() as u64,
        1 + longer.evaluator.train.steps,
        "one row per step, none repeated"
    );
    // fewer steps than already run: refused before anything trains
    let mut shorter = longer.clone();
    shorter.evaluator.train.steps = 10;
    let e = Trainer::new(shorter, &out, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("evaluator.train.steps") && e.contains("already ran 40 steps"), "{e}");
    // any other change to the started stage is still refused
    let mut other = longer.clone();
    other.evaluator.train.batch_size += 1;
    let e = Trainer::new(other, &out, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("stage `evaluator` changed"), "{e}");
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

/// The shipped model's final training config (weights/tiny-shapes/training/config-h.json, the
/// run folder's config.json) is the real preset: `gen train --preset real` trains what ships.
#[test]
fn shipped_training_config_is_the_real_preset() -> anyhow::Result<()> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../weights/tiny-shapes/training/config-h.json");
    assert_eq!(PretrainConfig::load(&p)?, PretrainConfig::real());
    Ok(())
}

/// Caption-part dropout: off draws nothing and gives the world's caption; on, every variant
/// (full, no background, no view, neither) occurs and parses back to the scene's parts.
#[test]
fn training_captions_with_part_dropout() -> anyhow::Result<()> {
    use gen_core::SeededRng;
    use gen_pretrain::stages::training_caption;
    use gen_world::{parse_caption, Split, World};
    let world = World::default();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        let s = world.sample(Split::Train, i)?;
        // off: the world's caption, and the generator is untouched
        let mut a = SeededRng::new(i);
        let mut b = SeededRng::new(i);
        assert_eq!(training_caption(&s.scene, 0.0, &mut a), s.caption);
        assert_eq!(a.uniform(), b.uniform(), "part dropout 0 must not draw");
        // always: only shape and colour are left
        let short = training_caption(&s.scene, 1.0, &mut a);
        let p = parse_caption(&short)?;
        assert!(p.background.is_none() && p.view.is_none(), "{short}");
        assert_eq!((p.shape, p.colour), (s.scene.shape, Some(s.scene.colour)), "{short}");
        // half: each variant parses back to the scene's parts
        for _ in 0..4 {
            let c = training_caption(&s.scene, 0.5, &mut a);
            let p = parse_caption(&c)?;
            assert_eq!((p.shape, p.colour), (s.scene.shape, Some(s.scene.colour)), "{c}");
            assert!(p.background.is_none_or(|bg| bg == s.scene.background), "{c}");
            assert!(p.view.is_none_or(|v| v == s.scene.view()), "{c}");
            seen.insert((p.background.is_some(), p.view.is_some()));
        }
    }
    assert_eq!(seen.len(), 4, "all four variants occur: {seen:?}");
    // out of range is refused
    let mut bad = PretrainConfig::tiny();
    bad.unet.caption_part_dropout = 1.5;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("unet.caption_part_dropout"), "{e}");
    Ok(())
}
