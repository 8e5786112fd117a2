//! The fixed palette: 8 named hues × plain / light / dark tones (24 object albedos) and a few
//! named background colours, all as fixed sRGB values.
//!
//! Light tones mix the plain albedo 55 % of the way towards white, dark tones halve it (both in
//! sRGB, so the HSV hue is kept and only saturation/value change): "light blue" differs from
//! "blue" mainly by saturation, which is what lets the world show guidance's over-saturation
//! failure mode (a model that over-saturates paints "light blue" as "blue"). One background,
//! "blue", shares its word with an object hue, so colour/background confusion ("a red cube on a
//! blue background" rendered as a blue cube) is measurable.

use serde::{Deserialize, Serialize};

/// The hue of an object colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hue {
    Red,
    Orange,
    Yellow,
    Green,
    Cyan,
    Blue,
    Purple,
    Pink,
}

/// Plain, light or dark variant of a hue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tone {
    Plain,
    Light,
    Dark,
}

/// An object colour: a hue and a tone ("light blue", "dark red", "green").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Colour {
    pub hue: Hue,
    pub tone: Tone,
}

/// A plain background colour, named in the caption ("on a grey background").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    Grey,
    White,
    Black,
    Blue,
}

impl Hue {
    /// All hues in a fixed order.
    pub const ALL: [Hue; 8] = [
        Hue::Red,
        Hue::Orange,
        Hue::Yellow,
        Hue::Green,
        Hue::Cyan,
        Hue::Blue,
        Hue::Purple,
        Hue::Pink,
    ];

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Hue::Red => "red",
            Hue::Orange => "orange",
            Hue::Yellow => "yellow",
            Hue::Green => "green",
            Hue::Cyan => "cyan",
            Hue::Blue => "blue",
            Hue::Purple => "purple",
            Hue::Pink => "pink",
        }
    }

    pub fn from_name(word: &str) -> Option<Hue> {
        Hue::ALL.into_iter().find(|h| h.name() == word)
    }
}

impl Tone {
    /// All tones in a fixed order.
    pub const ALL: [Tone; 3] = [Tone::Plain, Tone::Light, Tone::Dark];

    /// The caption word ("" for plain).
    pub fn name(self) -> &'static str {
        match self {
            Tone::Plain => "",
            Tone::Light => "light",
            Tone::Dark => "dark",
        }
    }

    /// The tone named by a modifier word ("light", "dark").
    pub fn from_modifier(word: &str) -> Option<Tone> {
        match word {
            "light" => Some(Tone::Light),
            "dark" => Some(Tone::Dark),
            _ => None,
        }
    }
}

/// sRGB albedos, `[plain, light, dark]` per hue in [`Hue::ALL`] order.
const ALBEDOS: [[[u8; 3]; 3]; 8] = [
    [[210, 35, 35], [235, 156, 156], [105, 18, 18]], // red
    [[235, 130, 25], [246, 199, 152], [118, 65, 13]], // orange
    [[230, 200, 30], [244, 230, 154], [115, 100, 15]], // yellow
    [[40, 170, 55], [158, 217, 165], [20, 85, 28]],  // green
    [[30, 185, 195], [154, 224, 228], [15, 93, 98]], // cyan
    [[40, 80, 215], [158, 176, 237], [20, 40, 108]], // blue
    [[135, 45, 200], [201, 161, 230], [68, 23, 100]], // purple
    [[225, 50, 150], [242, 163, 208], [113, 25, 75]], // pink
];

impl Colour {
    pub fn new(hue: Hue, tone: Tone) -> Self {
        Self { hue, tone }
    }

    /// All 24 colours, hue-major.
    pub fn all() -> Vec<Colour> {
        Hue::ALL.iter().flat_map(|&h| Tone::ALL.iter().map(move |&t| Colour::new(h, t))).collect()
    }

    /// The caption phrase: "blue", "light blue", "dark blue".
    pub fn name(self) -> String {
        match self.tone {
            Tone::Plain => self.hue.name().to_string(),
            t => format!("{} {}", t.name(), self.hue.name()),
        }
    }

    /// The fixed sRGB albedo (8 bit).
    pub fn srgb8(self) -> [u8; 3] {
        let tone = match self.tone {
            Tone::Plain => 0,
            Tone::Light => 1,
            Tone::Dark => 2,
        };
        ALBEDOS[Hue::ALL.iter().position(|&h| h == self.hue).expect("every hue is in ALL")][tone]
    }

    /// The sRGB albedo in [0, 1].
    pub fn srgb(self) -> [f32; 3] {
        self.srgb8().map(|v| v as f32 / 255.0)
    }
}

impl Background {
    /// All backgrounds in a fixed order.
    pub const ALL: [Background; 4] =
        [Background::Grey, Background::White, Background::Black, Background::Blue];

    /// The caption word.
    pub fn name(self) -> &'static str {
        match self {
            Background::Grey => "grey",
            Background::White => "white",
            Background::Black => "black",
            Background::Blue => "blue",
        }
    }

    pub fn from_name(word: &str) -> Option<Background> {
        Background::ALL.into_iter().find(|b| b.name() == word)
    }

    /// The fixed sRGB colour (8 bit).
    pub fn srgb8(self) -> [u8; 3] {
        match self {
            Background::Grey => [128, 128, 128],
            Background::White => [235, 235, 235],
            Background::Black => [20, 20, 20],
            Background::Blue => [70, 100, 170],
        }
    }

    /// The sRGB colour in [0, 1].
    pub fn srgb(self) -> [f32; 3] {
        self.srgb8().map(|v| v as f32 / 255.0)
    }
}

/// sRGB transfer function, decoding: sRGB [0, 1] → linear [0, 1].
pub fn srgb_to_linear(c: f32) -> f32 {
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

/// sRGB transfer function, encoding: linear [0, 1] → sRGB [0, 1] (input clamped).
pub fn linear_to_srgb(c: f32) -> f32 {
    let c = c.clamp(0.0, 1.0);
    if c <= 0.0031308 {
        12.92 * c
    } else {
        1.055 * c.powf(1.0 / 2.4) - 0.055
    }
}

/// HSV of an RGB triple in [0, 1]: hue in degrees [0, 360), saturation and value in [0, 1].
pub fn rgb_to_hsv(rgb: [f32; 3]) -> [f32; 3] {
    let [r, g, b] = rgb;
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    let hue = if delta <= 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / delta).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / delta + 2.0)
    } else {
        60.0 * ((r - g) / delta + 4.0)
    };
    let sat = if max <= 0.0 { 0.0 } else { delta / max };
    [hue.rem_euclid(360.0), sat, max]
}

/// Smallest absolute difference of two hues in degrees (0..=180).
pub fn hue_distance(a: f32, b: f32) -> f32 {
    let d = (a - b).rem_euclid(360.0);
    d.min(360.0 - d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
    }

    #[test]
    fn tones_keep_hue_and_order_saturation_and_value() {
        for h in Hue::ALL {
            let [p, l, d] = Tone::ALL.map(|t| rgb_to_hsv(Colour::new(h, t).srgb()));
            assert!(
                hue_distance(p[0], l[0]) < 3.0 && hue_distance(p[0], d[0]) < 3.0,
                "{h:?}: {p:?} {l:?} {d:?}"
            );
            assert!(l[1] < 0.6 * p[1], "{h:?}: light must be much less saturated");
            assert!(d[2] < 0.6 * p[2], "{h:?}: dark must be much darker");
            assert!(p[1] > 0.75, "{h:?}: plain colours are saturated");
        }
    }

    #[test]
    fn hues_are_distinct() {
        let hues: Vec<f32> =
            Hue::ALL.iter().map(|&h| rgb_to_hsv(Colour::new(h, Tone::Plain).srgb())[0]).collect();
        for i in 0..hues.len() {
            for j in i + 1..hues.len() {
                assert!(
                    hue_distance(hues[i], hues[j]) >= 14.0,
                    "{:?} vs {:?}",
                    Hue::ALL[i],
                    Hue::ALL[j]
                );
            }
        }
    }

    #[test]
    fn every_colour_contrasts_with_every_background() {
        for c in Colour::all() {
            for b in Background::ALL {
                let d = dist(c.srgb(), b.srgb());
                assert!(d > 0.2, "{} on {} background: sRGB distance {d}", c.name(), b.name());
            }
        }
    }

    #[test]
    fn srgb_round_trip_and_hsv_by_hand() {
        for i in 0..=255 {
            let c = i as f32 / 255.0;
            assert!((linear_to_srgb(srgb_to_linear(c)) - c).abs() < 1e-5);
        }
        assert!((srgb_to_linear(0.5) - 0.21404).abs() < 1e-4);
        let hsv = rgb_to_hsv([0.0, 0.5, 1.0]);
        assert!(
            (hsv[0] - 210.0).abs() < 1e-4
                && (hsv[1] - 1.0).abs() < 1e-6
                && (hsv[2] - 1.0).abs() < 1e-6
        );
        assert_eq!(hue_distance(350.0, 10.0), 20.0);
    }
}
