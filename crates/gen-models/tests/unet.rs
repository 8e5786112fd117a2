//! Tests of the UNet on tiny random-weight configs (f64): finite-difference gradient checks,
//! every parameter reached by the gradient, per-sample timesteps, chunked attention, config errors.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gen_core::SeededRng;
use gen_models::unet::{UNet2DConditionModel, UNetConfig};
use serde_json::json;

/// A tiny SD-1.x-shaped config: two blocks (cross-attention down, plain down), 2 heads.
/// An edit of a config JSON (for the error-message cases).
type ConfigEdit = Box<dyn Fn(&mut serde_json::Value)>;

fn tiny_json() -> serde_json::Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [8, 16],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": 1,
        "cross_attention_dim": 8,
        "attention_head_dim": 2,
        "norm_num_groups": 4,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "act_fn": "silu",
        "sample_size": 8,
        "use_linear_projection": false,
        "upcast_attention": false,
        "center_input_sample": false
    })
}

fn tiny_cfg() -> UNetConfig {
    UNetConfig::from_json(&tiny_json(), "tiny").unwrap()
}

/// Gives every variable deterministic random values: norm weights near 1, biases small,
/// other weights ~ N(0, 1/fan_in).
fn randomize(varmap: &VarMap, seed: u64) -> Result<BTreeMap<String, Var>> {
    let vars: BTreeMap<String, Var> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut rng = SeededRng::new(seed);
    for (name, var) in &vars {
        let shape = var.shape().clone();
        let n = rng.randn(shape.clone(), DType::F64, &Device::Cpu)?;
        let is_norm = name.contains("norm");
        let t = if name.ends_with(".bias") {
            (n * 0.1)?
        } else if is_norm {
            ((n * 0.1)? + 1.0)?
        } else {
            let fan_in = shape.elem_count() / shape.dims()[0];
            (n / (fan_in as f64).sqrt())?
        };
        var.set(&t)?;
    }
    Ok(vars)
}

fn build(cfg: &UNetConfig, seed: u64) -> Result<(UNet2DConditionModel, BTreeMap<String, Var>)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let model = UNet2DConditionModel::new(vb, cfg)?;
    let vars = randomize(&varmap, seed)?;
    Ok((model, vars))
}

struct Inputs {
    sample: Tensor,
    t: Tensor,
    ctx: Tensor,
    weight: Tensor,
}

fn inputs(seed: u64) -> Result<Inputs> {
    let mut rng = SeededRng::new(seed);
    let dev = Device::Cpu;
    Ok(Inputs {
        sample: rng.randn((2, 4, 8, 8), DType::F64, &dev)?,
        t: Tensor::new(&[37f64, 801.0], &dev)?,
        ctx: rng.randn((2, 3, 8), DType::F64, &dev)?,
        weight: rng.randn((2, 4, 8, 8), DType::F64, &dev)?,
    })
}

/// `L = Σ unet(sample, t, ctx) ⊙ weight`.
fn loss(m: &UNet2DConditionModel, sample: &Tensor, ctx: &Tensor, inp: &Inputs) -> Result<Tensor> {
    Ok((m.forward(sample, &inp.t, ctx)? * &inp.weight)?.sum_all()?)
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_vec1::<f64>()?)
}

/// Indices to probe: the two largest |gradient| entries and two spread-out ones.
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

/// Central difference of `f` w.r.t. entry `i` of `var`.
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

/// Checks analytic gradients of `L` against central differences at a few entries of each
/// listed parameter and of both inputs; returns the worst relative error.
fn fd_check(cfg: &UNetConfig, params: &[String]) -> Result<f64> {
    let (model, vars) = build(cfg, 1)?;
    let inp = inputs(2)?;
    let sample = Var::from_tensor(&inp.sample)?;
    let ctx = Var::from_tensor(&inp.ctx)?;
    let grads = loss(&model, sample.as_tensor(), ctx.as_tensor(), &inp)?.backward()?;
    let h = 1e-5;
    let mut worst = 0f64;
    let mut check =
        |name: &str, var: &Var, g: &Tensor, f: &mut dyn FnMut() -> Result<f64>| -> Result<()> {
            let g = flat(g)?;
            for i in probe_indices(&g) {
                let n = fd(var, i, h, f)?;
                let e = rel_err(g[i], n);
                worst = worst.max(e);
                if std::env::var("FD_VERBOSE").is_ok() {
                    eprintln!("{name}[{i}] {e:.2e}");
                }
                assert!(e < 1e-6, "{name}[{i}]: analytic {} vs FD {n} (rel. err {e:.2e})", g[i]);
            }
            Ok(())
        };
    // The loss reads the input Vars' current values, so one closure serves all checks.
    let mut f = || -> Result<f64> {
        Ok(loss(&model, sample.as_tensor(), ctx.as_tensor(), &inp)?.to_scalar::<f64>()?)
    };
    for p in params {
        let var = vars.get(p).unwrap_or_else(|| panic!("no parameter {p}"));
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {p}"));
        check(p, var, g, &mut f)?;
    }
    check("sample", &sample, grads.get(sample.as_tensor()).expect("sample grad"), &mut f)?;
    check("encoder_hidden_states", &ctx, grads.get(ctx.as_tensor()).expect("ctx grad"), &mut f)?;
    Ok(worst)
}

#[test]
fn unet_gradients_match_finite_differences() -> Result<()> {
    let t = "transformer_blocks.0";
    let params = [
        "conv_in.weight".to_string(),
        "time_embedding.linear_1.weight".into(),
        "time_embedding.linear_2.bias".into(),
        "down_blocks.0.resnets.0.norm1.weight".into(),
        "down_blocks.0.resnets.0.time_emb_proj.weight".into(),
        "down_blocks.0.attentions.0.norm.weight".into(),
        "down_blocks.0.attentions.0.proj_in.weight".into(),
        format!("down_blocks.0.attentions.0.{t}.norm1.weight"),
        format!("down_blocks.0.attentions.0.{t}.attn1.to_q.weight"),
        format!("down_blocks.0.attentions.0.{t}.attn1.to_k.weight"),
        format!("down_blocks.0.attentions.0.{t}.attn2.to_k.weight"),
        format!("down_blocks.0.attentions.0.{t}.attn2.to_v.weight"),
        format!("mid_block.attentions.0.{t}.norm3.bias"),
        format!("mid_block.attentions.0.{t}.ff.net.0.proj.weight"),
        format!("mid_block.attentions.0.{t}.attn1.to_out.0.weight"),
        "down_blocks.0.downsamplers.0.conv.weight".into(),
        "up_blocks.0.upsamplers.0.conv.weight".into(),
        "up_blocks.0.resnets.1.conv_shortcut.weight".into(),
        format!("up_blocks.1.attentions.1.{t}.attn2.to_q.weight"),
        "conv_norm_out.weight".into(),
        "conv_out.bias".into(),
    ];
    let worst = fd_check(&tiny_cfg(), &params)?;
    eprintln!("UNet FD (conv projections): worst relative error {worst:.2e}");
    Ok(())
}

/// The SD-2-style variant: linear projections, two transformer layers, only-cross-attention in
/// the first block, per-block heads, upcast attention, sin-first embedding with shift 1, centred
/// input.
fn variant_json() -> serde_json::Value {
    let mut j = tiny_json();
    j["use_linear_projection"] = json!(true);
    j["transformer_layers_per_block"] = json!([2, 1]);
    j["only_cross_attention"] = json!([true, false]);
    j["attention_head_dim"] = json!([2, 4]);
    j["upcast_attention"] = json!(true);
    j["flip_sin_to_cos"] = json!(false);
    j["freq_shift"] = json!(1);
    j["center_input_sample"] = json!(true);
    j
}

#[test]
fn unet_variant_gradients_match_finite_differences() -> Result<()> {
    let cfg = UNetConfig::from_json(&variant_json(), "variant")?;
    let a = "down_blocks.0.attentions.0";
    let params = [
        format!("{a}.proj_in.weight"),
        format!("{a}.proj_out.bias"),
        format!("{a}.transformer_blocks.0.attn1.to_k.weight"),
        format!("{a}.transformer_blocks.1.attn1.to_q.weight"),
        format!("{a}.transformer_blocks.1.norm2.weight"),
        format!("{a}.transformer_blocks.1.ff.net.2.weight"),
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v.weight".into(),
        "up_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k.weight".into(),
    ];
    let worst = fd_check(&cfg, &params)?;
    eprintln!(
        "UNet FD (linear projections, 2 layers, only-cross): worst relative error {worst:.2e}"
    );
    Ok(())
}

/// Every parameter gets a non-zero gradient, for the conv- and the linear-projection variants
/// (the latter with two transformer layers and only-cross-attention in the first block).
#[test]
fn unet_every_parameter_gets_a_gradient() -> Result<()> {
    let linear = variant_json();
    for (label, j) in [("conv proj", tiny_json()), ("linear proj", linear)] {
        let cfg = UNetConfig::from_json(&j, label)?;
        let (model, vars) = build(&cfg, 3)?;
        let inp = inputs(4)?;
        let grads = loss(&model, &inp.sample, &inp.ctx, &inp)?.backward()?;
        let mut missing = Vec::new();
        for (name, var) in &vars {
            match grads.get(var.as_tensor()) {
                Some(g) if g.abs()?.max_all()?.to_scalar::<f64>()? > 0.0 => {}
                _ => missing.push(name.clone()),
            }
        }
        assert!(missing.is_empty(), "{label}: parameters without gradient: {missing:?}");
        assert!(vars.len() > 50, "{label}: only {} parameters", vars.len());
        // Every linear layer is listed and named by its parameter path.
        let linears = model.linears();
        let linear_vars =
            vars.keys().filter(|k| k.ends_with(".weight") && vars[*k].rank() == 2).count();
        assert_eq!(linears.len(), linear_vars, "{label}: linears() misses layers");
        for l in &linears {
            assert!(
                vars.contains_key(&format!("{}.weight", l.name())),
                "{label}: bad linear name {}",
                l.name()
            );
        }
    }
    Ok(())
}

#[test]
fn unet_per_sample_timesteps_match_single_runs() -> Result<()> {
    let cfg = tiny_cfg();
    let (model, _) = build(&cfg, 5)?;
    let inp = inputs(6)?;
    let both = model.forward(&inp.sample, &Tensor::new(&[3f64, 640.0], &Device::Cpu)?, &inp.ctx)?;
    for (i, t) in [3f64, 640.0].into_iter().enumerate() {
        let one = model.forward(
            &inp.sample.narrow(0, i, 1)?,
            &Tensor::new(&[t], &Device::Cpu)?,
            &inp.ctx.narrow(0, i, 1)?,
        )?;
        let d = (both.narrow(0, i, 1)? - one)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "sample {i}: batched vs single differ by {d}");
    }
    // A single timestep (0-d, f32, or integer) is broadcast to the batch.
    let same =
        model.forward(&inp.sample, &Tensor::new(&[500f64, 500.0], &Device::Cpu)?, &inp.ctx)?;
    for t in [Tensor::new(500f32, &Device::Cpu)?, Tensor::new(&[500u32], &Device::Cpu)?] {
        let d = (model.forward(&inp.sample, &t, &inp.ctx)? - &same)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(d < 1e-12, "broadcast timestep differs by {d}");
    }
    // Different timesteps give different outputs (the embedding is used).
    let d =
        (both.narrow(0, 0, 1)? - same.narrow(0, 0, 1)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d > 1e-6);
    // A timestep tensor of the wrong length is an error, not a panic.
    let bad = model.forward(&inp.sample, &Tensor::new(&[1f64, 2.0, 3.0], &Device::Cpu)?, &inp.ctx);
    assert!(bad.unwrap_err().to_string().contains("timesteps"));
    Ok(())
}

#[test]
fn unet_chunked_attention_matches() -> Result<()> {
    let cfg = tiny_cfg();
    let (mut model, _) = build(&cfg, 7)?;
    let inp = inputs(8)?;
    let full = model.forward(&inp.sample, &inp.t, &inp.ctx)?;
    model.set_attention_chunk_size(Some(5));
    assert_eq!(model.attention_chunk_size(), Some(5));
    let chunked = model.forward(&inp.sample, &inp.t, &inp.ctx)?;
    let d = (full - chunked)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d < 1e-12, "chunked attention differs by {d}");
    Ok(())
}

fn write_tmp(name: &str, v: &serde_json::Value) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("gen-models-unet-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v)?)?;
    Ok(p)
}

#[test]
fn unet_config_errors_name_file_and_key() -> Result<()> {
    // A valid file round-trips.
    let ok = write_tmp("ok.json", &tiny_json())?;
    let cfg = UNetConfig::from_file(&ok)?;
    assert_eq!(cfg, tiny_cfg());
    assert_eq!(cfg.block_out_channels, vec![8, 16]);

    let cases: Vec<(&str, ConfigEdit, &str)> = vec![
        (
            "missing.json",
            Box::new(|j| {
                j.as_object_mut().unwrap().remove("cross_attention_dim");
            }),
            "cross_attention_dim",
        ),
        (
            "sdxl.json",
            Box::new(|j| j["addition_embed_type"] = json!("text_time")),
            "addition_embed_type",
        ),
        ("badtype.json", Box::new(|j| j["norm_eps"] = json!("tiny")), "norm_eps"),
        ("badreq.json", Box::new(|j| j["in_channels"] = json!("four")), "in_channels"),
        (
            "blocks.json",
            Box::new(|j| j["down_block_types"] = json!(["CrossAttnDownBlock2D", "SimpleDown"])),
            "down_block_types",
        ),
        ("heads.json", Box::new(|j| j["attention_head_dim"] = json!(3)), "attention_head_dim"),
        (
            "shift.json",
            Box::new(|j| j["resnet_time_scale_shift"] = json!("scale_shift")),
            "resnet_time_scale_shift",
        ),
    ];
    for (file, edit, key) in cases {
        let mut j = tiny_json();
        edit(&mut j);
        let p = write_tmp(file, &j)?;
        let msg = UNetConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            msg.contains(&p.display().to_string()) && msg.contains(&format!("`{key}`")),
            "{file}: {msg}"
        );
    }
    let msg = UNetConfig::from_file("/nonexistent/unet/config.json").unwrap_err().to_string();
    assert!(msg.contains("/nonexistent/unet/config.json"), "{msg}");
    Ok(())
}

#[test]
fn unet_missing_weight_names_the_key() -> Result<()> {
    // An empty safetensors-free builder: every key is missing; the error names the first one.
    let vb = VarBuilder::from_tensors(std::collections::HashMap::new(), DType::F32, &Device::Cpu);
    let msg = UNet2DConditionModel::new(vb, &tiny_cfg()).unwrap_err().to_string();
    assert!(msg.contains("conv_in.weight"), "{msg}");
    Ok(())
}

/// Backprop through K = 3 UNet calls `x ← x − 0.1·unet(x, t_k, ctx)` with gradient
/// checkpointing (`gen_ops::checkpoint::Chain`) gives the same parameter and input gradients as
/// full backprop.
#[test]
fn unet_checkpointed_chain_matches_full_backprop() -> Result<()> {
    use gen_ops::checkpoint::Chain;
    let cfg = tiny_cfg();
    let (model, vars) = build(&cfg, 21)?;
    let inp = inputs(22)?;
    let ts = [900f64, 500.0, 100.0];
    let step = |k: usize, x: &Tensor| -> candle_core::Result<Tensor> {
        let t = Tensor::new(&[ts[k]], &Device::Cpu)?;
        let eps =
            model.forward(x, &t, &inp.ctx).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        x - (eps * 0.1)?
    };
    let loss = |y: &Tensor| (y * &inp.weight)?.sum_all();

    // Full backprop.
    let x0 = Var::from_tensor(&inp.sample)?;
    let mut x = x0.as_tensor().clone();
    for k in 0..3 {
        x = step(k, &x)?;
    }
    let full = loss(&x)?.backward()?;

    // Checkpointed.
    let chain = Chain::forward(&inp.sample, 3, step)?;
    let d_out = (chain.output() - x.detach())?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d_out < 1e-12, "chain output differs by {d_out}");
    let ck = chain.backward_loss(loss, step)?;

    let mut worst = 0f64;
    let mut compare = |name: &str, a: &Tensor, b: &Tensor| -> Result<()> {
        let scale = a.abs()?.max_all()?.to_scalar::<f64>()?;
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(scale > 0.0, "{name}: zero gradient");
        worst = worst.max(d / scale);
        assert!(d <= 1e-10 * scale, "{name}: checkpointed gradient differs by {d} (scale {scale})");
        Ok(())
    };
    for (name, var) in &vars {
        let a = full.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no full gradient"));
        let b = ck
            .grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no checkpointed gradient"));
        compare(name, a, b)?;
    }
    compare("x0", full.get(x0.as_tensor()).expect("x0 grad"), &ck.input_grad)?;
    eprintln!(
        "checkpointed vs full backprop through 3 UNet calls: worst relative difference {worst:.2e}"
    );
    Ok(())
}

/// `num_attention_heads`, when given, is the head count (and `attention_head_dim` then is ignored,
/// as diffusers intends); otherwise `attention_head_dim` is (diffusers' naming quirk).
#[test]
fn unet_head_count_fields() -> Result<()> {
    let inp = inputs(31)?;
    let run = |j: serde_json::Value| -> Result<Tensor> {
        let (m, _) = build(&UNetConfig::from_json(&j, "heads")?, 32)?;
        Ok(m.forward(&inp.sample, &inp.t, &inp.ctx)?)
    };
    let mut a = tiny_json();
    a["attention_head_dim"] = json!([2, 4]);
    let mut b = tiny_json();
    b["attention_head_dim"] = json!(8);
    b["num_attention_heads"] = json!([2, 4]);
    let mut c = tiny_json();
    c["attention_head_dim"] = json!(1);
    let (ya, yb, yc) = (run(a)?, run(b)?, run(c)?);
    let d = (&ya - yb)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d < 1e-12, "num_attention_heads [2,4] vs attention_head_dim [2,4]: {d}");
    let d = (&ya - yc)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d > 1e-6, "head count has no effect");
    Ok(())
}

/// A test adapter: `x ↦ x Aᵀ` with a trainable `A`.
#[derive(Debug)]
struct DeltaAdapter {
    a: Var,
}

impl gen_ops::nn::LinearAdapter for DeltaAdapter {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.a.as_tensor().t()?)
    }
}

/// An adapter attached through a handle from `linears()` changes the model's output, and its
/// parameter's gradient matches finite differences; removing it restores the output.
#[test]
fn unet_linear_adapters_take_effect_and_train() -> Result<()> {
    let (model, _) = build(&tiny_cfg(), 41)?;
    let inp = inputs(42)?;
    let before = model.forward(&inp.sample, &inp.t, &inp.ctx)?;
    let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k";
    let lin = model.linears().into_iter().find(|l| l.name() == name).expect("to_k listed");
    let a = Var::from_tensor(
        &(SeededRng::new(43).randn((lin.out_dim(), lin.in_dim()), DType::F64, &Device::Cpu)?
            * 0.1)?,
    )?;
    lin.add_adapter(std::sync::Arc::new(DeltaAdapter { a: a.clone() }));
    let after = model.forward(&inp.sample, &inp.t, &inp.ctx)?;
    let d = (&after - &before)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d > 1e-6, "adapter had no effect");

    let grads = loss(&model, &inp.sample, &inp.ctx, &inp)?.backward()?;
    let g = flat(grads.get(a.as_tensor()).expect("adapter gets a gradient"))?;
    let mut f =
        || -> Result<f64> { Ok(loss(&model, &inp.sample, &inp.ctx, &inp)?.to_scalar::<f64>()?) };
    for i in probe_indices(&g) {
        let n = fd(&a, i, 1e-5, &mut f)?;
        assert!(rel_err(g[i], n) < 1e-6, "adapter A[{i}]: analytic {} vs FD {n}", g[i]);
    }

    lin.clear_adapters();
    let restored = model.forward(&inp.sample, &inp.t, &inp.ctx)?;
    let d = (restored - before)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert!(d == 0.0, "output not restored after removing the adapter: {d}");
    Ok(())
}
