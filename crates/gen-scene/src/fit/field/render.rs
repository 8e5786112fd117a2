//! Volume rendering for the field fitter: random ray batches and whole images, with gradients
//! (for objectives on the rendered image) or without (previews, evaluation, turntables).

use candle_core::{DType, Device, Tensor};
use gen_core::{Result, SeededRng};

use crate::camera::{Camera, Intrinsics};
use crate::field::volume::{march_rays, RadianceField, Ray};
use crate::field::{render_volume, CamField, OccupancyGrid, VolumeConfig};

/// Rendered rays.
#[derive(Debug, Clone)]
pub struct RaysOutput {
    /// `(R, 3)`.
    pub rgb: Tensor,
    /// `(R)`: `1 − T_K`.
    pub opacity: Tensor,
    pub samples_evaluated: usize,
    pub samples_total: usize,
}

/// Volume-renders a batch of rays with the quadrature of [`render_volume`] (equal bins over the
/// ray's span in `cfg.bounds` beyond `cfg.near`, bin centres or jittered positions, skipping
/// empty occupancy cells). Differentiable w.r.t. the field's parameters. Rays that miss the
/// box get the background.
pub fn render_rays(
    field: &dyn RadianceField,
    rays: &[Ray],
    cfg: &VolumeConfig,
    occupancy: Option<&OccupancyGrid>,
    jitter: Option<&mut SeededRng>,
) -> Result<RaysOutput> {
    let rays: Vec<(Ray, f64)> = rays
        .iter()
        .map(|r| {
            let d = r.dir;
            (*r, (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt())
        })
        .collect();
    let out = march_rays(field, &rays, cfg, occupancy, jitter)?;
    Ok(RaysOutput {
        rgb: out.rgb,
        opacity: out.opacity,
        samples_evaluated: out.samples_evaluated,
        samples_total: out.samples_total,
    })
}

/// Evaluates a field without recording gradients (the outputs are detached, so the graph of a
/// query is freed as soon as it returns).
pub(crate) struct Detached<'a>(pub(crate) &'a CamField);

impl RadianceField for Detached<'_> {
    fn query(&self, points: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (s, c) = self.0.forward(points)?;
        Ok((s.detach(), c.detach()))
    }
    fn dtype(&self) -> DType {
        RadianceField::dtype(self.0)
    }
    fn device(&self) -> Device {
        RadianceField::device(self.0)
    }
}

/// Renders a whole view differentiably (w.r.t. the field's parameters), `rows` image rows at a
/// time, with bin-centre samples (`jitter` `None`) or stratified ones: `(rgb (H, W, 3),
/// opacity (H, W))` in the field's dtype. For objectives on the whole image (score
/// distillation); the graph of every sample is kept until the backward pass, so memory grows
/// with `H · W · samples_per_ray`.
pub fn render_field_image_grad(
    field: &CamField,
    camera: &Camera,
    cfg: &VolumeConfig,
    occupancy: Option<&OccupancyGrid>,
    mut jitter: Option<&mut SeededRng>,
) -> Result<(Tensor, Tensor)> {
    render_rows(camera, |cam| {
        let out = render_volume(field, cam, cfg, occupancy, jitter.as_deref_mut())?;
        Ok((out.rgb, out.opacity))
    })
}

/// Renders `camera` in bands of rows (bounded memory per call of `band`, which renders a camera
/// whose image is rows `r0..r0 + n` of the original) and stacks the bands.
fn render_rows(
    camera: &Camera,
    mut band: impl FnMut(&Camera) -> Result<(Tensor, Tensor)>,
) -> Result<(Tensor, Tensor)> {
    let (w, h) = (camera.width(), camera.height());
    let rows = (16384 / w.max(1)).clamp(1, h.max(1));
    let (mut rgbs, mut ops) = (Vec::new(), Vec::new());
    let mut r0 = 0;
    while r0 < h {
        let n = rows.min(h - r0);
        // A camera whose image is rows r0..r0+n of the original (principal point shifted).
        let k = Intrinsics { cy: camera.intrinsics.cy - r0 as f64, height: n, ..camera.intrinsics };
        let cam = Camera::new(k, camera.rotation, camera.translation)?;
        let (rgb, op) = band(&cam)?;
        rgbs.push(rgb);
        ops.push(op);
        r0 += n;
    }
    Ok((Tensor::cat(&rgbs, 0)?, Tensor::cat(&ops, 0)?))
}

/// Renders a whole view without gradients, `rows` image rows at a time (bounded memory), with
/// bin-centre samples: `(rgb (H, W, 3), opacity (H, W))` as f32.
pub fn render_field_image(
    field: &CamField,
    camera: &Camera,
    cfg: &VolumeConfig,
    occupancy: Option<&OccupancyGrid>,
) -> Result<(Tensor, Tensor)> {
    render_rows(camera, |cam| {
        let out = render_volume(&Detached(field), cam, cfg, occupancy, None)?;
        Ok((out.rgb.to_dtype(DType::F32)?, out.opacity.to_dtype(DType::F32)?))
    })
}
