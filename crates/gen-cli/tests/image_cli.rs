//! The `gen image` command end to end on the tiny random pipeline `tests/fixtures/tiny-sd`:
//! files and metadata written, determinism, and bad input → non-zero exit, a clear message and
//! no output file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-sd").display().to_string()
}

fn gen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gen"))
        .args(args)
        .env_remove("GEN_MODEL")
        .output()
        .expect("gen binary runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-cli-image-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text_chunk(path: &Path, key: &str) -> String {
    let chunks = gen_sample::read_png_text(path).unwrap();
    chunks
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("{}: no `{key}` chunk", path.display()))
}

#[test]
fn image_writes_png_with_metadata_and_is_deterministic() {
    let dir = tmp("ok");
    let model = fixture();
    let out = dir.join("cube.png");
    let args = [
        "image",
        "a red cube",
        "--model",
        &model,
        "--size",
        "16x16",
        "--steps",
        "2",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--apg",
        "--eta",
        "0.3",
    ];
    let run = |o: &Path| {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--out", o.to_str().unwrap()]);
        let r = gen(&a);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        r
    };
    let r = run(&out);
    assert!(String::from_utf8_lossy(&r.stdout).contains("cube.png"));
    assert_eq!(text_chunk(&out, "prompt"), "a red cube");
    assert_eq!(text_chunk(&out, "seed"), "5");
    let params = text_chunk(&out, "parameters");
    assert!(params.contains("\"method\":\"apg\"") && params.contains("\"eta\":0.3"), "{params}");
    let again = dir.join("again.png");
    run(&again);
    let img = gen_core::imageio::load_image(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(img.dims(), &[3, 16, 16]);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&again).unwrap(),
        "same command, different bytes"
    );

    // A folder: images, grid and config.json.
    let folder = dir.join("run");
    let r = gen(&[
        "image",
        "a red cube",
        "a blue sphere",
        "--model",
        &model,
        "--size",
        "16",
        "--steps",
        "2",
        "--scheduler",
        "euler-a",
        "--out",
        folder.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for f in ["image-000.png", "image-001.png", "grid.png", "config.json"] {
        assert!(folder.join(f).is_file(), "{f} missing");
    }
    assert_eq!(text_chunk(&folder.join("image-001.png"), "prompt"), "a blue sphere");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let dir = tmp("bad");
    let model = fixture();
    let out = dir.join("out.png");
    let out_s = out.to_str().unwrap().to_string();
    let not_png = dir.join("not.png");
    std::fs::write(&not_png, b"text").unwrap();
    let np = not_png.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--size", "18x16"], "not a multiple of 4"),
        (vec!["--size", "16x"], "WxH"),
        (vec!["--steps", "0"], "steps"),
        (vec!["--scheduler", "pndm"], "known: ddim, ddpm, euler, euler-a, dpm++2m, dpm++2m-karras"),
        (vec!["--init-image", &np, "--strength", "0.5"], "cannot read init image"),
        (vec!["--init-image", &np, "--strength", "1.5"], "outside [0, 1]"),
        (vec!["--strength", "0.5"], "--init-image"),
        (vec!["--eta", "0.5"], "--apg"),
        (vec!["--apg", "--momentum", "1.5"], "momentum"),
        (vec!["--guidance-rescale", "2"], "--guidance-rescale"),
        (vec!["--guidance-rescale", "-0.5"], "outside [0, 1]"),
        (vec!["--dtype", "f64"], "f32, f16, bf16"),
        (vec!["--dtype", "bf16", "--device", "cpu"], "bf16 does not run on the CPU"),
    ];
    for (extra, needle) in cases {
        let mut a = vec!["image", "a red cube", "--model", &model, "--out", &out_s];
        a.extend(extra.iter().copied());
        for (flag, default) in [("--steps", "2"), ("--size", "16")] {
            if !extra.contains(&flag) {
                a.extend([flag, default]);
            }
        }
        let r = gen(&a);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{extra:?} succeeded");
        assert!(err.contains(needle), "{extra:?}: expected `{needle}` in `{err}`");
        assert!(!out.exists(), "{extra:?} wrote an output");
    }
    let r = gen(&[
        "image",
        "a red cube",
        "--model",
        &model,
        "--size",
        "16",
        "--steps",
        "2",
        "--out",
        dir.join("x.jpg").to_str().unwrap(),
    ]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains(".jpg"));
    let r = gen(&["image", "x", "--model", dir.join("nothing").to_str().unwrap(), "--out", &out_s]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("nothing"));
    // Only the two files this test made.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_lists_every_flag_with_examples() {
    let r = gen(&["image", "--help"]);
    assert!(r.status.success());
    let help = String::from_utf8_lossy(&r.stdout);
    for flag in [
        "--negative-prompt",
        "--apg",
        "--eta",
        "--norm-threshold",
        "--momentum",
        "--guidance-scale",
        "--guidance-rescale",
        "--guidance-interval",
        "--scheduler",
        "--steps",
        "--seed",
        "--size",
        "--num-images",
        "--model",
        "--offline",
        "--dtype",
        "--device",
        "--init-image",
        "--strength",
        "--lora",
        "--out",
        "Examples:",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn gen_model_environment_variable_names_the_default_model() {
    let dir = tmp("env");
    let out = dir.join("env.png");
    let r = Command::new(env!("CARGO_BIN_EXE_gen"))
        .args([
            "image",
            "a red cube",
            "--size",
            "16",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
        ])
        .env("GEN_MODEL", fixture())
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(text_chunk(&out, "model"), fixture());
    let missing = dir.join("no-model");
    let r = Command::new(env!("CARGO_BIN_EXE_gen"))
        .args(["image", "a red cube", "--out", dir.join("x.png").to_str().unwrap()])
        .env("GEN_MODEL", &missing)
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("no-model"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--lora FILE[:SCALE]`: a LoRA file changes the image, scale 0 leaves it as without LoRA,
/// the file and scale are recorded in the settings, and a missing or mismatched file fails
/// before anything is written.
#[test]
fn lora_flag_changes_the_image_and_is_recorded() {
    let dir = tmp("lora");
    let model = fixture();
    let lora = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/lora/ours_kohya.safetensors");
    let lora = lora.to_str().unwrap().to_string();
    let run = |name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name);
        let mut a = vec![
            "image",
            "a red cube",
            "--model",
            &model,
            "--size",
            "16x16",
            "--steps",
            "2",
            "--seed",
            "3",
            "--device",
            "cpu",
        ];
        a.extend_from_slice(extra);
        a.extend(["--out", out.to_str().unwrap()]);
        let r = gen(&a);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        out
    };
    let img = |p: &Path| {
        let t = gen_core::imageio::load_image(p, &candle_core::Device::Cpu).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let plain = img(&run("plain.png", &[]));
    let with = run("lora.png", &["--lora", &format!("{lora}:1.5")]);
    let zero = img(&run("zero.png", &["--lora", &format!("{lora}:0")]));
    assert_ne!(img(&with), plain, "LoRA at scale 1.5 did not change the image");
    assert_eq!(zero, plain, "LoRA at scale 0 changed the image");
    let params = text_chunk(&with, "parameters");
    assert!(params.contains("ours_kohya.safetensors") && params.contains("1.5"), "{params}");

    let missing = dir.join("missing.png");
    let r = gen(&[
        "image",
        "a red cube",
        "--model",
        &model,
        "--size",
        "16x16",
        "--steps",
        "2",
        "--lora",
        "/no/such/lora.safetensors",
        "--out",
        missing.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("/no/such/lora.safetensors"));
    assert!(!missing.exists());
    // A file that is not a LoRA for this model (the UNet weights themselves).
    let wrong = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors");
    let r = gen(&[
        "image",
        "a red cube",
        "--model",
        &model,
        "--size",
        "16x16",
        "--steps",
        "2",
        "--lora",
        wrong.to_str().unwrap(),
        "--out",
        missing.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("diffusion_pytorch_model.safetensors"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!missing.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An image's bytes do not depend on `--batch-size` (generation is batch-invariant and the PNG
/// metadata leaves the batch size out; config.json keeps it).
#[test]
fn png_bytes_do_not_depend_on_the_batch_size() {
    let dir = tmp("batch");
    let model = fixture();
    let run = |batch: &str| -> PathBuf {
        let folder = dir.join(format!("b{batch}"));
        let r = gen(&[
            "image",
            "a red cube",
            "--model",
            &model,
            "--size",
            "16",
            "--steps",
            "2",
            "--num-images",
            "3",
            "--batch-size",
            batch,
            "--out",
            folder.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        folder
    };
    let (one, three) = (run("1"), run("3"));
    for f in ["image-000.png", "image-001.png", "image-002.png", "grid.png"] {
        assert_eq!(
            std::fs::read(one.join(f)).unwrap(),
            std::fs::read(three.join(f)).unwrap(),
            "{f}: bytes differ between --batch-size 1 and 3"
        );
    }
    let config = std::fs::read_to_string(three.join("config.json")).unwrap();
    assert!(config.contains("\"batch_size\": 3"), "{config}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Warnings reach stderr as plain lines when stderr is not a terminal (the progress bar is
/// hidden then, and its `println` would print nothing). The embedded model's word-level
/// tokenizer does not know "teapot".
#[test]
fn warnings_reach_stderr_without_a_terminal() {
    let dir = tmp("warn");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../weights/tiny-shapes");
    let out = dir.join("teapot.png");
    let r = gen(&[
        "image",
        "a purple teapot",
        "--model",
        model.to_str().unwrap(),
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("warning:") && err.contains("does not know \"teapot\""), "stderr: {err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run whose outputs cannot all be written leaves none of them (nor temporary files): here
/// the grid's name is taken by a folder.
#[test]
fn an_unwritable_output_leaves_no_files() {
    let dir = tmp("partial");
    let model = fixture();
    let folder = dir.join("o");
    std::fs::create_dir_all(folder.join("grid.png")).unwrap();
    let r = gen(&[
        "image",
        "a red cube",
        "--model",
        &model,
        "--size",
        "16",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--out",
        folder.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("grid.png") && err.contains("folder"), "{err}");
    let left: Vec<_> =
        std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("grid.png")], "files left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A PNG with a header that says `w`×`h` pixels and no image data, so only a reader of the
/// header gets anywhere with it.
fn png_header_only(path: &Path, w: u32, h: u32) {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    // IHDR, then an empty IDAT and IEND: readers stop at the first IDAT for the header
    for chunk in [ihdr, b"IDAT".to_vec(), b"IEND".to_vec()] {
        png.extend((chunk.len() as u32 - 4).to_be_bytes());
        png.extend(&chunk);
        png.extend(crc32(&chunk).to_be_bytes());
    }
    std::fs::write(path, png).unwrap();
}

/// Sizes and counts that cannot fit in memory are refused from the estimate, before anything
/// is allocated: exit 1 (not an abort), the flag and the estimate in the message, no output
/// file, and in seconds.
#[test]
fn oversized_requests_fail_from_the_memory_estimate() {
    let dir = tmp("oversized");
    let model = fixture();
    let out = dir.join("out.png");
    let out_s = out.to_str().unwrap().to_string();
    let init = dir.join("big.png");
    png_header_only(&init, 4096, 4096);
    let header = gen_sample::InitImage { path: init.clone(), strength: 0.8 };
    assert_eq!(header.dimensions().unwrap(), (4096, 4096), "the test PNG's header is readable");
    let init_s = init.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--size", "100000"], "--size 100000x100000"),
        (vec!["--size", "16", "--num-images", "1000000000"], "--num-images 1000000000"),
        (vec!["--init-image", &init_s], "--init-image"),
    ];
    for (extra, needle) in cases {
        let mut a = vec!["image", "a red cube", "--model", &model, "--out", &out_s, "--steps", "2"];
        a.extend(extra.iter().copied());
        let t0 = std::time::Instant::now();
        let r = gen(&a);
        let secs = t0.elapsed().as_secs_f64();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: expected `{needle}` in `{err}`");
        assert!(err.contains("needs about") && err.contains("estimate:"), "{extra:?}: {err}");
        assert!(
            err.contains("available (MemAvailable)") || err.contains("sanity cap"),
            "{extra:?}: {err}"
        );
        assert!(!err.contains("memory allocation") && !err.contains("panicked"), "{err}");
        assert!(secs < 60.0, "{extra:?} took {secs:.1} s");
        assert!(!out.exists(), "{extra:?} wrote an output");
    }
    // only the test's init image is in the folder
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Negative numbers reach the flags for which they are legal (CFG with w < 0 steers away from
/// the prompt) and give a range error naming the flag where they are not, never clap's
/// "unexpected argument".
#[test]
fn negative_values_are_legal_or_a_range_error_naming_the_flag() {
    let dir = tmp("negative");
    let model = fixture();
    for (i, extra) in [
        vec!["--guidance-scale", "-1"],
        vec!["--guidance-scale=-1"],
        vec!["--apg", "--guidance-scale", "-2", "--eta", "-0.5", "--momentum", "-0.5"],
    ]
    .iter()
    .enumerate()
    {
        let out = dir.join(format!("neg{i}.png"));
        let mut a = vec!["image", "a red cube", "--model", &model, "--size", "16", "--steps", "2"];
        a.extend(extra.iter().copied());
        a.extend(["--out", out.to_str().unwrap()]);
        let r = gen(&a);
        assert!(r.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&r.stderr));
        assert!(out.is_file());
    }
    let out = dir.join("bad.png");
    let out_s = out.to_str().unwrap().to_string();
    for (extra, flag, range) in [
        (vec!["--steps", "-3"], "--steps", "at least 1"),
        (vec!["--num-images", "-2"], "--num-images", "at least 1"),
        (vec!["--batch-size", "-1"], "--batch-size", "at least 1"),
        (vec!["--size", "-64"], "--size", "out of range"),
        (vec!["--seed", "-1"], "--seed", "must be >= 0"),
        (vec!["--apg", "--norm-threshold", "-6"], "--norm-threshold", "must be >= 0"),
        (vec!["--apg", "--momentum", "-1.5"], "--momentum", "outside (-1, 1)"),
        (vec!["--ddim-eta", "-0.5", "--scheduler", "ddim"], "--ddim-eta", "must be >= 0"),
    ] {
        let mut a = vec!["image", "a red cube", "--model", &model, "--out", &out_s];
        a.extend(extra.iter().copied());
        let r = gen(&a);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{extra:?} succeeded");
        assert!(err.contains(flag) && err.contains(range), "{extra:?}: {err}");
        assert!(!err.contains("unexpected argument"), "{extra:?}: {err}");
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A LoRA whose keys name layers the model lacks: the error speaks CLI (the flag, the file, a
/// key) and does not point at library types.
#[test]
fn lora_with_unknown_keys_names_the_flag_file_and_key() {
    let dir = tmp("lora-keys");
    let path = dir.join("other-model.safetensors");
    let dev = candle_core::Device::Cpu;
    let t =
        |shape: (usize, usize)| candle_core::Tensor::zeros(shape, candle_core::DType::F32, &dev);
    let tensors = std::collections::HashMap::from([
        ("lora_unet_no_such_block_proj.lora_down.weight".to_string(), t((2, 8)).unwrap()),
        ("lora_unet_no_such_block_proj.lora_up.weight".to_string(), t((8, 2)).unwrap()),
    ]);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let out = dir.join("out.png");
    let r = gen(&[
        "image",
        "a red cube",
        "--model",
        &fixture(),
        "--size",
        "16",
        "--steps",
        "1",
        "--lora",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("--lora") && err.contains("other-model.safetensors"), "{err}");
    assert!(
        err.contains("lora_unet_no_such_block_proj") && err.contains("match no layer"),
        "{err}"
    );
    assert!(!err.contains("UnknownKeys") && !err.contains("::"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
