//! The field fit's output folder: [`fit_field`] (config JSON, previews, checkpoints, events),
//! the exports (marching-cubes mesh, volume-rendered turntable) and held-out evaluation.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gen_core::{write_atomic, Error, Result};
use image::RgbImage;

use super::render::render_field_image;
use super::trainer::{FieldStepInfo, FieldTrainer};
use super::FieldFitConfig;
use crate::field::{Aabb, CamField, OccupancyGrid, VolumeConfig};
use crate::fit::{
    optimizer_state_bytes, parse_export_list, run_fit, to_rgb8, EvalReport, PosedImage, RunEvent,
    CHECKPOINT_FILE,
};
use crate::mesh::{extract_mesh, Grid, MeshConfig, TriMesh};

/// PSNR and silhouette IoU (`opacity > 0.5` vs `mask > 0.5`) of the field against `views`
/// (bin-centre samples, with the occupancy grid when given).
pub fn evaluate_field(
    field: &CamField,
    views: &[PosedImage],
    cfg: &VolumeConfig,
    occupancy: Option<&OccupancyGrid>,
) -> Result<EvalReport> {
    EvalReport::over_views(views, |v| render_field_image(field, &v.camera, cfg, occupancy))
}

/// Which exports [`fit_field`] writes at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FieldExportSet {
    /// `mesh.glb` and `mesh.obj`: marching cubes of the density, vertex colours from the field.
    pub mesh: bool,
    /// `turntable.gif` and `turntable.png` (contact sheet), volume-rendered.
    pub turntable: bool,
}

impl FieldExportSet {
    /// Parses a comma list of `mesh`, `turntable` (or `all`, `none`); the splat-only formats
    /// `ply` and `glb` are errors.
    pub fn parse(list: &str) -> Result<Self> {
        let all = Self { mesh: true, turntable: true };
        parse_export_list(list, all, |s, w| {
            match w {
                "mesh" => s.mesh = true,
                "turntable" => s.turntable = true,
                "ply" | "glb" => {
                    return Err(Error::invalid(
                        "export",
                        format!(
                            "{w:?} is a splat format; a field exports mesh (mesh.glb + mesh.obj) \
                             and turntable"
                        ),
                    ))
                }
                _ => {
                    return Err(Error::invalid(
                        "export",
                        format!("unknown format {w:?} (mesh, turntable, all, none)"),
                    ))
                }
            }
            Ok(())
        })
    }
}

/// Output options of [`fit_field`].
#[derive(Debug, Clone, PartialEq)]
pub struct FieldOutputs {
    pub dir: PathBuf,
    /// Continue from `dir/checkpoint.safetensors` when it exists.
    pub resume: bool,
    pub exports: FieldExportSet,
    /// World up direction for the turntable.
    pub up: [f64; 3],
    /// Mesh grid samples along the longest side of the field's box.
    pub mesh_resolution: usize,
    /// Iso-level of the density σ for the mesh (world units⁻¹).
    pub mesh_threshold: f64,
    pub turntable_frames: usize,
    /// Turntable image side in pixels.
    pub turntable_size: usize,
}

impl FieldOutputs {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            resume: false,
            exports: FieldExportSet::default(),
            up: [0.0, 0.0, 1.0],
            mesh_resolution: 64,
            mesh_threshold: 10.0,
            turntable_frames: 24,
            turntable_size: 96,
        }
    }

    pub fn checkpoint_path(&self) -> PathBuf {
        self.dir.join(CHECKPOINT_FILE)
    }
}

/// Progress of [`fit_field`].
#[derive(Debug, Clone, PartialEq)]
pub enum FieldFitEvent {
    Started {
        step: u64,
        steps: u64,
        resumed: bool,
    },
    Step(FieldStepInfo),
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
    Preview {
        step: u64,
        path: PathBuf,
    },
    Exported {
        path: PathBuf,
    },
    Finished {
        step: u64,
        /// Bytes of optimizer state (gen-optim's accounting, all parameter groups).
        optimizer_state_bytes: usize,
    },
}

/// Runs a whole field fit into `out.dir`: `config.json`, `previews/step_NNNNNN.png` (first
/// view: target | render), `checkpoint.safetensors` every `checkpoint_every` steps and at the
/// end, and the exports of [`FieldExportSet`]. Returns the final trainer.
pub fn fit_field(
    cfg: FieldFitConfig,
    views: Vec<PosedImage>,
    out: &FieldOutputs,
    on_event: &mut dyn FnMut(&FieldFitEvent),
) -> Result<FieldTrainer> {
    cfg.validate()?;
    let trainer = run_fit::<FieldTrainer>(&cfg, views, &out.dir, out.resume, &mut |e| {
        on_event(&match e {
            RunEvent::Started { trainer, resumed } => {
                FieldFitEvent::Started { step: trainer.step_count(), steps: cfg.steps, resumed }
            }
            RunEvent::Step(info) => FieldFitEvent::Step(info),
            RunEvent::Preview { step, path } => FieldFitEvent::Preview { step, path },
            RunEvent::Checkpoint { step, path } => FieldFitEvent::Checkpoint { step, path },
        })
    })?;
    for path in export_field(&trainer, out)? {
        on_event(&FieldFitEvent::Exported { path });
    }
    on_event(&FieldFitEvent::Finished {
        step: trainer.step_count(),
        optimizer_state_bytes: optimizer_state_bytes(trainer.optimizer().optimizer()),
    });
    Ok(trainer)
}

/// Marching cubes of the field's density over its box (`resolution` samples along the longest
/// side) at iso-level `threshold`, vertex colours from the field. An empty mesh is an error.
pub fn field_mesh(field: &CamField, resolution: usize, threshold: f64) -> Result<TriMesh> {
    let b = field.cfg.bounds;
    let grid = Grid::around(b.min, b.max, resolution, 0.0)?;
    let mesh = extract_mesh(field, &MeshConfig { grid, threshold })?;
    if mesh.indices.is_empty() {
        return Err(Error::invalid(
            "mesh export",
            format!(
                "the field's density never crosses the iso-level {threshold} (fit longer or \
                 lower the mesh threshold)"
            ),
        ));
    }
    Ok(mesh)
}

/// Volume-rendered turntable frames of the field: `frames` orbit cameras (vertical field of
/// view 40°, elevation 20°, around `up`) centred on the occupied cells of `occupancy` (the
/// whole box when none is occupied) at a distance where their bounding sphere fills the view.
pub fn field_turntable(
    field: &CamField,
    cfg: &VolumeConfig,
    occupancy: &OccupancyGrid,
    up: [f64; 3],
    frames: usize,
    size: usize,
) -> Result<Vec<RgbImage>> {
    let (center, radius) = occupied_ball(occupancy);
    let fov = 40f64.to_radians();
    let tcfg = crate::turntable::TurntableConfig {
        frames,
        width: size,
        height: size,
        fov_y_deg: 40.0,
        elevation_deg: 20.0,
        up,
        framing: crate::turntable::Framing::Manual {
            center,
            distance: 1.1 * radius / (0.5 * fov).sin(),
        },
        ..Default::default()
    };
    // Manual framing never looks at the splats; an empty set satisfies the signature.
    let dev = Device::Cpu;
    let none = crate::splat::Splats {
        means: Tensor::zeros((0, 3), DType::F32, &dev)?,
        log_scales: Tensor::zeros((0, 3), DType::F32, &dev)?,
        quats: Tensor::zeros((0, 4), DType::F32, &dev)?,
        opacity_logits: Tensor::zeros(0, DType::F32, &dev)?,
        sh: Tensor::zeros((0, 1, 3), DType::F32, &dev)?,
    };
    let cams = crate::turntable::orbit_cameras(&none, &tcfg)?;
    cams.iter()
        .enumerate()
        .map(|(i, cam)| {
            let (rgb, _) = render_field_image(field, cam, cfg, Some(occupancy))
                .map_err(|e| Error::msg(format!("turntable view {i}: {e}")))?;
            to_rgb8(&rgb)
        })
        .collect()
}

/// Centre and radius of a ball holding the occupied cells (the box's when none is).
fn occupied_ball(g: &OccupancyGrid) -> ([f64; 3], f64) {
    let r = g.res;
    let cell = |a: usize, i: usize, t: f64| {
        g.bounds.min[a] + (g.bounds.max[a] - g.bounds.min[a]) * (i as f64 + t) / r as f64
    };
    let (mut lo, mut hi) = ([f64::INFINITY; 3], [f64::NEG_INFINITY; 3]);
    for k in 0..r {
        for j in 0..r {
            for i in 0..r {
                if g.occupied[(k * r + j) * r + i] {
                    for (a, idx) in [i, j, k].into_iter().enumerate() {
                        lo[a] = lo[a].min(cell(a, idx, 0.0));
                        hi[a] = hi[a].max(cell(a, idx, 1.0));
                    }
                }
            }
        }
    }
    let b: Aabb = if lo[0].is_finite() { Aabb { min: lo, max: hi } } else { g.bounds };
    let c = [0, 1, 2].map(|a| 0.5 * (b.min[a] + b.max[a]));
    let rad = (0..3).map(|a| (0.5 * (b.max[a] - b.min[a])).powi(2)).sum::<f64>().sqrt();
    (c, rad.max(1e-3))
}

/// Writes the exports selected in `out.exports` into `out.dir`; returns their paths.
pub fn export_field(trainer: &FieldTrainer, out: &FieldOutputs) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let e = out.exports;
    if e.turntable {
        let frames = field_turntable(
            trainer.field(),
            &trainer.config().volume_config(),
            trainer.occupancy(),
            out.up,
            out.turntable_frames,
            out.turntable_size,
        )?;
        let (g, s) = (out.dir.join("turntable.gif"), out.dir.join("turntable.png"));
        let gif = crate::export::gif::encode_gif(&frames, &Default::default())?;
        write_atomic(&g, &gif)?;
        write_atomic(
            &s,
            &crate::turntable::png_bytes(&crate::turntable::contact_sheet(&frames)?)?,
        )?;
        written.push(g);
        written.push(s);
    }
    if e.mesh {
        let mesh = field_mesh(trainer.field(), out.mesh_resolution, out.mesh_threshold)?;
        for name in ["mesh.glb", "mesh.obj"] {
            let p = out.dir.join(name);
            crate::mesh::write_mesh(&mesh, &p)?;
            written.push(p);
        }
    }
    Ok(written)
}
