//! Scores of a fit on held-out views: PSNR and silhouette IoU.

use candle_core::{DType, Tensor};
use gen_core::Result;

use super::PosedImage;
use crate::splat::{render, RenderConfig, Splats};

/// PSNR (dB) from a mean squared error of [0, 1] images.
pub fn psnr(mse: f64) -> f64 {
    if mse <= 0.0 {
        f64::INFINITY
    } else {
        -10.0 * mse.log10()
    }
}

/// Metrics of splats on held-out views.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Mean PSNR over views (dB; each view's PSNR from its own MSE).
    pub psnr: f64,
    /// Mean silhouette IoU (`alpha > 0.5` vs `mask > 0.5`) over views with a mask; `None`
    /// when no view has one.
    pub iou: Option<f64>,
    pub per_view_psnr: Vec<f64>,
    pub per_view_iou: Vec<Option<f64>>,
}

/// PSNR and silhouette IoU of `splats` rendered on `background` against `views`.
pub fn evaluate(splats: &Splats, views: &[PosedImage], background: [f64; 3]) -> Result<EvalReport> {
    let cfg = RenderConfig { background };
    EvalReport::over_views(views, |v| {
        let out = render(splats, &v.camera, &cfg)?;
        Ok((out.rgb, out.alpha))
    })
}

impl EvalReport {
    /// Scores `render(view) -> (rgb (H, W, 3), alpha (H, W))` against every view: PSNR of the
    /// clamped colours and IoU of `alpha > 0.5` vs `mask > 0.5` (1 when both are empty).
    pub(crate) fn over_views(
        views: &[PosedImage],
        mut render: impl FnMut(&PosedImage) -> Result<(Tensor, Tensor)>,
    ) -> Result<Self> {
        let mut per_view_psnr = Vec::new();
        let mut per_view_iou = Vec::new();
        for (i, v) in views.iter().enumerate() {
            v.validate(i)?;
            let (rgb, alpha) = render(v)?;
            let rgb = rgb.to_dtype(DType::F32)?.clamp(0f32, 1f32)?;
            let mse =
                (rgb - v.rgb.to_dtype(DType::F32)?)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
            per_view_psnr.push(psnr(mse));
            per_view_iou.push(match &v.mask {
                Some(m) => {
                    let a = alpha.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let m = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let (mut inter, mut uni) = (0usize, 0usize);
                    for (x, y) in a.iter().zip(&m) {
                        let (p, q) = (*x > 0.5, *y > 0.5);
                        inter += (p && q) as usize;
                        uni += (p || q) as usize;
                    }
                    Some(if uni == 0 { 1.0 } else { inter as f64 / uni as f64 })
                }
                None => None,
            });
        }
        let nv = per_view_psnr.len().max(1) as f64;
        let ious: Vec<f64> = per_view_iou.iter().flatten().copied().collect();
        Ok(EvalReport {
            psnr: per_view_psnr.iter().sum::<f64>() / nv,
            iou: (!ious.is_empty()).then(|| ious.iter().sum::<f64>() / ious.len() as f64),
            per_view_psnr,
            per_view_iou,
        })
    }
}
