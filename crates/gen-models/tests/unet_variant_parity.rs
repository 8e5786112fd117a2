//! The UNet against diffusers on a config variant the tiny-sd fixture does not cover (linear
//! projections, two transformer layers, only-cross-attention, per-block heads, upcast attention,
//! sin-first time embedding with shift 1, centred input, two resnets per block). Fixture made by
//! `tests/unet_vae_variant_fixtures.py`: every key must be used, outputs must match.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use gen_models::unet::{UNet2DConditionModel, UNetConfig};

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

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
        let out = model.forward(&x, &r["timesteps"], &r["encoder_hidden_states"])?.to_dtype(DType::F32)?;
        let err = max_abs(&(out - &r["out"])?)?;
        let scale = max_abs(&r["out"])?;
        eprintln!("UNet variant parity ({dtype:?}): max abs err {err:.2e} (output scale {scale:.2})");
        assert!(err < 1e-5 * scale.max(1.0), "{dtype:?}: max abs err {err:e}");
    }
    Ok(())
}
