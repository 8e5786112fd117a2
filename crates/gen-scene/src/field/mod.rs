//! Neural fields: a multiresolution hash-grid encoding with an analytic backward pass
//! ([`hashgrid`]), a Coordinate-Aware-Modulation MLP field ([`cam`]) and a differentiable volume
//! renderer with occupancy-grid empty-space skipping ([`volume`]).
//!
//! [`CamField`] implements [`crate::mesh::DensityField`], so [`crate::mesh::extract_mesh`]
//! meshes it.

pub mod cam;
pub mod hashgrid;
pub mod volume;

pub use cam::{CamField, DensityActivation, FieldConfig};
pub use hashgrid::HashGridConfig;
pub use volume::{render_volume, Aabb, OccupancyGrid, RadianceField, VolumeConfig, VolumeOutput};
