//! Text-to-image and image-to-image sampling on Stable-Diffusion-family models with the project's guidance
