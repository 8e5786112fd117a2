//! Binary glTF 2.0 (`.glb`) writers built on the `gltf` crate's JSON types (`gltf::json`)
//! and its GLB container writer (`gltf::binary::Glb`):
//! - [`splats_to_glb`]: Gaussian splats as a `POINTS` primitive with the
//!   `KHR_gaussian_splatting` extension (ellipse kernel);
//! - [`mesh_to_glb`]: a triangle mesh with `POSITION`, `NORMAL` and `COLOR_0`.
//!
//! Every buffer view starts at a 4-byte aligned offset; every `POSITION` accessor carries
//! `min`/`max`. The document is checked with `gltf::json`'s own validation before it is
//! written.
//!
//! One part is not expressed with the crate's types: `gltf::json::mesh::Semantic` (gltf
//! 1.4.1) only names the core attributes and application-specific ones, which it always
//! writes with a leading `_`; it has no way to spell extension-scoped attribute names such as
//! `KHR_gaussian_splatting:ROTATION` (an unknown name is `Checked::Invalid`, which refuses to
//! serialize). Those attributes are therefore added to the primitive's `attributes` object of
//! the serialized document (`insert_extension_attributes`); everything else, including the
//! primitive's `extensions` object (through the crate's `extensions` feature), comes from the
//! crate.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use gen_core::{write_atomic, Error, Result};
use gltf::binary::{Glb, Header};
use gltf::json::accessor::{Accessor, ComponentType, GenericComponentType, Type};
use gltf::json::buffer::{Buffer, Target, View};
use gltf::json::material::{Material, StrengthFactor};
use gltf::json::mesh::{Mesh, Mode, Primitive, Semantic};
use gltf::json::scene::{Node, Scene};
use gltf::json::validation::{Checked::Valid, USize64, Validate};
use gltf::json::{Asset, Index, Root};
use serde_json::{json, Value};

use super::{sigmoid, SplatArrays, SH_C0};
use crate::mesh::TriMesh;
use crate::splat::Splats;

/// glTF component type FLOAT.
pub const FLOAT: u32 = 5126;
/// glTF component type UNSIGNED_INT.
pub const UNSIGNED_INT: u32 = 5125;
/// The extension name.
pub const KHR_GAUSSIAN_SPLATTING: &str = "KHR_gaussian_splatting";

/// Accumulates buffer views and accessors over one binary buffer in a `gltf::json::Root`.
struct GltfBuilder {
    root: Root,
    bin: Vec<u8>,
}

impl GltfBuilder {
    fn new() -> Self {
        let root = Root {
            asset: Asset {
                copyright: None,
                extensions: None,
                extras: Default::default(),
                generator: Some("gen-scene".into()),
                min_version: None,
                version: "2.0".into(),
            },
            ..Default::default()
        };
        Self { root, bin: Vec::new() }
    }

    /// Adds a tightly packed float accessor of `ty` elements (`data.len()` must be a multiple
    /// of the type's component count); `with_bounds` adds per-component `min`/`max`.
    fn add_f32(&mut self, data: &[f32], ty: Type, with_bounds: bool) -> Index<Accessor> {
        let width = ty.multiplicity();
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = self.push_view(bytes, Target::ArrayBuffer);
        let (mut min, mut max) = (None, None);
        if with_bounds {
            let mut lo = vec![f32::INFINITY; width];
            let mut hi = vec![f32::NEG_INFINITY; width];
            for row in data.chunks_exact(width) {
                for c in 0..width {
                    lo[c] = lo[c].min(row[c]);
                    hi[c] = hi[c].max(row[c]);
                }
            }
            (min, max) = (Some(json!(lo)), Some(json!(hi)));
        }
        self.push_accessor(view, data.len() / width, ComponentType::F32, ty, min, max)
    }

    /// Adds an `UNSIGNED_INT` index accessor with `min`/`max`.
    fn add_indices(&mut self, idx: &[u32]) -> Index<Accessor> {
        let bytes: Vec<u8> = idx.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = self.push_view(bytes, Target::ElementArrayBuffer);
        let (lo, hi) = idx.iter().fold((u32::MAX, 0u32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let (min, max) = (Some(json!([lo])), Some(json!([hi])));
        self.push_accessor(view, idx.len(), ComponentType::U32, Type::Scalar, min, max)
    }

    fn push_accessor(
        &mut self,
        view: Index<View>,
        count: usize,
        component: ComponentType,
        ty: Type,
        min: Option<Value>,
        max: Option<Value>,
    ) -> Index<Accessor> {
        self.root.push(Accessor {
            buffer_view: Some(view),
            byte_offset: None,
            count: USize64::from(count),
            component_type: Valid(GenericComponentType(component)),
            extensions: None,
            extras: Default::default(),
            type_: Valid(ty),
            min,
            max,
            name: None,
            normalized: false,
            sparse: None,
        })
    }

    fn push_view(&mut self, bytes: Vec<u8>, target: Target) -> Index<View> {
        self.bin.resize(self.bin.len().next_multiple_of(4), 0);
        let view = View {
            buffer: Index::new(0),
            byte_length: USize64::from(bytes.len()),
            byte_offset: Some(USize64::from(self.bin.len())),
            byte_stride: None,
            name: None,
            target: Some(Valid(target)),
            extensions: None,
            extras: Default::default(),
        };
        self.bin.extend_from_slice(&bytes);
        self.root.push(view)
    }

    /// Adds `mesh` under a node named like it, as the only scene.
    fn add_scene(&mut self, mesh: Mesh) {
        let name = mesh.name.clone();
        let mesh = self.root.push(mesh);
        let node = self.root.push(Node { mesh: Some(mesh), name, ..Default::default() });
        let scene = self.root.push(Scene {
            extensions: None,
            extras: Default::default(),
            name: None,
            nodes: vec![node],
        });
        self.root.scene = Some(scene);
    }

    /// Finishes the document (one buffer holding every view), validates it with
    /// `gltf::json`, adds the extension-scoped attributes `ext_attrs` (attribute name,
    /// accessor) to primitive 0 of mesh 0 and packs JSON and BIN into a GLB container.
    fn finish(mut self, ext_attrs: &[(String, Index<Accessor>)]) -> Result<Vec<u8>> {
        self.bin.resize(self.bin.len().next_multiple_of(4), 0);
        self.root.push(Buffer {
            byte_length: USize64::from(self.bin.len()),
            name: None,
            uri: None,
            extensions: None,
            extras: Default::default(),
        });
        let mut problems = Vec::new();
        self.root.validate(&self.root, gltf::json::Path::new, &mut |path, e| {
            problems.push(format!("{}: {e}", path()))
        });
        if !problems.is_empty() {
            return Err(Error::msg(format!("invalid glTF document: {}", problems.join("; "))));
        }
        let enc = |e: serde_json::Error| Error::msg(format!("glTF JSON encoding failed: {e}"));
        let mut doc = serde_json::to_value(&self.root).map_err(enc)?;
        insert_extension_attributes(&mut doc, ext_attrs)?;
        let json = serde_json::to_vec(&doc).map_err(enc)?;
        // `Glb::to_vec` writes the header and chunk lengths itself (padding both chunks).
        let glb = Glb {
            header: Header { magic: *b"glTF", version: 2, length: 0 },
            json: Cow::Owned(json),
            bin: Some(Cow::Owned(self.bin)),
        };
        glb.to_vec().map_err(|e| Error::msg(format!("GLB encoding failed: {e}")))
    }
}

/// Adds extension-scoped attributes (`KHR_gaussian_splatting:ROTATION`, …) to the
/// `attributes` object of primitive 0 of mesh 0 in a serialized document. This is the one
/// place the document is edited as JSON: `gltf::json::mesh::Semantic` cannot name such
/// attributes (see the module documentation).
fn insert_extension_attributes(doc: &mut Value, attrs: &[(String, Index<Accessor>)]) -> Result<()> {
    if attrs.is_empty() {
        return Ok(());
    }
    let map = doc
        .pointer_mut("/meshes/0/primitives/0/attributes")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| {
        Error::msg("glTF document has no mesh primitive for extension attributes")
    })?;
    for (name, acc) in attrs {
        map.insert(name.clone(), json!(acc.value()));
    }
    Ok(())
}

/// Splits a GLB file into its JSON document and BIN chunk (container read by
/// `gltf::binary::Glb`), also checking that the header length is the file length, that both
/// chunks are padded to 4 bytes and that nothing follows the BIN chunk. `name` prefixes
/// errors.
pub fn parse_glb(bytes: &[u8], name: &str) -> Result<(Value, Vec<u8>)> {
    let err = |m: String| Error::msg(format!("{name}: {m}"));
    if bytes.len() < 12 || &bytes[0..4] != b"glTF" {
        return Err(err("missing `glTF` magic".into()));
    }
    let total = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if total != bytes.len() {
        return Err(err(format!("header length {total} but file has {} bytes", bytes.len())));
    }
    let glb = Glb::from_slice(bytes).map_err(|e| err(format!("bad GLB container: {e}")))?;
    let json_len = glb.json.len();
    if json_len % 4 != 0 {
        return Err(err(format!("JSON chunk length {json_len} is not a multiple of 4")));
    }
    let bin = glb.bin.map(Cow::into_owned).unwrap_or_default();
    if bin.len() % 4 != 0 {
        return Err(err(format!("BIN chunk length {} is not a multiple of 4", bin.len())));
    }
    let used = 20 + json_len + if bin.is_empty() { 0 } else { 8 + bin.len() };
    if used != bytes.len() {
        return Err(err(format!("{} trailing bytes after the last chunk", bytes.len() - used)));
    }
    let doc: Value =
        serde_json::from_slice(&glb.json).map_err(|e| err(format!("bad JSON: {e}")))?;
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
    let mut b = GltfBuilder::new();
    let pos: Vec<f32> = arrays.means.iter().flatten().copied().collect();
    let mut attributes = BTreeMap::new();
    attributes.insert(Valid(Semantic::Positions), b.add_f32(&pos, Type::Vec3, true));
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
    let mut ext_attrs = vec![
        (format!("{ext}:ROTATION"), b.add_f32(&rot, Type::Vec4, false)),
        (format!("{ext}:SCALE"), b.add_f32(&scale, Type::Vec3, false)),
        (format!("{ext}:OPACITY"), b.add_f32(&opacity, Type::Scalar, false)),
    ];
    let k_count = arrays.sh_coeffs();
    for l in 0..=arrays.sh_degree {
        for j in 0..(2 * l + 1) {
            let k = l * l + j;
            debug_assert!(k < k_count);
            let coef: Vec<f32> = (0..n)
                .flat_map(|i| (0..3).map(move |c| (i, c)))
                .map(|(i, c)| arrays.sh_at(i, k, c))
                .collect();
            ext_attrs.push((
                format!("{ext}:SH_DEGREE_{l}_COEF_{j}"),
                b.add_f32(&coef, Type::Vec3, false),
            ));
        }
    }
    if cfg.color_fallback {
        let mut col = Vec::with_capacity(4 * n);
        for (i, &o) in opacity.iter().enumerate() {
            let c = arrays.dc_color(i);
            col.extend(c.iter().map(|&v| srgb_to_linear(v)));
            col.push(o);
        }
        attributes.insert(Valid(Semantic::Colors(0)), b.add_f32(&col, Type::Vec4, false));
    }
    let mut extensions = gltf::json::extensions::mesh::Primitive::default();
    extensions.others.insert(
        ext.into(),
        json!({
            "kernel": "ellipse",
            "colorSpace": "srgb_rec709_display",
            "projection": "perspective",
            "sortingMethod": "cameraDistance",
        }),
    );
    let primitive = Primitive {
        attributes,
        extensions: Some(extensions),
        extras: Default::default(),
        indices: None,
        material: None,
        mode: Valid(Mode::Points),
        targets: None,
    };
    b.add_scene(Mesh {
        extensions: None,
        extras: Default::default(),
        name: Some("splats".into()),
        primitives: vec![primitive],
        weights: None,
    });
    b.root.extensions_used.push(ext.into());
    b.finish(&ext_attrs)
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
    let mut b = GltfBuilder::new();
    let pos: Vec<f32> = mesh.positions.iter().flatten().copied().collect();
    let nrm: Vec<f32> = mesh.normals.iter().flatten().copied().collect();
    let col: Vec<f32> = mesh.colors.iter().flatten().map(|&c| srgb_to_linear(c)).collect();
    let attributes = BTreeMap::from([
        (Valid(Semantic::Positions), b.add_f32(&pos, Type::Vec3, true)),
        (Valid(Semantic::Normals), b.add_f32(&nrm, Type::Vec3, false)),
        (Valid(Semantic::Colors(0)), b.add_f32(&col, Type::Vec3, false)),
    ]);
    let idx: Vec<u32> = mesh.indices.iter().flatten().copied().collect();
    let indices = b.add_indices(&idx);
    let mut material = Material { name: Some("vertex colour".into()), ..Default::default() };
    material.pbr_metallic_roughness.metallic_factor = StrengthFactor(0.0);
    material.pbr_metallic_roughness.roughness_factor = StrengthFactor(1.0);
    let material = b.root.push(material);
    let primitive = Primitive {
        attributes,
        extensions: None,
        extras: Default::default(),
        indices: Some(indices),
        material: Some(material),
        mode: Valid(Mode::Triangles),
        targets: None,
    };
    b.add_scene(Mesh {
        extensions: None,
        extras: Default::default(),
        name: Some("mesh".into()),
        primitives: vec![primitive],
        weights: None,
    });
    b.finish(&[])
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
