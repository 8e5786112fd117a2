//! Generate an image with adaptive projected guidance through the library API.
//!
//! `cargo run --release -p gen-examples --example apg -- MODEL_DIR_OR_HUB_ID "a red cube" out.png`
//! (try `tests/fixtures/tiny-sd`, a random-weight model, for a quick run).

use gen_diffusion::ApgConfig;
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_sample::{generate, save_outputs, SampleConfig, Sampler};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "weights/tiny-shapes".into());
    let prompt = args.next().unwrap_or_else(|| "a red cube on a blue floor".into());
    let out = args.next().unwrap_or_else(|| "apg.png".into());

    let pipe = SdPipeline::load(&ModelSource::parse(&model)?, &LoadOptions::default())?;
    // Paper settings: eta 0, norm threshold 15, momentum -0.5, in x0 space.
    let cfg = SampleConfig::new(prompt)
        .apg(ApgConfig::paper(7.5))
        .sampler(Sampler::DpmPp2m)
        .steps(25)
        .seed(1);
    let images = generate(&pipe, &cfg, &mut |_| {})?;
    let saved = save_outputs(out.as_ref(), &images, &cfg.resolve(&pipe)?)?;
    println!("wrote {}", saved.images[0].display());
    Ok(())
}
