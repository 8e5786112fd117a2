//! Differentiable ops whose gradients candle 0.11.1 drops or gets wrong, and the building-block
//! layers of the project's models.
//!
//! - [`ops`]: softmax, layer norm, group norm, attention, nearest upsampling — fused CPU custom
//!   ops with analytic backward passes, falling back to [`composite`] on other devices;
//! - [`composite`]: slow references from candle primitives (non-CPU fallback, test references);
//! - [`nn`]: LoRA-ready `Linear`, `LayerNorm`, `GroupNorm` modules;
//! - [`checkpoint`]: gradient checkpointing through a chain of calls.
//!
//! Every op here is checked against finite differences in the tests (`tests/`).
//! Ops return `candle_core::Result` so that they compose like candle's own ops.

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#![allow(clippy::manual_is_multiple_of)]

pub mod checkpoint;
pub mod composite;
mod conv;
mod fused;
pub mod nn;
pub mod ops;

pub use ops::{
    attention, conv2d, conv2d_bias, group_norm, layer_norm, quick_gelu, softmax_last_dim,
    upsample_nearest, AttentionConfig,
};
