//! Pinhole cameras in the OpenCV convention.
//!
//! Camera frame: **x right, y down, z forward** (the camera looks along +z). A world point `p`
//! maps to camera coordinates `t = R p + T` (`R`, `T`: the world-to-camera extrinsics) and to
//! pixel coordinates `u = fx * t.x / t.z + cx`, `v = fy * t.y / t.z + cy`.
//!
//! Pixel convention: pixel (row `i`, column `j`) covers `[j, j+1) × [i, i+1)` in pixel
//! coordinates, so its centre is `(j + 0.5, i + 0.5)`; a centred principal point is
//! `cx = width / 2`, `cy = height / 2`.

use gen_core::{Error, Result};
use glam::{DMat3, DVec3};

/// Pinhole intrinsics in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Intrinsics {
    pub fx: f64,
    pub fy: f64,
    pub cx: f64,
    pub cy: f64,
    pub width: usize,
    pub height: usize,
}

impl Intrinsics {
    /// Intrinsics with a vertical field of view `fov_y` (radians), square pixels and a centred
    /// principal point.
    pub fn from_fov_y(fov_y: f64, width: usize, height: usize) -> Result<Self> {
        if !(fov_y > 0.0 && fov_y < std::f64::consts::PI) {
            return Err(Error::invalid("camera fov_y", format!("{fov_y} rad is not in (0, pi)")));
        }
        let f = 0.5 * height as f64 / (0.5 * fov_y).tan();
        let k =
            Self { fx: f, fy: f, cx: 0.5 * width as f64, cy: 0.5 * height as f64, width, height };
        k.validate()?;
        Ok(k)
    }

    /// Checks positive focal lengths and a non-empty image.
    pub fn validate(&self) -> Result<()> {
        if !(self.fx > 0.0 && self.fy > 0.0 && self.fx.is_finite() && self.fy.is_finite()) {
            return Err(Error::invalid(
                "camera intrinsics",
                format!("focal lengths fx={} fy={} must be positive and finite", self.fx, self.fy),
            ));
        }
        if !(self.cx.is_finite() && self.cy.is_finite()) {
            return Err(Error::invalid(
                "camera intrinsics",
                format!("principal point ({}, {}) is not finite", self.cx, self.cy),
            ));
        }
        if self.width == 0 || self.height == 0 {
            return Err(Error::invalid(
                "camera intrinsics",
                format!("image size {}x{} is empty", self.width, self.height),
            ));
        }
        Ok(())
    }
}

/// A pinhole camera: intrinsics plus world-to-camera extrinsics (OpenCV convention, see the
/// module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Camera {
    pub intrinsics: Intrinsics,
    /// World-to-camera rotation `R` (rows: the camera's right, down and forward axes in world
    /// coordinates).
    pub rotation: DMat3,
    /// World-to-camera translation `T`: `t = R p + T`.
    pub translation: DVec3,
}

impl Camera {
    /// A camera from intrinsics and world-to-camera extrinsics. `rotation` must be a rotation
    /// matrix (orthonormal, determinant +1) to within 1e-4.
    pub fn new(intrinsics: Intrinsics, rotation: DMat3, translation: DVec3) -> Result<Self> {
        intrinsics.validate()?;
        let err = (rotation * rotation.transpose() - DMat3::IDENTITY)
            .to_cols_array()
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        if err.is_nan() || err >= 1e-4 || (rotation.determinant() - 1.0).abs() > 1e-4 {
            return Err(Error::invalid(
                "camera rotation",
                format!(
                    "not a rotation matrix (|R Rᵀ - I| = {err:.2e}, det = {:.4})",
                    rotation.determinant()
                ),
            ));
        }
        if !translation.is_finite() {
            return Err(Error::invalid(
                "camera translation",
                format!("{translation} is not finite"),
            ));
        }
        Ok(Self { intrinsics, rotation, translation })
    }

    /// A camera at `eye` looking at `target`, with `up` the world direction that appears up in
    /// the image (the camera's y axis points along `-up`, projected).
    pub fn look_at(intrinsics: Intrinsics, eye: DVec3, target: DVec3, up: DVec3) -> Result<Self> {
        let forward = (target - eye).normalize_or_zero();
        if forward == DVec3::ZERO {
            return Err(Error::invalid(
                "camera look_at",
                format!("eye {eye} and target {target} coincide"),
            ));
        }
        let right = forward.cross(up).normalize_or_zero();
        if right == DVec3::ZERO {
            return Err(Error::invalid(
                "camera look_at",
                format!("up {up} is parallel to the view direction {forward}"),
            ));
        }
        let down = forward.cross(right);
        // Rows of R are the camera axes in world coordinates.
        let rotation = DMat3::from_cols(right, down, forward).transpose();
        let translation = -(rotation * eye);
        Self::new(intrinsics, rotation, translation)
    }

    /// The camera centre in world coordinates, `-Rᵀ T`.
    pub fn position(&self) -> DVec3 {
        -(self.rotation.transpose() * self.translation)
    }

    /// World point to camera coordinates.
    pub fn world_to_camera(&self, p: DVec3) -> DVec3 {
        self.rotation * p + self.translation
    }

    /// World point to pixel coordinates `(u, v)` and depth `z`; `None` behind the camera.
    pub fn project(&self, p: DVec3) -> Option<(f64, f64, f64)> {
        let t = self.world_to_camera(p);
        if t.z <= 0.0 {
            return None;
        }
        let k = &self.intrinsics;
        Some((k.fx * t.x / t.z + k.cx, k.fy * t.y / t.z + k.cy, t.z))
    }

    pub fn width(&self) -> usize {
        self.intrinsics.width
    }

    pub fn height(&self) -> usize {
        self.intrinsics.height
    }
}

/// A camera on an orbit around `target`: the eye sits at `distance` from the target in the
/// direction `cos(el) (cos(az) front + sin(az) (up × front)) + sin(el) up`, looking at the
/// target with `up` appearing up in the image. With `up = +Z` and `front = +X` this is
/// gen-world's orbit convention (azimuth 0 on +X, 90° on +Y). Used for turntables and for
/// sampling views around an object (score distillation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Orbit {
    pub target: [f64; 3],
    /// The orbit axis (need not be unit length).
    pub up: [f64; 3],
    /// Azimuth 0 (projected onto the plane orthogonal to `up`; need not be unit length).
    pub front: [f64; 3],
    pub distance: f64,
    /// Radians, counter-clockwise about `up`.
    pub azimuth: f64,
    /// Radians above the orbit plane, in (−π/2, π/2).
    pub elevation: f64,
}

impl Orbit {
    /// gen-world's convention: Z up, azimuth 0 on +X, around `target`.
    pub fn z_up(target: [f64; 3], distance: f64, azimuth: f64, elevation: f64) -> Self {
        Self { target, up: [0.0, 0.0, 1.0], front: [1.0, 0.0, 0.0], distance, azimuth, elevation }
    }

    /// The unit axes `(up, front, side)` of the orbit (`side = up × front`).
    fn axes(&self) -> Result<(DVec3, DVec3, DVec3)> {
        let up = DVec3::from(self.up).try_normalize().ok_or_else(|| {
            Error::invalid("orbit up", format!("{:?} is not a direction", self.up))
        })?;
        let f = DVec3::from(self.front);
        let front = (f - f.dot(up) * up).try_normalize().ok_or_else(|| {
            Error::invalid(
                "orbit front",
                format!("{:?} is parallel to up {:?}", self.front, self.up),
            )
        })?;
        Ok((up, front, up.cross(front)))
    }

    /// The camera with intrinsics `k`.
    pub fn camera(&self, k: Intrinsics) -> Result<Camera> {
        let (up, a, b) = self.axes()?;
        let finite = [self.distance, self.azimuth, self.elevation].iter().all(|v| v.is_finite())
            && self.target.iter().all(|v| v.is_finite());
        if !(finite && self.distance > 0.0 && self.elevation.abs() < std::f64::consts::FRAC_PI_2) {
            return Err(Error::invalid(
                "orbit",
                format!(
                    "target {:?}, distance {}, elevation {} rad (want finite values, a positive \
                     distance and |elevation| < pi/2)",
                    self.target, self.distance, self.elevation
                ),
            ));
        }
        let (phi, el) = (self.azimuth, self.elevation);
        let dir = el.cos() * (phi.cos() * a + phi.sin() * b) + el.sin() * up;
        let center = DVec3::from(self.target);
        Camera::look_at(k, center + self.distance * dir, center, up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z_up_orbits_follow_the_world_convention() {
        let k = Intrinsics::from_fov_y(0.8, 32, 32).unwrap();
        let deg = f64::to_radians;
        // Azimuth 90°, elevation 30°, distance 2: eye at 2 (cos30 (0, 1, 0) + sin30 (0, 0, 1)).
        let cam = Orbit::z_up([0.0; 3], 2.0, deg(90.0), deg(30.0)).camera(k).unwrap();
        let want = DVec3::new(0.0, 2.0 * deg(30.0).cos(), 2.0 * deg(30.0).sin());
        assert!((cam.position() - want).length() < 1e-12, "{}", cam.position());
        // The target projects to the image centre; world +Z appears up (smaller v).
        let (u, v, _) = cam.project(DVec3::ZERO).unwrap();
        assert!((u - 16.0).abs() < 1e-9 && (v - 16.0).abs() < 1e-9);
        assert!(cam.project(DVec3::new(0.0, 0.0, 0.5)).unwrap().1 < 16.0);
        // The same camera as look_at from that eye.
        let l = Camera::look_at(k, want, DVec3::ZERO, DVec3::Z).unwrap();
        assert!((cam.rotation - l.rotation).to_cols_array().iter().all(|d| d.abs() < 1e-12));
        assert!(Orbit::z_up([0.0; 3], 0.0, 0.0, 0.0).camera(k).is_err());
        assert!(Orbit::z_up([0.0; 3], 1.0, 0.0, deg(90.0)).camera(k).is_err());
        let parallel = Orbit { front: [0.0, 0.0, 2.0], ..Orbit::z_up([0.0; 3], 1.0, 0.0, 0.0) };
        assert!(parallel.camera(k).is_err());
    }

    #[test]
    fn look_at_follows_opencv_axes() {
        let k = Intrinsics::from_fov_y(1.0, 64, 48).unwrap();
        // World y up; camera on -z looking at the origin along +z.
        let cam = Camera::look_at(k, DVec3::new(0.0, 0.0, -5.0), DVec3::ZERO, DVec3::Y).unwrap();
        assert!((cam.position() - DVec3::new(0.0, 0.0, -5.0)).length() < 1e-12);
        let (u, v, z) = cam.project(DVec3::ZERO).unwrap();
        assert!((u - 32.0).abs() < 1e-9 && (v - 24.0).abs() < 1e-9 && (z - 5.0).abs() < 1e-12);
        // A point above the target (world +y) lands in the upper half: smaller v.
        let (_, v_up, _) = cam.project(DVec3::new(0.0, 1.0, 0.0)).unwrap();
        assert!(v_up < 24.0);
        // Looking along +z with y up, world -x is to the right: larger u.
        let (u_r, _, _) = cam.project(DVec3::new(-1.0, 0.0, 0.0)).unwrap();
        assert!(u_r > 32.0);
        assert!(cam.project(DVec3::new(0.0, 0.0, -6.0)).is_none());
    }

    #[test]
    fn bad_cameras_are_errors() {
        let k = Intrinsics::from_fov_y(1.0, 8, 8).unwrap();
        assert!(Camera::look_at(k, DVec3::ONE, DVec3::ONE, DVec3::Y).is_err());
        assert!(Camera::look_at(k, DVec3::ZERO, DVec3::Y, DVec3::Y).is_err());
        assert!(Intrinsics::from_fov_y(0.0, 8, 8).is_err());
        assert!(Intrinsics::from_fov_y(1.0, 0, 8).is_err());
        assert!(
            Camera::new(k, DMat3::from_diagonal(DVec3::new(1.0, 1.0, 2.0)), DVec3::ZERO).is_err()
        );
    }
}
