//! Tests of the Gaussian-splat rasterizer, in one binary to keep link time down:
//! - `render`: values against hand computations (single splat, occlusion, early stop, culling,
//!   errors);
//! - `grad`: the custom ops against the dense pure-tensor reference (values and gradients), and
//!   central finite differences in f64 for every parameter kind;
//! - `gsplat_parity`: fixtures from gsplat 1.5.3's PyTorch implementation
//!   (`scripts/fixtures_splat.py`);
//! - `fit`: AdamW through the rasterizer recovers a perturbed scene;
//! - `lanes`: the fast paths (empty tiles, f32 lane kernels, equal depths) against the dense
//!   reference.

mod fit;
mod grad;
mod gsplat_parity;
mod lanes;
mod render;
