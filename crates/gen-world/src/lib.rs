//! The procedural shapes world the tiny Stable Diffusion is trained on and evaluated against:
//! an analytic, anti-aliased renderer of one coloured primitive (sphere, cube, cylinder, cone,
//! torus) seen by an orbit camera, captions with DreamFusion view words, the ground truth of every
//! sample, and deterministic splits.
//!
//! ```
//! use gen_world::{Split, World};
//! let world = World::default();
//! let s = world.sample(Split::Test, 7).unwrap();
//! assert_eq!(s.image.rgb.len(), 64 * 64 * 3);
//! let parts = gen_world::parse_caption(&s.caption).unwrap();
//! assert_eq!(parts.shape, s.scene.shape);
//! ```

pub mod camera;
pub mod caption;
pub mod dataset;
pub mod metrics;
pub mod palette;
pub mod render;
pub mod shapes;
pub mod world;

pub use camera::{OrbitCamera, Ray, RayGen};
pub use caption::{caption, parse_caption, tokenize, vocabulary, CaptionParts, View};
pub use dataset::{contact_sheet, write_dataset, DatasetSpec, DatasetSummary, Record};
pub use metrics::{
    alignment, clipped_fraction, colourfulness, frechet_distance, frechet_distance_stats,
    mean_saturation, real_vs_real, saturation_excess, AlignmentReport, ClipThresholds,
    GaussianStats, ImageU8, ObjectSelect, Predicted, Target, ViewJudge,
};
pub use palette::{Background, Colour, Hue, Tone};
pub use render::{render, Lighting, RenderInput, Rendered};
pub use shapes::{Hit, Shape};
pub use world::{Sample, Scene, Split, World, WorldConfig, SPLIT_SIZE};
