//! The subcommands of `gen`.

use clap::{Parser, Subcommand};

pub mod dataset;
pub mod eval;
pub mod fit;
pub mod image;
pub mod train;

/// gen: diffusion sampling with guidance, score distillation to 3D, reward fine-tuning and a
/// tiny embedded Stable Diffusion trained on a procedural shapes world.
#[derive(Debug, Parser)]
#[command(
    name = "gen",
    version,
    after_help = "Examples:\n  gen dataset --split test --count 64 --out out/test64\n  gen eval images --out out/eval\n  gen dataset --help"
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
