//! LoRA parity with diffusers/PEFT on the tiny SD pipeline (`tests/fixtures/tiny-sd/`), both ways.
//!
//! (a) Our files → diffusers: `writer_output_matches_committed_files` checks that our writer
//!     (gen_optim::lora) still produces exactly the committed `tests/fixtures/lora/ours_*.safetensors`
//!     (kohya; PEFT with alpha baked into B; PEFT with `lora_adapter_metadata`);
//!     `scripts/fixtures_lora.py` loaded those with `pipe.load_lora_weights` and recorded the UNet and
//!     text-encoder outputs (`ref_ours_*.safetensors`); we apply the same files to our models, as
//!     adapters and merged, and match those outputs.
//! (b) PEFT/diffusers → ours: `peft_meta` (alpha 8 ≠ r 4, saved with adapter metadata), `peft_plain`
//!     (alpha = r, no metadata) written by `StableDiffusionPipeline.save_lora_weights`, and
//!     `diffusers_kohya` (peft_plain through diffusers' `convert_state_dict_to_kohya`: `lora_te1_`
//!     prefix, transformers-5 names without `text_model.`, int64 alpha); references are the outputs
//!     of the PEFT-adapted pipeline.
//!
//! Measure: `max|ours - ref| / max|ref|` (references computed in f64 by the script, ours in f32);
//! bound 1e-4. Regenerate our files with `GEN_WRITE_LORA_FIXTURES=1 cargo test -p gen-tests --test
//! lora_parity -- writer`, then run the script.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use gen_core::SeededRng;
use gen_models::clip::{ClipTextConfig, ClipTextTransformer, TextForwardOptions};
use gen_models::loading::{find_weight_files, weights_vb, WeightVariant};
use gen_models::unet::{UNet2DConditionModel, UNetConfig};
use gen_optim::lora::*;

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn lora_dir() -> PathBuf {
    fixtures().join("lora")
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))
}

struct Models {
    unet: UNet2DConditionModel,
    te: ClipTextTransformer,
}

fn models() -> Result<Models> {
    let vb = |sub: &str| -> Result<candle_nn::VarBuilder<'static>> {
        let dir = fixtures().join("tiny-sd").join(sub);
        Ok(weights_vb(
            &find_weight_files(&dir, &WeightVariant { variant: None })?,
            DType::F32,
            &Device::Cpu,
        )?)
    };
    let dir = fixtures().join("tiny-sd");
    let ucfg = UNetConfig::from_file(dir.join("unet/config.json"))?;
    let tcfg = ClipTextConfig::from_file(dir.join("text_encoder/config.json"))?;
    Ok(Models {
        unet: UNet2DConditionModel::new(vb("unet")?, &ucfg)?,
        te: ClipTextTransformer::new(vb("text_encoder")?, &tcfg)?,
    })
}

/// `(unet_out, te_last_hidden_state)` on the parity inputs.
fn outputs(m: &Models) -> Result<(Tensor, Tensor)> {
    let u = load(&fixtures().join("parity/unet.safetensors"))?;
    let t = load(&fixtures().join("parity/text_encoder.safetensors"))?;
    let unet_out =
        m.unet.forward(&u["sample"], &u["timesteps_mixed"], &u["encoder_hidden_states"])?;
    let te = m.te.forward(&t["input_ids"], &TextForwardOptions::default())?.last_hidden_state;
    Ok((unet_out, te))
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    ensure!(
        ours.dims() == reference.dims(),
        "shape {:?} != reference {:?}",
        ours.dims(),
        reference.dims()
    );
    let a = ours.to_dtype(DType::F64)?;
    let b = reference.to_dtype(DType::F64)?;
    let diff = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    ensure!(scale > 0.0, "reference is all zeros");
    Ok(diff / scale)
}

const UNET_TARGETS: [&str; 6] = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"];
const TE_TARGETS: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

/// Our deterministic LoRA: rank 4, alpha 8, Kaiming A, B ~ 0.3·N(0, 1).
fn our_lora(m: &Models) -> Result<(LoraSet, LoraSet)> {
    let mut rng = SeededRng::new(2024);
    let cfg = |t: &[&str]| LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        init: LoraInit::Kaiming,
        target_modules: t.iter().map(|s| s.to_string()).collect(),
    };
    let u = attach_lora(&m.unet.linears(), "unet", &cfg(&UNET_TARGETS), &mut rng)?;
    let t = attach_lora(&m.te.linears(), "text_encoder", &cfg(&TE_TARGETS), &mut rng)?;
    for set in [&u, &t] {
        for e in set.entries() {
            let b = e.adapter.b();
            b.set(&(rng.randn(b.shape(), DType::F32, &Device::Cpu)? * 0.3)?)?;
        }
    }
    Ok((u, t))
}

fn our_files() -> [(&'static str, LoraSaveOptions); 3] {
    [
        ("ours_kohya", LoraSaveOptions { format: LoraFormat::Kohya, ..Default::default() }),
        (
            "ours_peft",
            LoraSaveOptions {
                format: LoraFormat::Peft,
                peft_alpha: PeftAlpha::Bake,
                ..Default::default()
            },
        ),
        (
            "ours_peft_meta",
            LoraSaveOptions {
                format: LoraFormat::Peft,
                peft_alpha: PeftAlpha::Metadata,
                ..Default::default()
            },
        ),
    ]
}

#[test]
fn writer_output_matches_committed_files() -> Result<()> {
    let m = models()?;
    let (u, t) = our_lora(&m)?;
    assert_eq!(
        u.len(),
        60,
        "tiny UNet: 6 transformer blocks × (2 attentions × 4 + 2 feed-forward)"
    );
    assert_eq!(t.len(), m.te.linears().len(), "every text-encoder linear is a target");
    let regenerate = std::env::var("GEN_WRITE_LORA_FIXTURES").is_ok();
    let tmp = std::env::temp_dir().join(format!("gen-lora-writer-{}", std::process::id()));
    for (name, opts) in our_files() {
        let committed = lora_dir().join(format!("{name}.safetensors"));
        let path =
            if regenerate { committed.clone() } else { tmp.join(format!("{name}.safetensors")) };
        save_lora(&[&u, &t], &path, &opts)?;
        if regenerate {
            continue;
        }
        let (a, b) = (load(&path)?, load(&committed)?);
        let mut ka: Vec<&String> = a.keys().collect();
        let mut kb: Vec<&String> = b.keys().collect();
        ka.sort();
        kb.sort();
        ensure!(ka == kb, "{name}: keys differ from the committed file");
        for k in ka {
            ensure!(a[k].dims() == b[k].dims(), "{name}: {k} shape differs");
            let d = (a[k].to_dtype(DType::F64)? - b[k].to_dtype(DType::F64)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            ensure!(d == 0.0, "{name}: {k} differs by {d}");
        }
    }
    Ok(())
}

fn parity(file: &str, reference: &str, mode: ApplyMode) -> Result<()> {
    let m = models()?;
    let (base_u, base_t) = outputs(&m)?;
    let refs = load(&lora_dir().join(format!("{reference}.safetensors")))?;
    let lf = read_lora_file(lora_dir().join(format!("{file}.safetensors")), &Device::Cpu)?;
    assert_eq!(lf.components(), vec!["unet", "text_encoder"], "{file}");
    let opts = ApplyOptions { mode, ..Default::default() };
    let u = apply_lora(&lf, "unet", &m.unet.linears(), &opts)?;
    let t = apply_lora(&lf, "text_encoder", &m.te.linears(), &opts)?;
    assert_eq!(u.set.len(), 60, "{file}: UNet modules");
    assert_eq!(t.set.len(), m.te.linears().len(), "{file}: text-encoder modules");
    let (ou, ot) = outputs(&m)?;
    let eu = rel_err(&ou, &refs["unet_out"])?;
    let et = rel_err(&ot, &refs["te_last_hidden_state"])?;
    // The LoRA must matter, or the comparison says nothing.
    let du = rel_err(&base_u, &refs["unet_out"])?;
    let dt = rel_err(&base_t, &refs["te_last_hidden_state"])?;
    println!("{file} ({mode:?}): UNet rel err {eu:.2e} (LoRA effect {du:.2e}), text encoder {et:.2e} (effect {dt:.2e})");
    ensure!(du > 1e-2 && dt > 1e-2, "{file}: LoRA effect too small to test ({du}, {dt})");
    ensure!(eu < TOL && et < TOL, "{file} ({mode:?}): UNet {eu}, text encoder {et}");
    if mode == ApplyMode::Merge {
        u.set.unmerge()?;
        t.set.unmerge()?;
        u.set.detach();
        t.set.detach();
        let (bu, bt) = outputs(&m)?;
        ensure!(
            rel_err(&bu, &base_u)? == 0.0 && rel_err(&bt, &base_t)? == 0.0,
            "unmerge + detach must restore the base model exactly"
        );
    }
    Ok(())
}

#[test]
fn ours_kohya_matches_diffusers() -> Result<()> {
    parity("ours_kohya", "ref_ours_kohya", ApplyMode::Adapter)?;
    parity("ours_kohya", "ref_ours_kohya", ApplyMode::Merge)
}

#[test]
fn ours_peft_baked_matches_diffusers() -> Result<()> {
    parity("ours_peft", "ref_ours_peft", ApplyMode::Adapter)?;
    parity("ours_peft", "ref_ours_peft", ApplyMode::Merge)
}

#[test]
fn ours_peft_metadata_matches_diffusers() -> Result<()> {
    parity("ours_peft_meta", "ref_ours_peft_meta", ApplyMode::Adapter)?;
    parity("ours_peft_meta", "ref_ours_peft_meta", ApplyMode::Merge)
}

#[test]
fn peft_with_metadata_alpha_matches() -> Result<()> {
    parity("peft_meta", "ref_peft_meta", ApplyMode::Adapter)?;
    parity("peft_meta", "ref_peft_meta", ApplyMode::Merge)
}

#[test]
fn peft_plain_matches() -> Result<()> {
    parity("peft_plain", "ref_peft_plain", ApplyMode::Adapter)?;
    parity("peft_plain", "ref_peft_plain", ApplyMode::Merge)
}

#[test]
fn diffusers_converted_kohya_matches() -> Result<()> {
    parity("diffusers_kohya", "ref_peft_plain", ApplyMode::Adapter)?;
    parity("diffusers_kohya", "ref_peft_plain", ApplyMode::Merge)
}

#[test]
fn file_for_another_model_is_rejected_with_shapes() -> Result<()> {
    // The tiny-sd LoRA against the unet-sd2 variant (other head layout, linear projections):
    // an error names a key and both shapes, or the unknown modules — never a panic.
    let dir = fixtures().join("tiny-sd/unet-sd2");
    let cfg = UNetConfig::from_file(dir.join("config.json"))?;
    let vb = weights_vb(
        &find_weight_files(&dir, &WeightVariant { variant: None })?,
        DType::F32,
        &Device::Cpu,
    )?;
    let unet = UNet2DConditionModel::new(vb, &cfg)?;
    let lf = read_lora_file(lora_dir().join("peft_plain.safetensors"), &Device::Cpu)?;
    match apply_lora(&lf, "unet", &unet.linears(), &ApplyOptions::default()) {
        Ok(_) => anyhow::bail!("applying a LoRA to a different UNet must fail"),
        Err(e) => {
            let e = e.to_string();
            println!("{e}");
            ensure!(e.contains("expected shape") || e.contains("match no layer"), "{e}");
        }
    }
    Ok(())
}

#[test]
fn cli_style_lora_on_a_loaded_pipeline() -> Result<()> {
    // What `gen image --lora FILE:SCALE` is meant to do: parse the argument and apply every part
    // of the file to the loaded pipeline, merged. Scale 1 is checked against diffusers; scale 0.5
    // (no diffusers reference recorded) merged against the adapter path at multiplier 0.5.
    use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
    let pipe =
        SdPipeline::load(&ModelSource::Local(fixtures().join("tiny-sd")), &LoadOptions::default())?;
    let arg = format!("{}:1", lora_dir().join("ours_kohya.safetensors").display());
    let (path, scale) = parse_lora_arg(&arg)?;
    let parts = [("unet", pipe.unet.linears()), ("text_encoder", pipe.text_encoder.linears())];
    let applied = apply_lora_file_to_parts(
        &path,
        &parts,
        &ApplyOptions { scale, mode: ApplyMode::Merge, ..Default::default() },
    )?;
    assert_eq!(applied.len(), 2);
    let m = Models { unet: pipe.unet.clone(), te: pipe.text_encoder.clone() };
    let refs = load(&lora_dir().join("ref_ours_kohya.safetensors"))?;
    let (ou, ot) = outputs(&m)?;
    let (eu, et) = (rel_err(&ou, &refs["unet_out"])?, rel_err(&ot, &refs["te_last_hidden_state"])?);
    println!("pipeline --lora ours_kohya:1 merged: UNet {eu:.2e}, text encoder {et:.2e}");
    ensure!(eu < TOL && et < TOL, "UNet {eu}, text encoder {et}");
    // Scale 0.5: merged equals the adapter path at multiplier 0.5.
    applied.iter().try_for_each(|a| a.set.unmerge())?;
    applied.iter().for_each(|a| a.set.set_multiplier(0.5));
    let (au, at) = outputs(&m)?;
    applied.iter().try_for_each(|a| a.set.merge(0.5))?;
    let (mu, mt) = outputs(&m)?;
    ensure!(rel_err(&mu, &au)? < 1e-5 && rel_err(&mt, &at)? < 1e-5, "scale 0.5: merged vs adapter");
    ensure!(rel_err(&au, &refs["unet_out"])? > 1e-2, "scale 0.5 must differ from scale 1");
    Ok(())
}

#[test]
fn lora_on_an_f16_unet() -> Result<()> {
    // Dtype paths: adapters on f16 activations (A and B cast per call) and merging into f16
    // weights (computed in f32, then cast). Bound: f16 rounding.
    let dir = fixtures().join("tiny-sd/unet");
    let cfg = UNetConfig::from_file(dir.join("config.json"))?;
    let vb = weights_vb(
        &find_weight_files(&dir, &WeightVariant { variant: None })?,
        DType::F16,
        &Device::Cpu,
    )?;
    let unet = UNet2DConditionModel::new(vb, &cfg)?;
    let u = load(&fixtures().join("parity/unet.safetensors"))?;
    let refs = load(&lora_dir().join("ref_ours_kohya.safetensors"))?;
    let run = || -> Result<Tensor> {
        Ok(unet.forward(
            &u["sample"].to_dtype(DType::F16)?,
            &u["timesteps_mixed"],
            &u["encoder_hidden_states"].to_dtype(DType::F16)?,
        )?)
    };
    let lf = read_lora_file(lora_dir().join("ours_kohya.safetensors"), &Device::Cpu)?;
    let a = apply_lora(&lf, "unet", &unet.linears(), &ApplyOptions::default())?;
    let e_adapter = rel_err(&run()?, &refs["unet_out"])?;
    a.set.merge(1.0)?;
    let e_merged = rel_err(&run()?, &refs["unet_out"])?;
    println!("f16 UNet + ours_kohya: adapter {e_adapter:.2e}, merged {e_merged:.2e}");
    ensure!(e_adapter < 1e-2 && e_merged < 1e-2, "adapter {e_adapter}, merged {e_merged}");
    Ok(())
}
