//! 3DGS `.ply` export and import: exact round trips, the standard property order and byte
//! layout (decoded here independently of the reader), foreign files (other property order,
//! extra properties and elements, other scalar types) and bad input.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gen_core::SeededRng;
use gen_scene::export::ply::{parse_ply, read_ply, write_ply};
use gen_scene::splat::RandomSplatsConfig;
use gen_scene::Splats;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-scene-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn random_splats(n: usize, degree: usize, seed: u64) -> Splats {
    let cfg = RandomSplatsConfig { count: n, sh_degree: degree, ..Default::default() };
    Splats::random(&cfg, &mut SeededRng::new(seed), DType::F32, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_same(a: &Splats, b: &Splats) {
    assert_eq!(a.sh.dims(), b.sh.dims());
    for (x, y, name) in [
        (&a.means, &b.means, "means"),
        (&a.log_scales, &b.log_scales, "log_scales"),
        (&a.quats, &b.quats, "quats"),
        (&a.opacity_logits, &b.opacity_logits, "opacity"),
        (&a.sh, &b.sh, "sh"),
    ] {
        assert_eq!(x.dims(), y.dims(), "{name}");
        let (x, y) = (flat(x), flat(y));
        for (i, (u, v)) in x.iter().zip(&y).enumerate() {
            assert_eq!(u.to_bits(), v.to_bits(), "{name}[{i}]: {u} vs {v}");
        }
    }
}

/// Splits a PLY into header lines and body bytes (independent of the library's parser).
fn split_header(bytes: &[u8]) -> (Vec<String>, &[u8]) {
    let end = bytes.windows(11).position(|w| w == b"end_header\n").unwrap() + 11;
    let text = std::str::from_utf8(&bytes[..end]).unwrap();
    (text.lines().map(|s| s.to_string()).collect(), &bytes[end..])
}

#[test]
fn round_trip_is_exact_for_every_degree() {
    let dir = tmp_dir("ply-rt");
    for degree in 0..=3 {
        let s = random_splats(37, degree, 10 + degree as u64);
        let path = dir.join(format!("d{degree}.ply"));
        write_ply(&s, &path).unwrap();
        let back = read_ply(&path, &Device::Cpu).unwrap();
        assert_same(&s, &back);
    }
    // No temporary files left behind by the atomic writer.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 4, "{left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn header_has_the_standard_property_order() {
    let dir = tmp_dir("ply-hdr");
    let path = dir.join("d0.ply");
    write_ply(&random_splats(5, 0, 1), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (lines, body) = split_header(&bytes);
    assert_eq!(lines[0], "ply");
    assert_eq!(lines[1], "format binary_little_endian 1.0");
    assert!(lines.contains(&"element vertex 5".to_string()));
    let props: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("property float ")).collect();
    let want = [
        "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0",
        "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
    ];
    assert_eq!(props, want[..]);
    // 17 = 62 - 45 f_rest: the degree-3 count of 62 includes the normals, so degree 0 has
    // 17 properties (a count of 14 leaves out nx ny nz).
    assert_eq!(props.len(), 17);
    assert_eq!(body.len(), 5 * 17 * 4);

    write_ply(&random_splats(2, 3, 2), &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (lines, body) = split_header(&bytes);
    let props: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("property float ")).collect();
    assert_eq!(props.len(), 62);
    assert_eq!(props[9], "f_rest_0");
    assert_eq!(props[53], "f_rest_44");
    assert_eq!(
        &props[54..],
        &["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    );
    assert_eq!(body.len(), 2 * 62 * 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn body_layout_is_pre_activation_and_channel_major() {
    // One Gaussian at degree 1 with distinct, recognisable values.
    let dev = Device::Cpu;
    let sh: Vec<f32> = (0..12).map(|i| 100.0 + i as f32).collect(); // sh[k][c] = 100 + 3k + c
    let s = Splats {
        means: Tensor::new(&[[1.0f32, 2.0, 3.0]], &dev).unwrap(),
        log_scales: Tensor::new(&[[-1.0f32, -2.0, -3.0]], &dev).unwrap(),
        quats: Tensor::new(&[[0.5f32, 0.6, 0.7, 0.8]], &dev).unwrap(),
        opacity_logits: Tensor::new(&[0.25f32], &dev).unwrap(),
        sh: Tensor::from_vec(sh, (1, 4, 3), &dev).unwrap(),
    };
    let dir = tmp_dir("ply-layout");
    let path = dir.join("one.ply");
    write_ply(&s, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, body) = split_header(&bytes);
    let v: Vec<f32> =
        body.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    #[rustfmt::skip]
    let want = [
        1.0, 2.0, 3.0, 0.0, 0.0, 0.0, // position, zero normals
        100.0, 101.0, 102.0,           // f_dc (k = 0, RGB)
        103.0, 106.0, 109.0,           // f_rest red: k = 1, 2, 3
        104.0, 107.0, 110.0,           // green
        105.0, 108.0, 111.0,           // blue
        0.25, -1.0, -2.0, -3.0,        // opacity logit, log scales
        0.5, 0.6, 0.7, 0.8,            // rot_0 = w, then x y z (unnormalised)
    ];
    assert_eq!(v, want);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A PLY written by "someone else": shuffled property order, doubles and uchar colours, an
/// extra element before and one after `vertex`, CRLF header lines and comments.
#[test]
fn foreign_layouts_are_read_by_name() {
    let mut h = String::new();
    h.push_str("ply\r\nformat binary_little_endian 1.0\r\ncomment made by hand\r\n");
    h.push_str("element camera 1\r\nproperty float fx\r\nproperty float fy\r\n");
    h.push_str("element vertex 2\r\n");
    let order = [
        ("rot_3", "float"),
        ("x", "double"),
        ("red", "uchar"),
        ("scale_2", "float"),
        ("f_dc_1", "float"),
        ("y", "float"),
        ("opacity", "double"),
        ("z", "float"),
        ("rot_0", "float"),
        ("f_dc_0", "float"),
        ("scale_0", "float"),
        ("rot_1", "float"),
        ("f_dc_2", "float"),
        ("scale_1", "float"),
        ("rot_2", "float"),
        ("confidence", "short"),
    ];
    for (n, t) in order {
        h.push_str(&format!("property {t} {n}\r\n"));
    }
    h.push_str("element face 1\r\nproperty list uchar int vertex_indices\r\nend_header\n");
    let mut bytes = h.into_bytes();
    bytes.extend_from_slice(&7.0f32.to_le_bytes());
    bytes.extend_from_slice(&8.0f32.to_le_bytes());
    for i in 0..2 {
        let base = 10.0 * (i as f32 + 1.0);
        for (n, t) in order {
            // Value = base + a per-property code, so every field is recognisable.
            let code = match n {
                "x" => 1.0,
                "y" => 2.0,
                "z" => 3.0,
                "f_dc_0" => 4.0,
                "f_dc_1" => 5.0,
                "f_dc_2" => 6.0,
                "opacity" => 0.5,
                "scale_0" => -1.0,
                "scale_1" => -2.0,
                "scale_2" => -3.0,
                "rot_0" => 0.1,
                "rot_1" => 0.2,
                "rot_2" => 0.3,
                "rot_3" => 0.4,
                _ => 0.0,
            };
            let v = base + code;
            match t {
                "float" => bytes.extend_from_slice(&v.to_le_bytes()),
                "double" => bytes.extend_from_slice(&(v as f64).to_le_bytes()),
                "uchar" => bytes.push(200),
                "short" => bytes.extend_from_slice(&(-5i16).to_le_bytes()),
                _ => unreachable!(),
            }
        }
    }
    bytes.extend_from_slice(&[3, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0]);
    let a = parse_ply(&bytes, "hand.ply").unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(a.sh_degree, 0);
    assert_eq!(a.means[1], [21.0, 22.0, 23.0]);
    assert_eq!(a.log_scales[0], [9.0, 8.0, 7.0]);
    assert_eq!(a.quats[0], [10.1, 10.2, 10.3, 10.4]);
    assert_eq!(a.opacity_logits, vec![10.5, 20.5]);
    assert_eq!(&a.sh[3..6], &[24.0, 25.0, 26.0]);
}

#[test]
fn zero_gaussians_round_trip() {
    let dir = tmp_dir("ply-empty");
    let s = random_splats(0, 1, 3);
    let path = dir.join("empty.ply");
    write_ply(&s, &path).unwrap();
    let back = read_ply(&path, &Device::Cpu).unwrap();
    assert_eq!(back.len(), 0);
    assert_eq!(back.sh.dims(), &[0, 4, 3]);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn err_of(bytes: &[u8]) -> String {
    match parse_ply(bytes, "bad.ply") {
        Ok(_) => panic!("accepted a bad file"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_files_are_clear_errors() {
    let dir = tmp_dir("ply-bad");
    let path = dir.join("good.ply");
    write_ply(&random_splats(3, 1, 4), &path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let text_end = good.windows(11).position(|w| w == b"end_header\n").unwrap() + 11;
    let header = std::str::from_utf8(&good[..text_end]).unwrap().to_string();
    let body = &good[text_end..];

    assert!(err_of(b"").contains("end_header"));
    assert!(err_of(b"PK\x03\x04 not a ply\nend_header\n").contains("not a PLY"));
    let e = err_of(&good[..good.len() - 5]);
    assert!(e.contains("truncated") && e.contains("record 2"), "{e}");
    let e = err_of(&good[..text_end - 3]);
    assert!(e.contains("end_header"), "{e}");

    let edit = |from: &str, to: &str| {
        let mut b = header.replacen(from, to, 1).into_bytes();
        b.extend_from_slice(body);
        b
    };
    let e = err_of(&edit("binary_little_endian", "ascii"));
    assert!(e.contains("line 2") && e.contains("ascii"), "{e}");
    let e = err_of(&edit("binary_little_endian", "binary_big_endian"));
    assert!(e.contains("binary_big_endian"), "{e}");
    let e = err_of(&edit("property float opacity", "property float opacityy"));
    assert!(e.contains("`opacity`"), "{e}");
    let e = err_of(&edit("property float f_rest_8\n", ""));
    assert!(e.contains("8 f_rest"), "{e}");
    let e = err_of(&edit("property float x", "property float32x x"));
    assert!(e.contains("unknown type `float32x`"), "{e}");
    let e = err_of(&edit("element vertex 3", "element vertex three"));
    assert!(e.contains("line 4") && e.contains("three"), "{e}");
    let e = err_of(&edit("property float x", "property float x\nproperty float x"));
    assert!(e.contains("declared twice"), "{e}");
    let e = err_of(&edit("element vertex", "element points"));
    assert!(e.contains("no `vertex` element"), "{e}");
    let e = err_of(&edit("property float x", "property list uchar int x"));
    assert!(e.contains("list"), "{e}");

    // NaN inside the body: named by vertex and property.
    let mut nan = good.clone();
    let rest = 3 * 3;
    let props = 9 + rest + 8;
    let opacity_at = text_end + (props + 9 + rest) * 4; // vertex 1, property `opacity`
    nan[opacity_at..opacity_at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = err_of(&nan);
    assert!(e.contains("vertex 1") && e.contains("`opacity`"), "{e}");

    // Every truncation of a small file is an error, never a panic.
    for cut in 0..good.len() {
        assert!(parse_ply(&good[..cut], "cut.ply").is_err(), "accepted a file cut at {cut}");
    }
    // Missing file: I/O error naming the path.
    let e = read_ply(dir.join("missing.ply"), &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("missing.ply"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn non_finite_splats_are_refused_on_export() {
    let dir = tmp_dir("ply-nan");
    let mut s = random_splats(4, 0, 5);
    let mut m = flat(&s.log_scales);
    m[7] = f32::INFINITY; // Gaussian 2
    s.log_scales = Tensor::from_vec(m, (4, 3), &Device::Cpu).unwrap();
    let path = dir.join("nan.ply");
    let e = write_ply(&s, &path).unwrap_err().to_string();
    assert!(e.contains("log_scales") && e.contains("Gaussian 2") && e.contains("nan.ply"), "{e}");
    assert!(!path.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
