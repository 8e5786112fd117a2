//! The world: its configuration, splits with fixed disjoint seed ranges, and deterministic
//! samples `World::sample(split, index)`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::camera::OrbitCamera;
use crate::caption::{caption, View};
use crate::palette::{Background, Colour, Hue, Tone};
use crate::render::{render, Lighting, RenderInput, Rendered};
use crate::shapes::Shape;
use gen_core::{Error, Result, SeededRng};

/// Number of indices (seeds) each split owns.
pub const SPLIT_SIZE: u64 = 1 << 40;

/// A dataset split. Each owns a fixed, disjoint range of [`SPLIT_SIZE`] seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }

    /// First seed of the split's range: train `[0, 2^40)`, validation `[2^40, 2^41)`,
    /// test `[2^41, 3·2^40)`.
    pub fn seed_base(self) -> u64 {
        match self {
            Split::Train => 0,
            Split::Validation => SPLIT_SIZE,
            Split::Test => 2 * SPLIT_SIZE,
        }
    }

    /// The seed of sample `index` of this split; an error when `index >= SPLIT_SIZE`.
    pub fn seed(self, index: u64) -> Result<u64> {
        if index >= SPLIT_SIZE {
            return Err(Error::invalid(
                "sample index",
                format!("{index} is out of range for split {self} (must be < 2^40)"),
            ));
        }
        Ok(self.seed_base() + index)
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Split> {
        Split::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
            Error::invalid(
                "split",
                format!("unknown split {s:?}; expected one of: train, validation, test"),
            )
        })
    }
}

/// Fixed parameters of the world. [`WorldConfig::default`] is the world the tiny model is
/// trained and evaluated on; change only the image size or supersampling for other uses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WorldConfig {
    /// Image width and height in pixels.
    pub image_size: u32,
    /// Subsamples per pixel along each axis (anti-aliasing).
    pub supersample: u32,
    /// Camera distance from the origin (world units).
    pub camera_distance: f32,
    /// Vertical field of view, degrees.
    pub fov_y_deg: f32,
    /// Elevation range sampled uniformly, degrees.
    pub elevation_min_deg: f32,
    pub elevation_max_deg: f32,
    pub lighting: Lighting,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            image_size: 64,
            supersample: 3,
            camera_distance: 4.0,
            fov_y_deg: 36.0,
            elevation_min_deg: -10.0,
            elevation_max_deg: 60.0,
            lighting: Lighting::default(),
        }
    }
}

/// Everything that determines an image: object, colours and camera angles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub shape: Shape,
    pub colour: Colour,
    pub background: Background,
    pub azimuth_deg: f32,
    pub elevation_deg: f32,
}

impl Scene {
    /// The DreamFusion view word of the camera angles.
    pub fn view(&self) -> View {
        View::from_angles(self.azimuth_deg, self.elevation_deg)
    }

    /// The caption: "a light blue torus on a grey background, side view".
    pub fn caption(&self) -> String {
        caption(self.shape, self.colour, self.background, self.view())
    }
}

/// One sample of a split: its scene (ground truth), caption and rendering.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub split: Split,
    pub index: u64,
    pub seed: u64,
    pub scene: Scene,
    pub caption: String,
    /// Image (sRGB f32 in [0, 1], `to_rgb8()` for u8) and per-pixel coverage mask.
    pub image: Rendered,
}

/// The procedural world ([`World::default`] uses [`WorldConfig::default`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct World {
    cfg: WorldConfig,
}

impl World {
    /// A world with `cfg`; errors name the bad field.
    pub fn new(cfg: WorldConfig) -> Result<Self> {
        let bad =
            |what: &str, msg: String| Err(Error::invalid(format!("world config `{what}`"), msg));
        if !(8..=1024).contains(&cfg.image_size) {
            return bad("image_size", format!("{} (must be in 8..=1024)", cfg.image_size));
        }
        if !(1..=8).contains(&cfg.supersample) {
            return bad("supersample", format!("{} (must be in 1..=8)", cfg.supersample));
        }
        if !cfg.camera_distance.is_finite() || cfg.camera_distance <= 1.5 {
            return bad(
                "camera_distance",
                format!("{} (must exceed 1.5: the object has radius ~1)", cfg.camera_distance),
            );
        }
        if !(cfg.fov_y_deg.is_finite() && cfg.fov_y_deg > 1.0 && cfg.fov_y_deg < 170.0) {
            return bad("fov_y_deg", format!("{} (must be in (1, 170))", cfg.fov_y_deg));
        }
        if !(cfg.elevation_min_deg <= cfg.elevation_max_deg
            && cfg.elevation_min_deg > -85.0
            && cfg.elevation_max_deg < 85.0)
        {
            return bad(
                "elevation range",
                format!(
                    "[{}, {}] (must be ordered, within (-85, 85))",
                    cfg.elevation_min_deg, cfg.elevation_max_deg
                ),
            );
        }
        if !(0.0..1.0).contains(&cfg.lighting.ambient) {
            return bad(
                "lighting.ambient",
                format!("{} (must be in [0, 1))", cfg.lighting.ambient),
            );
        }
        Ok(Self { cfg })
    }

    pub fn config(&self) -> &WorldConfig {
        &self.cfg
    }

    /// The world's camera at the given orbit angles (degrees).
    pub fn camera(&self, azimuth_deg: f32, elevation_deg: f32) -> OrbitCamera {
        OrbitCamera {
            azimuth_deg,
            elevation_deg,
            distance: self.cfg.camera_distance,
            fov_y_deg: self.cfg.fov_y_deg,
            width: self.cfg.image_size,
            height: self.cfg.image_size,
        }
    }

    /// The scene of sample `index` of `split` (cheap: no rendering). A pure function of
    /// `(split, index)`: shape, hue, tone and background uniform, azimuth uniform in [0, 360),
    /// elevation uniform in the configured range.
    pub fn scene(&self, split: Split, index: u64) -> Result<Scene> {
        let mut rng = SeededRng::new(split.seed(index)?);
        let shape = Shape::ALL[rng.below(Shape::ALL.len())];
        let hue = Hue::ALL[rng.below(Hue::ALL.len())];
        let tone = Tone::ALL[rng.below(Tone::ALL.len())];
        let background = Background::ALL[rng.below(Background::ALL.len())];
        let azimuth_deg = 360.0 * rng.uniform();
        let elevation_deg = self.cfg.elevation_min_deg
            + (self.cfg.elevation_max_deg - self.cfg.elevation_min_deg) * rng.uniform();
        Ok(Scene { shape, colour: Colour::new(hue, tone), background, azimuth_deg, elevation_deg })
    }

    /// Renders any scene (any shape, colour and background from any camera angles).
    pub fn render(&self, scene: &Scene) -> Rendered {
        render(&RenderInput {
            shape: scene.shape,
            albedo: scene.colour.srgb(),
            background: scene.background.srgb(),
            camera: self.camera(scene.azimuth_deg, scene.elevation_deg),
            lighting: self.cfg.lighting,
            supersample: self.cfg.supersample,
        })
    }

    /// Sample `index` of `split`: identical bytes for the same `(split, index)` and config.
    pub fn sample(&self, split: Split, index: u64) -> Result<Sample> {
        let seed = split.seed(index)?;
        let scene = self.scene(split, index)?;
        let image = self.render(&scene);
        Ok(Sample { split, index, seed, caption: scene.caption(), scene, image })
    }
}
