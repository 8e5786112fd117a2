//! `gen eval images` and `gen eval guidance` end to end on the shipped model weights/tiny-shapes
//! with tiny settings (2 prompts, 1 image each, 4 steps): the files exist, parse, and every value
//! is in its range (the model is retrained from time to time, so no value is pinned); resuming a
//! sweep reuses its rows; bad input fails with a clear message, a non-zero exit and no output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../weights/tiny-shapes").display().to_string()
}

fn gen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gen"))
        .args(args)
        .env_remove("GEN_MODEL")
        .output()
        .expect("gen binary runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gen-cli-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ok(r: &Output) {
    assert!(
        r.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
}

fn rows(path: &Path) -> Vec<BTreeMap<String, String>> {
    gen_eval::session::parse_csv(&std::fs::read_to_string(path).unwrap(), path).unwrap()
}

fn value(row: &BTreeMap<String, String>, k: &str) -> f64 {
    row[k].parse::<f64>().unwrap_or_else(|_| panic!("{k} = {:?} is not a number", row[k]))
}

/// Every metric of a row in its range.
fn check_ranges(row: &BTreeMap<String, String>, images: f64) {
    for k in [
        "shape_accuracy",
        "colour_accuracy",
        "hue_accuracy",
        "tone_accuracy",
        "background_accuracy",
        "view_accuracy",
        "real_shape_accuracy",
        "real_colour_accuracy",
    ] {
        let v = value(row, k);
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    // accuracies over `images` images are multiples of 1/images
    let s = value(row, "shape_accuracy") * images;
    assert!((s - s.round()).abs() < 1e-9, "shape accuracy × {images} = {s}");
    for k in ["clipped_fraction", "clipped_fraction_real", "saturation_real"] {
        let v = value(row, k);
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    if !row["saturation_excess"].is_empty() {
        let (e, g, r) = (
            value(row, "saturation_excess"),
            value(row, "saturation_generated"),
            value(row, "saturation_real"),
        );
        assert!((e - (g - r)).abs() < 1e-12 && (-1.0..=1.0).contains(&e), "{e} {g} {r}");
    }
    let (fid, base) = (value(row, "tiny_fid"), value(row, "tiny_fid_real_baseline"));
    assert!(fid.is_finite() && fid > -1e-6 && base.is_finite() && base > -1e-6, "{fid} {base}");
    assert_eq!(value(row, "images"), images);
    assert_eq!(value(row, "fid_size"), images);
    let t = value(row, "seconds_per_image");
    assert!(t > 0.0 && t < 60.0, "{t}");
}

#[test]
fn eval_images_writes_report_csv_and_grid() {
    let dir = tmp("images");
    let out = dir.join("run");
    let m = model();
    let args = [
        "eval",
        "images",
        "--model",
        &m,
        "--prompts",
        "2",
        "--per-prompt",
        "1",
        "--steps",
        "4",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ];
    let r = gen(&args);
    ok(&r);
    let stdout = String::from_utf8_lossy(&r.stdout);
    for word in [
        "shape accuracy",
        "tiny-FID",
        "real vs real",
        "saturation excess",
        "clipped fraction",
        "seconds per image",
    ] {
        assert!(stdout.contains(word), "table lacks {word}:\n{stdout}");
    }
    let csv = rows(&out.join("metrics.csv"));
    assert_eq!(csv.len(), 1);
    check_ranges(&csv[0], 2.0);
    assert_eq!(csv[0]["method"], "cfg");
    assert_eq!(csv[0]["steps"], "4");
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    for key in ["\"prompts\"", "\"test_indices\"", "\"metrics\"", "\"tiny_fid\"", " background, "] {
        assert!(report.contains(key), "report.json lacks {key}:\n{report}");
    }
    let grid =
        gen_core::imageio::load_image(out.join("samples.png"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(grid.dims(), &[3, 64, 2 * 64 + 2]);

    // Same command, same numbers (except the timing).
    let again = dir.join("again");
    let mut a2 = args.to_vec();
    *a2.last_mut().unwrap() = again.to_str().unwrap();
    ok(&gen(&a2));
    let csv2 = rows(&again.join("metrics.csv"));
    for k in
        ["shape_accuracy", "colour_accuracy", "tiny_fid", "saturation_excess", "clipped_fraction"]
    {
        assert_eq!(csv[0][k], csv2[0][k], "{k} differs between identical runs");
    }
    assert_eq!(
        std::fs::read(out.join("samples.png")).unwrap(),
        std::fs::read(again.join("samples.png")).unwrap()
    );

    // Short prompts: "a red cube"; shape and colour scored, background and view not.
    let short = dir.join("short");
    let mut a3 = args.to_vec();
    *a3.last_mut().unwrap() = short.to_str().unwrap();
    a3.extend(["--prompt-form", "short"]);
    ok(&gen(&a3));
    let csv3 = rows(&short.join("metrics.csv"));
    assert_eq!(csv3[0]["prompt_form"], "short");
    assert!(csv3[0]["shape_accuracy"].parse::<f64>().is_ok());
    assert_eq!(csv3[0]["background_accuracy"], "");
    assert_eq!(csv3[0]["view_accuracy"], "");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(short.join("report.json")).unwrap()).unwrap();
    for p in report["prompts"].as_array().unwrap() {
        let p = p.as_str().unwrap();
        assert!(!p.contains("background") && !p.contains("view") && p.starts_with("a"), "{p}");
    }

    // APG without --norm-threshold: the paper preset's r = 15 scaled to the model's 4×16×16
    // latents as `gen image` does, 15·sqrt(1024 / 65536) = 1.875; with it, r as given
    // (`--apg` is `gen image`'s spelling of `--guidance apg`).
    for (extra, r) in
        [(&["--guidance", "apg"][..], "1.875"), (&["--apg", "--norm-threshold", "3"][..], "3")]
    {
        let apg = dir.join(format!("apg-{r}"));
        let mut a4 = args.to_vec();
        *a4.last_mut().unwrap() = apg.to_str().unwrap();
        a4.extend(extra);
        ok(&gen(&a4));
        let csv4 = rows(&apg.join("metrics.csv"));
        assert_eq!((csv4[0]["method"].as_str(), csv4[0]["apg_r"].as_str()), ("apg", r));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_guidance_sweeps_and_resumes() {
    let dir = tmp("guidance");
    let out = dir.join("sweep");
    let m = model();
    let o = out.to_str().unwrap().to_string();
    let base = [
        "eval",
        "guidance",
        "--model",
        &m,
        "--prompts",
        "2",
        "--steps",
        "2",
        // the old name of --norm-threshold, kept as a hidden alias
        "--apg-r",
        "2",
        "--device",
        "cpu",
        "--out",
        &o,
    ];
    let mut args = base.to_vec();
    args.extend(["--method", "cfg,apg", "--scales", "1,5"]);
    let r = gen(&args);
    ok(&r);
    let csv = rows(&out.join("guidance.csv"));
    assert_eq!(csv.len(), 4);
    for row in &csv {
        check_ranges(row, 2.0);
    }
    assert_eq!(
        csv.iter().map(|r| (r["method"].as_str(), r["scale"].as_str())).collect::<Vec<_>>(),
        [("cfg", "1"), ("cfg", "5"), ("apg", "1"), ("apg", "5")]
    );
    assert_eq!(csv[2]["apg_r"], "2");
    // w = 1: CFG and APG both reduce to the conditional prediction → the same images.
    for k in ["shape_accuracy", "tiny_fid", "clipped_fraction"] {
        assert_eq!(csv[0][k], csv[2][k], "{k}: CFG and APG at w = 1 differ");
    }
    let png =
        gen_core::imageio::load_image(out.join("guidance.png"), &candle_core::Device::Cpu).unwrap();
    assert!(png.dim(2).unwrap() >= 600 && png.dim(1).unwrap() >= 400, "{:?}", png.dims());
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(stdout.contains("guidance") && stdout.contains("APG eta=0 r=2 beta=-0.5"), "{stdout}");

    // Resume: the 4 rows are reused, one new row is added.
    let mut args = base.to_vec();
    args.extend(["--method", "cfg,apg", "--scales", "1,5,7.5"]);
    let r = gen(&args);
    ok(&r);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(stderr.matches("(reused)").count(), 4, "{stderr}");
    let csv2 = rows(&out.join("guidance.csv"));
    assert_eq!(csv2.len(), 6);
    assert_eq!(csv2[..4], csv[..]);

    // Another variant into the same folder: APG in the second half of the steps only. Its row
    // is added and the table (and chart) show all 7 rows of this model, prompts and seed.
    let mut args = base.to_vec();
    args.extend(["--method", "apg", "--scales", "5", "--guidance-interval", "0.5,1"]);
    let r = gen(&args);
    ok(&r);
    let csv3 = rows(&out.join("guidance.csv"));
    assert_eq!(csv3.len(), 7);
    assert_eq!(csv3[6]["interval"], "steps:0.5,1");
    assert_eq!(csv3[6]["method"], "apg");
    assert!(csv3[..6].iter().all(|r| r["interval"].is_empty()));
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("CFG") || l.starts_with("APG")).count(),
        7,
        "{stdout}"
    );
    assert!(stdout.contains("APG eta=0 r=2 beta=-0.5 in steps:0.5,1"), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let dir = tmp("bad");
    let out = dir.join("out");
    let o = out.to_str().unwrap().to_string();
    let m = model();
    let missing = dir.join("no-such-model").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["eval", "images", "--model", &missing, "--prompts", "2", "--out", &o],
            "is not a folder",
        ),
        (
            vec!["eval", "images", "--model", &m, "--guidance", "pag", "--out", &o],
            "--guidance: invalid guidance: unknown method `pag`; known: cfg, apg",
        ),
        (
            vec!["eval", "images", "--model", &m, "--guidance-scale", "nan", "--out", &o],
            "--guidance-scale",
        ),
        // a negative scale is legal (as in `gen image`); the run then fails on --prompts 1
        (
            vec!["eval", "images", "--model", &m, "--scale", "-3", "--prompts", "1", "--out", &o],
            "at least 2 generated images",
        ),
        (
            vec![
                "eval",
                "images",
                "--model",
                &m,
                "--guidance-scale=-3",
                "--prompts",
                "1",
                "--out",
                &o,
            ],
            "at least 2 generated images",
        ),
        (
            vec![
                "eval",
                "images",
                "--model",
                &m,
                "--guidance",
                "apg",
                "--norm-threshold",
                "-6",
                "--out",
                &o,
            ],
            "must be >= 0",
        ),
        (vec!["eval", "images", "--model", &m, "--steps", "-3", "--out", &o], "at least 1"),
        (vec!["eval", "images", "--model", &m, "--batch-size", "-8", "--out", &o], "--batch-size"),
        (vec!["eval", "images", "--model", &m, "--batch", "0", "--out", &o], "at least 1"),
        (
            vec![
                "eval",
                "images",
                "--model",
                &m,
                "--prompts",
                "100000000",
                "--per-prompt",
                "100",
                "--out",
                &o,
            ],
            "--prompts 100000000 × --per-prompt 100",
        ),
        (
            vec!["eval", "images", "--model", &m, "--prompts", "1", "--out", &o],
            "at least 2 generated images",
        ),
        (
            vec![
                "eval",
                "images",
                "--model",
                &m,
                "--guidance",
                "apg",
                "--apg-momentum",
                "1.5",
                "--out",
                &o,
            ],
            "momentum",
        ),
        (vec!["eval", "images", "--model", &m, "--steps", "0", "--out", &o], "steps"),
        (
            vec!["eval", "images", "--model", &m, "--apg-r", "2", "--out", &o],
            "--norm-threshold only apply to APG",
        ),
        (
            vec![
                "eval",
                "guidance",
                "--model",
                &m,
                "--method",
                "cfg",
                "--apg-eta",
                "1",
                "--out",
                &o,
            ],
            "--eta only apply to APG",
        ),
        (vec!["eval", "guidance", "--model", &m, "--scales", "", "--out", &o], "empty"),
        (
            vec!["eval", "guidance", "--model", &m, "--guidance-interval", "0.8,0.2", "--out", &o],
            "guidance interval",
        ),
        (
            vec!["eval", "images", "--model", &m, "--prompt-form", "tiny", "--out", &o],
            "unknown form `tiny`",
        ),
        (
            vec!["eval", "guidance", "--model", &m, "--scales", "1,nan", "--out", &o],
            "guidance scale",
        ),
        (
            vec!["eval", "guidance", "--model", &m, "--method", "cfg,foo", "--out", &o],
            "unknown method `foo`",
        ),
        (vec!["eval", "guidance", "--model", &missing, "--out", &o], "is not a folder"),
    ];
    for (args, expect) in cases {
        let r = gen(&args);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expect), "{args:?}: expected {expect:?} in:\n{stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
        assert!(!stderr.contains("unexpected argument"), "{args:?}:\n{stderr}");
        // 1: our error, 2: clap's (a value out of range); never an abort
        assert!(matches!(r.status.code(), Some(1 | 2)), "{args:?}: {:?}\n{stderr}", r.status);
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    // An evaluator folder that is not there.
    let r = gen(&["eval", "images", "--model", &m, "--evaluator", &missing, "--out", &o]);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("no-such-model/config.json"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    // --help carries examples on both subcommands.
    for sub in ["images", "guidance"] {
        let r = gen(&["eval", sub, "--help"]);
        ok(&r);
        let help = String::from_utf8_lossy(&r.stdout);
        assert!(
            help.contains("Examples:")
                && help.contains(&format!("gen eval {sub}"))
                && help.contains("real-vs-real"),
            "{help}"
        );
        // `gen image`'s names; the old ones are hidden aliases
        for flag in
            ["--eta", "--norm-threshold", "--momentum", "--batch-size", "--guidance-interval"]
        {
            assert!(help.contains(flag), "gen eval {sub} --help lacks {flag}");
        }
        for old in ["--apg-r", "--apg-eta", "--apg-momentum", "--batch <", "--scale <"] {
            assert!(!help.contains(old), "gen eval {sub} --help shows {old}");
        }
    }
    let r = gen(&["eval", "images", "--help"]);
    let help = String::from_utf8_lossy(&r.stdout);
    assert!(help.contains("--guidance-scale") && help.contains("--apg"), "{help}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `gen eval model`: VAE PSNR and evaluator accuracy on real test images, written to model.json.
#[test]
fn eval_model_reports_vae_psnr_and_evaluator_accuracy() {
    let out = tmp("model");
    let r = gen(&[
        "eval",
        "model",
        "--model",
        &model(),
        "--images",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&r);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    let psnr = doc["vae_psnr_db"].as_f64().unwrap();
    assert!((5.0..80.0).contains(&psnr), "PSNR {psnr}");
    for k in ["shape", "hue", "tone", "colour", "view", "background"] {
        let v = doc["evaluator"][k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert_eq!(doc["evaluator"]["n"].as_u64(), Some(4));
    assert!(String::from_utf8_lossy(&r.stdout).contains("VAE reconstruction PSNR"));
    // bad input: no images, a missing model folder
    let r = gen(&["eval", "model", "--model", &model(), "--images", "0"]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("--images"));
    let r = gen(&["eval", "model", "--model", "/nonexistent/model"]);
    assert!(
        !r.status.success() && String::from_utf8_lossy(&r.stderr).contains("/nonexistent/model")
    );
    let _ = std::fs::remove_dir_all(&out);
}
