//! The 3DGS `.ply` layout that splat viewers and trainers read and write.
//!
//! `binary_little_endian 1.0`, one element `vertex` with float properties in the order
//! `x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 … f_rest_{3((d+1)²−1)−1} opacity scale_0
//! scale_1 scale_2 rot_0 rot_1 rot_2 rot_3`: pre-activation values (opacity logit, log scale,
//! unnormalised quaternion with `rot_0 = w`), `f_rest` channel-major (all red coefficients
//! 1..K, then green, then blue), zero normals. 14 properties at SH degree 0, 62 at degree 3.
//!
//! The reader takes the property order from the header, accepts extra properties (of any
//! scalar type) and extra elements before or after `vertex` (scalar properties only before
//! it), and reports malformed or truncated input as an error naming the header line, the
//! property or the vertex.

use std::path::Path;

use candle_core::Device;
use gen_core::{write_atomic, Error, Result};

use super::SplatArrays;
use crate::splat::Splats;

/// Property names of the standard layout for SH degree `degree`, in file order.
pub fn property_names(degree: usize) -> Vec<String> {
    let rest = 3 * ((degree + 1) * (degree + 1) - 1);
    let mut names: Vec<String> = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    names.extend((0..rest).map(|i| format!("f_rest_{i}")));
    names.extend(
        ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
            .iter()
            .map(|s| s.to_string()),
    );
    names
}

/// Encodes `arrays` as a 3DGS `.ply` (header and binary body).
pub fn ply_bytes(arrays: &SplatArrays) -> Result<Vec<u8>> {
    arrays.check_finite()?;
    let names = property_names(arrays.sh_degree);
    let n = arrays.len();
    let k = arrays.sh_coeffs();
    let mut out = String::new();
    out.push_str("ply\nformat binary_little_endian 1.0\n");
    out.push_str("comment written by gen-scene (3D Gaussian splats)\n");
    out.push_str(&format!("element vertex {n}\n"));
    for name in &names {
        out.push_str(&format!("property float {name}\n"));
    }
    out.push_str("end_header\n");
    let mut bytes = out.into_bytes();
    bytes.reserve(n * names.len() * 4);
    let mut row: Vec<f32> = Vec::with_capacity(names.len());
    for i in 0..n {
        row.clear();
        row.extend_from_slice(&arrays.means[i]);
        row.extend_from_slice(&[0.0; 3]);
        row.extend((0..3).map(|c| arrays.sh_at(i, 0, c)));
        for c in 0..3 {
            row.extend((1..k).map(|kk| arrays.sh_at(i, kk, c)));
        }
        row.push(arrays.opacity_logits[i]);
        row.extend_from_slice(&arrays.log_scales[i]);
        row.extend_from_slice(&arrays.quats[i]);
        debug_assert_eq!(row.len(), names.len());
        for v in &row {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(bytes)
}

/// Writes `splats` to `path` as a 3DGS `.ply` (atomically). f64 splats are stored as f32.
pub fn write_ply(splats: &Splats, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let arrays = SplatArrays::from_splats(splats)
        .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    write_atomic(path, &ply_bytes(&arrays)?)
}

/// Reads a 3DGS `.ply` into f32 splats on `device`.
pub fn read_ply(path: impl AsRef<Path>, device: &Device) -> Result<Splats> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let arrays = parse_ply(&bytes, &path.display().to_string())?;
    arrays.to_splats(device)
}

/// Scalar property types of the PLY format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScalarType {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
}

impl ScalarType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "char" | "int8" => Self::I8,
            "uchar" | "uint8" => Self::U8,
            "short" | "int16" => Self::I16,
            "ushort" | "uint16" => Self::U16,
            "int" | "int32" => Self::I32,
            "uint" | "uint32" => Self::U32,
            "float" | "float32" => Self::F32,
            "double" | "float64" => Self::F64,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Self::I8 | Self::U8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::F64 => 8,
        }
    }

    /// Reads a little-endian value from `b` (exactly `size()` bytes) as f64.
    fn read(self, b: &[u8]) -> f64 {
        match self {
            Self::I8 => b[0] as i8 as f64,
            Self::U8 => b[0] as f64,
            Self::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            Self::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
            Self::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Self::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Self::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Self::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        }
    }
}

#[derive(Debug)]
struct Property {
    name: String,
    ty: ScalarType,
    offset: usize,
}

#[derive(Debug)]
struct Element {
    name: String,
    count: usize,
    props: Vec<Property>,
    /// Bytes per record; `None` when the element has list properties.
    stride: Option<usize>,
}

/// Parses a 3DGS `.ply` from memory; `name` (usually the path) prefixes every error.
pub fn parse_ply(bytes: &[u8], name: &str) -> Result<SplatArrays> {
    let err = |msg: String| Error::msg(format!("{name}: {msg}"));
    // Header: ASCII lines up to and including "end_header\n".
    let marker = b"end_header";
    let mut pos = 0usize;
    let mut lines: Vec<(usize, String)> = Vec::new();
    let mut body_start = None;
    let mut line_no = 0usize;
    while pos < bytes.len() {
        let end = bytes[pos..].iter().position(|&b| b == b'\n').map(|e| pos + e);
        let Some(end) = end else { break };
        line_no += 1;
        let raw = &bytes[pos..end];
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|_| {
            err(format!("header line {line_no} is not ASCII text (missing or damaged end_header?)"))
        })?;
        pos = end + 1;
        if raw == marker {
            body_start = Some(pos);
            break;
        }
        lines.push((line_no, text.to_string()));
        if line_no > 10_000 {
            return Err(err("header has more than 10000 lines without end_header".into()));
        }
    }
    let body_start = body_start.ok_or_else(|| {
        err(format!(
            "no `end_header` line found (file of {} bytes is not a complete PLY)",
            bytes.len()
        ))
    })?;
    let mut it = lines.iter();
    match it.next() {
        Some((_, l)) if l.trim() == "ply" => {}
        _ => return Err(err("line 1: not a PLY file (first line must be `ply`)".into())),
    }
    let mut format_seen = false;
    let mut elements: Vec<Element> = Vec::new();
    for (no, line) in it {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().copied() {
            None | Some("comment") | Some("obj_info") => {}
            Some("format") => {
                if words.len() != 3 {
                    return Err(err(format!("line {no}: malformed format line `{line}`")));
                }
                if words[1] != "binary_little_endian" {
                    return Err(err(format!(
                        "line {no}: format `{}` is not supported (only binary_little_endian)",
                        words[1]
                    )));
                }
                if words[2] != "1.0" {
                    return Err(err(format!("line {no}: PLY version `{}` is not 1.0", words[2])));
                }
                format_seen = true;
            }
            Some("element") => {
                if words.len() != 3 {
                    return Err(err(format!("line {no}: malformed element line `{line}`")));
                }
                let count: usize = words[2].parse().map_err(|_| {
                    err(format!(
                        "line {no}: element `{}` count `{}` is not a number",
                        words[1], words[2]
                    ))
                })?;
                elements.push(Element {
                    name: words[1].to_string(),
                    count,
                    props: Vec::new(),
                    stride: Some(0),
                });
            }
            Some("property") => {
                let el = elements
                    .last_mut()
                    .ok_or_else(|| err(format!("line {no}: property before any element")))?;
                if words.get(1) == Some(&"list") {
                    if words.len() != 5 {
                        return Err(err(format!("line {no}: malformed list property `{line}`")));
                    }
                    el.stride = None;
                    continue;
                }
                if words.len() != 3 {
                    return Err(err(format!("line {no}: malformed property line `{line}`")));
                }
                let ty = ScalarType::parse(words[1]).ok_or_else(|| {
                    err(format!(
                        "line {no}: property `{}` has unknown type `{}`",
                        words[2], words[1]
                    ))
                })?;
                if el.props.iter().any(|p| p.name == words[2]) {
                    return Err(err(format!(
                        "line {no}: property `{}` of element `{}` is declared twice",
                        words[2], el.name
                    )));
                }
                let offset = el.stride.unwrap_or(0);
                el.props.push(Property { name: words[2].to_string(), ty, offset });
                if let Some(s) = el.stride.as_mut() {
                    *s += ty.size();
                }
            }
            Some(other) => {
                return Err(err(format!("line {no}: unknown header keyword `{other}`")));
            }
        }
    }
    if !format_seen {
        return Err(err("header has no `format` line".into()));
    }
    // Skip elements before `vertex` (they must have fixed-size records).
    let mut offset = body_start;
    let mut vertex = None;
    for el in &elements {
        if el.name == "vertex" {
            vertex = Some(el);
            break;
        }
        let stride = el.stride.ok_or_else(|| {
            err(format!(
                "element `{}` before `vertex` has list properties; cannot skip it",
                el.name
            ))
        })?;
        offset = stride
            .checked_mul(el.count)
            .and_then(|s| s.checked_add(offset))
            .ok_or_else(|| err(format!("element `{}` size overflows", el.name)))?;
    }
    let vertex = vertex.ok_or_else(|| err("header declares no `vertex` element".into()))?;
    let stride = vertex.stride.ok_or_else(|| {
        err("element `vertex` has list properties (not a 3DGS splat file)".into())
    })?;
    let find = |pname: &str| -> Result<&Property> {
        vertex
            .props
            .iter()
            .find(|p| p.name == pname)
            .ok_or_else(|| err(format!("element `vertex` lacks property `{pname}`")))
    };
    let n_rest = vertex.props.iter().filter(|p| p.name.starts_with("f_rest_")).count();
    let degree = match n_rest {
        0 => 0,
        9 => 1,
        24 => 2,
        45 => 3,
        other => {
            return Err(err(format!(
                "{other} f_rest_* properties; expected 0, 9, 24 or 45 (SH degree 0..3)"
            )))
        }
    };
    let k = (degree + 1) * (degree + 1);
    let pos_p = [find("x")?, find("y")?, find("z")?];
    let dc_p = [find("f_dc_0")?, find("f_dc_1")?, find("f_dc_2")?];
    let rest_p: Vec<&Property> =
        (0..n_rest).map(|i| find(&format!("f_rest_{i}"))).collect::<Result<_>>()?;
    let op_p = find("opacity")?;
    let sc_p = [find("scale_0")?, find("scale_1")?, find("scale_2")?];
    let rot_p = [find("rot_0")?, find("rot_1")?, find("rot_2")?, find("rot_3")?];

    let n = vertex.count;
    let need = stride.checked_mul(n).and_then(|s| s.checked_add(offset));
    let have = bytes.len();
    match need {
        Some(need) if need <= have => {}
        _ => {
            let complete = have.saturating_sub(offset) / stride.max(1);
            return Err(err(format!(
                "truncated: element `vertex` declares {n} records of {stride} bytes but the \
                 data ends inside record {complete} ({} bytes after the header)",
                have.saturating_sub(body_start)
            )));
        }
    }
    let mut arrays = SplatArrays {
        means: Vec::with_capacity(n),
        log_scales: Vec::with_capacity(n),
        quats: Vec::with_capacity(n),
        opacity_logits: Vec::with_capacity(n),
        sh: vec![0.0; n * k * 3],
        sh_degree: degree,
    };
    for i in 0..n {
        let rec = &bytes[offset + i * stride..offset + (i + 1) * stride];
        let get = |p: &Property| -> Result<f32> {
            let v = p.ty.read(&rec[p.offset..p.offset + p.ty.size()]) as f32;
            if !v.is_finite() {
                return Err(err(format!("vertex {i}: property `{}` is not finite ({v})", p.name)));
            }
            Ok(v)
        };
        arrays.means.push([get(pos_p[0])?, get(pos_p[1])?, get(pos_p[2])?]);
        arrays.log_scales.push([get(sc_p[0])?, get(sc_p[1])?, get(sc_p[2])?]);
        arrays.quats.push([get(rot_p[0])?, get(rot_p[1])?, get(rot_p[2])?, get(rot_p[3])?]);
        arrays.opacity_logits.push(get(op_p)?);
        for c in 0..3 {
            arrays.sh[(i * k) * 3 + c] = get(dc_p[c])?;
            for kk in 1..k {
                arrays.sh[(i * k + kk) * 3 + c] = get(rest_p[c * (k - 1) + kk - 1])?;
            }
        }
    }
    arrays.check_finite().map_err(|e| err(e.to_string()))?;
    Ok(arrays)
}
