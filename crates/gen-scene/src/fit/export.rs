//! The splat fit's final exports: `.ply`, `.glb` splats, a marching-cubes mesh, a turntable.

use std::path::PathBuf;

use gen_core::{Error, Result};

use super::FitOutputs;
use crate::splat::{RenderConfig, Splats};

/// Which exports [`fit()`](super::fit()) writes at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportSet {
    /// `splats.ply` (3DGS layout).
    pub ply: bool,
    /// `splats.glb` (KHR_gaussian_splatting).
    pub glb: bool,
    /// `mesh.glb`: marching cubes of the splat density.
    pub mesh: bool,
    /// `turntable.gif` and `turntable.png` (contact sheet).
    pub turntable: bool,
}

impl ExportSet {
    /// Parses a comma list of `ply`, `glb`, `mesh`, `turntable` (or `all`, `none`).
    pub fn parse(list: &str) -> Result<Self> {
        let all = Self { ply: true, glb: true, mesh: true, turntable: true };
        parse_export_list(list, all, |s, w| {
            match w {
                "ply" => s.ply = true,
                "glb" => s.glb = true,
                "mesh" => s.mesh = true,
                "turntable" => s.turntable = true,
                _ => {
                    return Err(Error::invalid(
                        "export",
                        format!("unknown format {w:?} (ply, glb, mesh, turntable, all, none)"),
                    ))
                }
            }
            Ok(())
        })
    }
}

/// Parses a comma list of export names into a set: `all` selects `all`, `none` clears the set,
/// any other name goes to `select` (which errors on a name it does not know).
pub(crate) fn parse_export_list<S: Default + Copy>(
    list: &str,
    all: S,
    mut select: impl FnMut(&mut S, &str) -> Result<()>,
) -> Result<S> {
    let mut s = S::default();
    for w in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match w {
            "all" => s = all,
            "none" => s = S::default(),
            _ => select(&mut s, w)?,
        }
    }
    Ok(s)
}

/// Writes the exports selected in `out.exports` into `out.dir`; returns their paths.
pub fn export(splats: &Splats, out: &FitOutputs, background: [f64; 3]) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let e = out.exports;
    if e.ply {
        let p = out.dir.join("splats.ply");
        crate::export::ply::write_ply(splats, &p)?;
        written.push(p);
    }
    if e.glb {
        let p = out.dir.join("splats.glb");
        crate::export::glb::splats_to_glb(splats, &p, &Default::default())?;
        written.push(p);
    }
    if e.turntable {
        let cfg = crate::turntable::TurntableConfig {
            up: out.up,
            render: RenderConfig { background },
            ..Default::default()
        };
        let (g, s) = (out.dir.join("turntable.gif"), out.dir.join("turntable.png"));
        crate::turntable::write_turntable(splats, &cfg, &g, &s)?;
        written.push(g);
        written.push(s);
    }
    if e.mesh {
        use crate::mesh::splat_density::{SplatDensity, SplatDensityConfig};
        let field = SplatDensity::new(splats, SplatDensityConfig::default())?;
        let (lo, hi) = field
            .bounds()
            .ok_or_else(|| Error::invalid("mesh export", "no Gaussian is opaque enough to mesh"))?;
        let grid = crate::mesh::Grid::around(lo, hi, out.mesh_resolution, 0.05)?;
        let mesh = crate::mesh::extract_mesh(
            &field,
            &crate::mesh::MeshConfig { grid, threshold: out.mesh_threshold },
        )?;
        if mesh.indices.is_empty() {
            return Err(Error::invalid(
                "mesh export",
                format!(
                    "the splat density never reaches the iso-level {} (opacities too low; fit \
                     longer or lower the mesh threshold); the other outputs were written",
                    out.mesh_threshold
                ),
            ));
        }
        let p = out.dir.join("mesh.glb");
        crate::mesh::write_mesh(&mesh, &p)?;
        written.push(p);
    }
    Ok(written)
}
