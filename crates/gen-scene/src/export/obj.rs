//! Wavefront `.obj` export of triangle meshes with vertex colours (`v x y z r g b`, the common
//! extension read by MeshLab, Blender and trimesh) and normals (`vn`).

use std::fmt::Write as _;
use std::path::Path;

use gen_core::{write_atomic, Error, Result};

use crate::mesh::TriMesh;

/// Encodes `mesh` as OBJ text. Faces are 1-based `f a//a b//b c//c` (vertex and normal
/// indices coincide). An empty mesh gives a comment-only file.
pub fn mesh_obj_string(mesh: &TriMesh) -> Result<String> {
    mesh.validate()?;
    let mut s = String::with_capacity(64 * mesh.positions.len() + 32 * mesh.indices.len());
    let _ = writeln!(
        s,
        "# gen-scene mesh: {} vertices, {} triangles; vertex colours are display RGB in [0, 1]",
        mesh.positions.len(),
        mesh.indices.len()
    );
    for (p, c) in mesh.positions.iter().zip(&mesh.colors) {
        let _ = writeln!(s, "v {} {} {} {} {} {}", p[0], p[1], p[2], c[0], c[1], c[2]);
    }
    for n in &mesh.normals {
        let _ = writeln!(s, "vn {} {} {}", n[0], n[1], n[2]);
    }
    for t in &mesh.indices {
        let (a, b, c) = (t[0] + 1, t[1] + 1, t[2] + 1);
        let _ = writeln!(s, "f {a}//{a} {b}//{b} {c}//{c}");
    }
    Ok(s)
}

/// Writes `mesh` to `path` as OBJ (atomically).
pub fn mesh_to_obj(mesh: &TriMesh, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let s = mesh_obj_string(mesh).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    write_atomic(path, s.as_bytes())
}
