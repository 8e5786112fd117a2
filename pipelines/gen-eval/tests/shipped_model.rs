//! The shipped model `weights/tiny-shapes` end to end: `gen image`'s default settings on a few
//! prompts (one per shape, varied colours, views and backgrounds; full captions and the shorter
//! forms users write) produce images that the separately trained evaluator classifies as the
//! prompt's shape and colour.
//!
//! This is the "a new user gets a recognisable red cube" check. The images are
//! deterministic (fixed seeds, CPU), so the test either always passes or always fails for a
//! given set of weights.

use std::path::Path;

use candle_core::Device;
use gen_eval::session::EvalSession;
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_sample::{generate, SampleConfig};
use gen_world::metrics::Target;

#[test]
fn default_settings_draw_the_prompted_shape_and_colour() -> anyhow::Result<()> {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../weights/tiny-shapes");
    let dev = Device::Cpu;
    let pipe = SdPipeline::load(&ModelSource::Local(model.clone()), &LoadOptions::default())?;
    let session = EvalSession::load(&model, None, &dev)?;
    // Full captions (the world's) and, as the UNet also trained on captions with the
    // background and/or view clause dropped, shorter ones — first the example.
    let prompts = [
        "a red cube, front view",
        "a red cube on a grey background, front view",
        "a blue sphere on a white background, side view",
        "a yellow cylinder on a grey background, front view",
        "a green cone on a blue background, back view",
        "a purple torus on a white background, overhead view",
        "a dark blue sphere, side view",
        "an orange cylinder on a white background",
        "a light green torus",
    ];
    let mut wrong = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let cfg = SampleConfig::new(*prompt).seed(i as u64);
        let images = generate(&pipe, &cfg, &mut |_| {})?;
        let (pred, _, _) = session.score(&images)?;
        let target = Target::from_prompt(prompt, None)?;
        let p = pred[0];
        let colour_ok = target.parts.colour.is_none_or(|c| c == p.colour);
        if p.shape != target.parts.shape || !colour_ok {
            wrong.push(format!("{prompt:?} (seed {i}) → {:?} {:?}", p.colour, p.shape));
        }
    }
    assert!(wrong.is_empty(), "misdrawn: {}", wrong.join("; "));
    Ok(())
}
