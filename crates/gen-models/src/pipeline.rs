//! Finding and loading a diffusers Stable Diffusion pipeline: a local folder laid out like
//! `save_pretrained` writes it (`model_index.json`, `text_encoder/`, `tokenizer/`, `unet/`,
//! `vae/`, `scheduler/`), or a Hugging Face hub repo (`org/name[@revision]`) through hf-hub's
//! cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`).
//!
//! Offline (`HubOptions::offline` or `HF_HUB_OFFLINE=1`) only the cache is read. Online, files
//! missing from the cache are downloaded; when the hub cannot be reached the cache is tried and
//! the error names the repo, the file, the cache folder and the network error.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use gen_core::{Error, Result};

use crate::clip::{ClipTextConfig, ClipTextTransformer, TextForwardOptions};
use crate::loading::{
    find_weight_files, select_weight_names, SafetensorsWeights, WeightSelection, WeightVariant,
};
use crate::tokenizer::{Encoded, Tokenizer};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};

/// Where a pipeline comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local diffusers folder.
    Local(PathBuf),
    /// A hub repo id `org/name`, with an optional revision (branch, tag or commit).
    Hub { repo: String, revision: Option<String> },
}

fn is_repo_part(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && !s.starts_with('-')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl ModelSource {
    /// An existing path is a local folder; otherwise `org/name` or `org/name@revision` is a hub
    /// repo. Anything else is an error saying neither applies.
    pub fn parse(s: &str) -> Result<Self> {
        let p = Path::new(s);
        if p.exists() {
            return Ok(Self::Local(p.to_path_buf()));
        }
        let (id, rev) = match s.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, Some(rev.to_string())),
            Some(_) => {
                return Err(Error::invalid("model", format!("{s:?}: empty revision after '@'")))
            }
            None => (s, None),
        };
        let parts: Vec<&str> = id.split('/').collect();
        if parts.len() == 2 && parts.iter().all(|p| is_repo_part(p)) {
            return Ok(Self::Hub { repo: id.to_string(), revision: rev });
        }
        Err(Error::invalid(
            "model",
            format!("{s:?} is not an existing folder and not a hub repo id of the form org/name[@revision]"),
        ))
    }
}

impl std::str::FromStr for ModelSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, revision: Some(r) } => write!(f, "{repo}@{r}"),
            Self::Hub { repo, revision: None } => write!(f, "{repo}"),
        }
    }
}

/// How to reach the hub.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// Read only the cache (also when `HF_HUB_OFFLINE` is 1/true/yes/on).
    pub offline: bool,
    /// The hub cache folder (the one holding `models--org--name`); default from the environment.
    pub cache_dir: Option<PathBuf>,
    /// Revision when the source names none; default `main`.
    pub revision: Option<String>,
    /// Weight variant to prefer (`fp16`); by default the plain files, else any variant.
    pub variant: Option<String>,
    /// Hub URL; default `HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
}

/// `HF_HUB_OFFLINE` set to a true value.
pub fn hub_offline_from_env() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// The hub cache folder: `cache_dir`, else `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (as huggingface_hub and hf-hub do).
pub fn hub_cache_dir(cache_dir: Option<&Path>) -> PathBuf {
    if let Some(d) = cache_dir {
        return d.to_path_buf();
    }
    if let Ok(d) = std::env::var("HF_HUB_CACHE") {
        if !d.is_empty() {
            return PathBuf::from(d);
        }
    }
    hf_hub::Cache::from_env().path().clone()
}

/// A component folder with its config and weight files.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
}

/// The files of a diffusers SD pipeline.
#[derive(Debug, Clone)]
pub struct PipelineFiles {
    /// The folder (a local folder or the hub snapshot).
    pub root: PathBuf,
    pub model_index: PathBuf,
    /// `model_index.json` as parsed JSON.
    pub model_index_json: serde_json::Value,
    pub text_encoder: ComponentFiles,
    /// The `tokenizer/` folder.
    pub tokenizer: PathBuf,
    pub unet: ComponentFiles,
    pub vae: ComponentFiles,
    /// `scheduler/scheduler_config.json`.
    pub scheduler_config: PathBuf,
}

fn must_exist(path: PathBuf, hint: &str) -> Result<PathBuf> {
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::MissingFile { path, hint: hint.to_string() })
    }
}

const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

impl PipelineFiles {
    /// Resolves a local folder or a hub repo (see the module docs).
    pub fn resolve(source: &ModelSource, hub: &HubOptions) -> Result<Self> {
        match source {
            ModelSource::Local(dir) => Self::from_folder(dir, hub),
            ModelSource::Hub { repo, revision } => {
                let rev = revision
                    .clone()
                    .or_else(|| hub.revision.clone())
                    .unwrap_or_else(|| "main".to_string());
                Self::from_hub(repo, &rev, hub)
            }
        }
    }

    /// A local diffusers folder.
    pub fn from_folder(dir: &Path, hub: &HubOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                hint: "pipeline folder".into(),
            });
        }
        let model_index =
            must_exist(dir.join("model_index.json"), "a diffusers pipeline folder has one")?;
        let text = std::fs::read_to_string(&model_index).map_err(|e| Error::io(&model_index, e))?;
        let model_index_json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Config {
                file: model_index.clone(),
                key: "(file)".into(),
                msg: format!("not valid JSON: {e}"),
            })?;
        let variant = WeightVariant { variant: hub.variant.clone() };
        let component = |name: &str| -> Result<ComponentFiles> {
            let d = must_exist(dir.join(name), "component folder")?;
            let config = must_exist(d.join("config.json"), "component config")?;
            let weights = find_weight_files(&d, &variant)?;
            Ok(ComponentFiles { dir: d, config, weights })
        };
        Ok(Self {
            root: dir.to_path_buf(),
            text_encoder: component("text_encoder")?,
            tokenizer: must_exist(dir.join("tokenizer"), "tokenizer folder")?,
            unet: component("unet")?,
            vae: component("vae")?,
            scheduler_config: must_exist(
                dir.join("scheduler").join("scheduler_config.json"),
                "scheduler config",
            )?,
            model_index,
            model_index_json,
        })
    }

    /// The snapshot folder of `repo` at `revision` in the cache, if present: `refs/<revision>`
    /// names the commit, or `revision` is itself a commit with a snapshot.
    pub fn cached_snapshot(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
        let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
        let by_ref = std::fs::read_to_string(folder.join("refs").join(revision))
            .ok()
            .map(|c| folder.join("snapshots").join(c.trim()))
            .filter(|p| p.is_dir());
        by_ref.or_else(|| Some(folder.join("snapshots").join(revision)).filter(|p| p.is_dir()))
    }

    fn from_cache(
        repo: &str,
        revision: &str,
        cache: &Path,
        hub: &HubOptions,
        why: &str,
    ) -> Result<Self> {
        let Some(snap) = Self::cached_snapshot(cache, repo, revision) else {
            return Err(Error::msg(format!(
                "repo {repo} (revision {revision}) file model_index.json is not in the hub cache at {}{why}",
                cache.display()
            )));
        };
        Self::from_folder(&snap, hub).map_err(|e| {
            Error::msg(format!("repo {repo} (revision {revision}) is in the hub cache at {} but incomplete{why}: {e}", cache.display()))
        })
    }

    /// A hub repo: offline from the cache, online downloading what the cache lacks.
    pub fn from_hub(repo: &str, revision: &str, hub: &HubOptions) -> Result<Self> {
        let cache = hub_cache_dir(hub.cache_dir.as_deref());
        if hub.offline || hub_offline_from_env() {
            return Self::from_cache(repo, revision, &cache, hub, " (offline mode: only the cache is read; download it once online or give a local folder)");
        }
        let mut builder =
            hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.clone()))
                .with_progress(false);
        let endpoint = hub
            .endpoint
            .clone()
            .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()));
        if let Some(ep) = endpoint {
            builder = builder.with_endpoint(ep);
        }
        let api = builder
            .build()
            .map_err(|e| Error::msg(format!("cannot set up the hub client: {e}")))?;
        let api_repo = api.repo(hf_hub::Repo::with_revision(
            repo.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        ));
        let info = match api_repo.info() {
            Ok(info) => info,
            Err(net) => {
                // Unreachable hub: fall back to the cache, naming both problems.
                return Self::from_cache(
                    repo,
                    revision,
                    &cache,
                    hub,
                    &format!(" and the hub is unreachable: {net}"),
                );
            }
        };
        let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
        let get = |file: &str| -> Result<PathBuf> {
            api_repo.get(file).map_err(|e| {
                Error::msg(format!("repo {repo} (revision {revision}) file {file}: download into the cache at {} failed: {e}", cache.display()))
            })
        };
        if !names.iter().any(|n| n == "model_index.json") {
            return Err(Error::msg(format!("repo {repo} (revision {revision}) has no model_index.json: not a diffusers pipeline")));
        }
        let model_index = get("model_index.json")?;
        let variant = WeightVariant { variant: hub.variant.clone() };
        for comp in ["text_encoder", "unet", "vae"] {
            let prefix = format!("{comp}/");
            let in_comp: Vec<String> = names
                .iter()
                .filter_map(|n| n.strip_prefix(&prefix))
                .filter(|n| !n.contains('/'))
                .map(str::to_string)
                .collect();
            get(&format!("{comp}/config.json"))?;
            match select_weight_names(&in_comp, &variant) {
                WeightSelection::Single(f) => {
                    get(&format!("{comp}/{f}"))?;
                }
                WeightSelection::Index(f) => {
                    let idx = get(&format!("{comp}/{f}"))?;
                    let text = std::fs::read_to_string(&idx).map_err(|e| Error::io(&idx, e))?;
                    let v: serde_json::Value = serde_json::from_str(&text)
                        .map_err(|e| Error::Config { file: idx.clone(), key: "weight_map".into(), msg: e.to_string() })?;
                    let mut shards: Vec<String> = v
                        .get("weight_map")
                        .and_then(|m| m.as_object())
                        .map(|m| m.values().filter_map(|s| s.as_str().map(str::to_string)).collect())
                        .unwrap_or_default();
                    shards.sort();
                    shards.dedup();
                    for s in shards {
                        get(&format!("{comp}/{s}"))?;
                    }
                }
                WeightSelection::None => {
                    return Err(Error::msg(format!(
                        "repo {repo} (revision {revision}): {comp}/ has no safetensors weights (it holds: {}); safetensors is required",
                        in_comp.join(", ")
                    )))
                }
            }
        }
        for f in TOKENIZER_FILES {
            let name = format!("tokenizer/{f}");
            if names.contains(&name) {
                get(&name)?;
            }
        }
        get("scheduler/scheduler_config.json")?;
        let snap = model_index.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_folder(&snap, hub)
    }
}

/// Options of [`SdPipeline::load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype of every model. Default f32 (the CPU backend has no bf16 matmul and runs
    /// f16 slowly); weights stored as f16/bf16/f32 are converted.
    pub dtype: DType,
    pub device: Device,
    pub hub: HubOptions,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, device: Device::Cpu, hub: HubOptions::default() }
    }
}

/// A loaded Stable Diffusion pipeline: tokenizer, CLIP text encoder, UNet, VAE, and the
/// scheduler config for the diffusion crate.
#[derive(Debug, Clone)]
pub struct SdPipeline {
    pub files: PipelineFiles,
    pub tokenizer: Tokenizer,
    pub text_config: ClipTextConfig,
    pub text_encoder: ClipTextTransformer,
    pub unet_config: UNetConfig,
    pub unet: UNet2DConditionModel,
    pub vae_config: VaeConfig,
    pub vae: AutoencoderKL,
    /// `scheduler/scheduler_config.json`, parsed.
    pub scheduler_config: serde_json::Value,
    /// Checkpoint tensors no model read, per component (`position_ids` buffers, for instance):
    /// worth a warning, not an error.
    pub unused_keys: Vec<(String, Vec<String>)>,
    pub dtype: DType,
    pub device: Device,
}

fn load_weights(c: &ComponentFiles) -> Result<SafetensorsWeights> {
    SafetensorsWeights::open(&c.weights)
}

impl SdPipeline {
    /// Resolves `source` and builds every component on `opts.device` in `opts.dtype`.
    pub fn load(source: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let files = PipelineFiles::resolve(source, &opts.hub)?;
        Self::from_files(files, opts)
    }

    /// Builds the components from resolved files.
    pub fn from_files(files: PipelineFiles, opts: &LoadOptions) -> Result<Self> {
        let (dtype, dev) = (opts.dtype, &opts.device);
        let tokenizer = Tokenizer::from_folder(&files.tokenizer)?;
        let text_config = ClipTextConfig::from_file(&files.text_encoder.config)?;
        let unet_config = UNetConfig::from_file(&files.unet.config)?;
        let vae_config = VaeConfig::from_file(&files.vae.config)?;
        if unet_config.cross_attention_dim != text_config.hidden_size {
            return Err(Error::msg(format!(
                "{}: cross_attention_dim {} does not match the text encoder's hidden_size {} ({})",
                files.unet.config.display(),
                unet_config.cross_attention_dim,
                text_config.hidden_size,
                files.text_encoder.config.display()
            )));
        }
        let mut unused_keys = Vec::new();
        let w = load_weights(&files.text_encoder)?;
        // transformers stores `text_model.…`; some conversions drop the prefix
        let vb = w.var_builder(dtype, dev);
        let text_encoder = if !w.contains("text_model.embeddings.token_embedding.weight")
            && w.contains("embeddings.token_embedding.weight")
        {
            ClipTextTransformer::new_unprefixed(vb, &text_config)?
        } else {
            ClipTextTransformer::new(vb, &text_config)?
        };
        unused_keys.push(("text_encoder".to_string(), w.unused_keys()));
        let w = load_weights(&files.unet)?;
        let unet = UNet2DConditionModel::new(w.var_builder(dtype, dev), &unet_config)?;
        unused_keys.push(("unet".to_string(), w.unused_keys()));
        let w = load_weights(&files.vae)?;
        let vae = AutoencoderKL::new(w.var_builder(dtype, dev), &vae_config)?;
        unused_keys.push(("vae".to_string(), w.unused_keys()));
        unused_keys.retain(|(_, k)| !k.is_empty());
        let sc = &files.scheduler_config;
        let text = std::fs::read_to_string(sc).map_err(|e| Error::io(sc, e))?;
        let scheduler_config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Config {
                file: sc.clone(),
                key: "(file)".into(),
                msg: format!("not valid JSON: {e}"),
            })?;
        Ok(Self {
            files,
            tokenizer,
            text_config,
            text_encoder,
            unet_config,
            unet,
            vae_config,
            vae,
            scheduler_config,
            unused_keys,
            dtype,
            device: dev.clone(),
        })
    }

    /// Prompt length: the tokenizer's `model_max_length` capped by the text encoder's
    /// `max_position_embeddings` (77 for SD).
    pub fn max_text_len(&self) -> usize {
        let p = self.text_config.max_position_embeddings;
        self.tokenizer.model_max_length().map(|m| m.min(p)).unwrap_or(p)
    }

    /// Tokenizes and encodes prompts: `(B, L, D)` conditioning (the hidden state picked by
    /// `opts`, `last_hidden_state` by default) and the token ids (with truncation flags).
    pub fn encode_prompts(
        &self,
        prompts: &[&str],
        opts: &TextForwardOptions,
    ) -> Result<(Tensor, Vec<Encoded>)> {
        let enc = self.tokenizer.encode_batch(prompts, self.max_text_len())?;
        let ids = Tokenizer::ids_tensor(&enc, &self.device)?;
        let out = self.text_encoder.forward(&ids, opts)?;
        Ok((out.selected, enc))
    }
}
