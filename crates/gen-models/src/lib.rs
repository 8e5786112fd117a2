//! Stable-Diffusion-family models with diffusers' module structure, config.json fields and
//! safetensors key names, so a diffusers pipeline folder loads with no renaming.
