//! The primitives of the world and their analytic ray intersections.
//!
//! Every shape is centred at the origin with a fixed size (world units; the object fits in a
//! sphere of radius 1) and its symmetry axis along world +Z (the up axis). Intersections are
//! closed-form for the sphere, cube (slabs), cylinder and cone (quadratics plus caps); the torus
//! (a quartic) is found by sphere tracing its exact signed distance function inside its bounding
//! sphere and slab: with an exact SDF each step is at most the distance to the surface, so the
//! march cannot step over it; it stops within 2e-5 world units of the surface. The tests check
//! every shape against brute-force fine marching of an inside/outside predicate.

use glam::Vec3;
use serde::{Deserialize, Serialize};

use crate::camera::Ray;

/// Sphere radius.
pub const SPHERE_RADIUS: f32 = 0.8;
/// Half the cube's side.
pub const CUBE_HALF: f32 = 0.5;
/// Cylinder radius and half-height (a tall can).
pub const CYLINDER_RADIUS: f32 = 0.48;
pub const CYLINDER_HALF_HEIGHT: f32 = 0.78;
/// Cone: base radius, base height and apex height (apex up).
pub const CONE_RADIUS: f32 = 0.72;
pub const CONE_BASE_Z: f32 = -0.6;
pub const CONE_APEX_Z: f32 = 0.85;
/// Torus (lying flat, ring in the XY plane): major and minor radius.
pub const TORUS_MAJOR: f32 = 0.62;
pub const TORUS_MINOR: f32 = 0.26;

/// Rays hitting closer than this are ignored (self-intersection guard).
const T_MIN: f32 = 1e-4;

/// The primitives of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Sphere,
    Cube,
    Cylinder,
    Cone,
    Torus,
}

/// A ray hit: distance along the (unit) ray and the outward unit normal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub t: f32,
    pub normal: Vec3,
}

impl Shape {
    /// All shapes, in a fixed order (the order sampling uses).
    pub const ALL: [Shape; 5] =
        [Shape::Sphere, Shape::Cube, Shape::Cylinder, Shape::Cone, Shape::Torus];

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Sphere => "sphere",
            Shape::Cube => "cube",
            Shape::Cylinder => "cylinder",
            Shape::Cone => "cone",
            Shape::Torus => "torus",
        }
    }

    /// The shape named `word` (a caption word).
    pub fn from_name(word: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == word)
    }

    /// Whether the world point `p` is inside the solid (used by tests as an independent check
    /// of [`Shape::intersect`]).
    pub fn contains(self, p: Vec3) -> bool {
        match self {
            Shape::Sphere => p.length_squared() <= SPHERE_RADIUS * SPHERE_RADIUS,
            Shape::Cube => p.abs().max_element() <= CUBE_HALF,
            Shape::Cylinder => {
                p.z.abs() <= CYLINDER_HALF_HEIGHT
                    && p.x * p.x + p.y * p.y <= CYLINDER_RADIUS * CYLINDER_RADIUS
            }
            Shape::Cone => {
                if p.z < CONE_BASE_Z || p.z > CONE_APEX_Z {
                    return false;
                }
                let r = CONE_RADIUS * (CONE_APEX_Z - p.z) / (CONE_APEX_Z - CONE_BASE_Z);
                p.x * p.x + p.y * p.y <= r * r
            }
            Shape::Torus => torus_sdf(p) <= 0.0,
        }
    }

    /// The nearest hit of `ray` (unit direction) with the surface at `t > 0`, if any.
    pub fn intersect(self, ray: &Ray) -> Option<Hit> {
        match self {
            Shape::Sphere => sphere(ray.origin, ray.dir, SPHERE_RADIUS).and_then(|(t0, t1)| {
                let t = if t0 > T_MIN { t0 } else { t1 };
                (t > T_MIN).then(|| Hit { t, normal: (ray.origin + t * ray.dir) / SPHERE_RADIUS })
            }),
            Shape::Cube => cube(ray),
            Shape::Cylinder => cylinder(ray),
            Shape::Cone => cone(ray),
            Shape::Torus => torus(ray),
        }
    }
}

/// Real roots of `a t² + b t + c = 0` in ascending order (numerically stable form).
fn quadratic(a: f32, b: f32, c: f32) -> Option<(f32, f32)> {
    if a.abs() < 1e-12 {
        if b.abs() < 1e-12 {
            return None;
        }
        let t = -c / b;
        return Some((t, t));
    }
    let disc = b * b - 4.0 * a * c;
    if disc < 0.0 {
        return None;
    }
    let q = -0.5 * (b + b.signum() * disc.sqrt());
    let (t0, t1) = if q == 0.0 { (0.0, 0.0) } else { (q / a, c / q) };
    Some((t0.min(t1), t0.max(t1)))
}

/// Entry and exit distances of a ray with the sphere of radius `r` at the origin.
fn sphere(o: Vec3, d: Vec3, r: f32) -> Option<(f32, f32)> {
    quadratic(d.dot(d), 2.0 * o.dot(d), o.dot(o) - r * r)
}

fn cube(ray: &Ray) -> Option<Hit> {
    let (o, d) = (ray.origin, ray.dir);
    let mut t_near = f32::NEG_INFINITY;
    let mut t_far = f32::INFINITY;
    let mut axis = 0;
    for k in 0..3 {
        if d[k].abs() < 1e-12 {
            if o[k].abs() > CUBE_HALF {
                return None;
            }
            continue;
        }
        let (t1, t2) = ((-CUBE_HALF - o[k]) / d[k], (CUBE_HALF - o[k]) / d[k]);
        let (lo, hi) = (t1.min(t2), t1.max(t2));
        if lo > t_near {
            t_near = lo;
            axis = k;
        }
        t_far = t_far.min(hi);
    }
    if t_near > t_far || t_near <= T_MIN {
        return None;
    }
    let mut normal = Vec3::ZERO;
    normal[axis] = -d[axis].signum();
    Some(Hit { t: t_near, normal })
}

/// Keeps the nearer of two optional hits.
fn nearer(a: Option<Hit>, b: Option<Hit>) -> Option<Hit> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.t <= b.t { a } else { b }),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Hit with the horizontal disk of radius `r` at height `z` (normal `nz` = ±1).
fn disk(ray: &Ray, z: f32, r: f32, nz: f32) -> Option<Hit> {
    if ray.dir.z.abs() < 1e-12 {
        return None;
    }
    let t = (z - ray.origin.z) / ray.dir.z;
    let p = ray.origin + t * ray.dir;
    (t > T_MIN && p.x * p.x + p.y * p.y <= r * r)
        .then_some(Hit { t, normal: Vec3::new(0.0, 0.0, nz) })
}

fn cylinder(ray: &Ray) -> Option<Hit> {
    let (o, d) = (ray.origin, ray.dir);
    let (r, h) = (CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT);
    let mut side = None;
    if let Some((t0, t1)) = quadratic(
        d.x * d.x + d.y * d.y,
        2.0 * (o.x * d.x + o.y * d.y),
        o.x * o.x + o.y * o.y - r * r,
    ) {
        for t in [t0, t1] {
            let p = o + t * d;
            if t > T_MIN && p.z.abs() <= h {
                side = Some(Hit { t, normal: Vec3::new(p.x, p.y, 0.0) / r });
                break;
            }
        }
    }
    nearer(side, nearer(disk(ray, h, r, 1.0), disk(ray, -h, r, -1.0)))
}

fn cone(ray: &Ray) -> Option<Hit> {
    let (o, d) = (ray.origin, ray.dir);
    // x² + y² = k² w², w = apex_z - z (w in [0, apex_z - base_z]).
    let k = CONE_RADIUS / (CONE_APEX_Z - CONE_BASE_Z);
    let k2 = k * k;
    let w0 = CONE_APEX_Z - o.z;
    let a = d.x * d.x + d.y * d.y - k2 * d.z * d.z;
    let b = 2.0 * (o.x * d.x + o.y * d.y + k2 * w0 * d.z);
    let c = o.x * o.x + o.y * o.y - k2 * w0 * w0;
    let mut side = None;
    if let Some((t0, t1)) = quadratic(a, b, c) {
        for t in [t0, t1] {
            let p = o + t * d;
            if t > T_MIN && p.z >= CONE_BASE_Z && p.z <= CONE_APEX_Z {
                let w = CONE_APEX_Z - p.z;
                side = Some(Hit { t, normal: Vec3::new(p.x, p.y, k2 * w).normalize_or(Vec3::Z) });
                break;
            }
        }
    }
    nearer(side, disk(ray, CONE_BASE_Z, CONE_RADIUS, -1.0))
}

/// Exact signed distance to the torus (negative inside).
fn torus_sdf(p: Vec3) -> f32 {
    let q = (p.x * p.x + p.y * p.y).sqrt() - TORUS_MAJOR;
    (q * q + p.z * p.z).sqrt() - TORUS_MINOR
}

fn torus(ray: &Ray) -> Option<Hit> {
    const MAX_STEPS: usize = 256;
    const EPS: f32 = 2e-5;
    let (o, d) = (ray.origin, ray.dir);
    // The torus lies inside its bounding sphere and the slab |z| <= minor radius: march only
    // where the ray is inside both.
    let (mut t_enter, mut t_exit) = sphere(o, d, TORUS_MAJOR + TORUS_MINOR + 1e-3)?;
    let slab = TORUS_MINOR + 1e-3;
    if d.z.abs() < 1e-12 {
        if o.z.abs() > slab {
            return None;
        }
    } else {
        let (z0, z1) = ((-slab - o.z) / d.z, (slab - o.z) / d.z);
        t_enter = t_enter.max(z0.min(z1));
        t_exit = t_exit.min(z0.max(z1));
    }
    if t_exit <= T_MIN || t_enter > t_exit {
        return None;
    }
    let mut t = t_enter.max(T_MIN);
    for _ in 0..MAX_STEPS {
        let s = torus_sdf(o + t * d);
        if s < EPS {
            let p = o + t * d;
            let ring = Vec3::new(p.x, p.y, 0.0).normalize_or(Vec3::X) * TORUS_MAJOR;
            return Some(Hit { t, normal: (p - ring).normalize_or(Vec3::Z) });
        }
        t += s;
        if t > t_exit {
            return None;
        }
    }
    // A grazing ray that crept along the surface without reaching it within the step budget:
    // counted as a miss (it passes within a tiny fraction of a pixel of the surface).
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use gen_core::SeededRng;

    /// First `t` at which the ray enters the solid, by marching `contains` with a fine step.
    fn brute_force(shape: Shape, ray: &Ray, step: f32) -> Option<f32> {
        let mut t = 0.0;
        while t < 8.0 {
            if shape.contains(ray.origin + t * ray.dir) {
                return Some(t);
            }
            t += step;
        }
        None
    }

    fn random_rays(n: usize, seed: u64) -> Vec<Ray> {
        let mut rng = SeededRng::new(seed);
        (0..n)
            .map(|_| {
                let az = rng.uniform() * std::f32::consts::TAU;
                let el = (rng.uniform() * 2.0 - 1.0) * 1.2;
                let origin = 4.0 * Vec3::new(el.cos() * az.cos(), el.cos() * az.sin(), el.sin());
                let target =
                    Vec3::new(rng.uniform() - 0.5, rng.uniform() - 0.5, rng.uniform() - 0.5) * 2.0;
                Ray { origin, dir: (target - origin).normalize() }
            })
            .collect()
    }

    #[test]
    fn intersections_match_brute_force_marching() {
        let step = 5e-4;
        for shape in Shape::ALL {
            let mut disagree = 0;
            let rays = random_rays(300, 11);
            for ray in &rays {
                let a = shape.intersect(ray);
                let b = brute_force(shape, ray, step);
                match (a, b) {
                    (Some(h), Some(t)) => assert!(
                        (h.t - t).abs() < 2.0 * step,
                        "{shape:?}: analytic {} vs marched {t}",
                        h.t
                    ),
                    (None, None) => {}
                    _ => disagree += 1, // only grazing rays may disagree
                }
            }
            let hits = rays.iter().filter(|r| shape.intersect(r).is_some()).count();
            assert!(hits > 60, "{shape:?}: too few hits ({hits}) for the test to mean anything");
            assert!(disagree <= 2, "{shape:?}: {disagree} hit/miss disagreements");
        }
    }

    #[test]
    fn normals_point_outward_and_are_unit() {
        for shape in Shape::ALL {
            for ray in random_rays(200, 5) {
                if let Some(h) = shape.intersect(&ray) {
                    let p = ray.origin + h.t * ray.dir;
                    assert!((h.normal.length() - 1.0).abs() < 1e-4, "{shape:?}");
                    assert!(
                        !shape.contains(p + 2e-3 * h.normal),
                        "{shape:?}: outside of normal is inside at {p}"
                    );
                    assert!(
                        shape.contains(p - 2e-3 * h.normal),
                        "{shape:?}: inside of normal is outside at {p}"
                    );
                    assert!(h.normal.dot(ray.dir) <= 1e-4, "{shape:?}: back-facing hit");
                }
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for s in Shape::ALL {
            assert_eq!(Shape::from_name(s.name()), Some(s));
        }
        assert_eq!(Shape::from_name("pyramid"), None);
    }
}
