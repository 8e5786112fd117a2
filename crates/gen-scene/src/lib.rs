//! Cameras (pinhole, OpenCV axes; orbits), Gaussian splats and their differentiable
//! rasterizer, hash-grid neural fields with volume rendering, adaptive density control as a
//! strategy, loss-agnostic splat and field optimisers with photometric fitting on top
//! ([`fit`]), marching-cubes meshing, exporters (PLY, glTF/GLB, OBJ, GIF) and turntables.
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

pub use camera::{Camera, Intrinsics, Orbit};
pub use splat::{render, RenderConfig, RenderOutput, Splats};
