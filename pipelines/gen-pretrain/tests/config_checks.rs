//! A training config is checked whole before anything trains (unknown keys name the nearest
//! known key; every stage's values; model sections; shapes across stages), and a run never
//! continues silently from or into non-finite values.

use std::path::{Path, PathBuf};

use candle_core::Device;
use gen_models::EvaluatorConfig;
use gen_pretrain::runner::MAX_BAD_STEPS_IN_A_ROW;
use gen_pretrain::{PretrainConfig, RunControl, Stage, TrainEvent, Trainer};
use serde_json::{json, Value};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-pretrain-checks-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// An edit of a config's JSON.
type Edit = fn(&mut Value);

/// The tiny config as JSON with `edit` applied, parsed as if read from `c.json`.
fn parse_edited(edit: impl FnOnce(&mut Value)) -> Result<PretrainConfig, String> {
    let mut v = serde_json::to_value(PretrainConfig::tiny()).unwrap();
    edit(&mut v);
    PretrainConfig::from_json_str(Path::new("c.json"), &v.to_string()).map_err(|e| e.to_string())
}

#[test]
fn unknown_keys_name_the_nearest_known_key() {
    let cases: [(&str, Edit, &str); 5] = [
        ("sede", |v| v["sede"] = json!(7), "`seed`"),
        ("unet.train.lrr", |v| v["unet"]["train"]["lrr"] = json!(1e-3), "`lr`"),
        ("vae.kl_wieght", |v| v["vae"]["kl_wieght"] = json!(0.0), "`kl_weight`"),
        (
            "unet.config.layers_per_blok",
            |v| v["unet"]["config"]["layers_per_blok"] = json!(1),
            "`layers_per_block`",
        ),
        (
            "clip.text_config.hiden_size",
            |v| v["clip"]["text_config"]["hiden_size"] = json!(16),
            "`hidden_size`",
        ),
    ];
    for (key, edit, nearest) in cases {
        let e = parse_edited(edit).unwrap_err();
        assert!(e.starts_with("c.json: field `") && e.contains(&format!("`{key}`")), "{key}: {e}");
        assert!(e.contains(&format!("nearest known key is {nearest}")), "{key}: {e}");
    }
    // keys the trainer writes itself may not be set (they would be overwritten)
    let e = parse_edited(|v| v["vae"]["config"]["scaling_factor"] = json!(0.5)).unwrap_err();
    assert!(e.contains("vae.config.scaling_factor") && e.contains("set by the trainer"), "{e}");
    // the unedited config parses
    assert_eq!(parse_edited(|_| {}).unwrap(), PretrainConfig::tiny());
}

#[test]
fn bad_values_of_any_stage_fail_before_training() -> anyhow::Result<()> {
    let cases: Vec<(&str, Edit)> = vec![
        ("unet.train.lr", |v| v["unet"]["train"]["lr"] = json!(-1.0)),
        ("unet.train.lr", |v| v["unet"]["train"]["lr"] = json!(0.0)),
        ("vae.train.final_lr_fraction", |v| v["vae"]["train"]["final_lr_fraction"] = json!(2.0)),
        ("clip.train.weight_decay", |v| v["clip"]["train"]["weight_decay"] = json!(-0.1)),
        ("unet.train.max_grad_norm", |v| v["unet"]["train"]["max_grad_norm"] = json!(0.0)),
        ("unet.train.warmup_steps", |v| v["unet"]["train"]["warmup_steps"] = json!(30)),
        ("evaluator.norm_groups", |v| v["evaluator"]["norm_groups"] = json!(0)),
        ("evaluator.channels", |v| v["evaluator"]["channels"] = json!([8, 6])),
        ("vae.kl_weight", |v| v["vae"]["kl_weight"] = json!(-1.0)),
        ("max_text_len", |v| v["max_text_len"] = json!(1)),
        // the model parsers' own checks
        ("num_attention_heads", |v| v["clip"]["text_config"]["num_attention_heads"] = json!(3)),
        ("norm_num_groups", |v| v["unet"]["config"]["norm_num_groups"] = json!(3)),
        // shapes across stages
        ("unet.config.cross_attention_dim", |v| {
            v["unet"]["config"]["cross_attention_dim"] = json!(32)
        }),
        ("unet.config.in_channels", |v| v["unet"]["config"]["in_channels"] = json!(3)),
        ("unet.config.sample_size", |v| v["unet"]["config"]["sample_size"] = json!(16)),
        ("clip.vision_config.image_size", |v| v["clip"]["vision_config"]["image_size"] = json!(32)),
        ("clip.text_config.max_position_embeddings", |v| {
            v["clip"]["text_config"]["max_position_embeddings"] = json!(8)
        }),
    ];
    for (key, edit) in cases {
        let e = parse_edited(edit).unwrap_err();
        assert!(e.contains(key), "{key}: {e}");
    }
    // a Trainer refuses a bad config before any stage has trained (the UNet value used to fail
    // only after the evaluator, CLIP and VAE stages)
    let out = tmp("bad-unet-lr");
    let mut cfg = PretrainConfig::tiny();
    cfg.unet.train.lr = -1.0;
    let e = Trainer::new(cfg, &out, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("unet.train.lr"), "{e}");
    assert!(!out.join("evaluator").exists() && !out.join("config.json").exists());
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// The hand-kept CLIP key lists name keys the CLIP parsers really read: a value of the wrong
/// type under each is an error naming it.
#[test]
fn clip_key_lists_are_read_by_the_parsers() {
    for (section, keys) in [
        ("text_config", gen_pretrain::config::CLIP_TEXT_KEYS),
        ("vision_config", gen_pretrain::config::CLIP_VISION_KEYS),
    ] {
        for key in keys {
            let e =
                parse_edited(|v| v["clip"][section][*key] = json!({"not": "a value"})).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "clip.{section}.{key}: {e}");
        }
    }
}

#[test]
fn evaluator_config_is_checked_on_load() -> anyhow::Result<()> {
    let dir = tmp("evaluator-config");
    std::fs::create_dir_all(&dir)?;
    let p = dir.join("config.json");
    let good = serde_json::to_value(EvaluatorConfig::new(
        16,
        vec![8, 16],
        4,
        &gen_pretrain::data::evaluator_classes(),
    ))?;
    std::fs::write(&p, good.to_string())?;
    EvaluatorConfig::from_file(&p)?;
    let cases: [(&str, Edit); 6] = [
        ("norm_grups", |v| v["norm_grups"] = json!(4)),
        ("labels.shape", |v| v["labels"]["shape"] = json!([])),
        ("num_hues", |v| {
            v["num_hues"] = json!(0);
            v["labels"]["hue"] = json!([]);
        }),
        ("norm_groups", |v| v["norm_groups"] = json!(0)),
        ("channels", |v| v["channels"] = json!([])),
        ("image_size", |v| v["image_size"] = json!(0)),
    ];
    for (key, edit) in cases {
        let mut v = good.clone();
        edit(&mut v);
        std::fs::write(&p, v.to_string())?;
        let e = EvaluatorConfig::from_file(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()) && e.contains(&format!("`{key}`")), "{e}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A diverging stage (a learning rate far too high) stops with an error naming the steps
/// after MAX_BAD_STEPS_IN_A_ROW skipped steps instead of training on NaN; a checkpoint with
/// a NaN weight is refused on resume, naming the file and the tensor.
#[test]
fn non_finite_training_stops_with_an_error() -> anyhow::Result<()> {
    let out = tmp("diverge");
    let mut cfg = PretrainConfig::tiny();
    cfg.evaluator.train.lr = 1e30;
    cfg.evaluator.train.max_grad_norm = None;
    let mut notes = Vec::new();
    let e = Trainer::new(cfg, &out, &Device::Cpu)?
        .train(Stage::Evaluator, &RunControl::default(), &mut |e| {
            if let TrainEvent::Note { message, .. } = e {
                notes.push(message.clone());
            }
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("not finite in {MAX_BAD_STEPS_IN_A_ROW} steps in a row")), "{e}");
    assert!(e.starts_with("evaluator: step "), "{e}");
    assert_eq!(
        notes.iter().filter(|n| n.contains("step skipped")).count() as u64,
        MAX_BAD_STEPS_IN_A_ROW
    );
    std::fs::remove_dir_all(&out)?;

    // a checkpoint holding a NaN
    let out = tmp("nan-checkpoint");
    let cfg = PretrainConfig::tiny();
    Trainer::new(cfg.clone(), &out, &Device::Cpu)?.train(
        Stage::Evaluator,
        &RunControl { stop_after: Some(10) },
        &mut |_| {},
    )?;
    let (ck, _) = gen_pretrain::runner::latest_checkpoint(&out.join("evaluator"))?.unwrap();
    let file = ck.join("model.safetensors");
    let mut map = candle_core::safetensors::load(&file, &Device::Cpu)?;
    let w = map["head.bias"].to_vec1::<f32>()?;
    let mut w2 = w.clone();
    w2[3] = f32::NAN;
    map.insert("head.bias".into(), candle_core::Tensor::new(w2.as_slice(), &Device::Cpu)?);
    candle_core::safetensors::save(&map, &file)?;
    let e = Trainer::new(cfg, &out, &Device::Cpu)?
        .train(Stage::Evaluator, &RunControl::default(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&file.display().to_string())
            && e.contains("`head.bias`")
            && e.contains("element 3"),
        "{e}"
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

/// The UNet does not start on an unfinished CLIP text encoder or VAE (as `gen train
/// --stop-after N` over all stages used to do): a paused run leaves it unstarted with a note,
/// a full run is an error; both name the stage and its step.
#[test]
fn unet_waits_for_finished_dependencies() -> anyhow::Result<()> {
    let out = tmp("unet-deps");
    let mut cfg = PretrainConfig::tiny();
    cfg.clip.train.steps = 6;
    cfg.vae.train.steps = 6;
    let mut t = Trainer::new(cfg, &out, &Device::Cpu)?;
    t.train(Stage::Clip, &RunControl::default(), &mut |_| {})?;
    t.train(Stage::Vae, &RunControl { stop_after: Some(3) }, &mut |_| {})?;
    let e = t.train(Stage::Unet, &RunControl::default(), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("stage `vae` is at step 3 of 6"), "{e}");
    let mut notes = Vec::new();
    let o = t.train(Stage::Unet, &RunControl { stop_after: Some(2) }, &mut |e| {
        if let TrainEvent::Note { message, .. } = e {
            notes.push(message.clone());
        }
    })?;
    assert!(!o.finished && o.step == 0 && o.losses.is_empty(), "{o:?}");
    assert!(notes.iter().any(|n| n.contains("not started") && n.contains("`vae` is at step 3")));
    assert!(!out.join("unet").join("latest.json").exists());
    t.train(Stage::Vae, &RunControl::default(), &mut |_| {})?;
    t.train(Stage::Unet, &RunControl { stop_after: Some(2) }, &mut |_| {})?;
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
