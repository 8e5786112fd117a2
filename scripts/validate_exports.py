"""Checks the sample exports of `export_sample` with standard Python readers.

- .ply: read with `plyfile` (pinned in validate_exports.sh); checks the binary little-endian
  format, the standard 3DGS property order and count (17 at SH degree 0, 62 at degree 3),
  float32 types, zero normals and finite values.
- .glb (splats): parsed here with struct/numpy and compared with the .ply written from the same
  splats: POSITION = xyz, SCALE = exp(scale_i), OPACITY = sigmoid(opacity),
  ROTATION = normalised (rot_1, rot_2, rot_3, rot_0), SH_DEGREE_l_COEF_j = f_dc / f_rest
  (channel-major) coefficient l*l + j.
- mesh .obj vs mesh .glb: same vertex positions; the .obj vertex colours equal the sRGB
  encoding of the linear glTF COLOR_0.
- .gif / .png: opened with Pillow: frame count, loop flag, size.

Usage: python validate_exports.py OUT_DIR   (exit status 1 on any failure)
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from plyfile import PlyData, PlyElement

failures = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg)
    if not cond:
        failures.append(msg)


def read_glb(path):
    b = path.read_bytes()
    magic, version, total = struct.unpack_from("<4sII", b, 0)
    assert magic == b"glTF" and version == 2 and total == len(b)
    jl, jt = struct.unpack_from("<I4s", b, 12)
    doc = json.loads(b[20 : 20 + jl])
    bl, bt = struct.unpack_from("<I4s", b, 20 + jl)
    assert jt == b"JSON" and bt == b"BIN\0"
    binary = b[28 + jl : 28 + jl + bl]
    comps = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}

    def accessor(i):
        a = doc["accessors"][i]
        v = doc["bufferViews"][a["bufferView"]]
        n = comps[a["type"]]
        arr = np.frombuffer(binary, dtype="<f4", count=a["count"] * n, offset=v["byteOffset"])
        return arr.reshape(a["count"], n)

    return doc, accessor


def standard_names(degree):
    rest = 3 * ((degree + 1) ** 2 - 1)
    return (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )


def check_splats(out, degree):
    ply = PlyData.read(str(out / f"splats_d{degree}.ply"))
    check(not ply.text and ply.byte_order == "<", f"d{degree}.ply is binary little-endian")
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    want = standard_names(degree)
    check(names == want, f"d{degree}.ply property order ({len(names)} properties, want {len(want)})")
    check(all(v.data.dtype[n] == np.dtype("<f4") for n in names), f"d{degree}.ply all float32")
    col = {n: np.asarray(v[n], dtype=np.float64) for n in names}
    check(all(np.isfinite(c).all() for c in col.values()), f"d{degree}.ply finite")
    check(all((col[n] == 0).all() for n in ("nx", "ny", "nz")), f"d{degree}.ply zero normals")
    n = len(v.data)

    doc, acc = read_glb(out / f"splats_d{degree}.glb")
    prim = doc["meshes"][0]["primitives"][0]
    at = prim["attributes"]
    ext = "KHR_gaussian_splatting"
    check(prim["mode"] == 0 and ext in doc.get("extensionsUsed", []), f"d{degree}.glb POINTS + extensionsUsed")
    pos = acc(at["POSITION"])
    xyz = np.stack([col["x"], col["y"], col["z"]], 1)
    check(np.array_equal(pos, xyz.astype(np.float32)), f"d{degree}.glb POSITION == ply xyz")
    a = doc["accessors"][at["POSITION"]]
    check(np.allclose(a["min"], xyz.min(0)) and np.allclose(a["max"], xyz.max(0)), f"d{degree}.glb POSITION min/max")
    scale = np.exp(np.stack([col[f"scale_{i}"] for i in range(3)], 1))
    check(np.allclose(acc(at[f"{ext}:SCALE"]), scale, rtol=1e-5), f"d{degree}.glb SCALE == exp(scale_i)")
    opac = 1 / (1 + np.exp(-col["opacity"]))
    check(np.allclose(acc(at[f"{ext}:OPACITY"])[:, 0], opac, atol=1e-6), f"d{degree}.glb OPACITY == sigmoid")
    q = np.stack([col["rot_1"], col["rot_2"], col["rot_3"], col["rot_0"]], 1)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    check(np.allclose(acc(at[f"{ext}:ROTATION"]), q, atol=1e-6), f"d{degree}.glb ROTATION == normalised xyzw")
    k = (degree + 1) ** 2
    sh = np.zeros((n, k, 3))
    for c in range(3):
        sh[:, 0, c] = col[f"f_dc_{c}"]
        for kk in range(1, k):
            sh[:, kk, c] = col[f"f_rest_{c * (k - 1) + kk - 1}"]
    ok = True
    for l in range(degree + 1):
        for j in range(2 * l + 1):
            ok &= np.array_equal(acc(at[f"{ext}:SH_DEGREE_{l}_COEF_{j}"]), sh[:, l * l + j].astype(np.float32))
    check(ok and len([s for s in at if "SH_DEGREE" in s]) == k, f"d{degree}.glb SH coefficients == ply f_dc/f_rest")


def check_mesh(out):
    doc, acc = read_glb(out / "mesh.glb")
    at = doc["meshes"][0]["primitives"][0]["attributes"]
    pos, col = acc(at["POSITION"]), acc(at["COLOR_0"])
    vs = np.array(
        [[float(x) for x in l.split()[1:]] for l in (out / "mesh.obj").read_text().splitlines() if l.startswith("v ")]
    )
    check(vs.shape == (len(pos), 6), f"mesh.obj has {len(vs)} coloured vertices, glb {len(pos)}")
    check(np.allclose(vs[:, :3], pos, atol=1e-6), "mesh.obj positions == mesh.glb POSITION")
    lin = np.where(vs[:, 3:] <= 0.04045, vs[:, 3:] / 12.92, ((vs[:, 3:] + 0.055) / 1.055) ** 2.4)
    check(np.allclose(lin, col, atol=1e-5), "mesh.glb COLOR_0 == linear(obj colours)")
    nrm = acc(at["NORMAL"])
    check(np.allclose(np.linalg.norm(nrm, axis=1), 1, atol=1e-5), "mesh.glb unit normals")


def check_images(out):
    gif = Image.open(out / "turntable.gif")
    check(gif.format == "GIF" and gif.n_frames == 12, f"turntable.gif: {gif.n_frames} frames")
    check(gif.info.get("loop") == 0, f"turntable.gif loops forever (loop={gif.info.get('loop')})")
    check(gif.size == (96, 96), f"turntable.gif size {gif.size}")
    sheet = Image.open(out / "turntable.png")
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB"), dtype=np.int32))
    # Compare GIF frames with the lossless contact sheet (4 columns, 2-pixel gaps).
    s = np.asarray(sheet.convert("RGB"), dtype=np.int32)
    worst = 0
    for i, f in enumerate(frames):
        r, c = divmod(i, 4)
        tile = s[2 + r * 98 : 2 + r * 98 + 96, 2 + c * 98 : 2 + c * 98 + 96]
        worst = max(worst, float(np.abs(tile - f).mean()))
    check(worst < 20, f"GIF frames match the contact sheet (worst mean abs diff {worst:.2f} / 255)")


def write_foreign(ply_path, json_path):
    """A 3DGS file as another tool might write it, plus the values it holds (JSON)."""
    rng = np.random.default_rng(7)
    n, degree = 50, 1
    names = standard_names(degree)
    rng.shuffle(names)
    types = {nm: ("f8" if nm in ("x", "opacity", "rot_2") else "f4") for nm in names}
    dtype = [(nm, types[nm]) for nm in names] + [("red", "u1"), ("confidence", "i2")]
    data = np.zeros(n, dtype=dtype)
    for nm in names:
        data[nm] = rng.normal(size=n)
    data["red"] = 200
    data["confidence"] = -3
    cam = np.zeros(1, dtype=[("fx", "f4"), ("fy", "f4")])
    PlyData(
        [PlyElement.describe(cam, "camera"), PlyElement.describe(data, "vertex")],
        byte_order="<",
        comments=["written by plyfile for gen-scene's importer check"],
    ).write(str(ply_path))
    f = lambda nm: data[nm].astype(np.float32).astype(float).tolist()
    k = (degree + 1) ** 2
    sh = np.zeros((n, k, 3), dtype=np.float32)
    for c in range(3):
        sh[:, 0, c] = data[f"f_dc_{c}"]
        for kk in range(1, k):
            sh[:, kk, c] = data[f"f_rest_{c * (k - 1) + kk - 1}"]
    ref = {
        "means": np.stack([f("x"), f("y"), f("z")], 1).tolist(),
        "log_scales": np.stack([f(f"scale_{i}") for i in range(3)], 1).tolist(),
        "quats": np.stack([f(f"rot_{i}") for i in range(4)], 1).tolist(),
        "opacity_logits": f("opacity"),
        "sh": sh.reshape(-1).astype(float).tolist(),
        "sh_degree": degree,
    }
    Path(json_path).write_text(json.dumps(ref))


def compare_import(ref_path, got_path):
    ref = json.loads(Path(ref_path).read_text())
    got = json.loads(Path(got_path).read_text())
    for key in ("means", "log_scales", "quats", "opacity_logits", "sh", "sh_degree"):
        a, b = np.asarray(ref[key], dtype=np.float64), np.asarray(got[key], dtype=np.float64)
        check(a.shape == b.shape and np.array_equal(a, b), f"import of plyfile-written file: {key} {b.shape} exact")
    print(f"{len(failures)} failure(s)")
    sys.exit(1 if failures else 0)


def main():
    if sys.argv[1] == "--write-foreign":
        write_foreign(sys.argv[2], sys.argv[3])
        return
    if sys.argv[1] == "--compare-import":
        compare_import(sys.argv[2], sys.argv[3])
        return
    out = Path(sys.argv[1])
    for d in (0, 3):
        check_splats(out, d)
    check_mesh(out)
    check_images(out)
    print(f"{len(failures)} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
