//! Seeded mutation tests of everything gen-models reads from a model folder: safetensors
//! weights, model configs (UNet, VAE, CLIP text) and tokenizer files. Every mutated file must
//! give a clean error or a valid result — no panic, no abort (a huge declared size is an error
//! before anything is allocated). Also: a NaN weight is refused on load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gen_core::fuzz::run_cases;
use gen_models::clip::{ClipTextConfig, ClipTextTransformer};
use gen_models::loading::{JsonConfig, SafetensorsWeights};
use gen_models::tokenizer::Tokenizer;
use gen_models::unet::{UNet2DConditionModel, UNetConfig};
use gen_models::vae::{AutoencoderKL, VaeConfig};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../weights/tiny-shapes")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-models-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn fuzz_safetensors_weights() -> anyhow::Result<()> {
    let d = tmp("safetensors");
    let dev = Device::Cpu;
    let base = Tensor::arange(0f32, 24.0, &dev)?.reshape((2, 3, 4))?;
    let mut m: HashMap<String, Tensor> = HashMap::new();
    m.insert("w.f32".into(), base.clone());
    m.insert("w.f16".into(), base.to_dtype(DType::F16)?.reshape((4, 6))?);
    m.insert("w.bf16".into(), base.to_dtype(DType::BF16)?.flatten_all()?);
    m.insert("b".into(), Tensor::new(&[1.5f64, -2.0], &dev)?);
    let f = d.join("model.safetensors");
    candle_core::safetensors::save(&m, &f)?;
    let bytes = std::fs::read(&f)?;
    let (_, err) = run_cases("safetensors", &bytes, 400, |b| -> anyhow::Result<()> {
        std::fs::write(&f, b)?;
        let w = SafetensorsWeights::open(std::slice::from_ref(&f))?;
        for k in w.keys() {
            let shape = w.info(&k).map(|i| i.shape.clone());
            w.load(&k, shape.as_deref(), DType::F32, &dev)?;
        }
        Ok(())
    });
    assert!(err > 100, "the mutations must mostly break the file: {err} errors");
    std::fs::remove_dir_all(&d)?;
    Ok(())
}

/// Headers declaring sizes that overflow or exceed the file are errors before allocation
/// (a shape whose byte size overflows used to panic in the size check).
#[test]
fn huge_declared_sizes_are_errors() -> anyhow::Result<()> {
    let d = tmp("huge");
    let f = d.join("model.safetensors");
    let write = |header: &str, data: usize, len_field: Option<u64>| -> anyhow::Result<()> {
        let mut b = len_field.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(&f, b)?;
        Ok(())
    };
    for (header, data, len_field) in [
        (
            r#"{"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}"#,
            16,
            None,
        ),
        (r#"{"w":{"dtype":"F16","shape":[18446744073709551615],"data_offsets":[0,2]}}"#, 2, None),
        (r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,18446744073709551615]}}"#, 16, None),
        (r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 16, Some(u64::MAX)),
        (r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 16, Some(1 << 40)),
    ] {
        write(header, data, len_field)?;
        let e = SafetensorsWeights::open(std::slice::from_ref(&f)).unwrap_err().to_string();
        assert!(e.contains(&f.display().to_string()), "{e}");
    }
    std::fs::remove_dir_all(&d)?;
    Ok(())
}

/// A model config, mutated, is parsed; when it parses, the model is built from the shipped
/// weights (a config that disagrees with them is an error naming the tensor).
#[test]
fn fuzz_model_configs() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let dir = model_dir();
    let unet_w = SafetensorsWeights::open(&[dir.join("unet/diffusion_pytorch_model.safetensors")])?;
    let vae_w = SafetensorsWeights::open(&[dir.join("vae/diffusion_pytorch_model.safetensors")])?;
    let te_w = SafetensorsWeights::open(&[dir.join("text_encoder/model.safetensors")])?;
    let read = |p: &str| std::fs::read(dir.join(p));
    run_cases("unet config", &read("unet/config.json")?, 300, |b| -> anyhow::Result<()> {
        let v: serde_json::Value = serde_json::from_slice(b)?;
        let cfg = UNetConfig::from_json(&v, "unet/config.json")?;
        UNet2DConditionModel::new(unet_w.var_builder(DType::F32, &dev), &cfg)?;
        Ok(())
    });
    run_cases("vae config", &read("vae/config.json")?, 300, |b| -> anyhow::Result<()> {
        let v: serde_json::Value = serde_json::from_slice(b)?;
        let cfg = VaeConfig::from_json(&v, "vae/config.json")?;
        AutoencoderKL::new(vae_w.var_builder(DType::F32, &dev), &cfg)?;
        Ok(())
    });
    run_cases(
        "text encoder config",
        &read("text_encoder/config.json")?,
        300,
        |b| -> anyhow::Result<()> {
            let c = JsonConfig::from_str("text_encoder/config.json", std::str::from_utf8(b)?)?;
            let cfg = ClipTextConfig::from_json(&c)?;
            ClipTextTransformer::new(te_w.var_builder(DType::F32, &dev), &cfg)?;
            Ok(())
        },
    );
    Ok(())
}

/// Each tokenizer file of the shipped folder, mutated (the others intact), loads or fails
/// cleanly; a loaded tokenizer encodes a prompt.
#[test]
fn fuzz_tokenizer_files() -> anyhow::Result<()> {
    let src = model_dir().join("tokenizer");
    for file in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        let d = tmp(&format!("tokenizer-{file}"));
        for e in std::fs::read_dir(&src)? {
            let e = e?;
            std::fs::copy(e.path(), d.join(e.file_name()))?;
        }
        let base = std::fs::read(src.join(file))?;
        run_cases(file, &base, 200, |b| -> anyhow::Result<()> {
            std::fs::write(d.join(file), b)?;
            let t = Tokenizer::from_folder(&d)?;
            t.encode("a red cube on a grey background, front view", 16)?;
            Ok(())
        });
        std::fs::remove_dir_all(&d)?;
    }
    Ok(())
}

/// One f16 of the UNet's `conv_in.weight` set to NaN: loading the model is an error naming
/// the file and the tensor (it used to give an all-black image).
#[test]
fn nan_weight_is_refused_naming_file_and_tensor() -> anyhow::Result<()> {
    let d = tmp("nan-weight");
    let src = model_dir().join("unet/diffusion_pytorch_model.safetensors");
    let f = d.join("diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&src)?;
    // the element's offset from the header
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let info = &header["conv_in.weight"];
    assert_eq!(info["dtype"], "F16");
    let start = 8 + n + info["data_offsets"][0].as_u64().unwrap() as usize;
    let at = start + 2 * 5; // element 5
    bytes[at..at + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    std::fs::write(&f, &bytes)?;
    let cfg = UNetConfig::from_file(model_dir().join("unet/config.json"))?;
    let w = SafetensorsWeights::open(std::slice::from_ref(&f))?;
    let Err(e) = UNet2DConditionModel::new(w.var_builder(DType::F32, &Device::Cpu), &cfg) else {
        panic!("a NaN weight must be refused");
    };
    let e = e.to_string();
    assert!(
        e.contains(&f.display().to_string())
            && e.contains("`conv_in.weight`")
            && e.contains("element 5 is NaN"),
        "{e}"
    );
    // +inf too
    bytes[at..at + 2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    std::fs::write(&f, &bytes)?;
    let w = SafetensorsWeights::open(std::slice::from_ref(&f))?;
    let e = w.load("conv_in.weight", None, DType::F16, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("element 5 is inf"), "{e}");
    std::fs::remove_dir_all(&d)?;
    Ok(())
}
