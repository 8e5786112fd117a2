//! Stable-Diffusion-family models with diffusers' module structure, config.json fields and
//! safetensors key names, so a diffusers pipeline folder loads with no renaming.

pub mod blocks;
pub mod clip;
pub mod loading;
pub mod pipeline;
pub mod tokenizer;
pub mod unet;
pub mod vae;
