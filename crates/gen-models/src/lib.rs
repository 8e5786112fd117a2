//! Stable-Diffusion-family models with diffusers' module structure, config.json fields and
//! safetensors key names, so a diffusers pipeline folder loads with no renaming; and the SD
//! adapter ([`sd`]) that plugs them into `gen-diffusion`'s model-agnostic sampling: the UNet's
//! [`Denoiser`](gen_diffusion::Denoiser), prompt encoding and latent encode / decode.

pub mod blocks;
pub mod clip;
pub mod evaluator;
pub mod loading;
pub mod pipeline;
pub mod sd;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use clip::{
    ClipConfig, ClipModel, ClipTextConfig, ClipTextModelWithProjection, ClipTextOutput,
    ClipTextTransformer, ClipVisionConfig, ClipVisionModelWithProjection, ClipVisionTransformer,
    TextForwardOptions,
};
pub use evaluator::{Evaluator, EvaluatorClasses, EvaluatorConfig};
pub use pipeline::{LoadOptions, ModelSource, PipelineFiles, SdPipeline};
pub use sd::{PromptOptions, UNetDenoiser};
pub use tokenizer::{Encoded, Tokenizer};
pub use unet::{UNet2DConditionModel, UNetConfig};
pub use vae::{AutoencoderKL, DiagonalGaussian, VaeConfig};
