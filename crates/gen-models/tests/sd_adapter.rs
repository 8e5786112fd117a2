//! The SD adapter on the tiny random-weight pipeline: the UNet's `Denoiser` batches the
//! branches (and, per sample, gives each sample the bytes it gets alone), the prediction type
//! comes from `scheduler_config.json`, prompt encoding (cond / uncond, clip skip) and the
//! latent encode / decode with scaling and shift factors.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gen_diffusion::Denoiser;
use gen_models::{LoadOptions, ModelSource, PromptOptions, SdPipeline, TextForwardOptions};

fn pipe() -> SdPipeline {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd");
    SdPipeline::load(&ModelSource::Local(dir), &LoadOptions::default()).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn denoiser_branches_are_the_unet_on_each_condition() -> anyhow::Result<()> {
    let p = pipe();
    let den = p.denoiser(false)?;
    assert_eq!(den.prediction_type(), p.scheduler_config()?.prediction_type);
    let c = p.unet_config.in_channels;
    let x = Tensor::randn(0f32, 1.0, (2, c, 8, 8), &Device::Cpu)?;
    let conds =
        p.encode_conditions(&["a red cube", "a blue cone"], "", &PromptOptions::default())?;
    let uncond = conds.uncond.as_ref().unwrap();
    let outs = den.predict(&x, &[500.0, 500.0], &[&conds.cond, uncond])?;
    assert_eq!(outs.len(), 2);
    let t = Tensor::new(&[500f32, 500.0], &Device::Cpu)?;
    // each branch is the UNet on that branch's condition (up to the batch-size bits)
    for (out, cond) in outs.iter().zip([&conds.cond, uncond]) {
        let want = p.unet.forward(&x, &t, cond)?;
        let d = (out - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "{d}");
    }
    // per sample: sample 1 gets exactly the bytes it gets in a batch of one
    let per = p.denoiser(true)?.predict(&x, &[500.0, 700.0], &[&conds.cond, uncond])?;
    let alone = den.predict(
        &x.narrow(0, 1, 1)?,
        &[700.0],
        &[&conds.cond.narrow(0, 1, 1)?, &uncond.narrow(0, 1, 1)?],
    )?;
    assert_eq!(bits(&per[0].narrow(0, 1, 1)?), bits(&alone[0]));
    assert_eq!(bits(&per[1].narrow(0, 1, 1)?), bits(&alone[1]));
    let err = den.predict(&x, &[500.0], &[&conds.cond]).unwrap_err().to_string();
    assert!(err.contains("1 timesteps for a batch of 2"), "{err}");
    Ok(())
}

#[test]
fn prompt_encoding_follows_the_options() -> anyhow::Result<()> {
    let p = pipe();
    let prompts = ["a red cube", "a blue cone"];
    let batched = p.encode_text(&prompts, &PromptOptions::default())?;
    let (direct, _) = p.encode_prompts(&prompts, &TextForwardOptions::default())?;
    assert_eq!(bits(&batched), bits(&direct));
    // one call per prompt: prompt 1's rows are those it gets alone
    let per =
        p.encode_text(&prompts, &PromptOptions { one_call_per_prompt: true, clip_skip: 0 })?;
    let (alone, _) = p.encode_prompts(&prompts[1..], &TextForwardOptions::default())?;
    assert_eq!(bits(&per.narrow(0, 1, 1)?), bits(&alone));
    // clip skip picks the earlier hidden state
    let skip =
        p.encode_text(&prompts, &PromptOptions { clip_skip: 1, one_call_per_prompt: false })?;
    let (want, _) =
        p.encode_prompts(&prompts, &TextForwardOptions { clip_skip: 1, ..Default::default() })?;
    assert_eq!(bits(&skip), bits(&want));
    assert_ne!(bits(&skip), bits(&batched));
    // uncond: the negative prompt for every sample
    let c = p.encode_conditions(&prompts, "blurry", &PromptOptions::default())?;
    let (neg, _) = p.encode_prompts(&["blurry", "blurry"], &TextForwardOptions::default())?;
    assert_eq!(bits(c.uncond.as_ref().unwrap()), bits(&neg));
    Ok(())
}

#[test]
fn latents_use_scaling_and_shift_factors() -> anyhow::Result<()> {
    let mut p = pipe();
    let img = ((Tensor::rand(0f32, 1.0, (1, 3, 16, 16), &Device::Cpu)? * 2.0)? - 1.0)?;
    let mean = p.vae.encode(&img)?.mode();
    p.vae_config.scaling_factor = 0.5;
    p.vae_config.shift_factor = Some(0.25);
    // (mean - shift) * scale, by hand
    let want: Vec<f32> =
        mean.flatten_all()?.to_vec1::<f32>()?.iter().map(|m| (m - 0.25) * 0.5).collect();
    let lat = p.encode_latents(&img)?;
    let got = lat.flatten_all()?.to_vec1::<f32>()?;
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
    assert_eq!(
        lat.dims()[1..],
        [p.latent_shape(16, 16).0, p.latent_shape(16, 16).1, p.latent_shape(16, 16).2]
    );
    // decode undoes the scaling: decode(lat / scale + shift) = decode(mean)
    let a = p.decode_latents(&lat)?;
    let b = p.vae.decode(&mean)?;
    let d = (a - b)?.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    assert!(d < 1e-4, "{d}");
    Ok(())
}
