//! The subcommands of `gen`.

use clap::{Parser, Subcommand};

pub mod dataset;
pub mod eval;
pub mod fit;
pub mod flags;
pub mod image;
pub mod train;

/// gen: Stable-Diffusion-family text-to-image and image-to-image with CFG/APG guidance,
/// Gaussian-splat and neural-field fitting to posed images, and a tiny embedded Stable
/// Diffusion trained on a procedural shapes world (train it, measure it).
#[derive(Debug, Parser)]
#[command(
    name = "gen",
    version,
    after_help = "Examples:\n  gen image \"a red cube, front view\" --out cube.png\n  gen fit --world \"a green cone\" --out out/cone\n  gen dataset --split test --count 64 --out out/test64\n  gen eval images --out out/eval\n  gen image --help"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Render samples of the procedural shapes world (images, masks, captions, ground truth).
    Dataset(dataset::DatasetArgs),
    /// Measure the model on the shapes world's test prompts: accuracy, tiny-FID, saturation, speed.
    Eval(Box<eval::EvalArgs>),
    /// Fit Gaussian splats to posed images (a world object or a transforms.json folder).
    Fit(Box<fit::FitArgs>),
    /// Generate images from a prompt (or an image and a prompt) with CFG or APG guidance.
    Image(Box<image::ImageArgs>),
    /// Train the embedded tiny Stable Diffusion and its evaluator on the shapes world (resumable).
    Train(Box<train::TrainArgs>),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dataset(args) => dataset::run(args),
        Command::Eval(args) => eval::run(*args),
        Command::Fit(args) => fit::run(*args),
        Command::Image(args) => image::run(*args),
        Command::Train(args) => train::run(*args),
    }
}
