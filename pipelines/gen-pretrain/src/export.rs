//! Export of a training run as a diffusers Stable Diffusion folder:
//!
//! ```text
//! model_index.json                  StableDiffusionPipeline
//! scheduler/scheduler_config.json   DDIMScheduler, SD's scaled_linear schedule
//! text_encoder/config.json + model.safetensors                 CLIPTextModel (`text_model.*`)
//! tokenizer/tokenizer.json, tokenizer_config.json, special_tokens_map.json
//! unet/config.json + diffusion_pytorch_model.safetensors       UNet2DConditionModel
//! vae/config.json + diffusion_pytorch_model.safetensors        AutoencoderKL (measured scaling_factor)
//! clip/config.json + model.safetensors                         full CLIPModel (scorer), not in model_index
//! evaluator/config.json + model.safetensors                    the evaluator CNN, not in model_index
//! ```
//! Weights are written in f16 or f32 with the training keys, which are diffusers'/transformers'.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use gen_core::{write_atomic, Error, Result, ResultExt};

use crate::config::PretrainConfig;
use crate::runner::latest_weights;
use crate::stages::{
    clip_config_json, scheduler_config_json, text_encoder_config_json, unet_config_json,
    vae_config_json,
};

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// `(component, bytes of its weight file)`.
    pub files: Vec<(String, u64)>,
    pub scaling_factor: f64,
    pub evaluator: bool,
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::msg(format!("serialising {}: {e}", path.display())))?;
    write_atomic(path, text.as_bytes())
}

fn load_map(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).ctx(format!("reading {}", path.display()))
}

fn save_map(map: HashMap<String, Tensor>, dtype: DType, path: &Path) -> Result<u64> {
    let mut out = HashMap::new();
    for (k, t) in map {
        out.insert(k, t.to_dtype(dtype)?);
    }
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
    }
    gen_optim::save_safetensors_atomic(&out, path)?;
    Ok(std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len())
}

/// Exports the run folder `run` (see [`crate::stages`]) to the diffusers folder `dest`, using
/// each stage's latest checkpoint. The CLIP, VAE and UNet stages must have checkpoints; the
/// evaluator is exported when it has one. `dtype`: F16 or F32.
pub fn export(run: &Path, dest: &Path, dtype: DType) -> Result<ExportReport> {
    if !matches!(dtype, DType::F16 | DType::F32) {
        return Err(Error::invalid("export dtype", format!("{dtype:?} (use f16 or f32)")));
    }
    let cfg = PretrainConfig::load(&run.join("config.json"))?;
    let scaling_path = run.join("unet").join("scaling.json");
    let text = std::fs::read_to_string(&scaling_path).map_err(|e| Error::io(&scaling_path, e))?;
    let sv: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        file: scaling_path.clone(),
        key: "(file)".into(),
        msg: e.to_string(),
    })?;
    let scaling_factor = sv["scaling_factor"].as_f64().ok_or_else(|| Error::Config {
        file: scaling_path.clone(),
        key: "scaling_factor".into(),
        msg: "missing".into(),
    })?;
    let clip_w = latest_weights(&run.join("clip"))?;
    let vae_w = latest_weights(&run.join("vae"))?;
    let unet_w = latest_weights(&run.join("unet"))?;
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let mut files = Vec::new();

    write_json(
        &dest.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    write_json(&dest.join("scheduler").join("scheduler_config.json"), &scheduler_config_json())?;
    crate::tokenizer::write_tokenizer(&dest.join("tokenizer"), cfg.max_text_len)?;

    let clip = load_map(&clip_w)?;
    // `torch_dtype` stays float32 (as written by `clip_config_json`) whatever the storage dtype:
    // transformers would otherwise build the text encoder in f16 while diffusers builds the UNet
    // and VAE in f32, and a default `StableDiffusionPipeline` call would mix them.
    let dt = clip_config_json(&cfg);
    std::fs::create_dir_all(dest.join("clip")).map_err(|e| Error::io(dest.join("clip"), e))?;
    write_json(&dest.join("clip").join("config.json"), &dt)?;
    files.push((
        "clip".into(),
        save_map(clip.clone(), dtype, &dest.join("clip").join("model.safetensors"))?,
    ));
    let text_only: HashMap<String, Tensor> =
        clip.into_iter().filter(|(k, _)| k.starts_with("text_model.")).collect();
    std::fs::create_dir_all(dest.join("text_encoder"))
        .map_err(|e| Error::io(dest.join("text_encoder"), e))?;
    let tc = text_encoder_config_json(&cfg);
    write_json(&dest.join("text_encoder").join("config.json"), &tc)?;
    files.push((
        "text_encoder".into(),
        save_map(text_only, dtype, &dest.join("text_encoder").join("model.safetensors"))?,
    ));

    std::fs::create_dir_all(dest.join("vae")).map_err(|e| Error::io(dest.join("vae"), e))?;
    write_json(&dest.join("vae").join("config.json"), &vae_config_json(&cfg, scaling_factor))?;
    files.push((
        "vae".into(),
        save_map(
            load_map(&vae_w)?,
            dtype,
            &dest.join("vae").join("diffusion_pytorch_model.safetensors"),
        )?,
    ));

    std::fs::create_dir_all(dest.join("unet")).map_err(|e| Error::io(dest.join("unet"), e))?;
    write_json(&dest.join("unet").join("config.json"), &unet_config_json(&cfg))?;
    files.push((
        "unet".into(),
        save_map(
            load_map(&unet_w)?,
            dtype,
            &dest.join("unet").join("diffusion_pytorch_model.safetensors"),
        )?,
    ));

    let eval_dir = run.join("evaluator");
    let evaluator = match latest_weights(&eval_dir) {
        Ok(w) => {
            let ed = dest.join("evaluator");
            std::fs::create_dir_all(&ed).map_err(|e| Error::io(&ed, e))?;
            let c = std::fs::read(eval_dir.join("config.json"))
                .map_err(|e| Error::io(eval_dir.join("config.json"), e))?;
            write_atomic(ed.join("config.json"), &c)?;
            // the evaluator is small: kept in f32
            files.push((
                "evaluator".into(),
                save_map(load_map(&w)?, DType::F32, &ed.join("model.safetensors"))?,
            ));
            true
        }
        Err(_) => false,
    };
    Ok(ExportReport { files, scaling_factor, evaluator })
}
