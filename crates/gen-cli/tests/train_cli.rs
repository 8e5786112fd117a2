//! `gen train` end to end on the tiny preset: a background run (stderr not a terminal) logs
//! plain lines, and a second invocation resumes instead of starting over.

use std::process::Command;

#[test]
fn train_logs_plain_lines_without_a_terminal_and_resumes() {
    let out = std::env::temp_dir().join(format!("gen-train-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--preset",
            "tiny",
            "--stages",
            "evaluator",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_gen")).args(&args).output().expect("gen runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let first = run(&["--stop-after", "20"]);
    assert!(first.contains("from step 0 of 30"), "{first}");
    assert!(first.contains("evaluator: checkpoint at step 20"), "{first}");
    assert!(!first.contains("checkpoint at step 30"), "stopped early: {first}");
    let second = run(&[]);
    assert!(second.contains("from step 20 of 30"), "resumed: {second}");
    assert!(second.contains("evaluator 30/30 loss"), "{second}");
    let _ = std::fs::remove_dir_all(&out);
}
