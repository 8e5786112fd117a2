//! VAE parity with diffusers (f64 references stored as f32): encode (posterior mean and
//! log-variance) and decode on
//! 1. the committed tiny diffusers folder `tests/fixtures/tiny-sd/vae` (references by
//!    `scripts/make_parity_fixtures.py`);
//! 2. a config variant it does not cover (`tests/unet_vae_variant_fixtures/`, made by
//!    `tests/unet_vae_variant_fixtures.py`).
//!
//! Each also checks that every safetensors key is used and every model parameter found.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gen_models::vae::{AutoencoderKL, VaeConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[test]
fn tiny_sd_vae_keys_and_parity() -> Result<()> {
    let dir = fixtures().join("tiny-sd/vae");
    let cfg = VaeConfig::from_file(dir.join("config.json"))?;
    let wpath = dir.join("diffusion_pytorch_model.safetensors");
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&wpath)? };
    let keys: BTreeSet<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
    let varmap = VarMap::new();
    AutoencoderKL::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg)?;
    let wanted: BTreeSet<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    let unused: Vec<_> = keys.difference(&wanted).collect();
    let missing: Vec<_> = wanted.difference(&keys).collect();
    assert!(unused.is_empty() && missing.is_empty(), "unused keys {unused:?}, missing {missing:?}");

    let dev = Device::Cpu;
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&wpath], DType::F32, &dev)? };
    let model = AutoencoderKL::new(vb, &cfg)?;
    assert!((model.config().scaling_factor - 0.18215).abs() < 1e-9);
    let r = candle_core::safetensors::load(fixtures().join("parity/vae.safetensors"), &dev)?;
    let post = model.encode(&r["image"])?;
    let decoded = model.decode(&r["latent"])?;
    for (name, got, want) in [
        ("posterior_mean", &post.mean, &r["posterior_mean"]),
        ("posterior_logvar", &post.logvar, &r["posterior_logvar"]),
        ("decoded", &decoded, &r["decoded"]),
    ] {
        let err = max_abs(&(got - want)?)?;
        let scale = max_abs(want)?;
        eprintln!("vae {name}: max abs err {err:.2e} (scale {scale:.2})");
        assert!(err < 1e-5 * scale.max(1.0), "{name}: max abs err {err:e}");
    }
    Ok(())
}

/// The VAE against diffusers on a config variant the tiny-sd fixture does not cover (three
/// blocks, two resnets per block, no quant/post-quant convolutions, GELU). Fixture made by
/// `tests/unet_vae_variant_fixtures.py`: every key must be used, outputs must match.
#[test]
fn vae_variant_keys_and_parity() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/unet_vae_variant_fixtures");
    let cfg = VaeConfig::from_file(dir.join("vae/config.json"))?;
    assert!(!cfg.use_quant_conv && !cfg.use_post_quant_conv);
    let wpath = dir.join("vae/diffusion_pytorch_model.safetensors");
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&wpath)? };
    let keys: BTreeSet<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
    let varmap = VarMap::new();
    AutoencoderKL::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg)?;
    let wanted: BTreeSet<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    let unused: Vec<_> = keys.difference(&wanted).collect();
    let missing: Vec<_> = wanted.difference(&keys).collect();
    assert!(unused.is_empty() && missing.is_empty(), "unused keys {unused:?}, missing {missing:?}");

    let dev = Device::Cpu;
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&wpath], DType::F32, &dev)? };
    let model = AutoencoderKL::new(vb, &cfg)?;
    assert_eq!(model.downscale_factor(), 4);
    let r = candle_core::safetensors::load(dir.join("io_vae.safetensors"), &dev)?;
    let post = model.encode(&r["image"])?;
    let decoded = model.decode(&r["latent"])?;
    for (name, got, want) in [
        ("posterior_mean", &post.mean, &r["posterior_mean"]),
        ("posterior_logvar", &post.logvar, &r["posterior_logvar"]),
        ("decoded", &decoded, &r["decoded"]),
    ] {
        let err = max_abs(&(got - want)?)?;
        let scale = max_abs(want)?;
        eprintln!("VAE variant {name}: max abs err {err:.2e} (scale {scale:.2})");
        assert!(err < 1e-5 * scale.max(1.0), "{name}: max abs err {err:e}");
    }
    Ok(())
}

/// Records requested names and shapes; hands out stride-0 zero tensors (no memory).
#[derive(Clone, Default)]
struct ShapeRecorder(
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<usize>>>>,
);

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// At full size (the SD 1.x/2.x VAE config), the VAE asks for exactly diffusers' parameter
/// names and shapes (`tests/unet_vae_variant_fixtures/sd_shapes.json`, from diffusers by
/// `tests/unet_vae_sd_shapes.py`).
#[test]
fn sd_vae_parameter_names_and_shapes_match_diffusers() -> Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/unet_vae_variant_fixtures/sd_shapes.json");
    let all: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let cfg = VaeConfig::from_json(&all["sd_vae"]["config"], "sd_vae")?;
    let want: std::collections::BTreeMap<String, Vec<usize>> =
        serde_json::from_value(all["sd_vae"]["params"].clone())?;
    let rec = ShapeRecorder::default();
    AutoencoderKL::new(
        VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu),
        &cfg,
    )?;
    let got = rec.0.lock().unwrap().clone();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "parameter names differ"
    );
    for (k, s) in &want {
        assert_eq!(&got[k], s, "shape of {k}");
    }
    let n: usize = got.values().map(|s| s.iter().product::<usize>()).sum();
    eprintln!("sd_vae: {} tensors, {n} parameters", got.len());
    Ok(())
}
