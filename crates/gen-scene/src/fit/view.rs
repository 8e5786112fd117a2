//! Posed training and evaluation images.

use candle_core::Tensor;
use gen_core::{Error, Result};

use crate::camera::Camera;

/// One training or evaluation view.
#[derive(Debug, Clone)]
pub struct PosedImage {
    pub camera: Camera,
    /// `(H, W, 3)` f32 colour in [0, 1] (already composited on the background).
    pub rgb: Tensor,
    /// Optional `(H, W)` f32 object mask / alpha in [0, 1].
    pub mask: Option<Tensor>,
}

/// Checks a trainer's views: at least one, each image and mask of its camera's size.
pub(crate) fn validate_training_views(views: &[PosedImage]) -> Result<()> {
    if views.is_empty() {
        return Err(Error::invalid("fit views", "no training views"));
    }
    for (i, v) in views.iter().enumerate() {
        v.validate(i)?;
    }
    Ok(())
}

impl PosedImage {
    pub(crate) fn validate(&self, i: usize) -> Result<()> {
        let (w, h) = (self.camera.intrinsics.width, self.camera.intrinsics.height);
        if self.rgb.dims() != [h, w, 3] {
            return Err(Error::invalid(
                format!("view {i} image"),
                format!(
                    "shape {:?}, but its camera is {w}x{h} (want ({h}, {w}, 3))",
                    self.rgb.dims()
                ),
            ));
        }
        if let Some(m) = &self.mask {
            if m.dims() != [h, w] {
                return Err(Error::invalid(
                    format!("view {i} mask"),
                    format!("shape {:?} (want ({h}, {w}))", m.dims()),
                ));
            }
        }
        Ok(())
    }
}
