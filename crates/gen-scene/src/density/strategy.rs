//! Density control as a strategy (the shape of gsplat's `Strategy`): the splat optimiser
//! ([`crate::fit::SplatOptimizer`]) calls [`DensityStrategy::step_pre_backward`] before it
//! renders and [`DensityStrategy::step_post_backward`] after the backward pass and the
//! optimizer step. A strategy sees the render (screen-space gradient probe, pixel radii, image
//! size) and may change the splats and their optimizer; it never sees the loss, so photometric
//! fitting and score distillation share it.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::{Error, Result, SeededRng};
use gen_optim::{AdamW, Optim};

use super::{
    densify_and_prune, remap_optimizer, reset_opacity, DensityConfig, DensityReport, DensityStats,
};
use crate::splat::project::PROJ_DIM;
use crate::splat::SplatVars;

/// The optimised splats and their optimizer (one AdamW group per field, see
/// [`super::splat_param_groups`]), as a strategy may change them.
pub struct SplatParams {
    pub vars: SplatVars,
    pub opt: Optim<AdamW>,
}

impl SplatParams {
    /// Number of Gaussians.
    pub fn len(&self) -> usize {
        self.vars.means.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one step's render left for the strategy after the backward pass.
pub struct RenderInfo<'a> {
    /// The step just completed (1-based).
    pub step: u64,
    /// Gradients of the backward pass.
    pub grads: &'a GradStore,
    /// The probe returned by [`DensityStrategy::step_pre_backward`] for this render.
    pub probe: Option<&'a Var>,
    /// `(N)` pixel radii of the render (0: culled).
    pub radii: &'a Tensor,
    pub width: usize,
    pub height: usize,
}

/// What a strategy did after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StrategyReport {
    pub density: Option<DensityReport>,
    pub opacity_reset: bool,
}

/// Density control that knows nothing of the loss (see the module docs).
pub trait DensityStrategy {
    /// Before the render of a step over `n` Gaussians: the `(n, PROJ_DIM)` screen-space
    /// gradient probe to render with ([`crate::splat::render_with_probe`]), or `None`.
    fn step_pre_backward(&mut self, n: usize, dtype: DType, device: &Device)
        -> Result<Option<Var>>;

    /// After the backward pass and the optimizer step of `info.step`: gather statistics and
    /// change `params` (densify, prune, reset) on the strategy's schedule.
    fn step_post_backward(
        &mut self,
        params: &mut SplatParams,
        info: &RenderInfo<'_>,
    ) -> Result<StrategyReport>;

    /// The strategy's state for a checkpoint, as named tensors.
    fn state(&self) -> Result<Vec<(String, Tensor)>>;

    /// Restores the state saved by [`DensityStrategy::state`] for `n` Gaussians; `get` returns
    /// a saved tensor by name (erroring with the file and key when absent).
    fn load_state(&mut self, n: usize, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<()>;
}

/// No density control: the set of Gaussians stays fixed.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedSet;

impl DensityStrategy for FixedSet {
    fn step_pre_backward(&mut self, _: usize, _: DType, _: &Device) -> Result<Option<Var>> {
        Ok(None)
    }
    fn step_post_backward(
        &mut self,
        _: &mut SplatParams,
        _: &RenderInfo<'_>,
    ) -> Result<StrategyReport> {
        Ok(StrategyReport::default())
    }
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![])
    }
    fn load_state(&mut self, _: usize, _: &dyn Fn(&str) -> Result<Tensor>) -> Result<()> {
        Ok(())
    }
}

/// 3DGS adaptive density control ([`densify_and_prune`], [`reset_opacity`]) on the schedule of
/// a [`DensityConfig`]; the size rules prune only once opacity resets have started
/// ([`DensityConfig::size_pruning_now`]). Randomness of the densification after step `s`:
/// generator stream `2⁴⁰ + s` of `seed`.
#[derive(Debug, Clone)]
pub struct AdaptiveDensity {
    pub cfg: DensityConfig,
    /// Scene radius (3DGS: the camera spread).
    pub extent: f64,
    pub seed: u64,
    pub stats: DensityStats,
}

const STATS_GRAD: &str = "stats.grad_accum";
const STATS_VISIBLE: &str = "stats.visible";
const STATS_RADIUS: &str = "stats.max_radius";

impl AdaptiveDensity {
    /// A strategy for `n` initial Gaussians.
    pub fn new(cfg: DensityConfig, extent: f64, seed: u64, n: usize) -> Result<Self> {
        cfg.validate()?;
        if !(extent.is_finite() && extent > 0.0) {
            return Err(Error::invalid("scene extent", format!("{extent}")));
        }
        Ok(Self { cfg, extent, seed, stats: DensityStats::new(n) })
    }
}

impl DensityStrategy for AdaptiveDensity {
    fn step_pre_backward(
        &mut self,
        n: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Var>> {
        Ok(Some(Var::zeros((n, PROJ_DIM), dtype, device)?))
    }

    fn step_post_backward(
        &mut self,
        params: &mut SplatParams,
        info: &RenderInfo<'_>,
    ) -> Result<StrategyReport> {
        let step = info.step;
        let cfg = self.cfg;
        if step <= cfg.densify_until {
            let probe = info.probe.ok_or_else(|| Error::msg("density control needs a probe"))?;
            let pg = info
                .grads
                .get(probe)
                .ok_or_else(|| Error::msg("render probe received no gradient"))?;
            self.stats.accumulate(pg, info.radii, info.width, info.height)?;
        }
        let mut report = StrategyReport::default();
        if cfg.densify_now(step) {
            let mut rng = SeededRng::fork(self.seed, (1u64 << 40) + step);
            let splats = params.vars.splats();
            let mut round = cfg;
            if !cfg.size_pruning_now(step) {
                round.max_screen_radius = None;
                round.max_world_scale = None;
            }
            let d =
                densify_and_prune(&splats.detach(), &self.stats, &round, self.extent, &mut rng)?;
            if d.splats.is_empty() {
                return Err(Error::msg(format!(
                    "step {step}: density control pruned every Gaussian ({} transparent or \
                     oversized); fitting stopped",
                    d.report.pruned
                )));
            }
            let vars = SplatVars::new(&d.splats)?;
            params.opt = remap_optimizer(&params.opt, &vars, &d.rows, &[])?;
            params.vars = vars;
            self.stats = DensityStats::new(d.splats.len());
            report.density = Some(d.report);
        }
        if cfg.reset_opacity_now(step) {
            let s = reset_opacity(&params.vars.splats().detach(), cfg.reset_opacity)?;
            let vars = SplatVars::new(&s)?;
            let rows: Vec<Option<usize>> = (0..s.len()).map(Some).collect();
            params.opt = remap_optimizer(&params.opt, &vars, &rows, &["opacity_logits"])?;
            params.vars = vars;
            report.opacity_reset = true;
        }
        Ok(report)
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = Device::Cpu;
        let s = &self.stats;
        let vis: Vec<f64> = s.visible.iter().map(|&v| v as f64).collect();
        Ok(vec![
            (STATS_GRAD.into(), Tensor::new(s.grad_accum.as_slice(), &dev)?),
            (STATS_VISIBLE.into(), Tensor::new(vis.as_slice(), &dev)?),
            (STATS_RADIUS.into(), Tensor::new(s.max_radius.as_slice(), &dev)?),
        ])
    }

    fn load_state(&mut self, n: usize, get: &dyn Fn(&str) -> Result<Tensor>) -> Result<()> {
        let f64s = |k: &str| -> Result<Vec<f64>> {
            let v = get(k)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            if v.len() != n {
                return Err(Error::invalid(k, format!("{} entries for {n} Gaussians", v.len())));
            }
            Ok(v)
        };
        self.stats = DensityStats {
            grad_accum: f64s(STATS_GRAD)?,
            visible: f64s(STATS_VISIBLE)?.iter().map(|&v| v as u32).collect(),
            max_radius: f64s(STATS_RADIUS)?,
        };
        Ok(())
    }
}
