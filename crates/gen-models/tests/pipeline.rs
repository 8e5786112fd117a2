//! Pipeline resolution: local folders, a fake hub cache laid out like huggingface_hub's
//! (`models--org--name/{blobs,refs/main,snapshots/<commit>}`), offline and unreachable-hub
//! errors, and loading the tiny diffusers folder end to end.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use gen_models::clip::TextForwardOptions;
use gen_models::pipeline::{
    hub_offline_from_env, HubOptions, LoadOptions, ModelSource, PipelineFiles, SdPipeline,
};

fn tiny_sd() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-models-pipeline-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Copies the pipeline files of `src` into `dst` the way the hub cache stores them: contents
/// in `blobs/`, the snapshot holding symlinks to them (copies where symlinks are unavailable).
fn fill_snapshot(src: &Path, repo_dir: &Path, rel: &Path) {
    let snap = repo_dir.join("snapshots").join(COMMIT);
    for entry in std::fs::read_dir(src.join(rel)).unwrap() {
        let entry = entry.unwrap();
        let r = rel.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            fill_snapshot(src, repo_dir, &r);
            continue;
        }
        let blob = repo_dir.join("blobs").join(r.to_string_lossy().replace('/', "_"));
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::copy(entry.path(), &blob).unwrap();
        let target = snap.join(&r);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, &target).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, &target).unwrap();
    }
}

/// A cache with `org/tiny-sd` at revision `main`.
fn fake_cache(name: &str) -> PathBuf {
    let cache = tmp(name);
    let repo_dir = cache.join("models--org--tiny-sd");
    fill_snapshot(&tiny_sd(), &repo_dir, Path::new(""));
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();
    cache
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions { offline: true, cache_dir: Some(cache.to_path_buf()), ..Default::default() }
}

#[test]
fn parses_sources() -> anyhow::Result<()> {
    assert_eq!(
        ModelSource::parse("org/name")?,
        ModelSource::Hub { repo: "org/name".into(), revision: None }
    );
    assert_eq!(
        ModelSource::parse("stabilityai/stable-diffusion-2-1@fp16")?,
        ModelSource::Hub {
            repo: "stabilityai/stable-diffusion-2-1".into(),
            revision: Some("fp16".into())
        }
    );
    let local = tiny_sd();
    assert_eq!(ModelSource::parse(local.to_str().unwrap())?, ModelSource::Local(local.clone()));
    for bad in ["no-slash", "a/b/c", "org/name@", "./missing/folder", "org/na me"] {
        let e = ModelSource::parse(bad).unwrap_err().to_string();
        assert!(e.contains(bad.trim_end_matches('@')), "{bad}: {e}");
    }
    assert_eq!(ModelSource::parse("org/name@v1")?.to_string(), "org/name@v1");
    Ok(())
}

#[test]
fn resolves_local_folder() -> anyhow::Result<()> {
    let f = PipelineFiles::resolve(&ModelSource::Local(tiny_sd()), &HubOptions::default())?;
    assert!(f.model_index.ends_with("model_index.json"));
    assert_eq!(f.unet.weights, vec![tiny_sd().join("unet/diffusion_pytorch_model.safetensors")]);
    assert_eq!(f.text_encoder.weights, vec![tiny_sd().join("text_encoder/model.safetensors")]);
    assert!(f.scheduler_config.ends_with("scheduler/scheduler_config.json"));
    assert_eq!(f.model_index_json["_class_name"], "StableDiffusionPipeline");
    let fp16 = HubOptions { variant: Some("fp16".into()), ..Default::default() };
    let f = PipelineFiles::resolve(&ModelSource::Local(tiny_sd()), &fp16)?;
    assert_eq!(
        f.unet.weights,
        vec![tiny_sd().join("unet/diffusion_pytorch_model.fp16.safetensors")]
    );
    Ok(())
}

#[test]
fn local_folder_missing_unet_config_names_the_path() -> anyhow::Result<()> {
    let d = tmp("missing-unet-config");
    let repo_dir = d.join("cache-like");
    fill_snapshot(&tiny_sd(), &repo_dir, Path::new(""));
    let root = repo_dir.join("snapshots").join(COMMIT);
    std::fs::remove_file(root.join("unet/config.json"))?;
    let e = PipelineFiles::resolve(&ModelSource::Local(root.clone()), &HubOptions::default())
        .unwrap_err()
        .to_string();
    println!("{e}");
    assert!(e.contains(&root.join("unet").join("config.json").display().to_string()), "{e}");
    std::fs::remove_file(root.join("model_index.json"))?;
    let e = PipelineFiles::resolve(&ModelSource::Local(root.clone()), &HubOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_index.json"), "{e}");
    Ok(())
}

#[test]
fn hub_offline_resolves_from_cache() -> anyhow::Result<()> {
    let cache = fake_cache("offline-ok");
    let src = ModelSource::parse("org/tiny-sd")?;
    let f = PipelineFiles::resolve(&src, &offline(&cache))?;
    let snap = cache.join("models--org--tiny-sd/snapshots").join(COMMIT);
    assert_eq!(f.root, snap);
    assert_eq!(f.vae.weights, vec![snap.join("vae/diffusion_pytorch_model.safetensors")]);
    // a commit hash as revision
    let by_commit = ModelSource::Hub { repo: "org/tiny-sd".into(), revision: Some(COMMIT.into()) };
    assert_eq!(PipelineFiles::resolve(&by_commit, &offline(&cache))?.root, snap);
    // a revision the cache lacks
    let other = ModelSource::Hub { repo: "org/tiny-sd".into(), revision: Some("v2".into()) };
    let e = PipelineFiles::resolve(&other, &offline(&cache)).unwrap_err().to_string();
    assert!(
        e.contains("org/tiny-sd") && e.contains("v2") && e.contains(&cache.display().to_string()),
        "{e}"
    );
    Ok(())
}

#[test]
fn hub_offline_unknown_repo_names_repo_and_cache() -> anyhow::Result<()> {
    let cache = fake_cache("offline-unknown");
    let e = PipelineFiles::resolve(&ModelSource::parse("someone/unknown-model")?, &offline(&cache))
        .unwrap_err()
        .to_string();
    println!("{e}");
    assert!(
        e.contains("someone/unknown-model")
            && e.contains(&cache.display().to_string())
            && e.contains("offline"),
        "{e}"
    );
    // an incomplete snapshot names the missing file
    let snap = cache.join("models--org--tiny-sd/snapshots").join(COMMIT);
    std::fs::remove_file(snap.join("unet/config.json"))?;
    let e = PipelineFiles::resolve(&ModelSource::parse("org/tiny-sd")?, &offline(&cache))
        .unwrap_err()
        .to_string();
    println!("{e}");
    assert!(
        e.contains("org/tiny-sd") && e.contains("incomplete") && e.contains("unet/config.json"),
        "{e}"
    );
    Ok(())
}

#[test]
fn unreachable_hub_falls_back_to_cache_or_says_so() -> anyhow::Result<()> {
    let cache = fake_cache("unreachable");
    // nothing listens on port 9 of localhost: the connection is refused at once
    let hub = HubOptions {
        cache_dir: Some(cache.clone()),
        endpoint: Some("http://127.0.0.1:9".into()),
        ..Default::default()
    };
    let f = PipelineFiles::resolve(&ModelSource::parse("org/tiny-sd")?, &hub)?;
    assert_eq!(f.root, cache.join("models--org--tiny-sd/snapshots").join(COMMIT));
    let e = PipelineFiles::resolve(&ModelSource::parse("org/not-cached")?, &hub)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("org/not-cached")
            && e.contains("model_index.json")
            && e.contains(&cache.display().to_string()),
        "{e}"
    );
    println!("{e}");
    if !hub_offline_from_env() {
        assert!(e.contains("unreachable"), "{e}");
    }
    Ok(())
}

#[test]
fn loads_tiny_sd_pipeline_and_encodes_prompts() -> anyhow::Result<()> {
    let cache = fake_cache("load");
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, hub: offline(&cache) };
    let p = SdPipeline::load(&ModelSource::parse("org/tiny-sd")?, &opts)?;
    assert_eq!(p.max_text_len(), 77);
    assert_eq!(p.scheduler_config["_class_name"], "DDIMScheduler");
    assert!(p.unused_keys.is_empty(), "unused: {:?}", p.unused_keys);
    // conditioning of the parity prompts against transformers
    let parity = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(parity.join("tokenizer_ids.json"))?)?;
    let out =
        candle_core::safetensors::load(parity.join("text_encoder.safetensors"), &Device::Cpu)?;
    let n = out["input_ids"].dim(0)?;
    let prompts: Vec<&str> =
        v["cases"].as_array().unwrap()[..n].iter().map(|c| c["text"].as_str().unwrap()).collect();
    let (cond, enc) = p.encode_prompts(&prompts, &TextForwardOptions::default())?;
    assert_eq!(cond.dims(), &[n, 77, 32]);
    assert!(enc.iter().all(|e| !e.truncated));
    let err =
        (cond - &out["last_hidden_state"])?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    println!("tiny-sd conditioning vs transformers: max |err| = {err:.3e}");
    assert!(err < 1e-4, "{err}");
    Ok(())
}
