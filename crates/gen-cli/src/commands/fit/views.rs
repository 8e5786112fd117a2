//! The views `gen fit` fits: renders of a gen-world object on the documented orbit schedule, or
//! a transforms.json folder split into training and held-out frames.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use gen_scene::fit::dataset::{
    camera_from_extrinsics, load_transforms, mean_camera_distance, split_holdout,
};
use gen_scene::fit::PosedImage;
use gen_scene::Intrinsics;
use gen_world::{parse_caption, Background, Colour, Hue, Scene, Tone, World, WorldConfig};

use super::FitArgs;

/// Training and held-out views plus the background.
pub(super) struct Views {
    pub(super) train: Vec<PosedImage>,
    pub(super) heldout: Vec<PosedImage>,
    pub(super) background: [f64; 3],
    pub(super) init_radius: f64,
    pub(super) label: String,
}

fn world_scene(args: &FitArgs) -> anyhow::Result<(gen_world::Shape, Colour, Background)> {
    let text = match (&args.world, &args.shape) {
        (Some(w), _) => w.clone(),
        (None, Some(s)) => {
            let mut t = format!("a {} {s}", args.colour.as_deref().unwrap_or(""));
            if let Some(b) = &args.background {
                t.push_str(&format!(" on a {b} background"));
            }
            t
        }
        _ => unreachable!("checked by the caller"),
    };
    let parts = parse_caption(&text).with_context(|| format!("--world/--shape {text:?}"))?;
    Ok((
        parts.shape,
        parts.colour.unwrap_or(Colour::new(Hue::Red, Tone::Plain)),
        parts.background.unwrap_or(Background::White),
    ))
}

pub(super) fn world_views(args: &FitArgs) -> anyhow::Result<Views> {
    let (shape, colour, background) = world_scene(args)?;
    let world = World::new(WorldConfig { image_size: args.size, ..WorldConfig::default() })?;
    let view = |az: f32, el: f32| -> anyhow::Result<PosedImage> {
        let scene = Scene { shape, colour, background, azimuth_deg: az, elevation_deg: el };
        let img = world.render(&scene);
        let cam = world.camera(az, el);
        let r = cam.rotation().to_cols_array_2d(); // columns of R
        let rows = [0, 1, 2].map(|i| [0, 1, 2].map(|j| r[j][i] as f64));
        let t = cam.world_to_camera().w_axis;
        let f = cam.focal_px() as f64;
        let (w, h) = (img.width as usize, img.height as usize);
        let k = Intrinsics {
            fx: f,
            fy: f,
            cx: 0.5 * w as f64,
            cy: 0.5 * h as f64,
            width: w,
            height: h,
        };
        let camera = camera_from_extrinsics(k, rows, [t.x as f64, t.y as f64, t.z as f64])?;
        Ok(PosedImage {
            camera,
            rgb: Tensor::from_vec(img.rgb, (h, w, 3), &Device::Cpu)?,
            mask: Some(Tensor::from_vec(img.mask, (h, w), &Device::Cpu)?),
        })
    };
    let n = args.views as usize;
    let train = (0..n)
        .map(|i| view(360.0 * i as f32 / n as f32, [-5.0, 10.0, 25.0, 40.0, 55.0][i % 5]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let m = args.holdout as usize;
    let heldout = (0..m)
        .map(|j| view(360.0 * (j as f32 + 0.37) / m.max(1) as f32 + 7.0, [5.0, 30.0, 50.0][j % 3]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bg = background.srgb();
    Ok(Views {
        train,
        heldout,
        background: bg.map(|v| v as f64),
        init_radius: args.init_radius.unwrap_or(1.0),
        label: format!("{} {} on {}", colour.name(), shape.name(), background.name()),
    })
}

fn parse_bg(s: &str) -> anyhow::Result<[f64; 3]> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--bg {s:?}: want R,G,B numbers in [0, 1]"))?;
    match v.as_slice() {
        [r, g, b] if v.iter().all(|x| (0.0..=1.0).contains(x)) => Ok([*r, *g, *b]),
        _ => bail!("--bg {s:?}: want three numbers in [0, 1] like 1,1,1"),
    }
}

pub(super) fn data_views(args: &FitArgs, dir: &PathBuf) -> anyhow::Result<Views> {
    let background = parse_bg(&args.bg)?;
    let all = load_transforms(dir, background)?;
    let (train, heldout) = split_holdout(all, args.holdout as usize);
    let mean_dist = mean_camera_distance(&train);
    Ok(Views {
        train,
        heldout,
        background,
        init_radius: args.init_radius.unwrap_or(mean_dist / 3.0),
        label: dir.display().to_string(),
    })
}
