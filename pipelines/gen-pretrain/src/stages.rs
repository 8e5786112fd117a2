//! The four training stages and the [`Trainer`] that runs them in a run folder:
//!
//! ```text
//! OUT/config.json        the PretrainConfig (a different config in the same folder is an error)
//! OUT/tokenizer/         word-level tokenizer over the world's vocabulary
//! OUT/clip/              CLIP text + vision, contrastive on (image, caption) pairs
//! OUT/vae/               AutoencoderKL: L1 + MSE reconstruction + small KL
//! OUT/unet/              UNet2DConditionModel: epsilon prediction on scaled VAE latents,
//!                        frozen text encoder, caption dropout to the empty prompt
//! OUT/evaluator/         shape/hue/tone/view/background CNN
//! ```
//! Each stage folder holds `metrics.csv`, `loss.png` and checkpoints (see [`crate::runner`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Value};

use gen_core::{write_atomic, Error, Result, SeededRng};
use gen_models::clip::{
    clip_normalize, ClipConfig, ClipModel, ClipTextConfig, ClipTextTransformer, ClipVisionConfig,
    TextForwardOptions,
};
use gen_models::loading::{JsonConfig, SafetensorsWeights};
use gen_models::tokenizer::Tokenizer;
use gen_models::unet::{UNet2DConditionModel, UNetConfig};
use gen_models::vae::{AutoencoderKL, VaeConfig};
use gen_world::Split;

use crate::config::PretrainConfig;
use crate::data::{one_hot, WorldData};
use crate::params::{init_params, sorted_vars};
use crate::runner::{
    latest_weights, run_stage, Objective, RunControl, StageOutcome, StageSpec, StepLoss, TrainEvent,
};
use gen_models::evaluator::{cross_entropy, Evaluator, EvaluatorConfig};

/// A training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Clip,
    Vae,
    Unet,
    Evaluator,
}

impl Stage {
    /// Every stage in training order (the UNet needs the CLIP text encoder and the VAE).
    pub const ALL: [Stage; 4] = [Stage::Evaluator, Stage::Clip, Stage::Vae, Stage::Unet];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Clip => "clip",
            Stage::Vae => "vae",
            Stage::Unet => "unet",
            Stage::Evaluator => "evaluator",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Stage::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
            Error::invalid("stage", format!("{s:?}; expected one of clip, vae, unet, evaluator"))
        })
    }

    /// The stage's optimisation settings in `cfg`.
    pub fn train_config(self, cfg: &PretrainConfig) -> &crate::config::StageConfig {
        match self {
            Stage::Clip => &cfg.clip.train,
            Stage::Vae => &cfg.vae.train,
            Stage::Unet => &cfg.unet.train,
            Stage::Evaluator => &cfg.evaluator.train,
        }
    }

    /// Seed offset of the stage, so stages draw different streams from one run seed.
    fn seed(self, run_seed: u64) -> u64 {
        let k = match self {
            Stage::Clip => 1,
            Stage::Vae => 2,
            Stage::Unet => 3,
            Stage::Evaluator => 4,
        };
        run_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(k)
    }
}

/// The full transformers `CLIPConfig` JSON of a run (text and vision sub-configs).
pub fn clip_config_json(cfg: &PretrainConfig) -> Value {
    let mut text = cfg.clip.text_config.clone();
    let vocab = crate::tokenizer::vocab().len();
    merge(
        &mut text,
        json!({"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
        "projection_dim": cfg.clip.projection_dim, "layer_norm_eps": 1e-5, "model_type": "clip_text_model"}),
    );
    let mut vision = cfg.clip.vision_config.clone();
    merge(
        &mut vision,
        json!({"num_channels": 3, "projection_dim": cfg.clip.projection_dim, "layer_norm_eps": 1e-5,
        "model_type": "clip_vision_model"}),
    );
    json!({"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.clip.projection_dim,
        "logit_scale_init_value": (1.0f64 / 0.07).ln(), "text_config": text, "vision_config": vision,
        "torch_dtype": "float32"})
}

/// `text_encoder/config.json` (transformers `CLIPTextModel`).
pub fn text_encoder_config_json(cfg: &PretrainConfig) -> Value {
    let mut text = clip_config_json(cfg)["text_config"].clone();
    merge(&mut text, json!({"architectures": ["CLIPTextModel"], "torch_dtype": "float32"}));
    text
}

/// `vae/config.json` with the given scaling factor.
pub fn vae_config_json(cfg: &PretrainConfig, scaling_factor: f64) -> Value {
    let mut v = cfg.vae.config.clone();
    merge(
        &mut v,
        json!({"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "in_channels": 3, "out_channels": 3,
        "act_fn": "silu", "scaling_factor": scaling_factor, "force_upcast": false}),
    );
    v
}

/// `unet/config.json`.
pub fn unet_config_json(cfg: &PretrainConfig) -> Value {
    let mut v = cfg.unet.config.clone();
    merge(
        &mut v,
        json!({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "act_fn": "silu",
        "flip_sin_to_cos": true, "freq_shift": 0, "center_input_sample": false}),
    );
    v
}

/// `scheduler/scheduler_config.json`: DDIM over Stable Diffusion's training schedule.
pub fn scheduler_config_json() -> Value {
    json!({"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": null,
        "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1, "prediction_type": "epsilon",
        "timestep_spacing": "leading", "rescale_betas_zero_snr": false, "thresholding": false,
        "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0})
}

fn merge(dst: &mut Value, src: Value) {
    if let (Some(d), Value::Object(s)) = (dst.as_object_mut(), src) {
        for (k, v) in s {
            d.insert(k, v);
        }
    }
}

fn json_cfg(origin: &str, v: &Value) -> JsonConfig {
    JsonConfig { path: PathBuf::from(origin), value: v.clone() }
}

/// The `ClipConfig` of a run.
pub fn clip_config(cfg: &PretrainConfig) -> Result<ClipConfig> {
    let j = clip_config_json(cfg);
    let text = ClipTextConfig::from_json(&json_cfg(
        "pretrain config clip.text_config",
        &j["text_config"],
    ))?;
    let vision = ClipVisionConfig::from_json(&json_cfg(
        "pretrain config clip.vision_config",
        &j["vision_config"],
    ))?;
    Ok(ClipConfig { text, vision, projection_dim: cfg.clip.projection_dim })
}

/// The SD training schedule's cumulative alphas (scaled_linear 0.00085..0.012, 1000 steps).
pub fn sd_alphas_cumprod() -> Vec<f64> {
    let betas = gen_diffusion::schedule::betas(
        gen_diffusion::BetaSchedule::ScaledLinear,
        0.00085,
        0.012,
        1000,
    );
    gen_diffusion::schedule::alphas_cumprod(&betas)
}

/// Runs the stages of a run folder.
pub struct Trainer {
    cfg: PretrainConfig,
    out: PathBuf,
    device: Device,
    data: WorldData,
    tokenizer: Tokenizer,
}

impl Trainer {
    /// Prepares `out`: saves the config (or checks it equals the one already there) and writes
    /// the tokenizer.
    pub fn new(cfg: PretrainConfig, out: &Path, device: &Device) -> Result<Self> {
        cfg.validate()?;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let cpath = out.join("config.json");
        if cpath.exists() {
            let old = PretrainConfig::load(&cpath)?;
            if old != cfg {
                check_compatible(&old, &cfg, out)?;
                // keep the superseded config next to the new one
                let mut n = 1;
                while out.join(format!("config.prev-{n}.json")).exists() {
                    n += 1;
                }
                old.save(&out.join(format!("config.prev-{n}.json")))?;
                cfg.save(&cpath)?;
            }
        } else {
            cfg.save(&cpath)?;
        }
        // a started stage configured for fewer steps than it already ran fails now, not
        // after the stages before it have trained
        for s in Stage::ALL {
            let total = s.train_config(&cfg).steps;
            if let Some((ck, st)) = crate::runner::latest_checkpoint(&out.join(s.name()))? {
                if st.step > total {
                    return Err(Error::Config {
                        file: cpath.clone(),
                        key: format!("{}.train.steps", s.name()),
                        msg: format!(
                            "{total}, but the stage already ran {} steps ({})",
                            st.step,
                            ck.display()
                        ),
                    });
                }
            }
        }
        let tdir = out.join("tokenizer");
        crate::tokenizer::write_tokenizer(&tdir, cfg.max_text_len)?;
        let tokenizer = Tokenizer::from_folder(&tdir)?;
        let data = WorldData::new(cfg.image_size, cfg.supersample, cfg.pool_size, device)?;
        Ok(Self { cfg, out: out.to_path_buf(), device: device.clone(), data, tokenizer })
    }

    pub fn config(&self) -> &PretrainConfig {
        &self.cfg
    }

    pub fn out_dir(&self) -> &Path {
        &self.out
    }

    /// The folder of a stage.
    pub fn stage_dir(&self, stage: Stage) -> PathBuf {
        self.out.join(stage.name())
    }

    /// Runs `stages` in the given order, each to its configured step count (resuming from its
    /// latest checkpoint).
    pub fn run(
        &mut self,
        stages: &[Stage],
        control: &RunControl,
        events: &mut dyn FnMut(&TrainEvent),
    ) -> Result<Vec<(Stage, StageOutcome)>> {
        let mut out = Vec::new();
        for &s in stages {
            let o = self.train(s, control, events)?;
            out.push((s, o));
        }
        Ok(out)
    }

    /// Trains (or resumes) one stage.
    pub fn train(
        &mut self,
        stage: Stage,
        control: &RunControl,
        events: &mut dyn FnMut(&TrainEvent),
    ) -> Result<StageOutcome> {
        match stage {
            Stage::Clip => self.train_clip(control, events),
            Stage::Vae => self.train_vae(control, events),
            Stage::Unet => self.train_unet(control, events),
            Stage::Evaluator => self.train_evaluator(control, events),
        }
    }

    /// A new variable map (filled by a model constructor) and its builder.
    fn fresh(&self) -> (VarMap, VarBuilder<'static>) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &self.device);
        (vm, vb)
    }

    fn train_clip(
        &mut self,
        control: &RunControl,
        events: &mut dyn FnMut(&TrainEvent),
    ) -> Result<StageOutcome> {
        let stage = Stage::Clip;
        let (vm, vb) = self.fresh();
        let model = ClipModel::new(vb, &clip_config(&self.cfg)?)?;
        init_params(&vm, stage.seed(self.cfg.seed), &[])?;
        let vars = sorted_vars(&vm);
        let mut obj = ClipObjective {
            model,
            data: &mut self.data,
            tokenizer: &self.tokenizer,
            max_len: self.cfg.max_text_len,
            batch: self.cfg.clip.train.batch_size,
        };
        let dir = self.out.join(stage.name());
        run_stage(
            StageSpec {
                name: stage.name(),
                dir: &dir,
                cfg: &self.cfg.clip.train,
                seed: stage.seed(self.cfg.seed),
            },
            &vars,
            &mut obj,
            control,
            events,
        )
    }

    fn train_vae(
        &mut self,
        control: &RunControl,
        events: &mut dyn FnMut(&TrainEvent),
    ) -> Result<StageOutcome> {
        let stage = Stage::Vae;
        let (vm, vb) = self.fresh();
        let vcfg =
            VaeConfig::from_json(&vae_config_json(&self.cfg, 1.0), "pretrain config vae.config")?;
        let model = AutoencoderKL::new(vb, &vcfg)?;
        init_params(&vm, stage.seed(self.cfg.seed), &[])?;
        let vars = sorted_vars(&vm);
        let mut obj = VaeObjective {
            model,
            data: &mut self.data,
            batch: self.cfg.vae.train.batch_size,
            mse_weight: self.cfg.vae.mse_weight,
            kl_weight: self.cfg.vae.kl_weight,
        };
        let dir = self.out.join(stage.name());
        run_stage(
            StageSpec {
                name: stage.name(),
                dir: &dir,
                cfg: &self.cfg.vae.train,
                seed: stage.seed(self.cfg.seed),
            },
            &vars,
            &mut obj,
            control,
            events,
        )
    }

    fn train_evaluator(
        &mut self,
        control: &RunControl,
        events: &mut dyn FnMut(&TrainEvent),
    ) -> Result<StageOutcome> {
        let stage = Stage::Evaluator;
        let (vm, vb) = self.fresh();
        let ecfg = self.evaluator_config();
        let model = Evaluator::new(vb, &ecfg)?;
        init_params(&vm, stage.seed(self.cfg.seed), &[])?;
        let vars = sorted_vars(&vm);
        let dir = self.out.join(stage.name());
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let text = serde_json::to_string_pretty(&ecfg).map_err(|e| Error::msg(e.to_string()))?;
        write_atomic(dir.join("config.json"), text.as_bytes())?;
        let mut obj = EvaluatorObjective {
            model,
            data: &mut self.data,
            batch: self.cfg.evaluator.train.batch_size,
        };
        run_stage(
            StageSpec {
                name: stage.name(),
                dir: &dir,
                cfg: &self.cfg.evaluator.train,
                seed: stage.seed(self.cfg.seed),
            },
            &vars,
            &mut obj,
            control,
            events,
        )
    }

    /// The evaluator's config for this run.
    pub fn evaluator_config(&self) -> EvaluatorConfig {
        EvaluatorConfig::new(
            self.cfg.image_size as usize,
            self.cfg.evaluator.channels.clone(),
            self.cfg.evaluator.norm_groups,
            &crate::data::evaluator_classes(),
        )
    }

    /// The frozen text encoder of the CLIP stage's latest checkpoint.
    pub fn load_text_encoder(&self) -> Result<ClipTextTransformer> {
        let w = SafetensorsWeights::open(&[latest_weights(&self.out.join("clip"))?])?;
        ClipTextTransformer::new(
            w.var_builder(DType::F32, &self.device),
            &clip_config(&self.cfg)?.text,
        )
    }

    /// The frozen VAE of the VAE stage's latest checkpoint (scaling factor 1 in its config).
    pub fn load_vae(&self) -> Result<AutoencoderKL> {
        let w = SafetensorsWeights::open(&[latest_weights(&self.out.join("vae"))?])?;
        let vcfg =
            VaeConfig::from_json(&vae_config_json(&self.cfg, 1.0), "pretrain config vae.config")?;
        AutoencoderKL::new(w.var_builder(DType::F32, &self.device), &vcfg)
    }

    /// The VAE scaling factor `1 / std` of the latent means of the first `scaling_samples` pool
    /// images, measured once and stored in `unet/scaling.json`.
    pub fn scaling_factor(&mut self, vae: &AutoencoderKL) -> Result<f64> {
        let path = self.out.join("unet").join("scaling.json");
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                file: path.clone(),
                key: "(file)".into(),
                msg: e.to_string(),
            })?;
            return v["scaling_factor"].as_f64().ok_or_else(|| Error::Config {
                file: path.clone(),
                key: "scaling_factor".into(),
                msg: "missing".into(),
            });
        }
        let n = self.cfg.unet.scaling_samples.min(self.cfg.pool_size).max(1);
        let mut means = Vec::new();
        for chunk in (0..n as u64).collect::<Vec<_>>().chunks(16) {
            let b = self.data.batch(Split::Train, chunk)?;
            let x = ((b.images * 2.0)? - 1.0)?;
            means.push(vae.encode(&x)?.mean.flatten_all()?);
        }
        let all = Tensor::cat(&means, 0)?.to_dtype(DType::F64)?;
        let mean = all.mean_all()?.to_scalar::<f64>()?;
        let var = all.affine(1.0, -mean)?.sqr()?.mean_all()?.to_scalar::<f64>()?;
        let s = 1.0 / var.sqrt().max(1e-6);
        write_atomic(&path, json!({"scaling_factor": s, "latent_mean": mean, "latent_std": var.sqrt(), "samples": n}).to_string().as_bytes())?;
        // the value as a resumed run reads it (decimal text may not give back every bit)
        self.scaling_factor(vae)
    }

    fn train_unet(
        &mut self,
        control: &RunControl,
        events: &mut dyn FnMut(&TrainEvent),
    ) -> Result<StageOutcome> {
        let stage = Stage::Unet;
        // The UNet learns the finished text encoder's and VAE's spaces (and the VAE's scaling
        // factor, measured once): starting it on unfinished ones would train it for weights
        // that then change under it. A paused run (`stop_after`, e.g. every stage of `gen
        // train --stop-after N`) leaves it unstarted, saying so; a full run is an error.
        for dep in [Stage::Clip, Stage::Vae] {
            let total = dep.train_config(&self.cfg).steps;
            if let Some((_, st)) = crate::runner::latest_checkpoint(&self.out.join(dep.name()))? {
                if st.step < total {
                    let why = format!(
                        "the UNet trains on the finished CLIP text encoder and VAE, but stage `{}` is at step {} of {total}",
                        dep.name(),
                        st.step,
                    );
                    if control.stop_after.is_none() {
                        return Err(Error::msg(format!(
                            "{why}: finish it first (e.g. `--stages {}` without --stop-after)",
                            dep.name()
                        )));
                    }
                    events(&TrainEvent::Note {
                        stage: stage.name().into(),
                        message: format!("not started: {why}"),
                    });
                    let at = crate::runner::latest_checkpoint(&self.out.join(stage.name()))?;
                    return Ok(StageOutcome {
                        step: at.map(|(_, st)| st.step).unwrap_or(0),
                        finished: false,
                        seconds: 0.0,
                        losses: Vec::new(),
                    });
                }
            }
        }
        let text = self.load_text_encoder()?;
        let vae = self.load_vae()?;
        let dir = self.out.join(stage.name());
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let scaling = self.scaling_factor(&vae)?;
        events(&TrainEvent::Note {
            stage: stage.name().into(),
            message: format!("VAE scaling factor {scaling:.5}"),
        });
        let (vm, vb) = self.fresh();
        let ucfg =
            UNetConfig::from_json(&unet_config_json(&self.cfg), "pretrain config unet.config")?;
        let model = UNet2DConditionModel::new(vb, &ucfg)?;
        init_params(&vm, stage.seed(self.cfg.seed), &["conv_out.weight"])?;
        let vars = sorted_vars(&vm);
        let mut obj = UnetObjective {
            model,
            text,
            vae,
            scaling,
            data: &mut self.data,
            tokenizer: &self.tokenizer,
            max_len: self.cfg.max_text_len,
            batch: self.cfg.unet.train.batch_size,
            dropout: self.cfg.unet.caption_dropout,
            part_dropout: self.cfg.unet.caption_part_dropout,
            alphas: sd_alphas_cumprod(),
            latents: HashMap::new(),
            texts: HashMap::new(),
        };
        run_stage(
            StageSpec {
                name: stage.name(),
                dir: &dir,
                cfg: &self.cfg.unet.train,
                seed: stage.seed(self.cfg.seed),
            },
            &vars,
            &mut obj,
            control,
            events,
        )
    }
}

/// A run folder may continue under a changed config only when the data and seed are the same
/// and every stage whose settings changed has not started (no checkpoint) or changed only its
/// step count (it then continues on the new total's learning-rate schedule): e.g. to give the
/// stages still to come, or the running one, fewer steps. A started stage may also change its
/// weight-average decay (`train.ema_decay`), and a started UNet its caption-part dropout (the
/// caption mix it trains on). Otherwise the error says what differs.
fn check_compatible(old: &PretrainConfig, new: &PretrainConfig, out: &Path) -> Result<()> {
    let shared =
        |c: &PretrainConfig| (c.seed, c.image_size, c.supersample, c.pool_size, c.max_text_len);
    let refuse = |what: &str| {
        Err(Error::msg(format!(
            "{} holds a different training config ({what}); resume with that config or use another output folder",
            out.join("config.json").display()
        )))
    };
    if shared(old) != shared(new) {
        return refuse("seed, image size, supersampling, pool size or text length differ");
    }
    // `train.steps` may change under a checkpoint (to shorten or extend a running stage), as
    // may `train.ema_decay` (a moving average started then starts from the current weights) and
    // the UNet's caption-part dropout; anything else in a started stage may not.
    fn other_than_steps<T: Clone>(
        a: &T,
        b: &T,
        train: impl Fn(&mut T) -> &mut crate::config::StageConfig,
    ) -> T {
        let mut a = a.clone();
        let mut b = b.clone();
        train(&mut a).steps = train(&mut b).steps;
        train(&mut a).ema_decay = train(&mut b).ema_decay;
        a
    }
    let changed = [
        (
            Stage::Clip,
            old.clip != new.clip,
            other_than_steps(&old.clip, &new.clip, |c| &mut c.train) != new.clip,
        ),
        (
            Stage::Vae,
            old.vae != new.vae,
            other_than_steps(&old.vae, &new.vae, |c| &mut c.train) != new.vae,
        ),
        (Stage::Unet, old.unet != new.unet, {
            // the caption mix (part dropout) is data, not model: it may change too
            let mut u = other_than_steps(&old.unet, &new.unet, |c| &mut c.train);
            u.caption_part_dropout = new.unet.caption_part_dropout;
            u != new.unet
        }),
        (
            Stage::Evaluator,
            old.evaluator != new.evaluator,
            other_than_steps(&old.evaluator, &new.evaluator, |c| &mut c.train) != new.evaluator,
        ),
    ];
    for (stage, _, differs_beyond_steps) in &changed {
        if *differs_beyond_steps
            && crate::runner::latest_checkpoint(&out.join(stage.name()))?.is_some()
        {
            return refuse(&format!(
                "stage `{}` changed (beyond its step count) but already has a checkpoint",
                stage.name()
            ));
        }
    }
    // the UNet depends on the CLIP text encoder and the VAE
    if (changed[0].1 || changed[1].1)
        && crate::runner::latest_checkpoint(&out.join("unet"))?.is_some()
    {
        return refuse(
            "the CLIP or VAE stage changed but the UNet, trained on them, has a checkpoint",
        );
    }
    Ok(())
}

/// A UNet training caption of `scene`: the full caption, or with probability `part_dropout`
/// each (two independent draws), without its background clause and/or its view clause
/// ("a red cube, front view", "a red cube on a grey background", "a red cube"). With
/// `part_dropout` 0 it draws nothing, so runs without part dropout are unchanged.
pub fn training_caption(
    scene: &gen_world::Scene,
    part_dropout: f64,
    rng: &mut SeededRng,
) -> String {
    let (mut background, mut view) = (Some(scene.background), Some(scene.view()));
    if part_dropout > 0.0 {
        if (rng.uniform() as f64) < part_dropout {
            background = None;
        }
        if (rng.uniform() as f64) < part_dropout {
            view = None;
        }
    }
    gen_world::CaptionParts { shape: scene.shape, colour: Some(scene.colour), background, view }
        .to_string()
}

/// Encodes prompts to `(B, L, D)` last hidden states.
pub fn encode_text(
    text: &ClipTextTransformer,
    tokenizer: &Tokenizer,
    prompts: &[&str],
    max_len: usize,
    device: &Device,
) -> Result<Tensor> {
    let enc = tokenizer.encode_batch(prompts, max_len)?;
    let ids = Tokenizer::ids_tensor(&enc, device)?;
    Ok(text.forward(&ids, &TextForwardOptions::default())?.last_hidden_state)
}

struct ClipObjective<'a> {
    model: ClipModel,
    data: &'a mut WorldData,
    tokenizer: &'a Tokenizer,
    max_len: usize,
    batch: usize,
}

impl Objective for ClipObjective<'_> {
    fn part_names(&self) -> Vec<String> {
        vec!["image_to_text_acc".into(), "logit_scale".into()]
    }

    fn loss(&mut self, _step: u64, rng: &mut SeededRng) -> Result<StepLoss> {
        let b = self.data.train_batch(rng, self.batch)?;
        let prompts: Vec<&str> = b.captions.iter().map(String::as_str).collect();
        let ids = Tokenizer::ids_tensor(
            &self.tokenizer.encode_batch(&prompts, self.max_len)?,
            b.images.device(),
        )?;
        let logits = self.model.logits_per_image(&ids, &clip_normalize(&b.images)?)?;
        let n = prompts.len();
        // targets: every text with the same caption as the image is a positive
        let mut t = vec![0f32; n * n];
        for i in 0..n {
            let same: Vec<usize> = (0..n).filter(|&j| b.captions[j] == b.captions[i]).collect();
            for &j in &same {
                t[i * n + j] = 1.0 / same.len() as f32;
            }
        }
        let targets = Tensor::from_vec(t, (n, n), b.images.device())?;
        let loss = ((cross_entropy(&logits, &targets)?
            + cross_entropy(&logits.t()?, &targets.t()?)?)?
            * 0.5)?;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let acc = pred
            .iter()
            .enumerate()
            .filter(|(i, &j)| b.captions[*i] == b.captions[j as usize])
            .count() as f64
            / n as f64;
        let scale =
            self.model.logit_scale.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
        Ok(StepLoss {
            loss,
            parts: vec![("image_to_text_acc".into(), acc), ("logit_scale".into(), scale)],
        })
    }
}

struct VaeObjective<'a> {
    model: AutoencoderKL,
    data: &'a mut WorldData,
    batch: usize,
    mse_weight: f64,
    kl_weight: f64,
}

impl Objective for VaeObjective<'_> {
    fn part_names(&self) -> Vec<String> {
        vec!["l1".into(), "mse".into(), "kl".into(), "psnr_db".into()]
    }

    fn loss(&mut self, _step: u64, rng: &mut SeededRng) -> Result<StepLoss> {
        let b = self.data.train_batch(rng, self.batch)?;
        let x = ((b.images * 2.0)? - 1.0)?;
        let post = self.model.encode(&x)?;
        let z = post.sample(rng)?;
        let rec = self.model.decode(&z)?;
        let diff = (&rec - &x)?;
        let l1 = diff.abs()?.mean_all()?;
        let mse = diff.sqr()?.mean_all()?;
        let kl = ((post.mean.sqr()? + post.logvar.exp()?)? - 1.0)?
            .sub(&post.logvar)?
            .mean_all()?
            .affine(0.5, 0.0)?;
        let loss = ((&l1 + (&mse * self.mse_weight)?)? + (&kl * self.kl_weight)?)?;
        let mse_v = mse.to_scalar::<f32>()? as f64;
        // PSNR of [0, 1] images: their MSE is a quarter of the [-1, 1] one
        let psnr = 10.0 * (1.0 / (mse_v / 4.0).max(1e-12)).log10();
        Ok(StepLoss {
            loss,
            parts: vec![
                ("l1".into(), l1.to_scalar::<f32>()? as f64),
                ("mse".into(), mse_v),
                ("kl".into(), kl.to_scalar::<f32>()? as f64),
                ("psnr_db".into(), psnr),
            ],
        })
    }
}

struct EvaluatorObjective<'a> {
    model: Evaluator,
    data: &'a mut WorldData,
    batch: usize,
}

impl Objective for EvaluatorObjective<'_> {
    fn part_names(&self) -> Vec<String> {
        vec![
            "shape_acc".into(),
            "hue_acc".into(),
            "tone_acc".into(),
            "view_acc".into(),
            "background_acc".into(),
        ]
    }

    fn loss(&mut self, _step: u64, rng: &mut SeededRng) -> Result<StepLoss> {
        let b = self.data.train_batch(rng, self.batch)?;
        let logits = self.model.forward(&b.images)?;
        let dev = b.images.device().clone();
        let heads = self.model.config().heads();
        let classes: [Vec<usize>; 5] = [
            b.labels.iter().map(|l| l.shape).collect(),
            b.labels.iter().map(|l| l.hue).collect(),
            b.labels.iter().map(|l| l.tone).collect(),
            b.labels.iter().map(|l| l.view).collect(),
            b.labels.iter().map(|l| l.background).collect(),
        ];
        let mut loss: Option<Tensor> = None;
        let mut parts = Vec::new();
        let names = self.part_names();
        for (h, ((o, k), cls)) in heads.iter().zip(&classes).enumerate() {
            let lg = logits.narrow(1, *o, *k)?;
            let ce = cross_entropy(&lg, &one_hot(cls, *k, &dev)?)?;
            loss = Some(match loss {
                None => ce,
                Some(l) => (l + ce)?,
            });
            let pred = lg.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let acc = pred.iter().zip(cls).filter(|(p, c)| **p as usize == **c).count() as f64
                / cls.len() as f64;
            parts.push((names[h].clone(), acc));
        }
        Ok(StepLoss { loss: loss.expect("five heads"), parts })
    }
}

struct UnetObjective<'a> {
    model: UNet2DConditionModel,
    text: ClipTextTransformer,
    vae: AutoencoderKL,
    scaling: f64,
    data: &'a mut WorldData,
    tokenizer: &'a Tokenizer,
    max_len: usize,
    batch: usize,
    dropout: f64,
    /// Probability of leaving out the background clause, and the view clause, of a caption.
    part_dropout: f64,
    alphas: Vec<f64>,
    /// pool index → (posterior mean, posterior std), each `(C, h, w)`; filled a block of
    /// [`LATENT_BLOCK`] pool indices at a time (see [`UnetObjective::ensure_latents`])
    latents: HashMap<u64, (Tensor, Tensor)>,
    /// prompt → `(L, D)` hidden states, each prompt encoded alone (see
    /// [`UnetObjective::ensure_texts`])
    texts: HashMap<String, Tensor>,
}

/// Pool indices whose VAE latents are computed in one batch.
const LATENT_BLOCK: u64 = 16;

impl UnetObjective<'_> {
    /// Fills the latent cache for `idx`. A model's output for one input can depend on the
    /// other inputs of its batch in the last bits (the CPU matrix kernels split the rows
    /// differently), so a cache filled with whatever a step was missing would hold different
    /// values after a restart (an empty cache) than in an uninterrupted run, and resuming would
    /// not be bit-identical. Latents are therefore computed in fixed blocks of pool indices
    /// (`[k B, (k + 1) B)` for index `i` in block `k`), the same batch whatever the history.
    fn ensure_latents(&mut self, idx: &[u64]) -> Result<()> {
        let pool = self.data.pool_size() as u64;
        let mut blocks: Vec<u64> = idx
            .iter()
            .filter(|i| !self.latents.contains_key(i))
            .map(|i| i / LATENT_BLOCK)
            .collect();
        blocks.sort();
        blocks.dedup();
        for block in blocks {
            let chunk: Vec<u64> =
                (block * LATENT_BLOCK..((block + 1) * LATENT_BLOCK).min(pool)).collect();
            let chunk = chunk.as_slice();
            let b = self.data.batch(Split::Train, chunk)?;
            let x = ((b.images * 2.0)? - 1.0)?;
            let post = self.vae.encode(&x)?;
            let std = post.std()?;
            for (r, &i) in chunk.iter().enumerate() {
                self.latents.insert(i, (post.mean.get(r)?.detach(), std.get(r)?.detach()));
            }
        }
        Ok(())
    }

    /// Fills the text cache for `prompts`, encoding each prompt alone: in a batch its hidden
    /// states would depend on the other prompts of the batch in the last bits, and the prompts
    /// missing at a step differ after a restart (see [`UnetObjective::ensure_latents`]).
    fn ensure_texts(&mut self, prompts: &[String]) -> Result<()> {
        let dev = self.model_device();
        for p in prompts {
            if !self.texts.contains_key(p) {
                let h = encode_text(&self.text, self.tokenizer, &[p.as_str()], self.max_len, &dev)?;
                self.texts.insert(p.clone(), h.get(0)?.detach());
            }
        }
        Ok(())
    }

    /// The training caption of pool sample `i` (see [`training_caption`]).
    fn caption(&mut self, i: u64, rng: &mut SeededRng) -> Result<String> {
        let s = self.data.sample(Split::Train, i)?;
        Ok(training_caption(&s.scene, self.part_dropout, rng))
    }

    fn model_device(&self) -> Device {
        self.text.token_embedding.device().clone()
    }
}

impl Objective for UnetObjective<'_> {
    fn part_names(&self) -> Vec<String> {
        Vec::new()
    }

    fn loss(&mut self, _step: u64, rng: &mut SeededRng) -> Result<StepLoss> {
        let idx = self.data.draw_indices(rng, self.batch);
        self.ensure_latents(&idx)?;
        let b = idx.len();
        let mut prompts = Vec::with_capacity(b);
        for &i in &idx {
            let keep = rng.uniform() as f64 >= self.dropout;
            prompts.push(if keep { self.caption(i, rng)? } else { String::new() });
        }
        self.ensure_texts(&prompts)?;
        let means: Vec<Tensor> = idx.iter().map(|i| self.latents[i].0.clone()).collect();
        let stds: Vec<Tensor> = idx.iter().map(|i| self.latents[i].1.clone()).collect();
        let mean = Tensor::stack(&means, 0)?;
        let std = Tensor::stack(&stds, 0)?;
        let dev = mean.device().clone();
        let z = (&mean + std.mul(&rng.randn(mean.shape(), DType::F32, &dev)?)?)?;
        let x0 = (z * self.scaling)?;
        let noise = rng.randn(x0.shape(), DType::F32, &dev)?;
        let ts: Vec<usize> = (0..b).map(|_| rng.below(self.alphas.len())).collect();
        let sa: Vec<f32> = ts.iter().map(|&t| self.alphas[t].sqrt() as f32).collect();
        let sb: Vec<f32> = ts.iter().map(|&t| (1.0 - self.alphas[t]).sqrt() as f32).collect();
        let sa = Tensor::from_vec(sa, (b, 1, 1, 1), &dev)?;
        let sb = Tensor::from_vec(sb, (b, 1, 1, 1), &dev)?;
        let xt = (x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?;
        let ctx =
            Tensor::stack(&prompts.iter().map(|p| self.texts[p].clone()).collect::<Vec<_>>(), 0)?;
        let t = Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, &dev)?;
        let pred = self.model.forward(&xt, &t, &ctx)?;
        let loss = (pred - noise)?.sqr()?.mean_all()?;
        Ok(StepLoss { loss, parts: Vec::new() })
    }
}
