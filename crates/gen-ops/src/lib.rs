//! Differentiable ops whose gradients candle 0.11.1 drops or gets wrong, and the building-block
//! layers of the project's models.
//!
//! Every op here is checked against finite differences in the tests (`tests/fd.rs`).
//! Ops return `candle_core::Result` so that they compose like candle's own ops.

pub mod nn;
pub mod ops;

pub use ops::{attention, group_norm, layer_norm, softmax_last_dim, upsample_nearest, AttentionConfig};
