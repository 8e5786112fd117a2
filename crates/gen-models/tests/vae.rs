//! Tests of the VAE on tiny random-weight configs (f64): finite-difference gradient checks of
//! encode and decode, every parameter reached by the gradient, legacy attention key names,
//! config errors.

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gen_core::SeededRng;
use gen_models::vae::{AutoencoderKL, VaeConfig};
use serde_json::json;

/// An edit of a config JSON (for the error-message cases).
type ConfigEdit = Box<dyn Fn(&mut serde_json::Value)>;

fn tiny_json() -> serde_json::Value {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "act_fn": "silu",
        "sample_size": 8
    })
}

fn tiny_cfg() -> VaeConfig {
    VaeConfig::from_json(&tiny_json(), "tiny").unwrap()
}

/// Deterministic random values: norm weights near 1, biases small, weights ~ N(0, 1/fan_in).
fn randomize(varmap: &VarMap, seed: u64) -> Result<BTreeMap<String, Var>> {
    let vars: BTreeMap<String, Var> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut rng = SeededRng::new(seed);
    for (name, var) in &vars {
        let shape = var.shape().clone();
        let n = rng.randn(shape.clone(), DType::F64, &Device::Cpu)?;
        let t = if name.ends_with(".bias") {
            (n * 0.1)?
        } else if name.contains("norm") {
            ((n * 0.1)? + 1.0)?
        } else {
            let fan_in = shape.elem_count() / shape.dims()[0];
            (n / (fan_in as f64).sqrt())?
        };
        var.set(&t)?;
    }
    Ok(vars)
}

fn build(cfg: &VaeConfig, seed: u64) -> Result<(AutoencoderKL, BTreeMap<String, Var>)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let model = AutoencoderKL::new(vb, cfg)?;
    Ok((model, randomize(&varmap, seed)?))
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_vec1::<f64>()?)
}

fn probe_indices(g: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..g.len()).collect();
    idx.sort_by(|a, b| g[*b].abs().partial_cmp(&g[*a].abs()).unwrap());
    let mut out = vec![idx[0]];
    if g.len() > 1 {
        out.push(idx[1]);
    }
    out.push(g.len() / 3);
    out.push(g.len() - 1);
    out.dedup();
    out
}

fn fd(var: &Var, i: usize, h: f64, f: &mut dyn FnMut() -> Result<f64>) -> Result<f64> {
    let orig = var.as_tensor().copy()?;
    let mut v = flat(&orig)?;
    let x0 = v[i];
    v[i] = x0 + h;
    var.set(&Tensor::from_vec(v.clone(), orig.shape(), &Device::Cpu)?)?;
    let lp = f()?;
    v[i] = x0 - h;
    var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu)?)?;
    let lm = f()?;
    var.set(&orig)?;
    Ok((lp - lm) / (2.0 * h))
}

fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-8)
}

/// Checks the gradient of `f` w.r.t. the listed variables at a few entries; returns the worst
/// relative error.
fn check_fd(
    grads: &candle_core::backprop::GradStore,
    vars: &[(String, Var)],
    f: &mut dyn FnMut() -> Result<f64>,
) -> Result<f64> {
    let mut worst = 0f64;
    for (name, var) in vars {
        let g =
            flat(grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")))?;
        for i in probe_indices(&g) {
            let n = fd(var, i, 1e-5, f)?;
            let e = rel_err(g[i], n);
            worst = worst.max(e);
            assert!(e < 1e-6, "{name}[{i}]: analytic {} vs FD {n} (rel. err {e:.2e})", g[i]);
        }
    }
    Ok(worst)
}

#[test]
fn vae_gradients_match_finite_differences() -> Result<()> {
    let (model, vars) = build(&tiny_cfg(), 1)?;
    let mut rng = SeededRng::new(2);
    let dev = Device::Cpu;
    let x = Var::from_tensor(&rng.rand_uniform((2, 3, 8, 8), -1.0, 1.0, DType::F64, &dev)?)?;
    let z = Var::from_tensor(&rng.randn((2, 4, 4, 4), DType::F64, &dev)?)?;
    let (wm, wl) =
        (rng.randn((2, 4, 4, 4), DType::F64, &dev)?, rng.randn((2, 4, 4, 4), DType::F64, &dev)?);
    let wd = rng.randn((2, 3, 8, 8), DType::F64, &dev)?;
    let named = |names: &[&str]| -> Vec<(String, Var)> {
        names
            .iter()
            .map(|n| {
                (n.to_string(), vars.get(*n).unwrap_or_else(|| panic!("no parameter {n}")).clone())
            })
            .collect()
    };

    // Encoder: L = Σ mean ⊙ wm + Σ logvar ⊙ wl.
    let enc_loss = |x: &Tensor| -> Result<Tensor> {
        let d = model.encode(x)?;
        Ok(((d.mean * &wm)?.sum_all()? + (d.logvar * &wl)?.sum_all()?)?)
    };
    let grads = enc_loss(x.as_tensor())?.backward()?;
    let mut enc_vars = named(&[
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.resnets.0.norm1.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.attentions.0.to_k.weight",
        "encoder.mid_block.attentions.0.to_v.bias",
        "encoder.mid_block.attentions.0.to_out.0.weight",
        "encoder.conv_norm_out.bias",
        "quant_conv.weight",
    ]);
    enc_vars.push(("image".into(), x.clone()));
    let mut f = || -> Result<f64> { Ok(enc_loss(x.as_tensor())?.to_scalar::<f64>()?) };
    let worst_enc = check_fd(&grads, &enc_vars, &mut f)?;

    // Decoder: L = Σ decode(z) ⊙ wd.
    let dec_loss = |z: &Tensor| -> Result<Tensor> { Ok((model.decode(z)? * &wd)?.sum_all()?) };
    let grads = dec_loss(z.as_tensor())?.backward()?;
    let mut dec_vars = named(&[
        "post_quant_conv.weight",
        "decoder.conv_in.weight",
        "decoder.mid_block.resnets.0.norm2.weight",
        "decoder.mid_block.attentions.0.to_q.weight",
        "decoder.mid_block.attentions.0.to_k.weight",
        "decoder.mid_block.attentions.0.group_norm.bias",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.conv_out.weight",
    ]);
    dec_vars.push(("latent".into(), z.clone()));
    let mut f = || -> Result<f64> { Ok(dec_loss(z.as_tensor())?.to_scalar::<f64>()?) };
    let worst_dec = check_fd(&grads, &dec_vars, &mut f)?;
    eprintln!("VAE FD: worst relative error encode {worst_enc:.2e}, decode {worst_dec:.2e}");
    Ok(())
}

#[test]
fn vae_every_parameter_gets_a_gradient() -> Result<()> {
    let (model, vars) = build(&tiny_cfg(), 3)?;
    let mut rng = SeededRng::new(4);
    let x = rng.rand_uniform((2, 3, 8, 8), -1.0, 1.0, DType::F64, &Device::Cpu)?;
    let d = model.encode(&x)?;
    let z = d.sample(&mut rng)?;
    let y = model.decode(&z)?;
    let w = rng.randn(y.shape(), DType::F64, &Device::Cpu)?;
    let grads = (y * w)?.sum_all()?.backward()?;
    let missing: Vec<&String> = vars
        .iter()
        .filter(|(_, v)| match grads.get(v.as_tensor()) {
            Some(g) => g.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() == 0.0,
            None => true,
        })
        .map(|(k, _)| k)
        .collect();
    assert!(missing.is_empty(), "parameters without gradient: {missing:?}");
    assert_eq!(model.linears().len(), 8, "two mid-block attentions × 4 projections");
    Ok(())
}

#[test]
fn vae_sample_is_seeded_and_logvar_clamped() -> Result<()> {
    let (model, _) = build(&tiny_cfg(), 5)?;
    let x = SeededRng::new(6).rand_uniform((1, 3, 8, 8), -1.0, 1.0, DType::F64, &Device::Cpu)?;
    let d = model.encode(&x)?;
    assert_eq!(d.mean.dims(), &[1, 4, 4, 4]);
    let a = d.sample(&mut SeededRng::new(9))?;
    let b = d.sample(&mut SeededRng::new(9))?;
    assert_eq!(flat(&a)?, flat(&b)?);
    let c = d.sample(&mut SeededRng::new(10))?;
    assert_ne!(flat(&a)?, flat(&c)?);
    // The clamp: logvar of an extreme distribution stays in [-30, 20].
    let big = model.encode(&(x * 1e6)?)?;
    let lv = flat(&big.logvar)?;
    assert!(lv.iter().all(|v| (-30.0..=20.0).contains(v)), "{lv:?}");
    Ok(())
}

/// A checkpoint with the legacy attention names (`query`, `key`, `value`, `proj_attn`) loads and
/// computes the same as one with the current names.
#[test]
fn vae_legacy_attention_keys_load() -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let model = AutoencoderKL::new(vb, &tiny_cfg())?;
    randomize(&varmap, 11)?;
    let current: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let rename = [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")];
    let legacy: HashMap<String, Tensor> = current
        .iter()
        .map(|(k, v)| {
            let mut k = k.clone();
            for (new, old) in rename {
                k = k.replace(&format!("attentions.0.{new}."), &format!("attentions.0.{old}."));
            }
            (k, v.clone())
        })
        .collect();
    assert!(legacy.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    let old = AutoencoderKL::new(
        VarBuilder::from_tensors(legacy, DType::F64, &Device::Cpu),
        &tiny_cfg(),
    )?;
    let z = SeededRng::new(12).randn((1, 4, 4, 4), DType::F64, &Device::Cpu)?;
    let d = (model.decode(&z)? - old.decode(&z)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d == 0.0, "legacy-named weights decode differently: {d}");
    let names: Vec<String> = old.linears().iter().map(|l| l.name().to_string()).collect();
    assert!(names.contains(&"encoder.mid_block.attentions.0.query".to_string()), "{names:?}");
    Ok(())
}

/// The attention block gives the same result for a transposed (non-contiguous) input as for a
/// contiguous copy. candle 0.11.1's batched matmul gets the former wrong silently, so the block
/// must make its input contiguous.
#[test]
fn attention_block_handles_transposed_input() -> Result<()> {
    use gen_models::blocks::{Attention, AttentionLayerConfig};
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = AttentionLayerConfig {
        query_dim: 6,
        cross_attention_dim: None,
        heads: 2,
        dim_head: 3,
        qkv_bias: true,
    };
    let attn = Attention::new(vb, &cfg)?;
    randomize(&varmap, 13)?;
    let x = SeededRng::new(14).randn((2, 6, 5), DType::F64, &Device::Cpu)?.transpose(1, 2)?;
    let a = attn.forward(&x, None, &Default::default())?;
    let b = attn.forward(&x.contiguous()?, None, &Default::default())?;
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d < 1e-14, "transposed input differs by {d}");
    Ok(())
}

#[test]
fn vae_config_errors_name_file_and_key() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("gen-models-vae-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ok = dir.join("ok.json");
    std::fs::write(&ok, tiny_json().to_string())?;
    let cfg = VaeConfig::from_file(&ok)?;
    assert_eq!(cfg, tiny_cfg());
    assert!(
        (cfg.scaling_factor - 0.18215).abs() < 1e-12
            && cfg.use_quant_conv
            && cfg.mid_block_add_attention
    );
    let mut with_stats = tiny_json();
    with_stats["latents_mean"] = json!([0.1, 0.2, 0.3, 0.4]);
    with_stats["latents_std"] = json!([1.0, 2.0, 3.0, 4.0]);
    with_stats["shift_factor"] = json!(0.5);
    let cfg = VaeConfig::from_json(&with_stats, "stats")?;
    assert_eq!(cfg.latents_std, Some(vec![1.0, 2.0, 3.0, 4.0]));
    assert_eq!(cfg.shift_factor, Some(0.5));

    let cases: Vec<(&str, ConfigEdit, &str)> = vec![
        (
            "missing.json",
            Box::new(|j| {
                j.as_object_mut().unwrap().remove("block_out_channels");
            }),
            "block_out_channels",
        ),
        ("badtype.json", Box::new(|j| j["scaling_factor"] = json!("big")), "scaling_factor"),
        (
            "blocks.json",
            Box::new(|j| j["up_block_types"] = json!(["UpDecoderBlock2D"])),
            "up_block_types",
        ),
        ("groups.json", Box::new(|j| j["norm_num_groups"] = json!(3)), "norm_num_groups"),
        ("latents.json", Box::new(|j| j["latents_mean"] = json!([0.1, 0.2])), "latents_mean"),
        ("force_upcast.json", Box::new(|j| j["force_upcast"] = json!(3)), "force_upcast"),
    ];
    for (file, edit, key) in cases {
        let mut j = tiny_json();
        edit(&mut j);
        let p = dir.join(file);
        std::fs::write(&p, j.to_string())?;
        let msg = VaeConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            msg.contains(&p.display().to_string()) && msg.contains(&format!("`{key}`")),
            "{file}: {msg}"
        );
    }
    Ok(())
}
