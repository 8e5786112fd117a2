//! Cameras, Gaussian splats and their differentiable rasterizer (neural fields, meshing and
//! exporters are still to come).
//!
//! Conventions: cameras follow OpenCV (x right, y down, z forward; see [`camera`]); images are
//! `(H, W, C)` tensors unless a function says otherwise.

pub mod camera;
pub mod density;
pub mod export;
pub mod field;
pub mod fit;
pub mod mesh;
pub mod real;
pub mod splat;
pub mod turntable;

pub use camera::{Camera, Intrinsics};
pub use splat::{render, RenderConfig, RenderOutput, Splats};
