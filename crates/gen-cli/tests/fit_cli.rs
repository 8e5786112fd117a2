//! `gen fit` end to end on a tiny world fit: outputs, metrics, resume, and bad input.

use std::process::Command;

fn gen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gen")).args(args).output().expect("gen binary runs")
}

#[test]
fn fit_writes_outputs_metrics_and_resumes() {
    let dir = std::env::temp_dir().join(format!("gen-cli-fit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let args = [
        "fit",
        "--world",
        "a blue sphere on a grey background",
        "--views",
        "4",
        "--holdout",
        "2",
        "--size",
        "16",
        "--steps",
        "30",
        "--gaussians",
        "200",
        "--preview-every",
        "15",
        "--checkpoint-every",
        "10",
        "--export",
        "ply,glb",
        "--out",
        d,
    ];
    let out = gen(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("held-out (2 views): PSNR"), "{stdout}");
    for f in [
        "config.json",
        "metrics.json",
        "checkpoint.safetensors",
        "previews/step_000015.png",
        "previews/step_000030.png",
        "splats.ply",
        "splats.glb",
        "heldout.png",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(dir.join("metrics.json")).unwrap();
    let psnr: f64 = metrics
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"heldout_psnr_db\": "))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no PSNR in {metrics}"));
    assert!(psnr.is_finite() && psnr > 10.0, "{metrics}");
    assert!(
        metrics.contains("\"heldout_iou\": 0.") || metrics.contains("\"heldout_iou\": 1."),
        "{metrics}"
    );
    // Resuming a finished run takes no more steps and reports the same numbers.
    let mut resumed: Vec<&str> = args.to_vec();
    resumed.push("--resume");
    let again = gen(&resumed);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let held = |s: &str| s.lines().find(|l| l.starts_with("held-out")).map(str::to_string);
    assert_eq!(held(&stdout), held(&String::from_utf8_lossy(&again.stdout)));
    // Its checkpoint is refused for another object and for another configuration.
    let mut other: Vec<&str> = resumed.clone();
    other[2] = "a red cube on a grey background";
    let refused = gen(&other);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("other training data"), "{err}");
    let mut longer: Vec<&str> = resumed.clone();
    longer[10] = "60";
    let refused = gen(&longer);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("`steps` 30 in the checkpoint, 60 now"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_fit_arguments_fail_clearly() {
    let out = gen(&["fit", "--world", "a red blob", "--out", "/tmp/unused-gen-fit"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"blob\""));
    let out = gen(&["fit", "--out", "/tmp/unused-gen-fit"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--world"));
    let out = gen(&["fit", "--data", "/nonexistent-gen-fit", "--out", "/tmp/unused-gen-fit"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("transforms.json"));
    let out = gen(&["fit", "--shape", "cube", "--export", "stl", "--out", "/tmp/unused-gen-fit"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stl"));
    let out =
        gen(&["fit", "--shape", "cube", "--max-gaussians", "0", "--out", "/tmp/unused-gen-fit"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-gaussians"));
    assert!(!std::path::Path::new("/tmp/unused-gen-fit").exists());
}

/// Sizes and counts too large for the machine are refused before anything is rendered or
/// allocated (an error naming the flags and the estimate, no output folder); negative values
/// get a range error naming the flag, not clap's "unexpected argument".
#[test]
fn oversized_and_negative_fit_arguments_fail_clearly() {
    let out_dir = std::env::temp_dir().join(format!("gen-fit-bounds-{}", std::process::id()));
    let out_s = out_dir.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--gaussians", "100000000", "--max-gaussians", "100000000"], "--max-gaussians"),
        (
            vec!["--representation", "field", "--samples-per-ray", "100000000"],
            "--samples-per-ray 100000000",
        ),
        (vec!["--steps", "-5"], "--steps"),
        (vec!["--seed", "-1"], "--seed"),
        (vec!["--mask-weight", "-0.5"], "--mask-weight"),
        (vec!["--rays", "0"], "--rays"),
    ];
    for (extra, needle) in cases {
        let mut a = vec!["fit", "--world", "a red cube", "--out", &out_s];
        a.extend(extra.iter().copied());
        let t0 = std::time::Instant::now();
        let r = gen(&a);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{extra:?} succeeded");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("unexpected argument"), "{extra:?}: {err}");
        if needle.starts_with("--max") || needle.starts_with("--samples") {
            assert!(err.contains("needs about"), "{extra:?}: no estimate in {err}");
        }
        assert!(t0.elapsed().as_secs() < 30, "{extra:?} took {:?}", t0.elapsed());
        assert!(!out_dir.exists(), "{extra:?} left {}", out_dir.display());
    }
}
