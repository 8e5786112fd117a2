//! A pinhole camera on a sphere around the origin ("orbit camera"), with look-at, intrinsics
//! and extrinsics in a documented convention, so the 3D crates can share it.
//!
//! # Conventions
//! - **World frame**: right-handed, **+Z up**. The object sits at the origin.
//! - **Orbit angles**: the camera centre is
//!   `distance * (cos(el) cos(az), cos(el) sin(az), sin(el))`, angles in degrees. Azimuth 0 puts
//!   the camera on the +X axis (the object's "front"), azimuth 90° on +Y, 180° on −X ("back").
//!   Elevation is the angle above the XY plane. The camera always looks at the origin with world
//!   +Z as its up hint (the elevation range of the world stays well away from ±90°).
//! - **Camera frame: OpenCV** — +x right, +y down, +z forward (the viewing direction).
//! - **Extrinsics** ([`OrbitCamera::world_to_camera`]): `p_cam = R p_world + t`, rows of `R` are
//!   the camera's right, down and forward axes in world coordinates, `t = -R c`.
//! - **Intrinsics** ([`OrbitCamera::intrinsics`]): `K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]` in
//!   pixels. Pixel `(i, j)` (column `i`, row `j`) covers `[i, i+1) x [j, j+1)`, so its centre is
//!   `(i + 0.5, j + 0.5)`; `cx = W / 2`, `cy = H / 2`, `fx = fy = (H / 2) / tan(fov_y / 2)`.
//!   A camera-frame point `p` projects to `(u, v) = (fx p.x / p.z + cx, fy p.y / p.z + cy)`.

use glam::{Mat3, Mat4, Vec2, Vec3};
use serde::{Deserialize, Serialize};

/// A ray `origin + t * dir` with a unit `dir`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ray {
    pub origin: Vec3,
    pub dir: Vec3,
}

/// A pinhole camera on a sphere around the origin, looking at the origin (see the module docs
/// for the conventions).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OrbitCamera {
    /// Azimuth in degrees (any value; 0 = +X axis, counter-clockwise seen from above).
    pub azimuth_deg: f32,
    /// Elevation above the XY plane in degrees, in (-90, 90).
    pub elevation_deg: f32,
    /// Distance of the camera centre from the origin (world units).
    pub distance: f32,
    /// Vertical field of view in degrees.
    pub fov_y_deg: f32,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
}

impl OrbitCamera {
    /// Camera centre in world coordinates.
    pub fn position(&self) -> Vec3 {
        let (az, el) = (self.azimuth_deg.to_radians(), self.elevation_deg.to_radians());
        self.distance * Vec3::new(el.cos() * az.cos(), el.cos() * az.sin(), el.sin())
    }

    /// World-to-camera rotation `R` (rows: right, down, forward in world coordinates).
    pub fn rotation(&self) -> Mat3 {
        let eye = self.position();
        let forward = (-eye).normalize();
        let right = forward.cross(Vec3::Z).normalize();
        let down = forward.cross(right);
        // glam matrices are column-major: build R^T from columns, then transpose.
        Mat3::from_cols(right, down, forward).transpose()
    }

    /// Extrinsics: the 4x4 world-to-camera transform `[R | t; 0 0 0 1]` (OpenCV camera frame).
    pub fn world_to_camera(&self) -> Mat4 {
        let r = self.rotation();
        let t = -(r * self.position());
        Mat4::from_cols(
            r.x_axis.extend(0.0),
            r.y_axis.extend(0.0),
            r.z_axis.extend(0.0),
            t.extend(1.0),
        )
    }

    /// The inverse of [`OrbitCamera::world_to_camera`] (camera pose in the world).
    pub fn camera_to_world(&self) -> Mat4 {
        let rt = self.rotation().transpose();
        let c = self.position();
        Mat4::from_cols(
            rt.x_axis.extend(0.0),
            rt.y_axis.extend(0.0),
            rt.z_axis.extend(0.0),
            c.extend(1.0),
        )
    }

    /// Focal length in pixels (`fx = fy`).
    pub fn focal_px(&self) -> f32 {
        0.5 * self.height as f32 / (0.5 * self.fov_y_deg.to_radians()).tan()
    }

    /// Intrinsics `K` (pixels; pixel centres at half-integers, see the module docs).
    pub fn intrinsics(&self) -> Mat3 {
        let f = self.focal_px();
        let (cx, cy) = (0.5 * self.width as f32, 0.5 * self.height as f32);
        Mat3::from_cols(Vec3::new(f, 0.0, 0.0), Vec3::new(0.0, f, 0.0), Vec3::new(cx, cy, 1.0))
    }

    /// Projects a world point to continuous pixel coordinates `(u, v)`; `None` behind the camera.
    pub fn project(&self, p_world: Vec3) -> Option<Vec2> {
        let p = self.world_to_camera().transform_point3(p_world);
        if p.z <= 1e-6 {
            return None;
        }
        let k = self.intrinsics() * (p / p.z);
        Some(Vec2::new(k.x, k.y))
    }

    /// The ray through continuous pixel coordinates `(u, v)` (pixel centres at `i + 0.5`).
    pub fn ray(&self, u: f32, v: f32) -> Ray {
        self.rays().ray(u, v)
    }

    /// A ray generator with the camera's pose and intrinsics precomputed (for many rays).
    pub fn rays(&self) -> RayGen {
        RayGen {
            origin: self.position(),
            cam_to_world: self.rotation().transpose(),
            inv_focal: 1.0 / self.focal_px(),
            cx: 0.5 * self.width as f32,
            cy: 0.5 * self.height as f32,
        }
    }
}

/// Generates the rays of one camera (see [`OrbitCamera::rays`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RayGen {
    origin: Vec3,
    cam_to_world: Mat3,
    inv_focal: f32,
    cx: f32,
    cy: f32,
}

impl RayGen {
    /// The ray through continuous pixel coordinates `(u, v)`.
    pub fn ray(&self, u: f32, v: f32) -> Ray {
        let d_cam = Vec3::new((u - self.cx) * self.inv_focal, (v - self.cy) * self.inv_focal, 1.0);
        Ray { origin: self.origin, dir: (self.cam_to_world * d_cam).normalize() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cam(az: f32, el: f32) -> OrbitCamera {
        OrbitCamera {
            azimuth_deg: az,
            elevation_deg: el,
            distance: 4.0,
            fov_y_deg: 40.0,
            width: 64,
            height: 48,
        }
    }

    #[test]
    fn origin_projects_to_image_centre() {
        for (az, el) in [(0.0, 0.0), (73.0, 25.0), (200.0, -10.0), (315.0, 60.0)] {
            let p = cam(az, el).project(Vec3::ZERO).unwrap();
            assert!((p - Vec2::new(32.0, 24.0)).length() < 1e-4, "{az} {el}: {p}");
        }
    }

    #[test]
    fn front_camera_axes_by_hand() {
        // Camera on +X looking at -X with +Z up: right is +Y, down is -Z.
        let c = cam(0.0, 0.0);
        assert!((c.position() - Vec3::new(4.0, 0.0, 0.0)).length() < 1e-6);
        let r = c.rotation();
        let (right, down, fwd) = (r.row(0), r.row(1), r.row(2));
        assert!((right - Vec3::Y).length() < 1e-6, "{right}");
        assert!((down + Vec3::Z).length() < 1e-6, "{down}");
        assert!((fwd + Vec3::X).length() < 1e-6, "{fwd}");
        // A point above the origin is in the upper half of the image (smaller v).
        let p = c.project(Vec3::new(0.0, 0.0, 0.5)).unwrap();
        assert!(p.y < 24.0 && (p.x - 32.0).abs() < 1e-4);
        // A point at +Y is on the right.
        assert!(c.project(Vec3::new(0.0, 0.5, 0.0)).unwrap().x > 32.0);
        // fx = (H/2)/tan(20°).
        assert!((c.focal_px() - 24.0 / 20f32.to_radians().tan()).abs() < 1e-4);
    }

    #[test]
    fn extrinsics_invert_and_rays_project_back() {
        let c = cam(123.0, 37.0);
        let m = c.world_to_camera() * c.camera_to_world();
        assert!(m.abs_diff_eq(Mat4::IDENTITY, 1e-5));
        for (u, v) in [(0.5, 0.5), (10.25, 40.0), (63.5, 2.0)] {
            let ray = c.ray(u, v);
            let back = c.project(ray.origin + 2.7 * ray.dir).unwrap();
            assert!((back - Vec2::new(u, v)).length() < 1e-3, "({u},{v}) -> {back}");
        }
    }
}
