//! End-to-end generation on the tiny random diffusers pipeline `tests/fixtures/tiny-sd`
//! (VAE and UNet factor 2 each, so sizes are multiples of 4; 16×16 images, 8×8 latents).

use std::path::{Path, PathBuf};

use anyhow::Result;
use gen_diffusion::{
    ApgConfig, ApgFormulation, GuidanceConfig, GuidanceMethod, IntervalRange, Space,
};
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_sample::{generate, read_png_text, save_outputs, Progress, SampleConfig, Sampler};
use image::RgbImage;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd")
}

fn load(dir: &Path) -> SdPipeline {
    SdPipeline::load(&ModelSource::Local(dir.to_path_buf()), &LoadOptions::default()).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-sample-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn base() -> SampleConfig {
    SampleConfig::new("a red cube on a blue floor")
        .size(16, 16)
        .steps(3)
        .seed(42)
        .sampler(Sampler::Ddim)
}

/// Mean and max absolute pixel difference.
fn diff(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
    let mut sum = 0u64;
    let mut max = 0u8;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        sum += d as u64;
        max = max.max(d);
    }
    (sum as f64 / a.as_raw().len() as f64, max)
}

fn run(pipe: &SdPipeline, cfg: &SampleConfig) -> Result<(Vec<RgbImage>, Vec<Progress>)> {
    let mut events = Vec::new();
    let imgs = generate(pipe, cfg, &mut |e| events.push(e.clone()))?;
    Ok((imgs, events))
}

#[test]
fn cfg_and_apg_generate_images_and_differ() -> Result<()> {
    let pipe = load(&fixture());
    let (cfg_imgs, events) = run(&pipe, &base().cfg(7.5))?;
    assert_eq!(cfg_imgs.len(), 1);
    assert_eq!(cfg_imgs[0].dimensions(), (16, 16));
    // 3 steps, each reported, then one decode.
    let steps = events.iter().filter(|e| matches!(e, Progress::Step { .. })).count();
    assert_eq!(steps, 3);
    assert!(events.contains(&Progress::Start {
        num_batches: 1,
        steps_per_batch: 3,
        total_steps: 3
    }));
    assert!(events.contains(&Progress::Decoded { images_done: 1, num_images: 1 }));
    // not a constant image
    let first = cfg_imgs[0].get_pixel(0, 0);
    assert!(cfg_imgs[0].pixels().any(|p| p != first));

    let (apg_imgs, _) = run(&pipe, &base().apg(ApgConfig::paper(7.5)))?;
    let (none_imgs, _) = run(
        &pipe,
        &base().guidance(GuidanceConfig {
            method: GuidanceMethod::None,
            rescale_phi: 0.0,
            interval: None,
        }),
    )?;
    let (m_apg, _) = diff(&apg_imgs[0], &cfg_imgs[0]);
    let (m_none, _) = diff(&none_imgs[0], &cfg_imgs[0]);
    assert!(m_apg > 0.0, "APG (eta 0, r 15, beta -0.5) should differ from CFG");
    assert!(m_none > 0.0, "CFG 7.5 should differ from no guidance");

    // APG with eta 1, no norm threshold and no momentum (paper form) is CFG, up to the f64
    // projection's rounding.
    let plain = ApgConfig {
        scale: 7.5,
        eta: 1.0,
        norm_threshold: 0.0,
        momentum: 0.0,
        formulation: ApgFormulation::Paper,
        space: Space::X0,
    };
    let (apg_as_cfg, _) = run(&pipe, &base().apg(plain))?;
    let (_, max) = diff(&apg_as_cfg[0], &cfg_imgs[0]);
    assert!(max <= 1, "APG(eta=1, r=0, beta=0) vs CFG: max pixel difference {max}");

    // rescale and interval run through the same loop
    let g = GuidanceConfig {
        method: GuidanceMethod::Cfg { scale: 7.5 },
        rescale_phi: 0.7,
        interval: Some(IntervalRange::StepFraction { start: 0.0, stop: 0.5 }),
    };
    let (r, _) = run(&pipe, &base().guidance(g))?;
    assert_ne!(r[0], cfg_imgs[0]);
    Ok(())
}

#[test]
fn same_seed_same_bytes_across_runs_and_batch_sizes() -> Result<()> {
    let pipe = load(&fixture());
    // euler-a draws step noise, so this also checks the per-image noise streams.
    for sampler in [Sampler::EulerAncestral, Sampler::DpmPp2mKarras] {
        let cfg = base().sampler(sampler).apg(ApgConfig::paper(5.0)).num_images(3);
        let (a, _) = run(&pipe, &cfg.clone().batch_size(1))?;
        let (b, _) = run(&pipe, &cfg.clone().batch_size(1))?;
        let (c, _) = run(&pipe, &cfg.clone().batch_size(3))?;
        let (d, _) = run(&pipe, &cfg.clone().batch_size(2))?;
        assert_eq!(a, b, "{sampler}: two runs differ");
        for i in 0..3 {
            assert_eq!(
                a[i].as_raw(),
                c[i].as_raw(),
                "{sampler}: image {i} differs between batch 1 and 3"
            );
            assert_eq!(
                a[i].as_raw(),
                d[i].as_raw(),
                "{sampler}: image {i} differs between batch 1 and 2"
            );
        }
        assert_ne!(a[0], a[1], "{sampler}: images of different streams are equal");
        // Without batch invariance the whole batch goes through each model call: the same
        // images up to the last bits of the matmuls.
        let (f, _) =
            run(&pipe, &SampleConfig { batch_invariant: false, ..cfg.clone().batch_size(3) })?;
        for i in 0..3 {
            let (_, max) = diff(&a[i], &f[i]);
            assert!(max <= 3, "{sampler}: batched image {i} max diff {max}");
        }
        let (e, _) = run(&pipe, &cfg.clone().seed(43).num_images(1))?;
        assert_ne!(e[0], a[0], "{sampler}: another seed gives the same image");
    }
    Ok(())
}

#[test]
fn every_sampler_runs() -> Result<()> {
    let pipe = load(&fixture());
    for s in Sampler::ALL {
        let (imgs, _) = run(&pipe, &base().sampler(s).steps(2))?;
        assert_eq!(imgs[0].dimensions(), (16, 16), "{s}");
    }
    let (imgs, _) = run(&pipe, &SampleConfig { ddim_eta: 1.0, ..base() })?;
    let (det, _) = run(&pipe, &base())?;
    assert_ne!(imgs[0], det[0], "DDIM eta 1 should add noise");
    Ok(())
}

#[test]
fn img2img_strength_zero_is_the_vae_round_trip() -> Result<()> {
    let pipe = load(&fixture());
    let dir = tmp("img2img");
    std::fs::create_dir_all(&dir)?;
    let init = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 15) as u8, (y * 15) as u8, 128]));
    let init_path = dir.join("init.png");
    init.save(&init_path)?;

    // The round trip computed directly with the VAE (scaling cancels out).
    let x = gen_core::imageio::rgb_to_tensor(&init, &pipe.device)?.unsqueeze(0)?;
    let round = pipe.vae.decode(&pipe.vae.encode(&x)?.mode())?;
    let round = gen_core::imageio::tensor_to_rgb(&round.get(0)?)?;

    let cfg = base().steps(8).init_image(&init_path, 0.0).num_images(2);
    let (imgs, events) = run(&pipe, &cfg)?;
    assert!(!events.iter().any(|e| matches!(e, Progress::Step { .. })));
    for img in &imgs {
        let (_, max) = diff(img, &round);
        assert!(max <= 1, "strength 0 vs VAE round trip: max diff {max}");
    }
    // strength 0.25 of 8 steps runs 2 steps, and stays closer to the round trip than strength 1.
    let (low, ev) = run(&pipe, &cfg.clone().init_image(&init_path, 0.25).num_images(1))?;
    assert!(ev.contains(&Progress::Start { num_batches: 1, steps_per_batch: 2, total_steps: 2 }));
    let (high, _) = run(&pipe, &cfg.clone().init_image(&init_path, 1.0).num_images(1))?;
    let (d_low, _) = diff(&low[0], &round);
    let (d_high, _) = diff(&high[0], &round);
    assert!(
        d_low < d_high,
        "strength 0.25 mean diff {d_low} should be below strength 1's {d_high}"
    );

    // Another size: the init image is resized, with a warning.
    let (r, ev) = run(&pipe, &cfg.clone().init_image(&init_path, 0.5).size(8, 8).num_images(1))?;
    assert_eq!(r[0].dimensions(), (8, 8));
    assert!(ev.iter().any(|e| matches!(e, Progress::Warning(w) if w.contains("resized to 8×8"))));
    // Without a size the init image's size is used.
    let (r, _) = run(
        &pipe,
        &SampleConfig {
            width: None,
            height: None,
            ..cfg.clone().init_image(&init_path, 0.5).num_images(1)
        },
    )?;
    assert_eq!(r[0].dimensions(), (16, 16));

    for s in [-0.5, 1.01, f64::NAN] {
        let e = generate(&pipe, &cfg.clone().init_image(&init_path, s), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("strength"), "{e}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn png_metadata_and_config_json() -> Result<()> {
    let pipe = load(&fixture());
    let dir = tmp("meta");
    let cfg = SampleConfig {
        model: Some("tiny-sd".into()),
        ..base().apg(ApgConfig::paper(5.0)).negative_prompt("blurry").num_images(2)
    };
    let imgs = generate(&pipe, &cfg, &mut |_| {})?;
    let resolved = cfg.resolve(&pipe)?;
    let saved = save_outputs(&dir, &imgs, &resolved)?;
    assert_eq!(saved.images.len(), 2);
    let text = read_png_text(&saved.images[1])?;
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no `{k}` chunk"))
    };
    assert_eq!(get("prompt"), "a red cube on a blue floor");
    assert_eq!(get("negative_prompt"), "blurry");
    assert_eq!(get("seed"), "42");
    assert_eq!(get("image_index"), "1");
    assert_eq!(get("sampler"), "ddim");
    assert_eq!(get("size"), "16x16");
    assert_eq!(get("model"), "tiny-sd");
    assert_eq!(SampleConfig::from_json(&get("parameters"))?, resolved);
    assert_eq!(image::open(&saved.images[1])?.to_rgb8(), imgs[1]);
    let grid = image::open(saved.grid.as_ref().unwrap())?.to_rgb8();
    assert_eq!(grid.dimensions(), (34, 16));
    let json = std::fs::read_to_string(saved.config.as_ref().unwrap())?;
    assert_eq!(SampleConfig::from_json(&json)?, resolved);
    // The saved config regenerates the same bytes.
    assert_eq!(generate(&pipe, &SampleConfig::from_json(&json)?, &mut |_| {})?, imgs);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn bad_inputs_are_errors_and_write_nothing() -> Result<()> {
    let pipe = load(&fixture());
    let dir = tmp("bad");
    std::fs::create_dir_all(&dir)?;
    let not_image = dir.join("notes.png");
    std::fs::write(&not_image, b"this is not a PNG")?;
    let out = dir.join("out");
    let cases: Vec<(SampleConfig, &str)> = vec![
        (base().size(18, 16), "not a multiple of 4"),
        (base().size(16, 0), "height"),
        (base().steps(0), "steps"),
        (base().init_image(&not_image, 0.5), "cannot read init image"),
        (base().init_image(dir.join("missing.png"), 0.5), "missing.png"),
        (base().init_image(&not_image, 2.0), "outside [0, 1]"),
        (base().steps(1001), "num_inference_steps"),
        (SampleConfig { dtype: gen_sample::Precision::F16, ..base() }, "dtype"),
    ];
    for (cfg, needle) in cases {
        let r = generate(&pipe, &cfg, &mut |_| {})
            .and_then(|imgs| save_outputs(&out, &imgs, &cfg.resolve(&pipe)?));
        let e = r.unwrap_err().to_string();
        assert!(e.contains(needle), "expected `{needle}` in `{e}`");
        assert!(!out.exists(), "an output was written for a bad input ({needle})");
    }
    let e = SampleConfig::from_json(r#"{"sampler": "pndm"}"#).unwrap_err().to_string();
    assert!(e.contains("pndm") && e.contains("euler-a"), "{e}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn long_prompt_is_truncated_with_a_warning() -> Result<()> {
    let pipe = load(&fixture());
    let long = vec!["red"; 100].join(" ");
    let (imgs, events) = run(&pipe, &SampleConfig { prompts: vec![long], ..base() })?;
    assert_eq!(imgs.len(), 1);
    let w: Vec<&String> = events
        .iter()
        .filter_map(|e| if let Progress::Warning(w) = e { Some(w) } else { None })
        .collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("100 tokens")
            && w[0].contains("77")
            && w[0].contains("25 tokens were dropped"),
        "{}",
        w[0]
    );
    Ok(())
}

#[test]
fn unknown_words_of_a_word_level_tokenizer_warn_with_the_known_ones() -> Result<()> {
    // tiny-sd with a word-level tokenizer in place of CLIP's BPE.
    let dir = tmp("wordlevel");
    for comp in ["text_encoder", "unet", "vae", "scheduler", "tokenizer"] {
        std::fs::create_dir_all(dir.join(comp))?;
        if comp == "tokenizer" {
            continue;
        }
        for f in std::fs::read_dir(fixture().join(comp))? {
            let f = f?;
            std::fs::copy(f.path(), dir.join(comp).join(f.file_name()))?;
        }
    }
    std::fs::copy(fixture().join("model_index.json"), dir.join("model_index.json"))?;
    let words = ["<|startoftext|>", "<|endoftext|>", "[UNK]", "a", "red", "blue", "cube", "sphere"];
    let vocab: serde_json::Map<String, serde_json::Value> =
        words.iter().enumerate().map(|(i, w)| (w.to_string(), i.into())).collect();
    let added: Vec<serde_json::Value> = (0..3)
        .map(|i| serde_json::json!({"id": i, "content": words[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer/tokenizer.json"), serde_json::to_vec(&tok)?)?;
    let tc = serde_json::json!({"bos_token": words[0], "eos_token": words[1], "pad_token": words[1], "unk_token": "[UNK]", "model_max_length": 77});
    std::fs::write(dir.join("tokenizer/tokenizer_config.json"), serde_json::to_vec(&tc)?)?;
    let pipe = load(&dir);
    let (_, events) = run(&pipe, &SampleConfig { prompts: vec!["a red blorp".into()], ..base() })?;
    let w: Vec<&String> = events
        .iter()
        .filter_map(|e| if let Progress::Warning(w) = e { Some(w) } else { None })
        .collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("\"blorp\"") && w[0].contains("known words: a, red, blue, cube, sphere"),
        "{}",
        w[0]
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn f16_pipeline_generates() -> Result<()> {
    let opts = LoadOptions { dtype: candle_core::DType::F16, ..Default::default() };
    let pipe = SdPipeline::load(&ModelSource::Local(fixture()), &opts)?;
    let cfg =
        SampleConfig { dtype: gen_sample::Precision::F16, ..base().apg(ApgConfig::paper(5.0)) };
    let (imgs, _) = run(&pipe, &cfg)?;
    let (again, _) = run(&pipe, &cfg)?;
    assert_eq!(imgs, again);
    let first = imgs[0].get_pixel(0, 0);
    assert!(imgs[0].pixels().any(|p| p != first));
    // The config must say f16 for an f16 pipeline.
    assert!(generate(&pipe, &base(), &mut |_| {}).unwrap_err().to_string().contains("dtype"));
    Ok(())
}

#[test]
fn apg_default_norm_threshold_scales_with_the_latent_size() -> Result<()> {
    let pipe = load(&fixture());
    let apg_r = |c: &SampleConfig| match &c.guidance.method {
        GuidanceMethod::Apg(a) => a.norm_threshold,
        m => panic!("{m:?}"),
    };
    let scaled =
        SampleConfig { apg_scale_norm_threshold: true, ..base().apg(ApgConfig::paper(5.0)) };
    let r = scaled.resolve(&pipe)?;
    let (c, h, w) = pipe.latent_shape(16, 16);
    assert_eq!(apg_r(&r), 15.0 * ((c * h * w) as f64 / (4.0 * 128.0 * 128.0)).sqrt());
    assert!(apg_r(&r) < 15.0);
    // the resolved config holds the r used, and saves like one with r given
    assert!(!r.apg_scale_norm_threshold);
    assert!(!r.to_json()?.contains("apg_scale_norm_threshold"));
    // r given: used as given; the scaled run equals the run with that r given
    let explicit = base().apg(ApgConfig { norm_threshold: apg_r(&r), ..ApgConfig::paper(5.0) });
    assert_eq!(apg_r(&explicit.resolve(&pipe)?), apg_r(&r));
    let (a, b) = (generate(&pipe, &scaled, &mut |_| {})?, generate(&pipe, &explicit, &mut |_| {})?);
    assert_eq!(a[0].as_raw(), b[0].as_raw());
    assert_eq!(apg_r(&base().apg(ApgConfig::paper(5.0)).resolve(&pipe)?), 15.0);
    Ok(())
}

/// The memory estimate grows with what it counts: linearly in the number of images (what is
/// held for them), at least quadratically in the side once attention logits dominate, and
/// chunked attention lowers it; `batch_invariant` runs keep one image per UNet call whatever
/// the batch size.
#[test]
fn memory_estimate_scales_with_size_count_and_attention_chunks() -> Result<()> {
    let mut pipe = load(&fixture());
    let est = |pipe: &SdPipeline, side: usize, n: usize, batch_invariant: bool| {
        let cfg = SampleConfig {
            batch_invariant,
            batch_size: 4,
            ..base().size(side, side).num_images(n)
        };
        cfg.memory_estimate(pipe).unwrap()
    };
    let one = est(&pipe, 64, 1, true);
    let many = est(&pipe, 64, 10, true);
    assert_eq!(one.working, many.working);
    assert!((many.held - 10.0 * one.held).abs() <= 1e-6 * many.held, "{one:?} {many:?}");
    let big = est(&pipe, 256, 1, true);
    assert!(big.working >= 16.0 * one.working, "{one:?} {big:?}");
    let batched = est(&pipe, 64, 10, false);
    assert!(batched.working > many.working, "{batched:?} {many:?}");
    pipe.unet.set_attention_chunk_size(Some(64));
    let chunked = est(&pipe, 256, 1, true);
    assert!(chunked.working < big.working, "{chunked:?} {big:?}");
    // unresolved sizes are an error, not a guess
    assert!(SampleConfig::new("x").memory_estimate(&pipe).is_err());
    Ok(())
}
