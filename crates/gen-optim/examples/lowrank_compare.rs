//! Loss at equal steps and optimizer-state bytes of AdamW, GaLore, FRUGAL and signSGD on a toy
//! problem: a 2-layer MLP student (64 → 256 → 64, tanh) fitting a random teacher of the same
//! shape on fixed synthetic data. A measurement, not a test.
//!
//! `cargo run -p gen-optim --example lowrank_compare [steps]`

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use gen_core::SeededRng;
use gen_optim::*;

const D_IN: usize = 64;
const HIDDEN: usize = 256;
const D_OUT: usize = 64;
const BATCH: usize = 128;

struct Mlp {
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
}

impl Mlp {
    fn new(seed: u64) -> Result<Self> {
        let mut rng = SeededRng::new(seed);
        let dev = Device::Cpu;
        let w1 = (rng.randn((HIDDEN, D_IN), DType::F32, &dev)? / (D_IN as f64).sqrt())?;
        let w2 = (rng.randn((D_OUT, HIDDEN), DType::F32, &dev)? / (HIDDEN as f64).sqrt())?;
        Ok(Self {
            w1: Var::from_tensor(&w1)?,
            b1: Var::from_tensor(&Tensor::zeros(HIDDEN, DType::F32, &dev)?)?,
            w2: Var::from_tensor(&w2)?,
            b2: Var::from_tensor(&Tensor::zeros(D_OUT, DType::F32, &dev)?)?,
        })
    }
    /// x: (B, D_IN) → (B, D_OUT).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.matmul(&self.w1.t()?)?.broadcast_add(&self.b1)?.tanh()?;
        Ok(h.matmul(&self.w2.t()?)?.broadcast_add(&self.b2)?)
    }
    fn params(&self) -> Vec<NamedVar> {
        vec![
            NamedVar::new("w1", self.w1.clone()),
            NamedVar::new("b1", self.b1.clone()),
            NamedVar::new("w2", self.w2.clone()),
            NamedVar::new("b2", self.b2.clone()),
        ]
    }
}

fn train(
    name: &str,
    make: &dyn Fn(Vec<NamedVar>) -> Result<Box<dyn Optimizer>>,
    steps: usize,
    bytes: &dyn Fn(&dyn Optimizer) -> usize,
) -> Result<()> {
    let teacher = Mlp::new(1)?;
    let student = Mlp::new(2)?;
    let mut rng = SeededRng::new(3);
    let x = rng.randn((BATCH * 8, D_IN), DType::F32, &Device::Cpu)?;
    let y = teacher.forward(&x)?.detach();
    let mut opt = make(student.params())?;
    let t0 = std::time::Instant::now();
    let mut first = 0.0;
    let mut last = 0.0;
    for s in 0..steps {
        let i = (s % 8) * BATCH;
        let (xb, yb) = (x.narrow(0, i, BATCH)?, y.narrow(0, i, BATCH)?);
        let loss = student.forward(&xb)?.sub(&yb)?.sqr()?.mean_all()?;
        opt.step(&loss.backward()?)?;
        let l = loss.to_scalar::<f32>()? as f64;
        if s == 0 {
            first = l;
        }
        last = l;
    }
    let full = student.forward(&x)?.sub(&y)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
    println!(
        "{name:<42} loss {first:.5} -> {last:.5} (all data {full:.5})  state {:>8} B  {:.2} s",
        bytes(opt.as_ref()),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    let steps: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(300);
    println!("{steps} steps, MLP {D_IN}-{HIDDEN}-{D_OUT}, batch {BATCH}");
    let total = |o: &dyn Optimizer| o.state_bytes().iter().sum::<usize>() + o.shared_state_bytes();
    train(
        "AdamW lr 3e-3",
        &|p| {
            Ok(Box::new(Optim::new(
                AdamW,
                vec![ParamGroup::new(
                    p,
                    AdamWConfig { lr: 3e-3, weight_decay: 0.0, ..Default::default() },
                )],
            )?))
        },
        steps,
        &total,
    )?;
    for kind in [ProjectionKind::Svd, ProjectionKind::Dct, ProjectionKind::RandomOrthogonal] {
        train(
            &format!("GaLore {kind:?} r=16 T=50 scale 1"),
            &|p| {
                let cfg = GaLoreConfig {
                    lr: 3e-3,
                    rank: 16,
                    update_gap: 50,
                    scale: 1.0,
                    kind,
                    ..Default::default()
                };
                Ok(Box::new(Optim::new(GaLore::default(), vec![ParamGroup::new(p, cfg)])?))
            },
            steps,
            &total,
        )?;
    }
    for kind in [ProjectionKind::Svd, ProjectionKind::Dct, ProjectionKind::RandomColumns] {
        train(
            &format!("FRUGAL {kind:?} rho=0.25 T=50"),
            &|p| {
                let cfg = FrugalConfig {
                    lr: 3e-3,
                    density: 0.25,
                    update_gap: 50,
                    kind,
                    ..Default::default()
                };
                Ok(Box::new(Optim::new(Frugal::default(), vec![ParamGroup::new(p, cfg)])?))
            },
            steps,
            &total,
        )?;
    }
    train(
        "signSGD lr 3e-4",
        &|p| {
            Ok(Box::new(Optim::new(
                SignSgd,
                vec![ParamGroup::new(p, SignSgdConfig { lr: 3e-4, ..Default::default() })],
            )?))
        },
        steps,
        &total,
    )?;
    Ok(())
}
