//! UNet parity with diffusers (f64 references stored as f32):
//! 1. the committed tiny diffusers folder `tests/fixtures/tiny-sd/unet*` (made by
//!    `scripts/make_tiny_sd.py`, references by `scripts/make_parity_fixtures.py`): f32, fp16
//!    and SD-2-style weights;
//! 2. a config variant that folder does not cover (`tests/unet_vae_variant_fixtures/`, made by
//!    `tests/unet_vae_variant_fixtures.py`).
//!
//! Each also checks that every safetensors key is used and every model parameter found.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gen_models::unet::{UNet2DConditionModel, UNetConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The parameter names the model asks for, from a build over an empty `VarMap`.
fn requested_names(cfg: &UNetConfig) -> Result<BTreeSet<String>> {
    let varmap = VarMap::new();
    UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), cfg)?;
    let names = varmap.data().lock().unwrap().keys().cloned().collect();
    Ok(names)
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn check(sub: &str, weights: &str, reference: &str) -> Result<()> {
    let dir = fixtures().join("tiny-sd").join(sub);
    let cfg = UNetConfig::from_file(dir.join("config.json"))?;
    let wpath = dir.join(weights);
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&wpath)? };
    let keys: BTreeSet<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
    let wanted = requested_names(&cfg)?;
    let unused: Vec<_> = keys.difference(&wanted).collect();
    let missing: Vec<_> = wanted.difference(&keys).collect();
    assert!(
        unused.is_empty() && missing.is_empty(),
        "{sub}/{weights}: unused keys {unused:?}, missing {missing:?}"
    );

    let dev = Device::Cpu;
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&wpath], DType::F32, &dev)? };
    let model = UNet2DConditionModel::new(vb, &cfg)?;
    let r = candle_core::safetensors::load(fixtures().join("parity").join(reference), &dev)?;
    let (x, ehs) = (&r["sample"], &r["encoder_hidden_states"]);
    for (tkey, okey) in [
        ("timesteps_mixed", "out_mixed"),
        ("timesteps_mixed_i64", "out_mixed"),
        ("timesteps_uniform", "out_uniform"),
    ] {
        let out = model.forward(x, &r[tkey], ehs)?;
        let want = &r[okey];
        let err = max_abs(&(out - want)?)?;
        let scale = max_abs(want)?;
        eprintln!("{sub}/{weights} {tkey}: max abs err {err:.2e} (output scale {scale:.2})");
        assert!(err < 1e-5 * scale.max(1.0), "{sub}/{weights} {tkey}: max abs err {err:e}");
    }
    Ok(())
}

#[test]
fn tiny_sd_unet_keys_and_parity() -> Result<()> {
    check("unet", "diffusion_pytorch_model.safetensors", "unet.safetensors")
}

#[test]
fn tiny_sd_unet_fp16_keys_and_parity() -> Result<()> {
    check("unet", "diffusion_pytorch_model.fp16.safetensors", "unet_fp16.safetensors")
}

#[test]
fn tiny_sd_unet_sd2_keys_and_parity() -> Result<()> {
    check("unet-sd2", "diffusion_pytorch_model.safetensors", "unet_sd2.safetensors")
}

/// Half precision on the CPU runs (norms, softmax and attention in f32 inside) and stays close
/// to the f64 reference.
#[test]
fn tiny_sd_unet_f16_runs_close() -> Result<()> {
    let dir = fixtures().join("tiny-sd/unet");
    let cfg = UNetConfig::from_file(dir.join("config.json"))?;
    let dev = Device::Cpu;
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            DType::F16,
            &dev,
        )?
    };
    let model = UNet2DConditionModel::new(vb, &cfg)?;
    let r = candle_core::safetensors::load(fixtures().join("parity/unet.safetensors"), &dev)?;
    let x = r["sample"].to_dtype(DType::F16)?;
    let out = model.forward(&x, &r["timesteps_mixed"], &r["encoder_hidden_states"])?;
    assert_eq!(out.dtype(), DType::F16);
    let err = max_abs(&(out.to_dtype(DType::F32)? - &r["out_mixed"])?)?;
    let scale = max_abs(&r["out_mixed"])?;
    eprintln!("unet f16: max abs err {err:.2e} (output scale {scale:.2})");
    assert!(err < 2e-2 * scale.max(1.0), "f16 max abs err {err:e}");
    Ok(())
}

/// The UNet against diffusers on a config variant the tiny-sd fixture does not cover (linear
/// projections, two transformer layers, only-cross-attention, per-block heads, upcast attention,
/// sin-first time embedding with shift 1, centred input, two resnets per block). Fixture made by
/// `tests/unet_vae_variant_fixtures.py`: every key must be used, outputs must match.
#[test]
fn unet_variant_keys_and_parity() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/unet_vae_variant_fixtures");
    let cfg = UNetConfig::from_file(dir.join("unet/config.json"))?;
    assert_eq!(cfg.only_cross_attention.expand(2), Some(vec![true, false]));
    let wpath = dir.join("unet/diffusion_pytorch_model.safetensors");
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&wpath)? };
    let keys: BTreeSet<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
    let varmap = VarMap::new();
    UNet2DConditionModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg)?;
    let wanted: BTreeSet<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    let unused: Vec<_> = keys.difference(&wanted).collect();
    let missing: Vec<_> = wanted.difference(&keys).collect();
    assert!(unused.is_empty() && missing.is_empty(), "unused keys {unused:?}, missing {missing:?}");

    let dev = Device::Cpu;
    let r = candle_core::safetensors::load(dir.join("io_unet.safetensors"), &dev)?;
    for dtype in [DType::F32, DType::F64] {
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&wpath], dtype, &dev)? };
        let model = UNet2DConditionModel::new(vb, &cfg)?;
        let x = r["sample"].to_dtype(dtype)?;
        let out = model
            .forward(&x, &r["timesteps"], &r["encoder_hidden_states"])?
            .to_dtype(DType::F32)?;
        let err = max_abs(&(out - &r["out"])?)?;
        let scale = max_abs(&r["out"])?;
        eprintln!(
            "UNet variant parity ({dtype:?}): max abs err {err:.2e} (output scale {scale:.2})"
        );
        assert!(err < 1e-5 * scale.max(1.0), "{dtype:?}: max abs err {err:e}");
    }
    Ok(())
}

/// A `VarBuilder` backend that records every requested name and shape and hands out stride-0
/// zero tensors, so full-size models can be built without memory.
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

/// At full size (SD 1.5 and SD 2.1 configs), the UNet asks for exactly diffusers' parameter
/// names and shapes (`tests/unet_vae_variant_fixtures/sd_shapes.json`, from diffusers by
/// `tests/unet_vae_sd_shapes.py`).
#[test]
fn sd_unet_parameter_names_and_shapes_match_diffusers() -> Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/unet_vae_variant_fixtures/sd_shapes.json");
    let all: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    for name in ["sd15_unet", "sd21_unet"] {
        let cfg = UNetConfig::from_json(&all[name]["config"], name)?;
        let want: std::collections::BTreeMap<String, Vec<usize>> =
            serde_json::from_value(all[name]["params"].clone())?;
        let rec = ShapeRecorder::default();
        let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
        let model = UNet2DConditionModel::new(vb, &cfg)?;
        let got = rec.0.lock().unwrap().clone();
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: missing {missing:?}, extra {extra:?}"
        );
        for (k, s) in &want {
            assert_eq!(&got[k], s, "{name}: shape of {k}");
        }
        let n: usize = got.values().map(|s| s.iter().product::<usize>()).sum();
        eprintln!(
            "{name}: {} tensors, {n} parameters, {} linear layers",
            got.len(),
            model.linears().len()
        );
    }
    Ok(())
}
