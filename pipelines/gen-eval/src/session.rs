//! `gen eval`: measures a text-to-image pipeline on the procedural world with the evaluator.
//!
//! [`EvalSession::evaluate`] generates `per_prompt` images for each of `prompts` captions of the
//! world's TEST split with exactly what `gen image` runs ([`gen_sample::generate`]: text encode,
//! sampling with the chosen guidance, VAE decode, 8-bit images) and scores them
//! ([`aggregate`]):
//! - prompt alignment of the evaluator's predictions with the prompt (shape, colour = hue and
//!   tone, background, view word), and the same accuracies on the real renders of the prompts
//!   (the ceiling the evaluator itself allows);
//! - tiny-FID: the Fréchet distance of evaluator features, generated images against `G` real
//!   test renders (`G` = number of generated images), with the real-vs-real baseline: the same
//!   distance between two disjoint sets of `G` real renders (Fréchet distance is biased upwards
//!   at small `G`; read tiny-FID against the baseline, never across different `G`);
//! - saturation excess: mean HSV object saturation of the generated images minus that of the
//!   real renders of the same prompts, both segmented by distance to the background colour the
//!   prompt names — or, for a prompt that names none ([`PromptForm`]), the background the
//!   evaluator sees in the image ([`gen_world::metrics::saturation_excess`]);
//! - clipped fraction: channel values at 0 or 255 in the generated (and the real) images;
//! - seconds per image of the generation (text encode + sampling + decode; no model loading).
//!
//! Prompts: the captions of test samples `start .. start + prompts`, `start` drawn from `seed`
//! ([`prompt_indices`]); the real reference set for tiny-FID is test samples
//! `start .. start + 2G` (it contains the prompts' own renders). Image `i` uses prompt
//! `i mod prompts` and random stream `i` of `seed`, so two configs that differ only in the
//! guidance see the same prompts and the same initial noise. [`PromptForm`] can shorten the
//! prompts (drop the background and/or view clause) to measure how the model follows the short
//! prompts users write; the real references stay the full captions' renders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::Serialize;

use gen_core::chart::{Panel, Series};
use gen_core::{Error, Result, SeededRng};
use gen_diffusion::{ApgConfig, GuidanceConfig, GuidanceMethod, IntervalRange};
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_sample::{generate, Progress, SampleConfig, Sampler};
use gen_world::metrics::{
    alignment, clipped_fraction, frechet_distance, real_vs_real, saturation_excess, set_saturation,
    ClipThresholds, ImageU8, ObjectSelect, Predicted, Target, ViewJudge,
};
use gen_world::{
    parse_caption, Background, Colour, Hue, Shape, Split, Tone, View, World, WorldConfig,
};

use gen_models::evaluator::{Evaluator, EvaluatorConfig, Prediction};

/// Random stream of the seed that picks the first test index of the prompts.
const PROMPT_STREAM: u64 = 0x70726f6d7074;

/// Which parts of the test captions the prompts keep: shape and colour always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptForm {
    /// "a red cube on a grey background, front view" (the world's captions).
    #[default]
    Full,
    /// "a red cube, front view".
    NoBackground,
    /// "a red cube on a grey background".
    NoView,
    /// "a red cube".
    Short,
}

impl PromptForm {
    pub const ALL: [PromptForm; 4] =
        [PromptForm::Full, PromptForm::NoBackground, PromptForm::NoView, PromptForm::Short];

    pub fn name(self) -> &'static str {
        match self {
            PromptForm::Full => "full",
            PromptForm::NoBackground => "no-background",
            PromptForm::NoView => "no-view",
            PromptForm::Short => "short",
        }
    }

    /// By name (`full`, `no-background`, `no-view`, `short`).
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|f| f.name() == s.trim()).ok_or_else(|| {
            Error::invalid(
                "prompt form",
                format!("unknown form `{s}`; known: {}", Self::ALL.map(|f| f.name()).join(", ")),
            )
        })
    }

    /// `caption` with the clauses this form drops left out.
    pub fn apply(self, caption: &str) -> Result<String> {
        let mut parts = parse_caption(caption)?;
        if matches!(self, PromptForm::NoBackground | PromptForm::Short) {
            parts.background = None;
        }
        if matches!(self, PromptForm::NoView | PromptForm::Short) {
            parts.view = None;
        }
        Ok(parts.to_string())
    }
}

/// Settings of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalConfig {
    /// The diffusers pipeline folder.
    pub model: PathBuf,
    /// The evaluator folder (`config.json`, `model.safetensors`); default `model/evaluator`.
    pub evaluator: Option<PathBuf>,
    /// Number of distinct prompts (test-split captions).
    pub prompts: usize,
    /// Images generated per prompt (different noise each).
    pub per_prompt: usize,
    /// Denoising steps.
    pub steps: usize,
    pub sampler: Sampler,
    /// CFG or APG with its options.
    pub guidance: GuidanceMethod,
    /// Guide only in this interval of the steps or noise levels (`None`: at every step).
    pub interval: Option<IntervalRange>,
    /// The test captions as given, or shortened.
    pub prompt_form: PromptForm,
    /// Picks the prompts and the noise of every image.
    pub seed: u64,
    /// Images denoised together (does not change the images, see `gen image`).
    pub batch: usize,
}

impl EvalConfig {
    /// Defaults: 32 prompts, 1 image each, 30 steps of DPM++ 2M, CFG 7.5, seed 0, batch 8.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            evaluator: None,
            prompts: 32,
            per_prompt: 1,
            steps: 30,
            sampler: Sampler::DpmPp2m,
            guidance: GuidanceMethod::Cfg { scale: 7.5 },
            interval: None,
            prompt_form: PromptForm::Full,
            seed: 0,
            batch: 8,
        }
    }

    /// Number of generated images.
    pub fn num_images(&self) -> usize {
        self.prompts * self.per_prompt
    }

    /// The evaluator folder this config uses.
    pub fn evaluator_dir(&self) -> PathBuf {
        self.evaluator.clone().unwrap_or_else(|| self.model.join("evaluator"))
    }

    /// Checks every field that does not need the model.
    pub fn validate(&self) -> Result<()> {
        if self.prompts == 0 {
            return Err(Error::invalid("prompts", "0 (need at least 1)"));
        }
        if self.per_prompt == 0 {
            return Err(Error::invalid("per-prompt", "0 (need at least 1 image per prompt)"));
        }
        if self.num_images() < 2 {
            return Err(Error::invalid(
                "number of images",
                format!(
                    "{} prompt(s) × {} image(s) = {}; tiny-FID needs at least 2 generated images",
                    self.prompts,
                    self.per_prompt,
                    self.num_images()
                ),
            ));
        }
        if self.steps == 0 {
            return Err(Error::invalid("steps", "0 (need at least 1)"));
        }
        if self.batch == 0 {
            return Err(Error::invalid("batch", "0 (need at least 1)"));
        }
        check_guidance_scale(guidance_scale(&self.guidance))?;
        self.guidance_config().build()?;
        Ok(())
    }

    /// The guidance: the method, no rescale, the interval.
    pub fn guidance_config(&self) -> GuidanceConfig {
        GuidanceConfig { method: self.guidance.clone(), rescale_phi: 0.0, interval: self.interval }
    }

    /// The `gen image` config of this evaluation for `prompts` at `size`×`size`.
    pub fn sample_config(&self, prompts: Vec<String>, size: usize) -> SampleConfig {
        SampleConfig {
            prompts,
            guidance: self.guidance_config(),
            sampler: self.sampler,
            steps: self.steps,
            seed: self.seed,
            width: Some(size),
            height: Some(size),
            num_images: self.num_images(),
            batch_size: self.batch,
            model: Some(self.model.display().to_string()),
            ..SampleConfig::default()
        }
    }
}

/// The guidance scale of a method (1 for no guidance).
pub fn guidance_scale(m: &GuidanceMethod) -> f64 {
    match m {
        GuidanceMethod::None => 1.0,
        GuidanceMethod::Cfg { scale } => *scale,
        GuidanceMethod::Apg(c) => c.scale,
    }
}

/// Short name of a method: `none`, `cfg` or `apg`.
pub fn guidance_kind(m: &GuidanceMethod) -> &'static str {
    match m {
        GuidanceMethod::None => "none",
        GuidanceMethod::Cfg { .. } => "cfg",
        GuidanceMethod::Apg(_) => "apg",
    }
}

/// The range `gen image` accepts too: any finite number (1 = no guidance, 0 = the
/// unconditional prediction, negative steers away from the prompt).
fn check_guidance_scale(w: f64) -> Result<()> {
    if !w.is_finite() {
        return Err(Error::invalid(
            "guidance scale",
            format!("{w} (must be a finite number; 1 = no guidance)"),
        ));
    }
    Ok(())
}

/// APG options that replace the paper preset's ([`ApgConfig::paper`]: eta 0, norm threshold
/// r 15, momentum −0.5, x0 space).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ApgOverrides {
    pub eta: Option<f64>,
    pub norm_threshold: Option<f64>,
    pub momentum: Option<f64>,
}

/// The guidance method named `kind` (`cfg` or `apg`) at scale `w` (finite).
pub fn guidance_method(kind: &str, w: f64, apg: &ApgOverrides) -> Result<GuidanceMethod> {
    check_guidance_scale(w)?;
    let m = match kind.trim().to_ascii_lowercase().as_str() {
        "cfg" => GuidanceMethod::Cfg { scale: w },
        "apg" => {
            let mut c = ApgConfig::paper(w);
            if let Some(e) = apg.eta {
                c.eta = e;
            }
            if let Some(r) = apg.norm_threshold {
                c.norm_threshold = r;
            }
            if let Some(b) = apg.momentum {
                c.momentum = b;
            }
            GuidanceMethod::Apg(c)
        }
        other => {
            return Err(Error::invalid(
                "guidance",
                format!("unknown method `{other}`; known: cfg, apg"),
            ))
        }
    };
    GuidanceConfig { method: m.clone(), rescale_phi: 0.0, interval: None }.build()?;
    Ok(m)
}

/// The test-split indices `start .. start + count`, `start` drawn from `seed`.
pub fn prompt_indices(seed: u64, count: usize) -> Vec<u64> {
    let start = SeededRng::fork(seed, PROMPT_STREAM).below(1 << 30) as u64;
    (start..start + count as u64).collect()
}

// ---------------------------------------------------------------------------------------------
// Aggregation (pure)
// ---------------------------------------------------------------------------------------------

/// A set of scored images: each image's prompt, the evaluator's labels and features.
#[derive(Debug, Clone, Copy)]
pub struct ScoredImages<'a> {
    pub images: &'a [RgbImage],
    /// The prompt of each image (it names the background used to segment the object).
    pub prompts: &'a [String],
    pub predicted: &'a [Predicted],
    /// Evaluator features, `images.len() × dim` row-major.
    pub features: &'a [f64],
    pub dim: usize,
}

impl ScoredImages<'_> {
    fn check(&self, what: &str) -> Result<()> {
        let n = self.images.len();
        if n == 0 {
            return Err(Error::invalid(what, "no images"));
        }
        if self.prompts.len() != n
            || self.predicted.len() != n
            || self.features.len() != n * self.dim
        {
            return Err(Error::invalid(
                what,
                format!(
                    "{n} images but {} prompts, {} predictions and {} feature values (expected {n} × {})",
                    self.prompts.len(),
                    self.predicted.len(),
                    self.features.len(),
                    self.dim
                ),
            ));
        }
        Ok(())
    }

    fn u8_images(&self) -> Result<Vec<ImageU8<'_>>> {
        Ok(self.images.iter().map(ImageU8::from_rgb_image).collect())
    }

    /// Each image with its object selection: by distance to the background the prompt names,
    /// else to the one the evaluator predicted for the image.
    fn segmented(&self) -> Result<Vec<(ImageU8<'_>, ObjectSelect<'static>)>> {
        self.images
            .iter()
            .zip(self.prompts)
            .zip(self.predicted)
            .map(|((img, p), pred)| {
                let bg = parse_caption(p)?.background.or(pred.background).ok_or_else(|| {
                    Error::invalid("prompt", format!("{p:?} names no background and the evaluator predicts none; cannot segment the object"))
                })?;
                Ok((ImageU8::from_rgb_image(img), ObjectSelect::for_background(bg)))
            })
            .collect()
    }

    fn alignment(&self) -> Result<gen_world::metrics::AlignmentReport> {
        let targets = self
            .prompts
            .iter()
            .map(|p| Target::from_prompt(p, None))
            .collect::<Result<Vec<_>>>()?;
        alignment(self.predicted, &targets, ViewJudge::Exact)
    }
}

/// Every measurement of one evaluation (accuracies are `None` when no prompt named the
/// attribute; saturations `None` when no image had object pixels).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalMetrics {
    /// Generated images.
    pub images: usize,
    /// Evaluator labels of the generated images vs the prompts.
    pub shape_accuracy: Option<f64>,
    /// Hue and tone both right.
    pub colour_accuracy: Option<f64>,
    pub hue_accuracy: Option<f64>,
    pub tone_accuracy: Option<f64>,
    pub background_accuracy: Option<f64>,
    /// Exact view word.
    pub view_accuracy: Option<f64>,
    /// The same on the real renders of the prompts (what the evaluator allows at best).
    pub real_shape_accuracy: Option<f64>,
    pub real_colour_accuracy: Option<f64>,
    pub real_background_accuracy: Option<f64>,
    /// Fréchet distance of evaluator features, generated vs `fid_size` real renders.
    pub tiny_fid: f64,
    /// The same between two disjoint sets of `fid_size` real renders.
    pub tiny_fid_real_baseline: f64,
    pub fid_size: usize,
    /// Mean HSV saturation of object pixels (mean of per-image means).
    pub saturation_generated: Option<f64>,
    pub saturation_real: Option<f64>,
    /// `saturation_generated − saturation_real` (positive: over-saturated).
    pub saturation_excess: Option<f64>,
    /// Generated images in which no object pixel was found (left out of the saturation).
    pub images_without_object: usize,
    /// Channel values at 0 or 255.
    pub clipped_fraction: f64,
    pub clipped_fraction_real: f64,
    /// Wall-clock seconds of generation per image.
    pub seconds_per_image: f64,
}

/// The metrics of `generated` against `real` (the real renders of the same prompts, in any
/// number) and `reference` (real features, at least `2 × generated` rows: tiny-FID uses its
/// even rows, the baseline its even vs its odd rows).
pub fn aggregate(
    generated: &ScoredImages,
    real: &ScoredImages,
    reference: &[f64],
    generation_seconds: f64,
) -> Result<EvalMetrics> {
    generated.check("generated images")?;
    real.check("real images")?;
    let (g, d) = (generated.images.len(), generated.dim);
    if real.dim != d {
        return Err(Error::invalid(
            "features",
            format!("generated features have dimension {d}, real ones {}", real.dim),
        ));
    }
    if d == 0 || reference.len() < 2 * g * d || !reference.len().is_multiple_of(d) {
        return Err(Error::invalid(
            "reference features",
            format!(
                "{} values; tiny-FID of {g} images needs at least 2 × {g} rows of dimension {d}",
                reference.len()
            ),
        ));
    }
    let gen_align = generated.alignment()?;
    let real_align = real.alignment()?;
    let even: Vec<f64> =
        (0..g).flat_map(|k| reference[2 * k * d..(2 * k + 1) * d].iter().copied()).collect();
    let tiny_fid = frechet_distance(generated.features, &even, d)?;
    let baseline = real_vs_real(reference, d, g)?;

    let gen_sets = generated.segmented()?;
    let real_sets = real.segmented()?;
    let (saturation_generated, saturation_real, saturation_excess_v, images_without_object) =
        match saturation_excess(&gen_sets, &real_sets) {
            Ok(s) => (s.generated.mean, s.real.mean, Some(s.excess), s.generated.empty),
            Err(_) => {
                // One set has no object pixel at all: report what there is.
                let gs = set_saturation(&gen_sets)?;
                let rs = set_saturation(&real_sets)?;
                (gs.mean, rs.mean, None, gs.empty)
            }
        };
    let clipped = clipped_fraction(&generated.u8_images()?, ClipThresholds::EXACT)?;
    let clipped_real = clipped_fraction(&real.u8_images()?, ClipThresholds::EXACT)?;
    Ok(EvalMetrics {
        images: g,
        shape_accuracy: gen_align.shape.value(),
        colour_accuracy: gen_align.colour.value(),
        hue_accuracy: gen_align.hue.value(),
        tone_accuracy: gen_align.tone.value(),
        background_accuracy: gen_align.background.value(),
        view_accuracy: gen_align.view_exact.value(),
        real_shape_accuracy: real_align.shape.value(),
        real_colour_accuracy: real_align.colour.value(),
        real_background_accuracy: real_align.background.value(),
        tiny_fid,
        tiny_fid_real_baseline: baseline.fd,
        fid_size: g,
        saturation_generated,
        saturation_real,
        saturation_excess: saturation_excess_v,
        images_without_object,
        clipped_fraction: clipped.overall,
        clipped_fraction_real: clipped_real.overall,
        seconds_per_image: generation_seconds / g as f64,
    })
}

// ---------------------------------------------------------------------------------------------
// The evaluator's labels as world types
// ---------------------------------------------------------------------------------------------

/// Maps the evaluator's class indices to world labels by the names in its `config.json`.
#[derive(Debug, Clone)]
pub struct LabelMap {
    shapes: Vec<Shape>,
    hues: Vec<Hue>,
    tones: Vec<Tone>,
    views: Vec<View>,
    backgrounds: Vec<Background>,
}

impl LabelMap {
    /// From the evaluator config's `labels` (class names per head); when it has none, the world's
    /// `ALL` orders (checked against the head sizes).
    pub fn new(cfg: &EvaluatorConfig, file: &Path) -> Result<Self> {
        fn head<T: Copy>(
            cfg_labels: &serde_json::Value,
            key: &str,
            size: usize,
            all: &[T],
            name: impl Fn(T) -> String,
            file: &Path,
        ) -> Result<Vec<T>> {
            let bad = |msg: String| Error::Config {
                file: file.to_path_buf(),
                key: format!("labels.{key}"),
                msg,
            };
            let names: Vec<String> = match cfg_labels.get(key) {
                Some(v) => serde_json::from_value(v.clone())
                    .map_err(|e| bad(format!("expected a list of names: {e}")))?,
                None => all.iter().map(|&x| name(x)).collect(),
            };
            if names.len() != size {
                return Err(bad(format!("{} names for a head of {size} classes", names.len())));
            }
            names
                .iter()
                .map(|n| {
                    all.iter().copied().find(|&x| name(x) == *n).ok_or_else(|| {
                        bad(format!(
                            "unknown class `{n}`; the world knows {}",
                            all.iter().map(|&x| name(x)).collect::<Vec<_>>().join(", ")
                        ))
                    })
                })
                .collect()
        }
        let l = &cfg.labels;
        let tone_name =
            |t: Tone| if t == Tone::Plain { "plain".to_string() } else { t.name().to_string() };
        Ok(Self {
            shapes: head(l, "shape", cfg.num_shapes, &Shape::ALL, |s| s.name().to_string(), file)?,
            hues: head(l, "hue", cfg.num_hues, &Hue::ALL, |s| s.name().to_string(), file)?,
            tones: head(l, "tone", cfg.num_tones, &Tone::ALL, tone_name, file)?,
            views: head(l, "view", cfg.num_views, &View::ALL, |s| s.name().to_string(), file)?,
            backgrounds: head(
                l,
                "background",
                cfg.num_backgrounds,
                &Background::ALL,
                |s| s.name().to_string(),
                file,
            )?,
        })
    }

    /// The world labels of one prediction.
    pub fn predicted(&self, p: &Prediction) -> Predicted {
        Predicted {
            shape: self.shapes[p.shape],
            colour: Colour::new(self.hues[p.hue], self.tones[p.tone]),
            view: Some(self.views[p.view]),
            background: Some(self.backgrounds[p.background]),
        }
    }
}

/// `(N, 3, H, W)` f32 in [0, 1] from 8-bit images of one size.
pub fn images_to_tensor(images: &[RgbImage], device: &Device) -> Result<Tensor> {
    let first = images.first().ok_or_else(|| Error::invalid("images", "none"))?;
    let (w, h) = (first.width() as usize, first.height() as usize);
    let mut v = Vec::with_capacity(images.len() * 3 * h * w);
    for (k, img) in images.iter().enumerate() {
        if (img.width() as usize, img.height() as usize) != (w, h) {
            return Err(Error::invalid(
                "images",
                format!("image {k} is {}×{}, image 0 {w}×{h}", img.width(), img.height()),
            ));
        }
        let raw = img.as_raw();
        for c in 0..3 {
            v.extend((0..h * w).map(|p| raw[p * 3 + c] as f32 / 255.0));
        }
    }
    Ok(Tensor::from_vec(v, (images.len(), 3, h, w), device)?)
}

// ---------------------------------------------------------------------------------------------
// The session: models loaded once, real renders scored once
// ---------------------------------------------------------------------------------------------

/// A report: the settings, what was evaluated and the metrics.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub config: EvalConfig,
    /// The prompts in order (image `i` used prompt `i mod prompts`).
    pub prompts: Vec<String>,
    /// Their test-split indices.
    pub test_indices: Vec<u64>,
    pub image_size: usize,
    pub metrics: EvalMetrics,
}

/// The generated images and the report.
#[derive(Debug, Clone)]
pub struct EvalOutput {
    pub report: EvalReport,
    /// Image `i` used prompt `i mod prompts`.
    pub images: Vec<RgbImage>,
}

/// Test samples `prompt_indices(seed, count)`: captions, renders and their scores.
struct RealScores {
    seed: u64,
    count: usize,
    captions: Vec<String>,
    images: Vec<RgbImage>,
    predicted: Vec<Predicted>,
    features: Vec<f64>,
}

/// The pipeline and evaluator of one model folder, loaded once for any number of
/// [`EvalSession::evaluate`] calls (a guidance sweep), with the real renders' scores cached.
pub struct EvalSession {
    pub model: PathBuf,
    pub pipe: SdPipeline,
    pub evaluator: Evaluator,
    labels: LabelMap,
    world: World,
    real: Option<RealScores>,
}

impl EvalSession {
    /// Loads `model` (a diffusers folder) and the evaluator (default `model/evaluator`).
    pub fn load(model: &Path, evaluator: Option<&Path>, device: &Device) -> Result<Self> {
        if !model.is_dir() {
            return Err(Error::invalid("model", format!("{} is not a folder (expected a diffusers pipeline folder such as weights/tiny-shapes)", model.display())));
        }
        let eval_dir = evaluator.map(Path::to_path_buf).unwrap_or_else(|| model.join("evaluator"));
        if !eval_dir.join("config.json").is_file() {
            return Err(Error::MissingFile {
                path: eval_dir.join("config.json"),
                hint: "the evaluator folder (config.json, model.safetensors) of a tiny-shapes model; pass --evaluator DIR".into(),
            });
        }
        let pipe = SdPipeline::load(
            &ModelSource::Local(model.to_path_buf()),
            &LoadOptions { device: device.clone(), ..LoadOptions::default() },
        )
        .map_err(|e| Error::msg(format!("loading model {}: {e}", model.display())))?;
        let evaluator = Evaluator::load(&eval_dir, device)
            .map_err(|e| Error::msg(format!("loading evaluator {}: {e}", eval_dir.display())))?;
        let labels = LabelMap::new(evaluator.config(), &eval_dir.join("config.json"))?;
        let world = World::new(WorldConfig {
            image_size: evaluator.config().image_size as u32,
            ..WorldConfig::default()
        })?;
        Ok(Self { model: model.to_path_buf(), pipe, evaluator, labels, world, real: None })
    }

    /// Image size the evaluator takes (and the images are generated at).
    pub fn image_size(&self) -> usize {
        self.evaluator.config().image_size
    }

    /// Predictions and features of images, 32 at a time.
    pub fn score(&self, images: &[RgbImage]) -> Result<(Vec<Predicted>, Vec<f64>, usize)> {
        let (mut preds, mut feats) = (Vec::new(), Vec::new());
        let d = *self.evaluator.config().channels.last().unwrap_or(&0);
        for chunk in images.chunks(32) {
            let x = images_to_tensor(chunk, &self.pipe.device)?;
            let f = self.evaluator.features(&x)?;
            preds.extend(self.evaluator.predict(&x)?.iter().map(|p| self.labels.predicted(p)));
            feats.extend(f.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
        }
        Ok((preds, feats, d))
    }

    /// Renders and scores test samples `prompt_indices(seed, count)` (cached).
    fn real(&mut self, seed: u64, count: usize) -> Result<&RealScores> {
        let fresh = !matches!(&self.real, Some(r) if r.seed == seed && r.count == count);
        if fresh {
            let idx = prompt_indices(seed, count);
            let mut captions = Vec::with_capacity(count);
            let mut images = Vec::with_capacity(count);
            for &i in &idx {
                let s = self.world.sample(Split::Test, i)?;
                captions.push(s.caption);
                images.push(s.image.to_rgb8());
            }
            let (predicted, features, _) = self.score(&images)?;
            self.real = Some(RealScores { seed, count, captions, images, predicted, features });
        }
        Ok(self.real.as_ref().expect("filled above"))
    }

    /// Generates and measures (see the module docs). `progress` gets `gen image`'s events.
    pub fn evaluate(
        &mut self,
        cfg: &EvalConfig,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<EvalOutput> {
        cfg.validate()?;
        let n = cfg.num_images();
        let size = self.image_size();
        let count = cfg.prompts.max(2 * n);
        let prompts: Vec<String> = self.real(cfg.seed, count)?.captions[..cfg.prompts]
            .iter()
            .map(|c| cfg.prompt_form.apply(c))
            .collect::<Result<_>>()?;
        let test_indices = prompt_indices(cfg.seed, cfg.prompts);
        let sc = cfg.sample_config(prompts.clone(), size);

        let t0 = Instant::now();
        let images = generate(&self.pipe, &sc, progress)?;
        let seconds = t0.elapsed().as_secs_f64();
        if images.len() != n {
            return Err(Error::msg(format!("generated {} images, expected {n}", images.len())));
        }

        let (gp, gf, d) = self.score(&images)?;
        let real = self.real.as_ref().expect("filled above");
        let image_prompts: Vec<String> =
            (0..n).map(|i| prompts[i % prompts.len()].clone()).collect();
        let generated = ScoredImages {
            images: &images,
            prompts: &image_prompts,
            predicted: &gp,
            features: &gf,
            dim: d,
        };
        let p = cfg.prompts;
        let real_set = ScoredImages {
            images: &real.images[..p],
            prompts: &real.captions[..p],
            predicted: &real.predicted[..p],
            features: &real.features[..p * d],
            dim: d,
        };
        let metrics = aggregate(&generated, &real_set, &real.features[..2 * n * d], seconds)?;
        Ok(EvalOutput {
            report: EvalReport {
                config: cfg.clone(),
                prompts,
                test_indices,
                image_size: size,
                metrics,
            },
            images,
        })
    }
}

/// The generated images (image `i` of prompt `i mod prompts`) in a grid with 2-pixel black
/// gaps: one row per prompt (its `per_prompt` images) when `per_prompt > 1`, else rows of 8.
pub fn samples_grid(images: &[RgbImage], prompts: usize, per_prompt: usize) -> Result<RgbImage> {
    let first = images.first().ok_or_else(|| Error::invalid("samples grid", "no images"))?;
    let (w, h) = first.dimensions();
    if images.len() != prompts * per_prompt || images.iter().any(|i| i.dimensions() != (w, h)) {
        return Err(Error::invalid(
            "samples grid",
            format!(
                "{} images for {prompts} prompts × {per_prompt}, or of different sizes",
                images.len()
            ),
        ));
    }
    let (cols, order): (usize, Vec<usize>) = if per_prompt > 1 {
        (
            per_prompt,
            (0..prompts).flat_map(|p| (0..per_prompt).map(move |k| k * prompts + p)).collect(),
        )
    } else {
        (images.len().min(8), (0..images.len()).collect())
    };
    let rows = order.len().div_ceil(cols);
    const GAP: u32 = 2;
    let mut grid = RgbImage::from_pixel(
        cols as u32 * (w + GAP) - GAP,
        rows as u32 * (h + GAP) - GAP,
        image::Rgb([0, 0, 0]),
    );
    for (slot, &i) in order.iter().enumerate() {
        let (c, r) = ((slot % cols) as u32, (slot / cols) as u32);
        image::imageops::replace(
            &mut grid,
            &images[i],
            (c * (w + GAP)) as i64,
            (r * (h + GAP)) as i64,
        );
    }
    Ok(grid)
}

// ---------------------------------------------------------------------------------------------
// CSV rows
// ---------------------------------------------------------------------------------------------

/// Columns of the settings that make two rows "the same run" (for resuming a sweep).
pub const SETTING_COLUMNS: [&str; 14] = [
    "model",
    "method",
    "scale",
    "apg_eta",
    "apg_r",
    "apg_momentum",
    "interval",
    "prompt_form",
    "sampler",
    "steps",
    "prompts",
    "per_prompt",
    "seed",
    "image_size",
];

/// The setting columns that are not the guidance's: rows that agree on these saw the same
/// prompts and noise and can share a chart.
pub const RUN_COLUMNS: [&str; 8] =
    ["model", "prompt_form", "sampler", "steps", "prompts", "per_prompt", "seed", "image_size"];

/// Columns of the metrics, in [`EvalMetrics`] order.
pub const METRIC_COLUMNS: [&str; 21] = [
    "images",
    "shape_accuracy",
    "colour_accuracy",
    "hue_accuracy",
    "tone_accuracy",
    "background_accuracy",
    "view_accuracy",
    "real_shape_accuracy",
    "real_colour_accuracy",
    "real_background_accuracy",
    "tiny_fid",
    "tiny_fid_real_baseline",
    "fid_size",
    "saturation_generated",
    "saturation_real",
    "saturation_excess",
    "images_without_object",
    "clipped_fraction",
    "clipped_fraction_real",
    "seconds_per_image",
    "batch",
];

fn opt(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl EvalReport {
    /// Pretty JSON (with a final newline).
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)
            .map_err(|e| Error::msg(format!("report to JSON: {e}")))?
            + "\n")
    }

    /// `(column, value)` pairs: [`SETTING_COLUMNS`] then [`METRIC_COLUMNS`] (empty = none).
    pub fn columns(&self) -> Vec<(&'static str, String)> {
        let c = &self.config;
        let m = &self.metrics;
        let metrics = [
            m.images.to_string(),
            opt(m.shape_accuracy),
            opt(m.colour_accuracy),
            opt(m.hue_accuracy),
            opt(m.tone_accuracy),
            opt(m.background_accuracy),
            opt(m.view_accuracy),
            opt(m.real_shape_accuracy),
            opt(m.real_colour_accuracy),
            opt(m.real_background_accuracy),
            m.tiny_fid.to_string(),
            m.tiny_fid_real_baseline.to_string(),
            m.fid_size.to_string(),
            opt(m.saturation_generated),
            opt(m.saturation_real),
            opt(m.saturation_excess),
            m.images_without_object.to_string(),
            m.clipped_fraction.to_string(),
            m.clipped_fraction_real.to_string(),
            m.seconds_per_image.to_string(),
            c.batch.to_string(),
        ];
        let mut out = settings_columns(c, self.image_size);
        out.extend(METRIC_COLUMNS.iter().copied().zip(metrics));
        out
    }
}

/// The CSV header line (no newline).
pub fn csv_header() -> String {
    SETTING_COLUMNS.iter().chain(METRIC_COLUMNS.iter()).copied().collect::<Vec<_>>().join(",")
}

/// One CSV line of a report (no newline).
pub fn csv_row(report: &EvalReport) -> String {
    report.columns().iter().map(|(_, v)| csv_field(v)).collect::<Vec<_>>().join(",")
}

fn split_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        match (ch, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    out.push(cur);
    out
}

/// Parses a CSV written with [`csv_header`] / [`csv_row`] into rows of column → value. Errors
/// name the file and line when the header differs or a row has the wrong number of fields.
pub fn parse_csv(text: &str, file: &Path) -> Result<Vec<BTreeMap<String, String>>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else { return Ok(Vec::new()) };
    if header.trim() != csv_header() {
        return Err(Error::Config {
            file: file.to_path_buf(),
            key: "(header)".into(),
            msg: format!(
                "columns differ from this version's ({}); move the file away or use another --out",
                csv_header()
            ),
        });
    }
    let cols = split_csv_line(header.trim());
    lines
        .enumerate()
        .map(|(i, l)| {
            let vals = split_csv_line(l);
            if vals.len() != cols.len() {
                return Err(Error::Config {
                    file: file.to_path_buf(),
                    key: format!("line {}", i + 2),
                    msg: format!("{} fields, expected {}", vals.len(), cols.len()),
                });
            }
            Ok(cols.iter().cloned().zip(vals).collect())
        })
        .collect()
}

/// Whether a parsed CSV row has the same [`SETTING_COLUMNS`] as `report_settings` (from
/// [`EvalReport::columns`] or [`settings_columns`]).
pub fn same_settings(row: &BTreeMap<String, String>, settings: &[(&'static str, String)]) -> bool {
    settings
        .iter()
        .filter(|(k, _)| SETTING_COLUMNS.contains(k))
        .all(|(k, v)| row.get(*k) == Some(v))
}

/// The [`SETTING_COLUMNS`] values a config will produce (without running it).
pub fn settings_columns(cfg: &EvalConfig, image_size: usize) -> Vec<(&'static str, String)> {
    let (eta, r, beta) = match &cfg.guidance {
        GuidanceMethod::Apg(a) => {
            (a.eta.to_string(), a.norm_threshold.to_string(), a.momentum.to_string())
        }
        _ => Default::default(),
    };
    let vals = [
        cfg.model.display().to_string(),
        guidance_kind(&cfg.guidance).to_string(),
        guidance_scale(&cfg.guidance).to_string(),
        eta,
        r,
        beta,
        cfg.interval.map(|i| i.to_string()).unwrap_or_default(),
        cfg.prompt_form.name().to_string(),
        cfg.sampler.name().to_string(),
        cfg.steps.to_string(),
        cfg.prompts.to_string(),
        cfg.per_prompt.to_string(),
        cfg.seed.to_string(),
        image_size.to_string(),
    ];
    SETTING_COLUMNS.iter().copied().zip(vals).collect()
}

// ---------------------------------------------------------------------------------------------
// Guidance sweep
// ---------------------------------------------------------------------------------------------

/// Parses a comma-separated list of guidance scales ("1,3,7.5"); errors on an empty list, a
/// non-number or a scale that is not finite.
pub fn parse_scales(list: &str) -> Result<Vec<f64>> {
    let parts: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if parts.is_empty() {
        return Err(Error::invalid(
            "scales",
            format!("{list:?} is empty; give comma-separated guidance scales such as 1,3,5,7.5"),
        ));
    }
    parts
        .iter()
        .map(|p| {
            let w: f64 = p.parse().map_err(|_| {
                Error::invalid("scales", format!("`{p}` in {list:?} is not a number"))
            })?;
            check_guidance_scale(w)?;
            Ok(w)
        })
        .collect()
}

/// One config per method × scale (methods outer), each `base` with that guidance: the same
/// prompts and noise for all. Errors on an empty list, an unknown method or a scale that is not
/// finite.
pub fn sweep_configs(
    base: &EvalConfig,
    methods: &[String],
    scales: &[f64],
    apg: &ApgOverrides,
) -> Result<Vec<EvalConfig>> {
    if methods.iter().all(|m| m.trim().is_empty()) {
        return Err(Error::invalid("method", "no guidance method given (cfg, apg or cfg,apg)"));
    }
    if scales.is_empty() {
        return Err(Error::invalid("scales", "no guidance scale given"));
    }
    let mut out = Vec::new();
    for m in methods.iter().filter(|m| !m.trim().is_empty()) {
        for &w in scales {
            out.push(EvalConfig { guidance: guidance_method(m, w, apg)?, ..base.clone() });
        }
    }
    Ok(out)
}

/// Line colours of the chart's series, in order of first appearance.
const PALETTE: [[u8; 3]; 8] = [
    [30, 80, 220],
    [230, 110, 20],
    [40, 160, 60],
    [200, 40, 40],
    [140, 80, 200],
    [120, 80, 40],
    [220, 90, 180],
    [110, 110, 110],
];

/// The guidance variant of a CSV row ([`parse_csv`]) as a chart/table label: `CFG`,
/// `APG eta=0 r=2 beta=-0.5`, followed by ` in steps:0.5,1` when guided in an interval only.
pub fn guidance_label(row: &BTreeMap<String, String>) -> String {
    let g = |k: &str| row.get(k).map(String::as_str).unwrap_or("");
    let mut s = g("method").to_uppercase();
    if g("method") == "apg" {
        s.push_str(&format!(" eta={} r={} beta={}", g("apg_eta"), g("apg_r"), g("apg_momentum")));
    }
    if !g("interval").is_empty() {
        s.push_str(&format!(" in {}", g("interval")));
    }
    s
}

/// The panels of the guidance chart from CSV rows ([`parse_csv`]): prompt accuracies (shape,
/// colour, background; y in [0, 1]), tiny-FID (dashed: the mean real-vs-real baseline),
/// saturation excess (dashed: 0) and the clipped fraction (dashed: the real renders'), each
/// against the guidance scale, one line per guidance variant ([`guidance_label`]).
pub fn guidance_panels(rows: &[BTreeMap<String, String>]) -> Vec<Panel> {
    let num = |r: &BTreeMap<String, String>, k: &str| r.get(k).and_then(|v| v.parse::<f64>().ok());
    let mut variants: Vec<String> = Vec::new();
    for r in rows {
        let m = guidance_label(r);
        if !variants.contains(&m) {
            variants.push(m);
        }
    }
    let mean_of = |k: &str| {
        let v: Vec<f64> = rows.iter().filter_map(|r| num(r, k)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let panel =
        |title: &str, key: &str, reference: Option<f64>, y_range: Option<(f64, f64)>| Panel {
            title: title.to_string(),
            series: variants
                .iter()
                .enumerate()
                .map(|(i, v)| Series {
                    name: v.clone(),
                    colour: PALETTE[i % PALETTE.len()],
                    points: {
                        let mut p: Vec<(f64, f64)> = rows
                            .iter()
                            .filter(|r| &guidance_label(r) == v)
                            .filter_map(|r| Some((num(r, "scale")?, num(r, key)?)))
                            .collect();
                        p.sort_by(|a, b| a.0.total_cmp(&b.0));
                        p
                    },
                })
                .collect(),
            reference,
            y_range,
        };
    vec![
        panel("shape accuracy", "shape_accuracy", None, Some((0.0, 1.0))),
        panel("colour accuracy (hue+tone)", "colour_accuracy", None, Some((0.0, 1.0))),
        panel("background accuracy", "background_accuracy", None, Some((0.0, 1.0))),
        panel("tiny-FID (- - real vs real)", "tiny_fid", mean_of("tiny_fid_real_baseline"), None),
        panel("saturation excess (- - 0)", "saturation_excess", Some(0.0), None),
        panel(
            "clipped fraction (- - real)",
            "clipped_fraction",
            mean_of("clipped_fraction_real"),
            None,
        ),
    ]
}
