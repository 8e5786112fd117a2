//! Render speed of the shapes world: ms per image at a given size, on one thread and on all.
//!
//! `cargo run --release -p gen-world --example render_speed [-- SIZE COUNT]`
//!
//! On a shared machine wall-clock times are inflated by other load; `RAYON_NUM_THREADS=1 time
//! target/release/examples/render_speed 64 300` gives CPU time (it renders 7 x COUNT + 10 images).

use std::time::Instant;

use gen_world::{Shape, Split, World, WorldConfig};

fn time_renders(world: &World, count: u64) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut checksum = 0f32;
    for i in 0..count {
        checksum += world.sample(Split::Train, i)?.image.rgb[0];
    }
    std::hint::black_box(checksum);
    Ok(1e3 * t0.elapsed().as_secs_f64() / count as f64)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size: u32 = args.first().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let count: u64 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(200);
    let cfg = WorldConfig { image_size: size, ..WorldConfig::default() };
    let world = World::new(cfg)?;
    time_renders(&world, 10)?; // warm-up
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let single = one.install(|| time_renders(&world, count))?;
    let all = time_renders(&world, count)?;
    println!(
        "{size}x{size}, {}x{} supersampling, {count} samples: {single:.3} ms/render on 1 thread, {all:.3} ms/render on {} threads",
        cfg.supersample,
        cfg.supersample,
        rayon::current_num_threads()
    );
    for shape in Shape::ALL {
        let ms = one.install(|| -> anyhow::Result<f64> {
            let t0 = Instant::now();
            for i in 0..count {
                let scene = gen_world::Scene { shape, ..world.scene(Split::Train, i)? };
                std::hint::black_box(world.render(&scene));
            }
            Ok(1e3 * t0.elapsed().as_secs_f64() / count as f64)
        })?;
        println!("  {:<8} {ms:.3} ms/render on 1 thread", shape.name());
    }
    Ok(())
}
