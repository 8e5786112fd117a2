//! What `gen fit` shows and writes besides the library's outputs: the progress bar, the clocks,
//! OUT/metrics.json, the closing lines and OUT/heldout.png.

use std::time::Instant;

use candle_core::Tensor;
use gen_scene::fit::{EvalReport, PosedImage};
use indicatif::{ProgressBar, ProgressStyle};

/// Process CPU time (user + system, all threads) from /proc/self/stat, in seconds.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the full line (utime, stime) are 11 and 12 after the command name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The progress bar, the clocks and the running PSNR of a fit.
pub(super) struct Progress {
    pub(super) bar: ProgressBar,
    t0: Instant,
    c0: Option<f64>,
    psnr_avg: Option<f64>,
}

impl Progress {
    pub(super) fn start(steps: u64) -> Self {
        let bar = ProgressBar::new(steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} steps ({elapsed}, eta {eta}) {msg}")
                .expect("valid template"),
        );
        Self { bar, t0: Instant::now(), c0: cpu_seconds(), psnr_avg: None }
    }

    /// Moves the bar to `step`; returns the running average of the steps' PSNR.
    pub(super) fn step(&mut self, step: u64, psnr: f64) -> f64 {
        let p = self.psnr_avg.map_or(psnr, |a| 0.95 * a + 0.05 * psnr);
        self.psnr_avg = Some(p);
        self.bar.set_position(step);
        p
    }

    pub(super) fn exported(&self, path: &std::path::Path) {
        crate::progress::say(&self.bar, format!("wrote {}", path.display()))
    }

    pub(super) fn optimizer(&self, state_bytes: usize) {
        crate::progress::say(
            &self.bar,
            format!("optimizer state {:.2} MB", state_bytes as f64 / 1e6),
        )
    }

    /// Clears the bar; returns the wall and CPU seconds since [`Progress::start`].
    pub(super) fn finish(self) -> (f64, Option<f64>) {
        self.bar.finish_and_clear();
        let wall = self.t0.elapsed().as_secs_f64();
        let cpu = match (self.c0, cpu_seconds()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        (wall, cpu)
    }
}

/// What a finished fit reports: OUT/metrics.json and the closing lines.
pub(super) struct Summary {
    steps: u64,
    wall: f64,
    cpu: Option<f64>,
    heldout_views: usize,
    report: Option<EvalReport>,
}

impl Summary {
    /// `times`: wall and CPU seconds of the fit; `evaluate` scores the held-out views (not
    /// called when there are none).
    pub(super) fn new(
        steps: u64,
        (wall, cpu): (f64, Option<f64>),
        heldout: &[PosedImage],
        evaluate: impl FnOnce(&[PosedImage]) -> gen_core::Result<EvalReport>,
    ) -> anyhow::Result<Self> {
        let report = if heldout.is_empty() { None } else { Some(evaluate(heldout)?) };
        Ok(Self { steps, wall, cpu, heldout_views: heldout.len(), report })
    }

    /// OUT/metrics.json: the `head` entries, the held-out metrics, the `tail` entries, the times.
    pub(super) fn write_metrics(
        &self,
        out: &std::path::Path,
        head: &[(&str, String)],
        tail: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let r = self.report.as_ref();
        let list = |v: Vec<String>| format!("[{}]", v.join(", "));
        let mut entries = head.to_vec();
        entries.extend([
            ("heldout_views", self.heldout_views.to_string()),
            ("heldout_psnr_db", r.map_or("null".into(), |r| format!("{:.4}", r.psnr))),
            ("heldout_iou", r.and_then(|r| r.iou).map_or("null".into(), |v| format!("{v:.5}"))),
            (
                "per_view_psnr_db",
                list(r.map_or(vec![], |r| {
                    r.per_view_psnr.iter().map(|v| format!("{v:.3}")).collect()
                })),
            ),
            (
                "per_view_iou",
                list(r.map_or(vec![], |r| {
                    r.per_view_iou
                        .iter()
                        .map(|v| v.map_or("null".into(), |x| format!("{x:.4}")))
                        .collect()
                })),
            ),
        ]);
        entries.extend_from_slice(tail);
        entries.push(("wall_seconds", format!("{:.3}", self.wall)));
        entries.push(("cpu_seconds", self.cpu.map_or("null".into(), |c| format!("{c:.2}"))));
        let lines: Vec<String> = entries.iter().map(|(k, v)| format!("  \"{k}\": {v}")).collect();
        let text = format!("{{\n{}\n}}\n", lines.join(",\n"));
        gen_core::write_atomic(out.join("metrics.json"), text.as_bytes())?;
        Ok(())
    }

    /// `done: N steps{extra}, wall and CPU time`, the held-out metrics and the output folder.
    pub(super) fn print(&self, out: &std::path::Path, extra: &str) {
        println!(
            "done: {} steps{extra}, {:.1} s wall{}",
            self.steps,
            self.wall,
            self.cpu.map_or(String::new(), |c| format!(", {c:.1} s CPU"))
        );
        if let Some(r) = &self.report {
            println!(
                "held-out ({} views): PSNR {:.2} dB, silhouette IoU {}",
                self.heldout_views,
                r.psnr,
                r.iou.map_or("n/a (no masks)".into(), |v| format!("{v:.4}"))
            );
        }
        println!("outputs in {}", out.display());
    }
}

/// Held-out targets above renders, written to OUT/heldout.png.
pub(super) fn write_heldout_sheet(
    out: &std::path::Path,
    heldout: &[PosedImage],
    render: &dyn Fn(&PosedImage) -> anyhow::Result<Tensor>,
) -> anyhow::Result<()> {
    if heldout.is_empty() {
        return Ok(());
    }
    let mut rows = Vec::new();
    for v in heldout {
        rows.push(Tensor::cat(&[&v.rgb, &render(v)?], 0)?);
    }
    let img = gen_scene::fit::to_rgb8(&Tensor::cat(&rows, 1)?)?;
    gen_core::write_atomic(out.join("heldout.png"), &gen_scene::turntable::png_bytes(&img)?)?;
    Ok(())
}
