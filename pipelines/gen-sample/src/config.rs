//! The sampling configuration: one serialisable struct that the CLI fills from its flags, a
//! run saves as JSON next to its outputs and PNG metadata carries, and the library API takes.

use std::path::PathBuf;

use candle_core::DType;
use gen_core::{Error, Result};
use gen_diffusion::{ApgConfig, GuidanceConfig, GuidanceMethod, SchedulerKind};
use gen_models::pipeline::SdPipeline;
use serde::{Deserialize, Serialize};

/// The samplers `gen image` offers (names as on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sampler {
    /// DDIM (deterministic with `ddim_eta = 0`).
    #[serde(rename = "ddim")]
    Ddim,
    /// DDPM ancestral sampling (stochastic).
    #[serde(rename = "ddpm")]
    Ddpm,
    /// Euler (Karras et al. 2022, Algorithm 2 without churn).
    #[serde(rename = "euler")]
    Euler,
    /// Euler ancestral (stochastic).
    #[serde(rename = "euler-a")]
    EulerAncestral,
    /// DPM-Solver++ 2M.
    #[serde(rename = "dpm++2m")]
    DpmPp2m,
    /// DPM-Solver++ 2M with Karras sigmas.
    #[serde(rename = "dpm++2m-karras")]
    DpmPp2mKarras,
}

impl Sampler {
    pub const ALL: [Sampler; 6] = [
        Self::Ddim,
        Self::Ddpm,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPp2m,
        Self::DpmPp2mKarras,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Ddpm => "ddpm",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2m => "dpm++2m",
            Self::DpmPp2mKarras => "dpm++2m-karras",
        }
    }

    /// The names, comma-separated (for help texts and errors).
    pub fn known_names() -> String {
        Self::ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
    }

    /// Parses a command-line name (also `euler_a`, `dpmpp_2m`, `dpmpp_2m_karras`, any case);
    /// the error lists the known names.
    pub fn parse(s: &str) -> Result<Self> {
        let norm = s
            .trim()
            .to_ascii_lowercase()
            .replace('_', "-")
            .replace("dpmpp-", "dpm++")
            .replace("dpmpp", "dpm++");
        for k in Self::ALL {
            if norm == k.name() {
                return Ok(k);
            }
        }
        Err(Error::invalid(
            "scheduler",
            format!("unknown scheduler `{s}`; known: {}", Self::known_names()),
        ))
    }

    /// The scheduler implementation in `gen-diffusion`.
    pub fn kind(self) -> SchedulerKind {
        match self {
            Self::Ddim => SchedulerKind::Ddim,
            Self::Ddpm => SchedulerKind::Ddpm,
            Self::Euler => SchedulerKind::Euler,
            Self::EulerAncestral => SchedulerKind::EulerAncestral,
            Self::DpmPp2m | Self::DpmPp2mKarras => SchedulerKind::DpmSolverMultistep,
        }
    }

    /// Whether the sampler uses Karras sigmas.
    pub fn karras(self) -> bool {
        self == Self::DpmPp2mKarras
    }
}

impl std::str::FromStr for Sampler {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Compute precision of the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
    pub fn from_dtype(d: DType) -> Option<Self> {
        match d {
            DType::F32 => Some(Self::F32),
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
    /// Whether models can run in this precision on `device`: candle's CPU backend has no bf16
    /// matmul, so bf16 needs a GPU.
    pub fn check_device(self, device: &candle_core::Device) -> Result<()> {
        if self == Self::Bf16 && device.is_cpu() {
            return Err(Error::invalid("dtype", "bf16 does not run on the CPU (candle's CPU backend has no bf16 matmul); use f32 or f16, or a GPU"));
        }
        Ok(())
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "fp16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(Error::invalid("dtype", format!("`{s}` (known: f32, f16, bf16)"))),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// Image-to-image: start from a noised encoding of `path` instead of pure noise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitImage {
    /// The image file (PNG or JPEG). Resized to the output size when it differs.
    pub path: PathBuf,
    /// How much to change it, in [0, 1]: the last `floor(steps * strength)` steps run, from the
    /// VAE latent noised to the first of them. 0 returns the VAE round trip of the image; 1
    /// starts from the most noised latent.
    pub strength: f64,
}

impl InitImage {
    /// The image's (width, height), read from its header; the error names the file.
    pub fn dimensions(&self) -> Result<(u32, u32)> {
        image::image_dimensions(&self.path)
            .map_err(|e| Error::msg(format!("cannot read init image {}: {e}", self.path.display())))
    }
}

/// Everything that determines the generated images. `None` size fields mean the model's
/// native size (`unet.sample_size × VAE factor`, or the init image's size for img2img).
/// [`SampleConfig::resolve`] fills them in and checks every field against the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    /// One prompt for every image, or several: image `i` uses `prompts[i % prompts.len()]`.
    pub prompts: Vec<String>,
    /// The prompt of the unconditional branch ("" = unconditional).
    pub negative_prompt: String,
    /// Guidance method (CFG, APG and its options), CFG-rescale and interval.
    pub guidance: GuidanceConfig,
    pub sampler: Sampler,
    /// Number of inference steps (before img2img `strength` truncation).
    pub steps: usize,
    /// Image `i` uses random stream `i` of this seed (its initial noise and, for stochastic
    /// samplers, its step noise), so it does not depend on `batch_size`.
    pub seed: u64,
    /// Width in pixels (multiple of the model's size factor).
    pub width: Option<usize>,
    /// Height in pixels.
    pub height: Option<usize>,
    pub num_images: usize,
    /// Images denoised together (memory/speed trade-off).
    pub batch_size: usize,
    /// Keep image `i` bit-identical whatever `batch_size` is: the UNet and the VAE decoder run
    /// one image at a time (with its guidance branches batched), because the last bits of
    /// candle's CPU matmul depend on the number of rows. `false` runs the whole batch through
    /// each model call (faster on a GPU; results then differ in the last bits between batch sizes).
    pub batch_invariant: bool,
    /// Precision the pipeline is loaded in (see [`SampleConfig::load_options`]).
    pub dtype: Precision,
    /// DDIM's eta (0 = deterministic DDIM; 1 = DDPM-like noise). Only for the `ddim` sampler.
    pub ddim_eta: f64,
    pub init_image: Option<InitImage>,
    /// Where the model came from (a folder or hub id); informational, saved with the outputs.
    pub model: Option<String>,
    /// LoRA files merged into the model before sampling (see [`crate::apply_loras`]);
    /// informational here, saved with the outputs.
    pub loras: Vec<crate::LoraSpec>,
    /// APG only: the norm threshold r in `guidance` is an SDXL-tuned value (a preset's) to be
    /// scaled to this model's latent size by [`SampleConfig::resolve`],
    /// `r·sqrt(D / D_SDXL)` with D = C·H·W of one latent
    /// ([`ApgConfig::norm_threshold_for_latent`](gen_diffusion::ApgConfig::norm_threshold_for_latent)).
    /// `resolve` stores the scaled r and clears the flag; `false`: r is used as given.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub apg_scale_norm_threshold: bool,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            prompts: vec![String::new()],
            negative_prompt: String::new(),
            guidance: GuidanceConfig::cfg(7.5),
            sampler: Sampler::DpmPp2m,
            steps: 30,
            seed: 0,
            width: None,
            height: None,
            num_images: 1,
            batch_size: 1,
            batch_invariant: true,
            dtype: Precision::F32,
            ddim_eta: 0.0,
            init_image: None,
            model: None,
            loras: Vec::new(),
            apg_scale_norm_threshold: false,
        }
    }
}

/// Builder-style setters.
impl SampleConfig {
    /// Defaults (CFG 7.5, DPM++ 2M, 30 steps, seed 0, model size) with one prompt.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self { prompts: vec![prompt.into()], ..Default::default() }
    }
    pub fn negative_prompt(mut self, p: impl Into<String>) -> Self {
        self.negative_prompt = p.into();
        self
    }
    pub fn guidance(mut self, g: GuidanceConfig) -> Self {
        self.guidance = g;
        self
    }
    /// Plain CFG with scale `w`.
    pub fn cfg(self, w: f64) -> Self {
        self.guidance(GuidanceConfig::cfg(w))
    }
    /// APG with these settings (e.g. `ApgConfig::paper(w)`), no rescale, no interval.
    pub fn apg(self, apg: ApgConfig) -> Self {
        self.guidance(GuidanceConfig {
            method: GuidanceMethod::Apg(apg),
            rescale_phi: 0.0,
            interval: None,
        })
    }
    pub fn sampler(mut self, s: Sampler) -> Self {
        self.sampler = s;
        self
    }
    pub fn steps(mut self, n: usize) -> Self {
        self.steps = n;
        self
    }
    pub fn seed(mut self, s: u64) -> Self {
        self.seed = s;
        self
    }
    pub fn size(mut self, width: usize, height: usize) -> Self {
        self.width = Some(width);
        self.height = Some(height);
        self
    }
    pub fn num_images(mut self, n: usize) -> Self {
        self.num_images = n;
        self
    }
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }
    pub fn init_image(mut self, path: impl Into<PathBuf>, strength: f64) -> Self {
        self.init_image = Some(InitImage { path: path.into(), strength });
        self
    }

    /// [`gen_models::pipeline::LoadOptions`] with this config's precision.
    pub fn load_options(
        &self,
        device: candle_core::Device,
        hub: gen_models::pipeline::HubOptions,
    ) -> gen_models::pipeline::LoadOptions {
        gen_models::pipeline::LoadOptions { dtype: self.dtype.dtype(), device, hub }
    }

    /// Checks the fields that do not need the model.
    pub fn validate(&self) -> Result<()> {
        if self.prompts.is_empty() {
            return Err(Error::invalid(
                "prompts",
                "no prompt given (use \"\" for an unconditional image)",
            ));
        }
        if self.steps == 0 {
            return Err(Error::invalid("steps", "0 (need at least 1 inference step)"));
        }
        if self.num_images == 0 {
            return Err(Error::invalid("num_images", "0 (need at least 1)"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", "0 (need at least 1)"));
        }
        for (what, v) in [("width", self.width), ("height", self.height)] {
            if v == Some(0) {
                return Err(Error::invalid(what, "0 pixels"));
            }
        }
        if !(self.ddim_eta >= 0.0 && self.ddim_eta.is_finite()) {
            return Err(Error::invalid("ddim_eta", format!("{} (must be >= 0)", self.ddim_eta)));
        }
        if self.ddim_eta != 0.0 && self.sampler != Sampler::Ddim {
            return Err(Error::invalid(
                "ddim_eta",
                format!("{} applies to the ddim sampler only, not {}", self.ddim_eta, self.sampler),
            ));
        }
        if let Some(ii) = &self.init_image {
            if !(0.0..=1.0).contains(&ii.strength) {
                return Err(Error::invalid(
                    "strength",
                    format!("{} is outside [0, 1]", ii.strength),
                ));
            }
            let kept = (self.steps as f64 * ii.strength) as usize;
            if ii.strength > 0.0 && kept == 0 {
                return Err(Error::invalid(
                    "strength",
                    format!(
                        "{} with {} steps runs no step (floor(steps × strength) = 0); raise the steps or the strength, or use strength 0 for the VAE round trip",
                        ii.strength, self.steps
                    ),
                ));
            }
        }
        // Builds the components once to check the scales, phi, momentum and interval.
        self.guidance.build()?;
        Ok(())
    }

    /// Size granularity of `pipe`: images must be multiples of the VAE factor times the UNet's
    /// (`2^(len(block_out_channels)-1)` each).
    pub fn size_multiple(pipe: &SdPipeline) -> (usize, usize) {
        let vae = pipe.vae.downscale_factor();
        let unet = 1usize << (pipe.unet_config.block_out_channels.len().saturating_sub(1));
        (vae, unet)
    }

    /// The model's native image size: `unet.sample_size × VAE factor` (512 when unset).
    pub fn native_size(pipe: &SdPipeline) -> usize {
        pipe.unet_config.sample_size.map(|s| s * pipe.vae.downscale_factor()).unwrap_or(512)
    }

    /// A copy with the size filled in and every field checked against `pipe`: size multiple of
    /// the model's factor, readable init image, matching precision.
    pub fn resolve(&self, pipe: &SdPipeline) -> Result<SampleConfig> {
        self.validate()?;
        let mut cfg = self.clone();
        if Precision::from_dtype(pipe.dtype) != Some(cfg.dtype) {
            return Err(Error::invalid(
                "dtype",
                format!("the config asks for {} but the pipeline was loaded in {:?}; load it with SampleConfig::load_options", cfg.dtype.name(), pipe.dtype),
            ));
        }
        cfg.dtype.check_device(&pipe.device)?;
        let init_dims = match &cfg.init_image {
            Some(ii) => Some(ii.dimensions()?),
            None => None,
        };
        let native = Self::native_size(pipe);
        let (w, h) = match (cfg.width, cfg.height, init_dims) {
            (Some(w), Some(h), _) => (w, h),
            (None, None, Some((iw, ih))) => (iw as usize, ih as usize),
            (w, h, _) => (w.unwrap_or(native), h.unwrap_or(native)),
        };
        let (fv, fu) = Self::size_multiple(pipe);
        let m = fv * fu;
        if w % m != 0 || h % m != 0 {
            return Err(Error::invalid(
                "size",
                format!(
                    "{w}×{h} is not a multiple of {m} (VAE factor {fv} = 2^(len(vae.block_out_channels)-1) times UNet factor {fu} on the latents); nearest: {}×{}",
                    (w / m).max(1) * m,
                    (h / m).max(1) * m
                ),
            ));
        }
        cfg.width = Some(w);
        cfg.height = Some(h);
        if cfg.apg_scale_norm_threshold {
            if let GuidanceMethod::Apg(apg) = &mut cfg.guidance.method {
                apg.norm_threshold = apg_norm_threshold_for(pipe, w, h, apg.norm_threshold);
            }
            cfg.apg_scale_norm_threshold = false;
        }
        Ok(cfg)
    }

    /// Estimate, in bytes, of the memory generating this resolved config allocates beyond the
    /// loaded weights (see [`memory_estimate`]).
    pub fn memory_estimate(&self, pipe: &SdPipeline) -> Result<MemoryEstimate> {
        let (w, h) = self.resolved_size()?;
        let unet_batch =
            if self.batch_invariant { 1 } else { self.batch_size.min(self.num_images) };
        Ok(memory_estimate(pipe, w, h, self.num_images, unet_batch, self.dtype))
    }

    /// The prompt of image `i`.
    pub fn prompt_for(&self, i: usize) -> &str {
        &self.prompts[i % self.prompts.len()]
    }

    /// (width, height) after [`SampleConfig::resolve`].
    pub fn resolved_size(&self) -> Result<(usize, usize)> {
        match (self.width, self.height) {
            (Some(w), Some(h)) => Ok((w, h)),
            _ => Err(Error::msg(
                "sample config: size not resolved; call SampleConfig::resolve first",
            )),
        }
    }

    /// The config as pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::msg(format!("sample config to JSON: {e}")))
    }

    /// Reads a config saved by [`SampleConfig::to_json`]; unknown fields are errors.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::invalid("sample config JSON", e.to_string()))
    }
}

/// An SDXL-tuned APG norm threshold `r` (a preset's) scaled to `pipe`'s latents at `width` ×
/// `height` pixels: [`ApgConfig::norm_threshold_for_latent`] with D = C·H·W of one latent.
pub fn apg_norm_threshold_for(pipe: &SdPipeline, width: usize, height: usize, r: f64) -> f64 {
    let (c, lh, lw) = pipe.latent_shape(width, height);
    ApgConfig::norm_threshold_for_latent(r, c * lh * lw)
}

/// What [`memory_estimate`] found, in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// The largest working set of one model call: a UNet step (both guidance branches) or a
    /// VAE decode/encode.
    pub working: f64,
    /// What is held for all images until they are written: latents, decoded f32 and 8-bit
    /// images, the grid and the encoded PNGs.
    pub held: f64,
}

impl MemoryEstimate {
    pub fn total(&self) -> f64 {
        self.working + self.held
    }
}

/// A conservative estimate of the memory sampling `num_images` images of `width` × `height`
/// pixels allocates beyond the weights, derived from the model configs (exact to within a small
/// factor; it exists to refuse requests that cannot fit, not to plan memory):
///
/// - UNet step (per image of the `unet_batch` images run together, times 2 guidance
///   branches): per latent pixel at level `l` (`P/4^l` pixels, `c_l` =
///   `block_out_channels[l]` channels) `c_l · (2·(layers_per_block + 1) + 16 + 9)` values —
///   the skip activations the up path keeps, the temporaries of one resnet/transformer block
///   (norm, conv, q/k/v/out, the 8·c GEGLU feed-forward) and the 9·c im2col buffer of a 3×3
///   convolution; and at every level with attention the `(L, L)` self-attention logits and
///   their softmax per head, `2 · heads · L · min(L, chunk)` values (`L = P/4^l`; `chunk` = the
///   UNet's attention chunk size, else `L`).
/// - VAE decoder (the same for the encoder of an init image), per image of the `unet_batch`
///   decoded together: per pixel at level `l` (`c_l` = `block_out_channels[l]`)
///   `c_l · (2·(layers_per_block + 2) + 9) + 2` values (the tensors of its blocks and the 9·c
///   im2col buffer of a 3×3 convolution) plus the mid-block attention logits, `2 · P²` values.
/// - Held per image: the f32 latent, the f32 and 8-bit RGB image, its grid cell and PNG.
///
/// Values are `dtype`'s size (4 bytes for f32).
pub fn memory_estimate(
    pipe: &SdPipeline,
    width: usize,
    height: usize,
    num_images: usize,
    unet_batch: usize,
    dtype: Precision,
) -> MemoryEstimate {
    let bpe = dtype.dtype().size_in_bytes() as f64;
    let (c, lh, lw) = pipe.latent_shape(width, height);
    let p = lh as f64 * lw as f64;
    let uc = &pipe.unet_config;
    let n = uc.block_out_channels.len();
    let layers = uc.layers_per_block.expand(n).unwrap_or_else(|| vec![2; n]);
    let heads = uc
        .num_attention_heads
        .as_ref()
        .unwrap_or(&uc.attention_head_dim)
        .expand(n)
        .unwrap_or_else(|| vec![8; n]);
    let chunk = pipe.unet.attention_chunk_size().map(|c| c as f64);
    let mut unet = 0.0;
    for (l, &ch) in uc.block_out_channels.iter().enumerate() {
        let lp = p / 4f64.powi(l as i32);
        unet += ch as f64 * lp * (2.0 * (layers[l] + 1) as f64 + 16.0 + 9.0);
        if uc.down_block_types.get(l).is_some_and(|t| t.contains("Attn")) {
            let rows = chunk.map_or(lp, |c| c.min(lp));
            unet += 2.0 * heads[l] as f64 * lp * rows;
        }
    }
    let unet = unet * bpe * 2.0 * unet_batch.max(1) as f64;
    let vc = &pipe.vae_config;
    let pix = width as f64 * height as f64;
    let mut vae = 2.0 * p * p;
    for (l, &ch) in vc.block_out_channels.iter().enumerate() {
        vae += (ch as f64 * (2.0 * (vc.layers_per_block + 2) as f64 + 9.0) + 2.0) * pix
            / 4f64.powi(l as i32);
    }
    let vae = vae * bpe * unet_batch.max(1) as f64;
    let held = num_images as f64 * (c as f64 * p * 4.0 + pix * 3.0 * (4.0 + 1.0 + 1.0 + 1.0));
    MemoryEstimate { working: unet.max(vae), held }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_parse_and_unknown_lists_known() {
        for s in Sampler::ALL {
            assert_eq!(Sampler::parse(s.name()).unwrap(), s);
        }
        assert_eq!(Sampler::parse("EULER_A").unwrap(), Sampler::EulerAncestral);
        assert_eq!(Sampler::parse("dpmpp_2m_karras").unwrap(), Sampler::DpmPp2mKarras);
        let e = Sampler::parse("pndm").unwrap_err().to_string();
        assert!(
            e.contains("pndm") && e.contains("ddim, ddpm, euler, euler-a, dpm++2m, dpm++2m-karras"),
            "{e}"
        );
    }

    #[test]
    fn validate_rejects_bad_fields() {
        let ok = SampleConfig::new("a red cube").steps(4);
        ok.validate().unwrap();
        let cases: Vec<(SampleConfig, &str)> = vec![
            (ok.clone().steps(0), "steps"),
            (ok.clone().num_images(0), "num_images"),
            (ok.clone().batch_size(0), "batch_size"),
            (ok.clone().init_image("x.png", 1.5), "outside [0, 1]"),
            (ok.clone().init_image("x.png", -0.1), "outside [0, 1]"),
            (ok.clone().init_image("x.png", 0.2), "runs no step"),
            (SampleConfig { ddim_eta: 0.5, ..ok.clone() }, "ddim sampler only"),
            (SampleConfig { prompts: vec![], ..ok.clone() }, "no prompt"),
            (ok.clone().apg(ApgConfig { momentum: 1.5, ..ApgConfig::paper(5.0) }), "momentum"),
        ];
        for (cfg, needle) in cases {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "expected `{needle}` in `{e}`");
        }
    }

    #[test]
    fn json_round_trip_and_unknown_field() {
        let cfg = SampleConfig::new("a blue sphere")
            .apg(ApgConfig::paper(5.0))
            .sampler(Sampler::EulerAncestral)
            .size(32, 16)
            .seed(9);
        let back = SampleConfig::from_json(&cfg.to_json().unwrap()).unwrap();
        assert_eq!(back, cfg);
        let text = cfg.to_json().unwrap();
        assert!(text.contains("\"euler-a\"") && text.contains("\"method\": \"apg\""), "{text}");
        let bad = text.replace("\"seed\"", "\"sede\"");
        assert!(SampleConfig::from_json(&bad).unwrap_err().to_string().contains("sede"));
    }
}
