//! Shared basics of the `gen` toolkit: the error type, device choice, an explicit seeded
//! random generator, image <-> tensor conversion and atomic file writes.
//!
//! Every library crate of the workspace returns [`Result`]; errors name the file, tensor key,
//! op or shape involved.

pub mod alloc;
pub mod chart;
pub mod device;
pub mod error;
pub mod finite;
pub mod fsutil;
pub mod fuzz;
pub mod imageio;
pub mod memory;
pub mod rng;
pub mod suggest;

pub use alloc::tune_allocator;
pub use device::{pick_device, DeviceChoice};
pub use error::{Error, Result, ResultExt};
pub use fsutil::{write_atomic, AtomicFile, StagedFiles};
pub use rng::SeededRng;
