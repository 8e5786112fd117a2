//! Finite-difference gradient checks of the CLIP text and vision models (tiny configs, random
//! float64 weights in a VarMap), and that every parameter receives a gradient.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use gen_core::SeededRng;
use gen_models::clip::{
    Activation, ClipTextConfig, ClipTextModelWithProjection, ClipVisionConfig,
    ClipVisionModelWithProjection, TextForwardOptions,
};

fn text_cfg(act: Activation) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 12,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        max_position_embeddings: 5,
        hidden_act: act,
        layer_norm_eps: 1e-5,
        projection_dim: 6,
        pad_token_id: 0,
        bos_token_id: 10,
        eos_token_id: 11,
    }
}

/// Sets every variable to seeded random values (layer-norm weights around 1).
fn randomize(vm: &VarMap, seed: u64) -> anyhow::Result<()> {
    let mut rng = SeededRng::new(seed);
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let v = &data[name];
        let r =
            (rng.randn(v.shape().clone(), DType::F32, &Device::Cpu)?.to_dtype(DType::F64)? * 0.4)?;
        let val = if name.contains("norm") && name.ends_with("weight") { (r + 1.0)? } else { r };
        v.set(&val)?;
    }
    Ok(())
}

fn vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Central-difference check of d loss / d var at a few flat indices.
fn fd_check(
    name: &str,
    var: &Var,
    grad: &Tensor,
    indices: &[usize],
    loss: &dyn Fn() -> anyhow::Result<f64>,
) -> anyhow::Result<f64> {
    let eps = 1e-5;
    let shape = var.shape().clone();
    let base: Vec<f64> = var.flatten_all()?.to_vec1()?;
    let g: Vec<f64> = grad.flatten_all()?.to_vec1()?;
    let mut worst: f64 = 0.0;
    for &i in indices {
        let i = i % base.len();
        let mut p = base.clone();
        p[i] += eps;
        var.set(&Tensor::from_vec(p.clone(), shape.clone(), &Device::Cpu)?)?;
        let lp = loss()?;
        p[i] -= 2.0 * eps;
        var.set(&Tensor::from_vec(p, shape.clone(), &Device::Cpu)?)?;
        let lm = loss()?;
        var.set(&Tensor::from_vec(base.clone(), shape.clone(), &Device::Cpu)?)?;
        let fd = (lp - lm) / (2.0 * eps);
        let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()).max(1e-3));
        assert!(err < 2e-6, "{name}[{i}]: analytic {} vs FD {fd} (rel err {err:.2e})", g[i]);
        worst = worst.max(err);
    }
    Ok(worst)
}

fn text_grad_case(act: Activation, clip_skip: usize) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = text_cfg(act);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
    let model = ClipTextModelWithProjection::new(vb, &cfg)?;
    randomize(&vm, 7)?;
    // token 3 and 4 used, 5..9 unused; eos 11 then padding 0
    let ids = Tensor::new(&[[10u32, 3, 4, 11, 0], [10, 4, 11, 0, 0]], &dev)?;
    let mut rng = SeededRng::new(3);
    let r1 = rng.randn((2, 5, 8), DType::F32, &dev)?.to_dtype(DType::F64)?;
    let r2 = rng.randn((2, 6), DType::F32, &dev)?.to_dtype(DType::F64)?;
    let opts = TextForwardOptions { clip_skip, ..Default::default() };
    let loss_t = || -> anyhow::Result<Tensor> {
        let (o, e) = model.forward(&ids, &opts)?;
        Ok(((o.selected * &r1)?.sum_all()? + (e * &r2)?.sum_all()?)?)
    };
    let loss = || -> anyhow::Result<f64> { Ok(loss_t()?.to_scalar::<f64>()?) };
    let grads = loss_t()?.backward()?;
    let mut worst: f64 = 0.0;
    for (name, var) in vars(&vm) {
        let g = grads.get(&var).unwrap_or_else(|| panic!("no gradient for {name}"));
        if name.ends_with("token_embedding.weight") {
            let rows: Vec<Vec<f64>> = g.to_vec2()?;
            for (t, row) in rows.iter().enumerate() {
                let n: f64 = row.iter().map(|x| x * x).sum();
                let used = [0usize, 3, 4, 10, 11].contains(&t);
                assert_eq!(n > 0.0, used, "token {t}: gradient norm {n}");
            }
            // FD on used rows: token 3, 4 and bos (10) and the pad token (0)
            worst = worst.max(fd_check(&name, &var, g, &[3 * 8, 4 * 8 + 5, 10 * 8 + 2, 1], &loss)?);
            continue;
        }
        let n = g.sqr()?.sum_all()?.to_scalar::<f64>()?;
        assert!(n > 0.0, "zero gradient for {name}");
        let check = [
            "q_proj.weight",
            "k_proj.weight",
            "v_proj.bias",
            "out_proj.weight",
            "layer_norm1",
            "layer_norm2",
            "final_layer_norm",
            "position_embedding",
            "fc1.weight",
            "fc2.bias",
            "text_projection",
        ];
        if check.iter().any(|c| name.contains(c)) {
            worst = worst.max(fd_check(&name, &var, g, &[0, 7, 13, 29], &loss)?);
        }
    }
    println!("text {act:?} clip_skip={clip_skip}: worst FD rel err {worst:.2e}");
    Ok(())
}

#[test]
fn text_gradients_match_fd_quick_gelu() -> anyhow::Result<()> {
    text_grad_case(Activation::QuickGelu, 0)
}

#[test]
fn text_gradients_match_fd_gelu_clip_skip() -> anyhow::Result<()> {
    text_grad_case(Activation::Gelu, 1)
}

#[test]
fn text_attention_is_causal() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = text_cfg(Activation::QuickGelu);
    let vm = VarMap::new();
    let model =
        ClipTextModelWithProjection::new(VarBuilder::from_varmap(&vm, DType::F64, &dev), &cfg)?;
    randomize(&vm, 1)?;
    let a = Tensor::new(&[[10u32, 3, 4, 11, 0]], &dev)?;
    let b = Tensor::new(&[[10u32, 3, 5, 6, 11]], &dev)?;
    let oa = model.text_model.forward(&a, &TextForwardOptions::default())?.last_hidden_state;
    let ob = model.text_model.forward(&b, &TextForwardOptions::default())?.last_hidden_state;
    let d_first = (oa.narrow(1, 0, 2)? - ob.narrow(1, 0, 2)?)?
        .abs()?
        .max_keepdim(2)?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    let d_later = (oa.narrow(1, 2, 1)? - ob.narrow(1, 2, 1)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    assert!(d_first < 1e-12, "positions before the change moved by {d_first}");
    assert!(d_later > 1e-3, "changed position did not move ({d_later})");
    // pooled at the first eos (position 3 in a, 4 in b)
    assert_eq!(model.text_model.eos_positions(&Tensor::cat(&[&a, &b], 0)?)?, vec![3, 4]);
    Ok(())
}

#[test]
fn legacy_eos_id_2_pools_at_argmax() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let mut cfg = text_cfg(Activation::QuickGelu);
    cfg.eos_token_id = 2;
    let vm = VarMap::new();
    let model =
        ClipTextModelWithProjection::new(VarBuilder::from_varmap(&vm, DType::F64, &dev), &cfg)?;
    let ids = Tensor::new(&[[0u32, 3, 11, 2, 2], [0, 11, 4, 11, 1]], &dev)?;
    assert_eq!(model.text_model.eos_positions(&ids)?, vec![2, 1]);
    Ok(())
}

#[test]
fn vision_gradients_match_fd() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = ClipVisionConfig {
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_channels: 3,
        image_size: 8,
        patch_size: 4,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
        projection_dim: 5,
    };
    let vm = VarMap::new();
    let model =
        ClipVisionModelWithProjection::new(VarBuilder::from_varmap(&vm, DType::F64, &dev), &cfg)?;
    randomize(&vm, 11)?;
    let mut rng = SeededRng::new(5);
    let pix = Var::from_tensor(&rng.randn((2, 3, 8, 8), DType::F32, &dev)?.to_dtype(DType::F64)?)?;
    let r1 = rng.randn((2, 5), DType::F32, &dev)?.to_dtype(DType::F64)?;
    let r2 = rng.randn((2, 5, 8), DType::F32, &dev)?.to_dtype(DType::F64)?;
    let loss_t = || -> anyhow::Result<Tensor> {
        let o = model.forward(pix.as_tensor())?;
        Ok(((o.image_embeds * &r1)?.sum_all()? + (o.last_hidden_state * &r2)?.sum_all()?)?)
    };
    let loss = || -> anyhow::Result<f64> { Ok(loss_t()?.to_scalar::<f64>()?) };
    let grads = loss_t()?.backward()?;
    let gp = grads.get(&pix).expect("pixel gradient");
    let mut worst = fd_check("pixel_values", &pix, gp, &[0, 17, 64, 100, 191, 250, 383], &loss)?;
    for (name, var) in vars(&vm) {
        let g = grads.get(&var).unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g.sqr()?.sum_all()?.to_scalar::<f64>()?;
        assert!(n > 0.0, "zero gradient for {name}");
        if [
            "patch_embedding",
            "class_embedding",
            "pre_layrnorm",
            "post_layernorm",
            "q_proj.weight",
            "k_proj.weight",
            "visual_projection",
        ]
        .iter()
        .any(|c| name.contains(c))
        {
            worst = worst.max(fd_check(&name, &var, g, &[1, 6, 23], &loss)?);
        }
    }
    println!("vision: worst FD rel err {worst:.2e}");
    Ok(())
}

/// A LoRA-style adapter `x A^T B^T` attached to every linear layer through the handles of
/// `linears()` changes the output and receives gradients.
#[derive(Debug)]
struct LowRank {
    a: Var,
    b: Var,
}

impl gen_ops::nn::LinearAdapter for LowRank {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.a.t()?)?.broadcast_matmul(&self.b.t()?)
    }
}

#[test]
fn adapters_attach_through_linears() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = text_cfg(Activation::QuickGelu);
    let vm = VarMap::new();
    let model =
        ClipTextModelWithProjection::new(VarBuilder::from_varmap(&vm, DType::F64, &dev), &cfg)?;
    randomize(&vm, 2)?;
    let ids = Tensor::new(&[[10u32, 3, 4, 11, 0]], &dev)?;
    let before = model.text_model.forward(&ids, &TextForwardOptions::default())?.last_hidden_state;
    let linears = model.text_model.linears();
    assert_eq!(linears.len(), 6 * cfg.num_hidden_layers);
    let mut rng = SeededRng::new(9);
    let mut adapters = Vec::new();
    for l in &linears {
        let a = Var::from_tensor(
            &(rng.randn((2, l.in_dim()), DType::F32, &dev)?.to_dtype(DType::F64)? * 0.1)?,
        )?;
        let b = Var::from_tensor(
            &(rng.randn((l.out_dim(), 2), DType::F32, &dev)?.to_dtype(DType::F64)? * 0.1)?,
        )?;
        let ad = std::sync::Arc::new(LowRank { a, b });
        l.add_adapter(ad.clone());
        adapters.push(ad);
    }
    let after = model.text_model.forward(&ids, &TextForwardOptions::default())?.last_hidden_state;
    let diff = (&after - &before)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    assert!(diff > 1e-4, "adapters had no effect ({diff})");
    let grads = after.sum_all()?.backward()?;
    for ad in &adapters {
        let g = grads.get(&ad.a).expect("adapter A gradient");
        assert!(g.abs()?.sum_all()?.to_scalar::<f64>()? > 0.0);
    }
    for l in &linears {
        l.clear_adapters();
    }
    let cleared = model.text_model.forward(&ids, &TextForwardOptions::default())?.last_hidden_state;
    assert_eq!((cleared - before)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?, 0.0);
    Ok(())
}

/// CLIP-score gradients w.r.t. the image (what reward fine-tuning backpropagates).
#[test]
fn clip_logits_gradient_wrt_pixels_matches_fd() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let vision = ClipVisionConfig {
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_channels: 3,
        image_size: 8,
        patch_size: 4,
        hidden_act: Activation::Gelu,
        layer_norm_eps: 1e-5,
        projection_dim: 4,
    };
    let cfg = gen_models::clip::ClipConfig {
        text: text_cfg(Activation::QuickGelu),
        vision,
        projection_dim: 4,
    };
    let vm = VarMap::new();
    let model =
        gen_models::clip::ClipModel::new(VarBuilder::from_varmap(&vm, DType::F64, &dev), &cfg)?;
    randomize(&vm, 21)?;
    let ids = Tensor::new(&[[10u32, 3, 4, 11, 0], [10, 5, 11, 0, 0]], &dev)?;
    let mut rng = SeededRng::new(8);
    let img = Var::from_tensor(
        &rng.rand_uniform((2, 3, 8, 8), 0.0, 1.0, DType::F32, &dev)?.to_dtype(DType::F64)?,
    )?;
    let loss_t = || -> anyhow::Result<Tensor> {
        let x = gen_models::clip::clip_normalize(img.as_tensor())?;
        let l = model.logits_per_image(&ids, &x)?;
        // reward: the logit of image i for prompt i
        Ok((l.get(0)?.get(0)? + l.get(1)?.get(1)?)?)
    };
    let loss = || -> anyhow::Result<f64> { Ok(loss_t()?.to_scalar::<f64>()?) };
    let grads = loss_t()?.backward()?;
    let g = grads.get(&img).expect("image gradient");
    let worst = fd_check("image", &img, g, &[0, 9, 77, 130, 200, 311, 383], &loss)?;
    assert!(grads.get(&vm.data().lock().unwrap()["logit_scale"]).is_some());
    println!("clip logits w.r.t. pixels: worst FD rel err {worst:.2e}");
    Ok(())
}
