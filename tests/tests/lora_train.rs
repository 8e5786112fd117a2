//! LoRA on the tiny SD UNet in f64: finite-difference check of the A and B gradients through the
//! whole UNet, no gradient for base weights, and a few AdamW steps on the LoRA Vars alone
//! reducing a loss while the base weights (Vars of a VarMap) stay bit-identical.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gen_core::SeededRng;
use gen_models::loading::{find_weight_files, weights_vb, WeightVariant};
use gen_models::unet::{UNet2DConditionModel, UNetConfig};
use gen_optim::lora::*;
use gen_optim::{AdamW, AdamWConfig, Optim, Optimizer, ParamGroup};

fn unet_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-sd/unet")
}

fn files() -> Result<Vec<PathBuf>> {
    Ok(find_weight_files(&unet_dir(), &WeightVariant { variant: None })?)
}

fn cfg() -> Result<UNetConfig> {
    Ok(UNetConfig::from_file(unet_dir().join("config.json"))?)
}

/// Batch-1 inputs: sample (1,4,8,8), timestep 500, context (1,5,32).
fn inputs() -> Result<(Tensor, Tensor, Tensor)> {
    let mut rng = SeededRng::new(77);
    let x = rng.randn((1, 4, 8, 8), DType::F64, &Device::Cpu)?;
    let ctx = rng.randn((1, 5, 32), DType::F64, &Device::Cpu)?;
    Ok((x, Tensor::new(&[500f64], &Device::Cpu)?, ctx))
}

fn lora_cfg() -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 3.0,
        dropout: 0.0,
        init: LoraInit::Gaussian,
        target_modules: vec!["attn1.to_q".into(), "attn2.to_k".into(), "ff.net.2".into()],
    }
}

#[test]
fn unet_lora_gradients_match_finite_differences() -> Result<()> {
    let unet =
        UNet2DConditionModel::new(weights_vb(&files()?, DType::F64, &Device::Cpu)?, &cfg()?)?;
    let set = attach_lora(&unet.linears(), "unet", &lora_cfg(), &mut SeededRng::new(1))?;
    let mut rng = SeededRng::new(2);
    for e in set.entries() {
        let b = e.adapter.b();
        b.set(&(rng.randn(b.shape(), DType::F64, &Device::Cpu)? * 0.5)?)?;
    }
    let (x, t, ctx) = inputs()?;
    let w = rng.randn((1, 4, 8, 8), DType::F64, &Device::Cpu)?;
    let loss = || -> Result<Tensor> { Ok((unet.forward(&x, &t, &ctx)? * &w)?.sum_all()?) };
    let grads = loss()?.backward()?;
    for l in unet.linears() {
        ensure!(grads.get(&l.weight()).is_none(), "{}: base weight got a gradient", l.name());
    }
    // Adapters in three places: first down-block self-attention, a cross-attention key (input from
    // the context) and an up-block feed-forward output.
    let vars = set.vars();
    let picks: Vec<&gen_optim::NamedVar> = vars
        .iter()
        .filter(|v| {
            v.name.contains("down_blocks.0.attentions.0")
                || v.name.contains("mid_block") && v.name.contains("attn2.to_k")
                || v.name.contains("up_blocks.1.attentions.2")
        })
        .collect();
    ensure!(picks.len() == 2 * (3 + 1 + 3), "picked {}", picks.len());
    let h = 1e-5;
    let (mut worst, mut checked) = (0f64, 0);
    for nv in picks {
        let v: &Var = &nv.var;
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient for {}", nv.name))?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = v.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let gscale = g.iter().fold(0f64, |m, x| m.max(x.abs()));
        ensure!(gscale > 1e-4, "{}: gradient nearly zero ({gscale})", nv.name);
        for k in 0..4 {
            let i = (k * 7919 + 13) % base.len();
            let set_at = |d: f64| -> Result<()> {
                let mut p = base.clone();
                p[i] += d;
                v.set(&Tensor::from_vec(p, v.shape(), &Device::Cpu)?)?;
                Ok(())
            };
            set_at(h)?;
            let lp = loss()?.to_scalar::<f64>()?;
            set_at(-h)?;
            let lm = loss()?.to_scalar::<f64>()?;
            set_at(0.0)?;
            let fd = (lp - lm) / (2.0 * h);
            let err = (fd - g[i]).abs() / gscale;
            worst = worst.max(err);
            checked += 1;
        }
    }
    println!(
        "UNet LoRA FD: {checked} entries, max error relative to the gradient scale {worst:.2e}"
    );
    ensure!(worst < 1e-6, "FD mismatch {worst}");
    Ok(())
}

#[test]
fn adamw_on_unet_lora_reduces_loss_base_vars_untouched() -> Result<()> {
    // Base weights as Vars of a VarMap (as a trainer would hold them), frozen by leaving them out
    // of the optimizer.
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for f in files()? {
            for (k, t) in candle_core::safetensors::load(&f, &Device::Cpu)? {
                data.insert(k, Var::from_tensor(&t.to_dtype(DType::F64)?)?);
            }
        }
    }
    let unet =
        UNet2DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu), &cfg()?)?;
    let before: Vec<(String, Vec<f64>)> = {
        let data = vm.data().lock().unwrap();
        let mut v: Vec<_> = data
            .iter()
            .map(|(k, v)| {
                (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap())
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let set = attach_lora(&unet.linears(), "unet", &LoraConfig::default(), &mut SeededRng::new(5))?;
    let (x, t, ctx) = inputs()?;
    let target = SeededRng::new(6).randn((1, 4, 8, 8), DType::F64, &Device::Cpu)?;
    let loss =
        || -> Result<Tensor> { Ok((unet.forward(&x, &t, &ctx)? - &target)?.sqr()?.mean_all()?) };
    let mut opt = Optim::new(
        AdamW,
        vec![ParamGroup::new(
            set.vars(),
            AdamWConfig { lr: 1e-2, weight_decay: 0.0, ..Default::default() },
        )],
    )?;
    let l0 = loss()?.to_scalar::<f64>()?;
    let start = std::time::Instant::now();
    for _ in 0..8 {
        let g = loss()?.backward()?;
        opt.step(&g)?;
    }
    let l1 = loss()?.to_scalar::<f64>()?;
    println!("UNet LoRA AdamW: loss {l0:.5} -> {l1:.5} in 8 steps ({:.2?})", start.elapsed());
    ensure!(l1 < 0.95 * l0, "loss {l0} -> {l1}");
    let after: Vec<(String, Vec<f64>)> = {
        let data = vm.data().lock().unwrap();
        let mut v: Vec<_> = data
            .iter()
            .map(|(k, v)| {
                (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap())
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    ensure!(before == after, "a base weight changed");
    Ok(())
}
