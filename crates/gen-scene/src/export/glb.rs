//! Binary glTF 2.0 (`.glb`) writers, hand-rolled with `serde_json`:
//! - [`splats_to_glb`]: Gaussian splats as a `POINTS` primitive with the
//!   `KHR_gaussian_splatting` extension (ellipse kernel);
//! - [`mesh_to_glb`]: a triangle mesh with `POSITION`, `NORMAL` and `COLOR_0`.
//!
//! GLB layout: 12-byte header (`glTF`, version 2, total length), a JSON chunk padded with
//! spaces to 4 bytes, a BIN chunk padded with zeros to 4 bytes. Every buffer view starts at a
//! 4-byte aligned offset; every `POSITION` accessor carries `min`/`max`.

use std::path::Path;

use gen_core::{write_atomic, Error, Result};
use serde_json::{json, Value};

use super::{sigmoid, SplatArrays, SH_C0};
use crate::mesh::TriMesh;
use crate::splat::Splats;

/// glTF component type FLOAT.
pub const FLOAT: u32 = 5126;
/// glTF component type UNSIGNED_INT.
pub const UNSIGNED_INT: u32 = 5125;
/// Buffer view target ARRAY_BUFFER.
const ARRAY_BUFFER: u32 = 34962;
/// Buffer view target ELEMENT_ARRAY_BUFFER.
const ELEMENT_ARRAY_BUFFER: u32 = 34963;
/// The extension name.
pub const KHR_GAUSSIAN_SPLATTING: &str = "KHR_gaussian_splatting";

/// Accumulates buffer views and accessors over one binary buffer.
#[derive(Default)]
struct GltfBuilder {
    bin: Vec<u8>,
    views: Vec<Value>,
    accessors: Vec<Value>,
}

impl GltfBuilder {
    /// Adds a tightly packed float accessor of `count` elements of `ty` (`"SCALAR"`, `"VEC3"`,
    /// …) with `width` components each; `with_bounds` adds per-component `min`/`max`.
    fn add_f32(&mut self, data: &[f32], width: usize, ty: &str, with_bounds: bool) -> usize {
        let count = data.len() / width;
        let mut acc = json!({
            "bufferView": self.push_view(bytemuck_f32(data), Some(ARRAY_BUFFER)),
            "componentType": FLOAT,
            "count": count,
            "type": ty,
        });
        if with_bounds {
            let mut lo = vec![f32::INFINITY; width];
            let mut hi = vec![f32::NEG_INFINITY; width];
            for row in data.chunks_exact(width) {
                for c in 0..width {
                    lo[c] = lo[c].min(row[c]);
                    hi[c] = hi[c].max(row[c]);
                }
            }
            acc["min"] = json!(lo);
            acc["max"] = json!(hi);
        }
        self.accessors.push(acc);
        self.accessors.len() - 1
    }

    fn add_indices(&mut self, idx: &[u32]) -> usize {
        let bytes: Vec<u8> = idx.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = self.push_view(bytes, Some(ELEMENT_ARRAY_BUFFER));
        let (lo, hi) = idx.iter().fold((u32::MAX, 0u32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        self.accessors.push(json!({
            "bufferView": view,
            "componentType": UNSIGNED_INT,
            "count": idx.len(),
            "type": "SCALAR",
            "min": [lo],
            "max": [hi],
        }));
        self.accessors.len() - 1
    }

    fn push_view(&mut self, bytes: Vec<u8>, target: Option<u32>) -> usize {
        self.bin.resize(self.bin.len().next_multiple_of(4), 0);
        let mut view = json!({
            "buffer": 0,
            "byteOffset": self.bin.len(),
            "byteLength": bytes.len(),
        });
        if let Some(t) = target {
            view["target"] = json!(t);
        }
        self.bin.extend_from_slice(&bytes);
        self.views.push(view);
        self.views.len() - 1
    }

    /// Finishes the document: `doc` gets `asset`, `buffers`, `bufferViews` and `accessors`.
    fn finish(mut self, mut doc: Value) -> Result<Vec<u8>> {
        self.bin.resize(self.bin.len().next_multiple_of(4), 0);
        doc["asset"] = json!({"version": "2.0", "generator": "gen-scene"});
        doc["buffers"] = json!([{"byteLength": self.bin.len()}]);
        doc["bufferViews"] = Value::Array(self.views);
        doc["accessors"] = Value::Array(self.accessors);
        let json = serde_json::to_vec(&doc)
            .map_err(|e| Error::msg(format!("glTF JSON encoding failed: {e}")))?;
        Ok(glb_container(json, self.bin))
    }
}

fn bytemuck_f32(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Packs a JSON chunk and a BIN chunk into a GLB container (both padded to 4 bytes).
pub fn glb_container(mut json: Vec<u8>, mut bin: Vec<u8>) -> Vec<u8> {
    json.resize(json.len().next_multiple_of(4), b' ');
    bin.resize(bin.len().next_multiple_of(4), 0);
    let total = 12 + 8 + json.len() + if bin.is_empty() { 0 } else { 8 + bin.len() };
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(b"glTF");
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&(total as u32).to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(b"JSON");
    out.extend_from_slice(&json);
    if !bin.is_empty() {
        out.extend_from_slice(&(bin.len() as u32).to_le_bytes());
        out.extend_from_slice(b"BIN\0");
        out.extend_from_slice(&bin);
    }
    out
}

/// Splits a GLB file into its JSON document and BIN chunk, checking the header, the chunk
/// types, lengths and 4-byte alignment. `name` prefixes errors.
pub fn parse_glb(bytes: &[u8], name: &str) -> Result<(Value, Vec<u8>)> {
    let err = |m: String| Error::msg(format!("{name}: {m}"));
    let u32_at = |o: usize| -> Result<u32> {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| err(format!("truncated at byte {o}")))
    };
    if bytes.get(0..4) != Some(b"glTF") {
        return Err(err("missing `glTF` magic".into()));
    }
    if u32_at(4)? != 2 {
        return Err(err(format!("GLB version {} (want 2)", u32_at(4)?)));
    }
    let total = u32_at(8)? as usize;
    if total != bytes.len() {
        return Err(err(format!("header length {total} but file has {} bytes", bytes.len())));
    }
    let json_len = u32_at(12)? as usize;
    if bytes.get(16..20) != Some(b"JSON") {
        return Err(err("first chunk is not JSON".into()));
    }
    if json_len != json_len.next_multiple_of(4) {
        return Err(err(format!("JSON chunk length {json_len} is not a multiple of 4")));
    }
    let json = bytes.get(20..20 + json_len).ok_or_else(|| err("JSON chunk truncated".into()))?;
    let doc: Value = serde_json::from_slice(json).map_err(|e| err(format!("bad JSON: {e}")))?;
    let mut bin = Vec::new();
    let o = 20 + json_len;
    if o < bytes.len() {
        let bin_len = u32_at(o)? as usize;
        if bytes.get(o + 4..o + 8) != Some(b"BIN\0") {
            return Err(err("second chunk is not BIN".into()));
        }
        if bin_len != bin_len.next_multiple_of(4) {
            return Err(err(format!("BIN chunk length {bin_len} is not a multiple of 4")));
        }
        bin = bytes
            .get(o + 8..o + 8 + bin_len)
            .ok_or_else(|| err("BIN chunk truncated".into()))?
            .to_vec();
        if o + 8 + bin_len != bytes.len() {
            return Err(err("trailing bytes after BIN chunk".into()));
        }
    }
    Ok((doc, bin))
}

/// Options of [`splats_to_glb`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplatGlbConfig {
    /// Also write `COLOR_0` (linear RGB of the DC colour, alpha = opacity) so viewers without
    /// the extension show a coloured point cloud.
    pub color_fallback: bool,
}

impl Default for SplatGlbConfig {
    fn default() -> Self {
        Self { color_fallback: true }
    }
}

/// sRGB transfer function decode (display value in `[0, 1]` to linear).
fn srgb_to_linear(c: f32) -> f32 {
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

/// Encodes splats as GLB with `KHR_gaussian_splatting` (colour space `srgb_rec709_display`,
/// ellipse kernel). Conversions from the training parameters: scale = exp(log-scale),
/// opacity = sigmoid(logit), rotation = normalised quaternion reordered to `(x, y, z, w)`;
/// SH coefficient `k = l² + l + m` goes to `SH_DEGREE_l_COEF_{l+m}`.
pub fn splats_glb_bytes(arrays: &SplatArrays, cfg: &SplatGlbConfig) -> Result<Vec<u8>> {
    arrays.check_finite()?;
    let n = arrays.len();
    if n == 0 {
        return Err(Error::invalid(
            "splat glTF export",
            "zero Gaussians: glTF accessors must hold at least one element",
        ));
    }
    let mut b = GltfBuilder::default();
    let pos: Vec<f32> = arrays.means.iter().flatten().copied().collect();
    let mut attrs = serde_json::Map::new();
    attrs.insert("POSITION".into(), json!(b.add_f32(&pos, 3, "VEC3", true)));
    let mut rot = Vec::with_capacity(4 * n);
    for q in &arrays.quats {
        let norm = q.iter().map(|v| v * v).sum::<f32>().sqrt();
        rot.extend_from_slice(&[q[1] / norm, q[2] / norm, q[3] / norm, q[0] / norm]);
    }
    let scale: Vec<f32> = arrays.log_scales.iter().flatten().map(|v| v.exp()).collect();
    if let Some(i) = scale.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "splat glTF export",
            format!("Gaussian {}: exp(log-scale) overflows f32", i / 3),
        ));
    }
    let opacity: Vec<f32> = arrays.opacity_logits.iter().map(|&v| sigmoid(v)).collect();
    let ext = KHR_GAUSSIAN_SPLATTING;
    attrs.insert(format!("{ext}:ROTATION"), json!(b.add_f32(&rot, 4, "VEC4", false)));
    attrs.insert(format!("{ext}:SCALE"), json!(b.add_f32(&scale, 3, "VEC3", false)));
    attrs.insert(format!("{ext}:OPACITY"), json!(b.add_f32(&opacity, 1, "SCALAR", false)));
    let k_count = arrays.sh_coeffs();
    for l in 0..=arrays.sh_degree {
        for j in 0..(2 * l + 1) {
            let k = l * l + j;
            debug_assert!(k < k_count);
            let coef: Vec<f32> = (0..n)
                .flat_map(|i| (0..3).map(move |c| (i, c)))
                .map(|(i, c)| arrays.sh_at(i, k, c))
                .collect();
            attrs.insert(
                format!("{ext}:SH_DEGREE_{l}_COEF_{j}"),
                json!(b.add_f32(&coef, 3, "VEC3", false)),
            );
        }
    }
    if cfg.color_fallback {
        let mut col = Vec::with_capacity(4 * n);
        for (i, &o) in opacity.iter().enumerate() {
            let c = arrays.dc_color(i);
            col.extend(c.iter().map(|&v| srgb_to_linear(v)));
            col.push(o);
        }
        attrs.insert("COLOR_0".into(), json!(b.add_f32(&col, 4, "VEC4", false)));
    }
    let doc = json!({
        "extensionsUsed": [ext],
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "splats"}],
        "meshes": [{
            "name": "splats",
            "primitives": [{
                "mode": 0,
                "attributes": Value::Object(attrs),
                "extensions": {
                    ext: {
                        "kernel": "ellipse",
                        "colorSpace": "srgb_rec709_display",
                        "projection": "perspective",
                        "sortingMethod": "cameraDistance",
                    }
                }
            }]
        }],
    });
    b.finish(doc)
}

/// Writes `splats` to `path` as GLB with `KHR_gaussian_splatting` (atomically).
pub fn splats_to_glb(splats: &Splats, path: impl AsRef<Path>, cfg: &SplatGlbConfig) -> Result<()> {
    let path = path.as_ref();
    let bytes = SplatArrays::from_splats(splats)
        .and_then(|a| splats_glb_bytes(&a, cfg))
        .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Encodes a triangle mesh as GLB: `POSITION` (with min/max), unit `NORMAL`, `COLOR_0`
/// (linear RGB: the mesh's display colours are sRGB-decoded) and `UNSIGNED_INT` indices.
pub fn mesh_glb_bytes(mesh: &TriMesh) -> Result<Vec<u8>> {
    mesh.validate()?;
    if mesh.indices.is_empty() {
        return Err(Error::invalid(
            "mesh glTF export",
            "the mesh has no triangles: glTF accessors must hold at least one element",
        ));
    }
    let mut b = GltfBuilder::default();
    let pos: Vec<f32> = mesh.positions.iter().flatten().copied().collect();
    let nrm: Vec<f32> = mesh.normals.iter().flatten().copied().collect();
    let col: Vec<f32> = mesh.colors.iter().flatten().map(|&c| srgb_to_linear(c)).collect();
    let p = b.add_f32(&pos, 3, "VEC3", true);
    let nn = b.add_f32(&nrm, 3, "VEC3", false);
    let c = b.add_f32(&col, 3, "VEC3", false);
    let idx: Vec<u32> = mesh.indices.iter().flatten().copied().collect();
    let i = b.add_indices(&idx);
    let doc = json!({
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "mesh"}],
        "materials": [{
            "name": "vertex colour",
            "pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0, "roughnessFactor": 1.0},
        }],
        "meshes": [{
            "name": "mesh",
            "primitives": [{
                "mode": 4,
                "attributes": {"POSITION": p, "NORMAL": nn, "COLOR_0": c},
                "indices": i,
                "material": 0,
            }]
        }],
    });
    b.finish(doc)
}

/// Writes `mesh` to `path` as GLB (atomically).
pub fn mesh_to_glb(mesh: &TriMesh, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let bytes = mesh_glb_bytes(mesh).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Display colour of the degree-0 SH coefficient (for tests and viewers).
pub fn dc_to_rgb(f_dc: f32) -> f32 {
    0.5 + SH_C0 * f_dc
}
