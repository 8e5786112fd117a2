//! GLB structure checks done here by hand (CI has no glTF validator): header, chunk types and
//! 4-byte alignment, buffer views inside the buffer and aligned, accessor counts and byte
//! lengths, `POSITION` min/max, and the `KHR_gaussian_splatting` attribute values recomputed
//! from the splat parameters.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gen_core::SeededRng;
use gen_scene::export::glb::{
    mesh_glb_bytes, mesh_to_glb, parse_glb, splats_to_glb, SplatGlbConfig,
};
use gen_scene::mesh::TriMesh;
use gen_scene::splat::RandomSplatsConfig;
use gen_scene::Splats;
use serde_json::Value;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-scene-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn u32_at(b: &[u8], o: usize) -> usize {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize
}

/// Parses the container by hand and checks its framing; returns (JSON, BIN).
fn open_glb(bytes: &[u8]) -> (Value, Vec<u8>) {
    assert_eq!(&bytes[0..4], b"glTF");
    assert_eq!(u32_at(bytes, 4), 2);
    assert_eq!(u32_at(bytes, 8), bytes.len());
    assert_eq!(bytes.len() % 4, 0);
    let jl = u32_at(bytes, 12);
    assert_eq!(&bytes[16..20], b"JSON");
    assert_eq!(jl % 4, 0, "JSON chunk not padded");
    let json = &bytes[20..20 + jl];
    assert!(json.iter().rev().take_while(|&&c| c == b' ').count() < 4);
    let doc: Value = serde_json::from_slice(json).unwrap();
    let o = 20 + jl;
    let bl = u32_at(bytes, o);
    assert_eq!(&bytes[o + 4..o + 8], b"BIN\0");
    assert_eq!(bl % 4, 0, "BIN chunk not padded");
    assert_eq!(o + 8 + bl, bytes.len());
    assert_eq!(doc["buffers"][0]["byteLength"].as_u64().unwrap() as usize, bl);
    (doc, bytes[o + 8..].to_vec())
}

fn components(ty: &str) -> usize {
    match ty {
        "SCALAR" => 1,
        "VEC3" => 3,
        "VEC4" => 4,
        t => panic!("unexpected accessor type {t}"),
    }
}

/// Reads a tightly packed float accessor, checking its view and byte length.
fn read_f32(doc: &Value, bin: &[u8], acc: usize) -> (Vec<f32>, usize, usize) {
    let a = &doc["accessors"][acc];
    assert_eq!(a["componentType"], 5126);
    let count = a["count"].as_u64().unwrap() as usize;
    let width = components(a["type"].as_str().unwrap());
    let v = &doc["bufferViews"][a["bufferView"].as_u64().unwrap() as usize];
    let off = v["byteOffset"].as_u64().unwrap() as usize;
    let len = v["byteLength"].as_u64().unwrap() as usize;
    assert_eq!(off % 4, 0);
    assert_eq!(len, count * width * 4);
    assert!(off + len <= bin.len());
    let vals = bin[off..off + len]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (vals, count, width)
}

#[test]
fn splat_glb_carries_the_extension_attributes() {
    let n = 23;
    let cfg = RandomSplatsConfig { count: n, sh_degree: 2, ..Default::default() };
    let s = Splats::random(&cfg, &mut SeededRng::new(7), DType::F32, &Device::Cpu).unwrap();
    let dir = tmp_dir("glb-splat");
    let path = dir.join("s.glb");
    splats_to_glb(&s, &path, &SplatGlbConfig::default()).unwrap();
    let (doc, bin) = open_glb(&std::fs::read(&path).unwrap());

    let ext = "KHR_gaussian_splatting";
    assert_eq!(doc["extensionsUsed"], serde_json::json!([ext]));
    assert_eq!(doc["asset"]["version"], "2.0");
    let prim = &doc["meshes"][0]["primitives"][0];
    assert_eq!(prim["mode"], 0);
    assert_eq!(prim["extensions"][ext]["kernel"], "ellipse");
    assert_eq!(prim["extensions"][ext]["colorSpace"], "srgb_rec709_display");
    let attrs = prim["attributes"].as_object().unwrap();
    // POSITION, ROTATION, SCALE, OPACITY, 1 + 3 + 5 SH attributes, COLOR_0.
    assert_eq!(attrs.len(), 4 + 9 + 1, "{attrs:?}");
    let acc = |name: &str| attrs[name].as_u64().unwrap() as usize;

    let means: Vec<f32> = s.means.flatten_all().unwrap().to_vec1().unwrap();
    let ls: Vec<f32> = s.log_scales.flatten_all().unwrap().to_vec1().unwrap();
    let q: Vec<f32> = s.quats.flatten_all().unwrap().to_vec1().unwrap();
    let op: Vec<f32> = s.opacity_logits.to_vec1().unwrap();
    let sh: Vec<f32> = s.sh.flatten_all().unwrap().to_vec1().unwrap();

    let (pos, count, w) = read_f32(&doc, &bin, acc("POSITION"));
    assert_eq!((count, w), (n, 3));
    assert_eq!(pos, means);
    let a = &doc["accessors"][acc("POSITION")];
    for c in 0..3 {
        let lo = means.iter().skip(c).step_by(3).fold(f32::INFINITY, |m, &v| m.min(v));
        let hi = means.iter().skip(c).step_by(3).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        assert_eq!(a["min"][c].as_f64().unwrap() as f32, lo);
        assert_eq!(a["max"][c].as_f64().unwrap() as f32, hi);
    }

    let (rot, count, w) = read_f32(&doc, &bin, acc(&format!("{ext}:ROTATION")));
    assert_eq!((count, w), (n, 4));
    for i in 0..n {
        let (qw, qx, qy, qz) = (q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]);
        let norm = (qw * qw + qx * qx + qy * qy + qz * qz).sqrt();
        let want = [qx / norm, qy / norm, qz / norm, qw / norm]; // glTF order x y z w
        for c in 0..4 {
            assert!((rot[4 * i + c] - want[c]).abs() < 1e-6);
        }
    }
    let (scale, _, w) = read_f32(&doc, &bin, acc(&format!("{ext}:SCALE")));
    assert_eq!(w, 3);
    for (g, l) in scale.iter().zip(&ls) {
        assert!((g - l.exp()).abs() <= 1e-6 * l.exp());
    }
    let (opac, _, w) = read_f32(&doc, &bin, acc(&format!("{ext}:OPACITY")));
    assert_eq!(w, 1);
    for (g, l) in opac.iter().zip(&op) {
        assert!((g - 1.0 / (1.0 + (-l).exp())).abs() < 1e-6);
        assert!((0.0..=1.0).contains(g));
    }
    // SH_DEGREE_l_COEF_j holds coefficient k = l² + j (m = j - l) of every channel.
    let k = 9;
    for (l, j) in [(0, 0), (1, 0), (1, 2), (2, 0), (2, 4)] {
        let (v, count, w) = read_f32(&doc, &bin, acc(&format!("{ext}:SH_DEGREE_{l}_COEF_{j}")));
        assert_eq!((count, w), (n, 3));
        let kk = l * l + j;
        for i in 0..n {
            for c in 0..3 {
                assert_eq!(v[3 * i + c], sh[(i * k + kk) * 3 + c]);
            }
        }
    }
    assert!(!attrs.contains_key(&format!("{ext}:SH_DEGREE_3_COEF_0")));
    let (col, _, w) = read_f32(&doc, &bin, acc("COLOR_0"));
    assert_eq!(w, 4);
    assert!(col.iter().all(|v| (0.0..=1.0).contains(v)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_splats_are_refused() {
    let dir = tmp_dir("glb-bad");
    let cfg = RandomSplatsConfig { count: 0, ..Default::default() };
    let empty = Splats::random(&cfg, &mut SeededRng::new(1), DType::F32, &Device::Cpu).unwrap();
    let e = splats_to_glb(&empty, dir.join("e.glb"), &SplatGlbConfig::default()).unwrap_err();
    assert!(e.to_string().contains("zero Gaussians"), "{e}");
    assert!(!dir.join("e.glb").exists());

    let cfg = RandomSplatsConfig { count: 3, ..Default::default() };
    let mut s = Splats::random(&cfg, &mut SeededRng::new(2), DType::F32, &Device::Cpu).unwrap();
    s.opacity_logits = Tensor::new(&[0.0f32, f32::NAN, 1.0], &Device::Cpu).unwrap();
    let e = splats_to_glb(&s, dir.join("n.glb"), &SplatGlbConfig::default()).unwrap_err();
    assert!(
        e.to_string().contains("opacity_logits") && e.to_string().contains("Gaussian 1"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tetrahedron() -> TriMesh {
    let p = [[0.0f32, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]];
    let c = [0.25f32, 0.25, 0.25];
    TriMesh {
        positions: p.to_vec(),
        normals: p
            .iter()
            .map(|v| {
                let d = [v[0] - c[0], v[1] - c[1], v[2] - c[2]];
                let l = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
                [d[0] / l, d[1] / l, d[2] / l]
            })
            .collect(),
        colors: vec![[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.5]],
        indices: vec![[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]],
    }
}

#[test]
fn mesh_glb_has_indexed_triangles_with_normals_and_colours() {
    let dir = tmp_dir("glb-mesh");
    let path = dir.join("m.glb");
    let mesh = tetrahedron();
    mesh_to_glb(&mesh, &path).unwrap();
    let (doc, bin) = open_glb(&std::fs::read(&path).unwrap());
    let prim = &doc["meshes"][0]["primitives"][0];
    // TRIANGLES (4) is glTF's default mode; the writer may leave it out.
    assert_eq!(prim.get("mode").unwrap_or(&serde_json::json!(4)), 4);
    let at = |k: &str| prim["attributes"][k].as_u64().unwrap() as usize;
    let (pos, count, _) = read_f32(&doc, &bin, at("POSITION"));
    assert_eq!(count, 4);
    assert_eq!(pos[10], 0.0); // vertex 3 y
    assert_eq!(pos[11], 3.0);
    let pa = &doc["accessors"][at("POSITION")];
    assert_eq!(pa["min"], serde_json::json!([0.0, 0.0, 0.0]));
    assert_eq!(pa["max"], serde_json::json!([1.0, 2.0, 3.0]));
    let (nrm, _, _) = read_f32(&doc, &bin, at("NORMAL"));
    for v in nrm.chunks_exact(3) {
        assert!(((v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt() - 1.0).abs() < 1e-6);
    }
    let (col, _, w) = read_f32(&doc, &bin, at("COLOR_0"));
    assert_eq!(w, 3);
    // Linear colour: sRGB 0.5 decodes to 0.2140.
    assert!((col[9] - 0.214_041).abs() < 1e-4, "{}", col[9]);
    assert_eq!(&col[0..3], &[1.0, 0.0, 0.0]);
    let ia = &doc["accessors"][prim["indices"].as_u64().unwrap() as usize];
    assert_eq!(ia["componentType"], 5125);
    assert_eq!(ia["count"], 12);
    let iv = &doc["bufferViews"][ia["bufferView"].as_u64().unwrap() as usize];
    assert_eq!(iv["target"], 34963);
    let off = iv["byteOffset"].as_u64().unwrap() as usize;
    assert_eq!(off % 4, 0);
    let idx: Vec<u32> = bin[off..off + 48]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(idx, vec![0, 2, 1, 0, 1, 3, 0, 3, 2, 1, 2, 3]);

    // Empty and invalid meshes are errors naming the problem.
    let e = mesh_to_glb(&TriMesh::default(), dir.join("e.glb")).unwrap_err().to_string();
    assert!(e.contains("no triangles"), "{e}");
    let mut bad = tetrahedron();
    bad.indices[2][1] = 9;
    let e = mesh_to_glb(&bad, dir.join("b.glb")).unwrap_err().to_string();
    assert!(e.contains("triangle 2"), "{e}");
    let mut bad = tetrahedron();
    bad.positions[1][0] = f32::NAN;
    let e = mesh_to_glb(&bad, dir.join("b.glb")).unwrap_err().to_string();
    assert!(e.contains("vertex 1"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn obj_lists_coloured_vertices_normals_and_faces() {
    let dir = tmp_dir("obj");
    let path = dir.join("m.obj");
    gen_scene::export::obj::mesh_to_obj(&tetrahedron(), &path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let v: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("v ")).collect();
    assert_eq!(v.len(), 4);
    assert_eq!(v[3], "v 0 0 3 0.5 0.5 0.5");
    assert_eq!(lines.iter().filter(|l| l.starts_with("vn ")).count(), 4);
    let f: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("f ")).collect();
    assert_eq!(
        f,
        vec!["f 1//1 3//3 2//2", "f 1//1 2//2 4//4", "f 1//1 4//4 3//3", "f 2//2 3//3 4//4"]
    );
    gen_scene::export::obj::mesh_to_obj(&TriMesh::default(), dir.join("e.obj")).unwrap();
    let e = std::fs::read_to_string(dir.join("e.obj")).unwrap();
    assert!(e.lines().all(|l| l.starts_with('#')));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn parse_glb_reads_back_the_writer_and_refuses_broken_containers() {
    let bytes = mesh_glb_bytes(&tetrahedron()).unwrap();
    let (doc, bin) = parse_glb(&bytes, "m.glb").unwrap();
    assert_eq!(open_glb(&bytes), (doc, bin));

    let broken = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        parse_glb(&b, "m.glb").unwrap_err().to_string()
    };
    let e = broken(&|b| b[0] = b'x');
    assert!(e.starts_with("m.glb: ") && e.contains("magic"), "{e}");
    let e = broken(&|b| b.truncate(b.len() - 4));
    assert!(e.contains("header length"), "{e}");
    // Four extra bytes after the BIN chunk, with the header length covering them.
    let e = broken(&|b| {
        b.extend_from_slice(&[0; 4]);
        let n = b.len() as u32;
        b[8..12].copy_from_slice(&n.to_le_bytes());
    });
    assert!(e.contains("trailing"), "{e}");
    // A BIN chunk length running past the end of the file.
    let e = broken(&|b| {
        let o = 20 + u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        let n = u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) + 8;
        b[o..o + 4].copy_from_slice(&n.to_le_bytes());
    });
    assert!(e.contains("GLB"), "{e}");
}
