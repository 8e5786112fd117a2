//! Training the embedded tiny Stable Diffusion (CLIP, VAE, UNet) and its evaluator from scratch on the procedural world
