//! Marching cubes (Lorensen & Cline 1987) with a case table derived at first use.
//!
//! Instead of a hand-typed 256×16 triangle table, the table is built from a rule: on each
//! cube face, every run of inside corners (going counter-clockwise, seen from outside) is cut
//! off by one segment, from the edge where the run starts to the edge where it ends. Faces
//! with two diagonal inside corners therefore always separate them, whichever cube looks at
//! the face, so neighbouring cubes agree on the shared face and the surface is watertight.
//! The face segments chain into closed loops (each cut edge starts one segment and ends
//! one), and each loop is fanned into triangles. A loop walks counter-clockwise seen from
//! the outside (low density), so triangles face outward.
//!
//! Vertices on shared grid edges are shared (indexed mesh).

use std::collections::HashMap;
use std::sync::OnceLock;

use gen_core::{Error, Result};
use glam::Vec3;

use super::{Grid, TriMesh};

/// Corner `c` of a cell sits at offset `(c & 1, (c >> 1) & 1, (c >> 2) & 1)`.
const fn corner_offset(c: usize) -> [usize; 3] {
    [c & 1, (c >> 1) & 1, (c >> 2) & 1]
}

/// The 12 cell edges as corner pairs (the first corner is the lower end) with their axis.
const EDGES: [(usize, usize, usize); 12] = [
    (0, 1, 0),
    (2, 3, 0),
    (4, 5, 0),
    (6, 7, 0),
    (0, 2, 1),
    (1, 3, 1),
    (4, 6, 1),
    (5, 7, 1),
    (0, 4, 2),
    (1, 5, 2),
    (2, 6, 2),
    (3, 7, 2),
];

/// The 6 faces, corners counter-clockwise seen from outside the cell.
const FACES: [[usize; 4]; 6] = [
    [0, 4, 6, 2], // x = 0
    [1, 3, 7, 5], // x = 1
    [0, 1, 5, 4], // y = 0
    [2, 6, 7, 3], // y = 1
    [0, 2, 3, 1], // z = 0
    [4, 5, 7, 6], // z = 1
];

fn edge_of(a: usize, b: usize) -> usize {
    EDGES
        .iter()
        .position(|&(p, q, _)| (p, q) == (a, b) || (p, q) == (b, a))
        .expect("adjacent corners share an edge")
}

/// Triangles (as cell edge triples) for each of the 256 inside/outside corner patterns.
fn case_table() -> &'static [Vec<[u8; 3]>; 256] {
    static TABLE: OnceLock<[Vec<[u8; 3]>; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(build_case))
}

fn build_case(case: usize) -> Vec<[u8; 3]> {
    let inside = |c: usize| (case >> c) & 1 == 1;
    // next[e] = the edge where the segment starting at edge e ends.
    let mut next = [usize::MAX; 12];
    for face in FACES {
        for k in 0..4 {
            let (a, b) = (face[k], face[(k + 1) % 4]);
            if inside(a) || !inside(b) {
                continue;
            }
            // Entering the inside run at edge (a, b); leave at its end.
            let mut j = (k + 1) % 4;
            while inside(face[(j + 1) % 4]) {
                j = (j + 1) % 4;
            }
            let start = edge_of(a, b);
            let end = edge_of(face[j], face[(j + 1) % 4]);
            debug_assert_eq!(next[start], usize::MAX, "edge starts two segments");
            next[start] = end;
        }
    }
    let mut used = [false; 12];
    let mut tris = Vec::new();
    for e0 in 0..12 {
        if next[e0] == usize::MAX || used[e0] {
            continue;
        }
        let mut poly = Vec::new();
        let mut e = e0;
        while !used[e] {
            used[e] = true;
            poly.push(e as u8);
            e = next[e];
        }
        for i in 1..poly.len().saturating_sub(1) {
            tris.push([poly[0], poly[i], poly[i + 1]]);
        }
    }
    tris
}

/// Extracts the surface `{x : v(x) = threshold}` from `values` sampled on `grid` (x fastest,
/// see [`Grid::index`]); a sample is inside when its value is above `threshold`. Normals are
/// the normalised negative gradient (central differences, interpolated along the cut edge);
/// colours are left grey (0.7) for the caller to fill.
pub fn marching_cubes(values: &[f32], grid: &Grid, threshold: f32) -> Result<TriMesh> {
    grid.validate()?;
    if values.len() != grid.len() {
        return Err(Error::invalid(
            "marching cubes",
            format!("{} values for a grid of {:?} samples", values.len(), grid.dims),
        ));
    }
    let [nx, ny, nz] = grid.dims;
    let step = grid.step();
    let table = case_table();
    let v = |i: usize, j: usize, k: usize| values[grid.index(i, j, k)];
    let grad = |i: usize, j: usize, k: usize| -> Vec3 {
        let d = |lo: f32, hi: f32, span: usize, s: f64| (hi - lo) / (span as f64 * s) as f32;
        let gx = d(
            v(i.saturating_sub(1), j, k),
            v((i + 1).min(nx - 1), j, k),
            (i + 1).min(nx - 1) - i.saturating_sub(1),
            step[0],
        );
        let gy = d(
            v(i, j.saturating_sub(1), k),
            v(i, (j + 1).min(ny - 1), k),
            (j + 1).min(ny - 1) - j.saturating_sub(1),
            step[1],
        );
        let gz = d(
            v(i, j, k.saturating_sub(1)),
            v(i, j, (k + 1).min(nz - 1)),
            (k + 1).min(nz - 1) - k.saturating_sub(1),
            step[2],
        );
        Vec3::new(gx, gy, gz)
    };
    let mut mesh = TriMesh::default();
    let mut vertex_of: HashMap<usize, u32> = HashMap::new();
    let mut grads: Vec<Vec3> = Vec::new();
    for k in 0..nz - 1 {
        for j in 0..ny - 1 {
            for i in 0..nx - 1 {
                let mut case = 0usize;
                let mut cv = [0f32; 8];
                for (c, val) in cv.iter_mut().enumerate() {
                    let o = corner_offset(c);
                    *val = v(i + o[0], j + o[1], k + o[2]);
                    if *val > threshold {
                        case |= 1 << c;
                    }
                }
                if case == 0 || case == 255 {
                    continue;
                }
                for tri in &table[case] {
                    let mut ids = [0u32; 3];
                    for (slot, &e) in ids.iter_mut().zip(tri) {
                        let (a, b, axis) = EDGES[e as usize];
                        let oa = corner_offset(a);
                        let (gi, gj, gk) = (i + oa[0], j + oa[1], k + oa[2]);
                        let key = grid.index(gi, gj, gk) * 3 + axis;
                        *slot = *vertex_of.entry(key).or_insert_with(|| {
                            let t = ((threshold - cv[a]) / (cv[b] - cv[a])).clamp(0.0, 1.0);
                            let pa = grid.point(gi, gj, gk);
                            let mut p = pa.map(|x| x as f32);
                            p[axis] += t * step[axis] as f32;
                            let ob = corner_offset(b);
                            let g = grad(gi, gj, gk).lerp(grad(i + ob[0], j + ob[1], k + ob[2]), t);
                            mesh.positions.push(p);
                            grads.push(g);
                            (mesh.positions.len() - 1) as u32
                        });
                    }
                    mesh.indices.push(ids);
                }
            }
        }
    }
    // Normals: -gradient; where the gradient vanishes, the area-weighted face normals.
    let mut face_n = vec![Vec3::ZERO; mesh.positions.len()];
    for t in &mesh.indices {
        let p = |v: u32| Vec3::from(mesh.positions[v as usize]);
        let n = (p(t[1]) - p(t[0])).cross(p(t[2]) - p(t[0]));
        for &v in t {
            face_n[v as usize] += n;
        }
    }
    mesh.normals = grads
        .iter()
        .zip(&face_n)
        .map(|(g, f)| {
            let n = (-*g).try_normalize().or_else(|| f.try_normalize()).unwrap_or(Vec3::Z);
            n.to_array()
        })
        .collect();
    mesh.colors = vec![[0.7; 3]; mesh.positions.len()];
    Ok(mesh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn face_orders_are_counter_clockwise_from_outside() {
        for (f, face) in FACES.iter().enumerate() {
            let p = |c: usize| Vec3::from(corner_offset(c).map(|v| v as f32));
            let n = (p(face[1]) - p(face[0])).cross(p(face[2]) - p(face[1]));
            let centre = (0..4).map(|i| p(face[i])).sum::<Vec3>() / 4.0 - Vec3::splat(0.5);
            assert!(n.dot(centre) > 0.0, "face {f} is not counter-clockwise from outside");
        }
    }

    #[test]
    fn every_case_closes_its_loops() {
        for case in 0..256usize {
            let tris = build_case(case);
            let cut =
                EDGES.iter().filter(|&&(a, b, _)| ((case >> a) & 1) != ((case >> b) & 1)).count();
            // Each loop of m edges gives m-2 triangles; every cut edge is used.
            let used: std::collections::HashSet<u8> = tris.iter().flatten().copied().collect();
            assert_eq!(used.len(), cut, "case {case}");
            // Complement cases cut the same edges.
            assert_eq!(
                build_case(255 - case)
                    .iter()
                    .flatten()
                    .collect::<std::collections::HashSet<_>>()
                    .len(),
                cut
            );
        }
        assert!(build_case(0).is_empty() && build_case(255).is_empty());
        assert_eq!(build_case(1).len(), 1);
    }
}
