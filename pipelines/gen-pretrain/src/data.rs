//! Batches streamed from the procedural world: no dataset on disk. Each batch draws
//! `batch_size` indices of the train split's first `pool_size` samples with the step's seeded
//! generator; a sample is rendered the first time it is drawn and kept in memory (it is a pure
//! function of its index, so the cache never changes what a step sees).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use gen_core::{Result, SeededRng};
use gen_world::{Background, Hue, Sample, Shape, Split, Tone, View, World, WorldConfig};

/// Class counts of the ground-truth labels, in [`Labels`] order.
pub const NUM_SHAPES: usize = Shape::ALL.len();
pub const NUM_HUES: usize = Hue::ALL.len();
pub const NUM_TONES: usize = Tone::ALL.len();
pub const NUM_VIEWS: usize = View::ALL.len();
pub const NUM_BACKGROUNDS: usize = Background::ALL.len();

/// The evaluator's classes: the world's label sets, in [`Labels`] index order.
pub fn evaluator_classes() -> gen_models::EvaluatorClasses {
    let names = |v: &mut dyn Iterator<Item = &'static str>| v.map(String::from).collect();
    gen_models::EvaluatorClasses {
        shape: names(&mut Shape::ALL.iter().map(|s| s.name())),
        hue: names(&mut Hue::ALL.iter().map(|s| s.name())),
        tone: ["plain", "light", "dark"].iter().map(|s| s.to_string()).collect(),
        view: names(&mut View::ALL.iter().map(|s| s.name())),
        background: names(&mut Background::ALL.iter().map(|s| s.name())),
    }
}

/// Ground-truth class indices of one sample (positions in the `ALL` arrays of gen-world).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Labels {
    pub shape: usize,
    pub hue: usize,
    pub tone: usize,
    pub view: usize,
    pub background: usize,
}

impl Labels {
    /// The labels of a sample.
    pub fn of(sample: &Sample) -> Self {
        let s = &sample.scene;
        let pos = |found: Option<usize>| found.expect("gen-world ALL arrays list every variant");
        Self {
            shape: pos(Shape::ALL.iter().position(|x| *x == s.shape)),
            hue: pos(Hue::ALL.iter().position(|x| *x == s.colour.hue)),
            tone: pos(Tone::ALL.iter().position(|x| *x == s.colour.tone)),
            view: pos(View::ALL.iter().position(|x| *x == s.view())),
            background: pos(Background::ALL.iter().position(|x| *x == s.background)),
        }
    }
}

/// A batch of world samples.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Train-split indices of the samples.
    pub indices: Vec<u64>,
    /// `(B, 3, H, W)` sRGB in `[0, 1]`.
    pub images: Tensor,
    pub captions: Vec<String>,
    pub labels: Vec<Labels>,
}

/// The world with a render cache over a bounded pool of train indices.
pub struct WorldData {
    world: World,
    pool_size: usize,
    cache: HashMap<(Split, u64), Sample>,
    device: Device,
}

impl WorldData {
    pub fn new(
        image_size: u32,
        supersample: u32,
        pool_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let world = World::new(WorldConfig { image_size, supersample, ..WorldConfig::default() })?;
        Ok(Self { world, pool_size, cache: HashMap::new(), device: device.clone() })
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// Sample `index` of `split`, rendered once (train and other splits alike).
    pub fn sample(&mut self, split: Split, index: u64) -> Result<&Sample> {
        if !self.cache.contains_key(&(split, index)) {
            let s = self.world.sample(split, index)?;
            self.cache.insert((split, index), s);
        }
        Ok(&self.cache[&(split, index)])
    }

    /// The pool indices of a step's batch, drawn with `rng`.
    pub fn draw_indices(&self, rng: &mut SeededRng, batch_size: usize) -> Vec<u64> {
        (0..batch_size).map(|_| rng.below(self.pool_size) as u64).collect()
    }

    /// A batch of the given indices of `split`.
    pub fn batch(&mut self, split: Split, indices: &[u64]) -> Result<Batch> {
        let mut pixels = Vec::new();
        let mut captions = Vec::with_capacity(indices.len());
        let mut labels = Vec::with_capacity(indices.len());
        let mut hw = (0, 0);
        for &i in indices {
            let s = self.sample(split, i)?;
            let (w, h) = (s.image.width as usize, s.image.height as usize);
            hw = (h, w);
            // HWC → CHW
            let rgb = &s.image.rgb;
            for c in 0..3 {
                pixels.extend((0..h * w).map(|p| rgb[p * 3 + c]));
            }
            captions.push(s.caption.clone());
            labels.push(Labels::of(s));
        }
        let images = Tensor::from_vec(pixels, (indices.len(), 3, hw.0, hw.1), &self.device)?;
        Ok(Batch { indices: indices.to_vec(), images, captions, labels })
    }

    /// A training batch: indices drawn with `rng` from the pool, then rendered.
    pub fn train_batch(&mut self, rng: &mut SeededRng, batch_size: usize) -> Result<Batch> {
        let idx = self.draw_indices(rng, batch_size);
        self.batch(Split::Train, &idx)
    }
}

/// `(B, K)` one-hot f32 rows for class indices.
pub fn one_hot(classes: &[usize], k: usize, device: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; classes.len() * k];
    for (r, &c) in classes.iter().enumerate() {
        v[r * k + c] = 1.0;
    }
    Ok(Tensor::from_vec(v, (classes.len(), k), device)?)
}
