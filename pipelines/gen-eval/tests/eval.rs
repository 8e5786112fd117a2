//! `gen eval`'s library side on hand-made inputs with known answers: the aggregation of
//! accuracies, tiny-FID and its baseline, saturation excess and clipped pixels; guidance and
//! scale parsing; the CSV round trip used to resume sweeps; the evaluator label map; the
//! sample grid and the chart.

use std::collections::BTreeMap;
use std::path::Path;

use gen_diffusion::GuidanceMethod;
use gen_eval::session::{
    aggregate, csv_header, csv_row, guidance_method, guidance_panels, parse_csv, parse_scales,
    prompt_indices, same_settings, samples_grid, settings_columns, sweep_configs, ApgOverrides,
    EvalConfig, EvalMetrics, EvalReport, LabelMap, ScoredImages,
};
use gen_models::evaluator::{EvaluatorConfig, Prediction};
use gen_world::metrics::Predicted;
use gen_world::{Background, Colour, Hue, Shape, Tone, View};
use image::{Rgb, RgbImage};

/// An 8×8 image of `bg` with a 4×4 square of `obj` in the middle (after the background
/// segmentation's one erosion, its 2×2 centre counts as object).
fn square(bg: [u8; 3], obj: [u8; 3]) -> RgbImage {
    RgbImage::from_fn(8, 8, |x, y| {
        if (2..6).contains(&x) && (2..6).contains(&y) {
            Rgb(obj)
        } else {
            Rgb(bg)
        }
    })
}

fn pred(shape: Shape, hue: Hue, tone: Tone, bg: Background) -> Predicted {
    Predicted {
        shape,
        colour: Colour::new(hue, tone),
        view: Some(View::Front),
        background: Some(bg),
    }
}

const D: usize = 3;

/// Feature rows `k` → `(k, k², k mod 3)` (full-rank covariance over 4+ rows).
fn features(rows: std::ops::Range<usize>) -> Vec<f64> {
    rows.flat_map(|k| [k as f64, (k * k) as f64 * 0.1, (k % 3) as f64]).collect()
}

#[test]
fn identical_sets_give_zero_excess_zero_fid_and_known_accuracy() -> anyhow::Result<()> {
    let grey = Background::Grey.srgb8();
    let prompts: Vec<String> = vec![
        "a red cube on a grey background, front view".into(),
        "a red sphere on a grey background, front view".into(),
        "a light blue cone on a grey background, front view".into(),
        "a dark green torus on a grey background, front view".into(),
    ];
    let images: Vec<RgbImage> =
        (0..4).map(|k| square(grey, [200, 40 + 20 * k as u8, 30])).collect();
    // Known confusion: shapes 3/4 right (sphere → cube), colours 2/4 (blue light → blue plain,
    // green dark → red dark: hue wrong, tone right), backgrounds 3/4.
    let predicted = vec![
        pred(Shape::Cube, Hue::Red, Tone::Plain, Background::Grey),
        pred(Shape::Cube, Hue::Red, Tone::Plain, Background::Grey),
        pred(Shape::Cone, Hue::Blue, Tone::Plain, Background::Grey),
        pred(Shape::Torus, Hue::Red, Tone::Dark, Background::White),
    ];
    // Reference: 8 rows; its even rows are rows 0, 2, 4, 6. Generated features = those rows.
    let reference = features(0..8);
    let even: Vec<f64> =
        (0..4).flat_map(|k| reference[2 * k * D..(2 * k + 1) * D].to_vec()).collect();
    let generated = ScoredImages {
        images: &images,
        prompts: &prompts,
        predicted: &predicted,
        features: &even,
        dim: D,
    };
    let real = generated;
    let m = aggregate(&generated, &real, &reference, 2.0)?;
    assert_eq!(m.images, 4);
    assert_eq!(m.shape_accuracy, Some(0.75));
    assert_eq!(m.colour_accuracy, Some(0.5));
    assert_eq!(m.hue_accuracy, Some(0.75));
    assert_eq!(m.tone_accuracy, Some(0.75));
    assert_eq!(m.background_accuracy, Some(0.75));
    assert_eq!(m.view_accuracy, Some(1.0));
    assert_eq!(m.real_shape_accuracy, Some(0.75));
    assert!(m.tiny_fid.abs() < 1e-9, "identical features: {}", m.tiny_fid);
    assert_eq!(m.fid_size, 4);
    assert_eq!(m.saturation_excess, Some(0.0), "identical images must give exactly 0");
    assert_eq!(m.images_without_object, 0);
    assert_eq!(m.seconds_per_image, 0.5);
    // Baseline: rows 0, 2, 4, 6 vs 1, 3, 5, 7 — it is what gen-world's real_vs_real gives.
    let rvr = gen_world::metrics::real_vs_real(&reference, D, 4)?;
    assert_eq!(m.tiny_fid_real_baseline, rvr.fd);
    assert!(m.tiny_fid_real_baseline > 0.0);
    Ok(())
}

#[test]
fn known_saturation_clipping_and_shifted_features() -> anyhow::Result<()> {
    let grey = Background::Grey.srgb8();
    let prompts: Vec<String> =
        vec!["a red cube on a grey background".into(), "a red cube on a grey background".into()];
    // Generated: pure red objects (saturation 1; 2 of 3 channels at 0 and 1 at 255 on 16 of
    // 64 pixels: 48 of 192 channel values clipped). Real: (255, 128, 128), saturation 127/255.
    let gen_imgs = vec![square(grey, [255, 0, 0]), square(grey, [255, 0, 0])];
    let real_imgs = vec![square(grey, [254, 128, 128]), square(grey, [254, 128, 128])];
    let p2 = vec![pred(Shape::Cube, Hue::Red, Tone::Plain, Background::Grey); 2];
    // Generated features = the reference's even rows + (1, -2, 0.5): FD = 1 + 4 + 0.25 exactly.
    let reference = features(10..14);
    let shift = [1.0, -2.0, 0.5];
    let shifted: Vec<f64> = (0..2)
        .flat_map(|k| (0..D).map(move |j| (k, j)))
        .map(|(k, j)| reference[2 * k * D + j] + shift[j])
        .collect();
    let generated = ScoredImages {
        images: &gen_imgs,
        prompts: &prompts,
        predicted: &p2,
        features: &shifted,
        dim: D,
    };
    let real_feats = features(10..12);
    let real = ScoredImages {
        images: &real_imgs,
        prompts: &prompts,
        predicted: &p2,
        features: &real_feats,
        dim: D,
    };
    let m = aggregate(&generated, &real, &reference, 1.0)?;
    assert!((m.saturation_generated.unwrap() - 1.0).abs() < 1e-12, "{m:?}");
    let real_sat = (254.0 - 128.0) / 254.0;
    assert!((m.saturation_real.unwrap() - real_sat).abs() < 1e-12, "{m:?}");
    assert!((m.saturation_excess.unwrap() - (1.0 - real_sat)).abs() < 1e-12, "{m:?}");
    assert!((m.clipped_fraction - 48.0 / 192.0).abs() < 1e-12, "{}", m.clipped_fraction);
    assert_eq!(m.clipped_fraction_real, 0.0);
    assert!((m.tiny_fid - 5.25).abs() < 1e-9, "{}", m.tiny_fid);

    // A generated set without object pixels: no excess, counted, no error.
    let blank = vec![square(grey, grey), square(grey, grey)];
    let g2 = ScoredImages { images: &blank, ..generated };
    let m2 = aggregate(&g2, &real, &reference, 1.0)?;
    assert_eq!(
        (m2.saturation_generated, m2.saturation_excess, m2.images_without_object),
        (None, None, 2)
    );
    Ok(())
}

#[test]
fn aggregate_rejects_inconsistent_inputs() {
    let grey = Background::Grey.srgb8();
    let imgs = vec![square(grey, [255, 0, 0]); 2];
    let prompts: Vec<String> = vec!["a red cube on a grey background".into(); 2];
    let p2 = vec![pred(Shape::Cube, Hue::Red, Tone::Plain, Background::Grey); 2];
    let f = features(0..2);
    let set =
        ScoredImages { images: &imgs, prompts: &prompts, predicted: &p2, features: &f, dim: D };
    // reference needs 2 × 2 rows
    let e = aggregate(&set, &set, &features(0..3), 1.0).unwrap_err().to_string();
    assert!(e.contains("reference features") && e.contains("2 × 2"), "{e}");
    let short = ScoredImages { predicted: &p2[..1], ..set };
    let e = aggregate(&short, &set, &features(0..4), 1.0).unwrap_err().to_string();
    assert!(e.contains("2 images but 2 prompts, 1 predictions"), "{e}");
    // a prompt that names no background, with no predicted background, cannot be segmented
    let nobg: Vec<String> = vec!["a red cube".into(); 2];
    let unseen = vec![Predicted { background: None, ..p2[0] }; 2];
    let bad = ScoredImages { prompts: &nobg, predicted: &unseen, ..set };
    let e = aggregate(&bad, &set, &features(0..4), 1.0).unwrap_err().to_string();
    assert!(e.contains("names no background"), "{e}");
}

/// Short prompts: the forms drop the clauses; prompts without a background are segmented by
/// the background the evaluator predicts (the same numbers as naming it), and the background
/// is not scored.
#[test]
fn prompt_forms_and_segmenting_without_a_named_background() -> anyhow::Result<()> {
    use gen_eval::session::PromptForm;
    let c = "a light red cube on a blue background, overhead view";
    assert_eq!(PromptForm::Full.apply(c)?, c);
    assert_eq!(PromptForm::NoBackground.apply(c)?, "a light red cube, overhead view");
    assert_eq!(PromptForm::NoView.apply(c)?, "a light red cube on a blue background");
    assert_eq!(PromptForm::Short.apply(c)?, "a light red cube");
    for f in PromptForm::ALL {
        assert_eq!(PromptForm::parse(f.name())?, f);
    }
    let e = PromptForm::parse("tiny").unwrap_err().to_string();
    assert!(e.contains("unknown form `tiny`") && e.contains("no-background"), "{e}");
    assert!(PromptForm::Short.apply("a red pyramid").is_err());

    let blue = Background::Blue.srgb8();
    let imgs = vec![square(blue, [255, 0, 0]), square(blue, [200, 100, 100])];
    let full: Vec<String> = vec!["a red cube on a blue background, front view".into(); 2];
    let short: Vec<String> =
        full.iter().map(|p| PromptForm::Short.apply(p)).collect::<Result<_, _>>()?;
    // the evaluator sees the blue background in the first image, a wrong (white) one in the second
    let p2 = vec![
        pred(Shape::Cube, Hue::Red, Tone::Plain, Background::Blue),
        pred(Shape::Cube, Hue::Red, Tone::Plain, Background::White),
    ];
    let f = features(0..2);
    let named =
        ScoredImages { images: &imgs, prompts: &full, predicted: &p2, features: &f, dim: D };
    let unnamed = ScoredImages { prompts: &short, ..named };
    let m_named = aggregate(&named, &named, &features(0..4), 1.0)?;
    let m_short = aggregate(&unnamed, &named, &features(0..4), 1.0)?;
    assert_eq!(m_named.background_accuracy, Some(0.5));
    assert_eq!(m_short.background_accuracy, None, "no background named: not scored");
    assert_eq!(m_short.view_accuracy, None);
    assert_eq!(m_short.shape_accuracy, Some(1.0));
    // image 1: segmented against blue either way; image 2 against white (its predicted
    // background) when unnamed: everything is "object" there, so its saturation differs
    assert_ne!(m_short.saturation_generated, m_named.saturation_generated);
    let first = vec![imgs[0].clone(), imgs[0].clone()];
    let p_first = vec![p2[0]; 2];
    let one_named = ScoredImages { images: &first, predicted: &p_first, ..named };
    let one_short = ScoredImages { prompts: &short, ..one_named };
    let a = aggregate(&one_named, &one_named, &features(0..4), 1.0)?;
    let b = aggregate(&one_short, &one_named, &features(0..4), 1.0)?;
    assert_eq!(a.saturation_generated, b.saturation_generated);
    assert_eq!(b.saturation_excess, Some(0.0));
    Ok(())
}

#[test]
fn guidance_and_scale_parsing() -> anyhow::Result<()> {
    let none = ApgOverrides::default();
    assert_eq!(guidance_method("cfg", 7.5, &none)?, GuidanceMethod::Cfg { scale: 7.5 });
    let GuidanceMethod::Apg(a) = guidance_method(
        "APG",
        10.0,
        &ApgOverrides { eta: Some(0.3), norm_threshold: Some(2.0), momentum: None },
    )?
    else {
        panic!("not APG")
    };
    assert_eq!((a.scale, a.eta, a.norm_threshold, a.momentum), (10.0, 0.3, 2.0, -0.5));
    let e = guidance_method("pag", 3.0, &none).unwrap_err().to_string();
    assert!(e.contains("unknown method `pag`; known: cfg, apg"), "{e}");
    // the range of `gen image`: any finite scale (0 = unconditional, negative steers away)
    for w in [0.0, -1.0] {
        assert_eq!(guidance_method("cfg", w, &none)?, GuidanceMethod::Cfg { scale: w });
    }
    for w in [f64::NAN, f64::INFINITY] {
        let e = guidance_method("cfg", w, &none).unwrap_err().to_string();
        assert!(e.contains("guidance scale") && e.contains("finite"), "{e}");
    }
    let e = guidance_method("apg", 5.0, &ApgOverrides { momentum: Some(1.5), ..none })
        .unwrap_err()
        .to_string();
    assert!(e.contains("momentum"), "{e}");

    assert_eq!(parse_scales(" 1, 3,7.5 ")?, vec![1.0, 3.0, 7.5]);
    assert!(parse_scales("").unwrap_err().to_string().contains("empty"));
    assert!(parse_scales(" , ").unwrap_err().to_string().contains("empty"));
    assert!(parse_scales("1,x").unwrap_err().to_string().contains("`x`"));
    assert_eq!(parse_scales("-1,0")?, vec![-1.0, 0.0]);
    assert!(parse_scales("1,inf").unwrap_err().to_string().contains("guidance scale"));

    let base = EvalConfig { prompts: 2, seed: 9, ..EvalConfig::new("m") };
    let cfgs = sweep_configs(&base, &["cfg".into(), "apg".into()], &[1.0, 5.0, 10.0], &none)?;
    assert_eq!(cfgs.len(), 6);
    assert!(cfgs.iter().all(|c| c.seed == 9 && c.prompts == 2 && c.model == base.model));
    assert_eq!(cfgs[4].guidance, GuidanceMethod::Apg(gen_diffusion::ApgConfig::paper(5.0)));
    assert!(sweep_configs(&base, &[], &[1.0], &none).is_err());
    assert!(sweep_configs(&base, &["cfg".into()], &[], &none).is_err());

    // validate
    assert!(base.validate().is_ok());
    let e = EvalConfig { prompts: 1, ..base.clone() }.validate().unwrap_err().to_string();
    assert!(e.contains("at least 2 generated images"), "{e}");
    assert!(EvalConfig { steps: 0, ..base.clone() }.validate().is_err());
    assert!(EvalConfig { guidance: GuidanceMethod::Cfg { scale: f64::NAN }, ..base.clone() }
        .validate()
        .is_err());
    assert!(EvalConfig { guidance: GuidanceMethod::Cfg { scale: -1.0 }, ..base.clone() }
        .validate()
        .is_ok());

    // prompts: fixed by the seed
    assert_eq!(prompt_indices(3, 4), prompt_indices(3, 4));
    assert_ne!(prompt_indices(3, 4), prompt_indices(4, 4));
    let p = prompt_indices(3, 4);
    assert_eq!(p[3], p[0] + 3);
    Ok(())
}

fn report(scale: f64) -> EvalReport {
    let cfg = EvalConfig {
        model: "weights/a,b".into(),
        guidance: GuidanceMethod::Cfg { scale },
        ..EvalConfig::new("x")
    };
    EvalReport {
        config: cfg,
        prompts: vec!["a red cube".into()],
        test_indices: vec![1],
        image_size: 64,
        metrics: EvalMetrics {
            images: 32,
            shape_accuracy: Some(0.5),
            colour_accuracy: None,
            hue_accuracy: Some(0.25),
            tone_accuracy: Some(1.0),
            background_accuracy: Some(1.0),
            view_accuracy: Some(0.0),
            real_shape_accuracy: Some(1.0),
            real_colour_accuracy: Some(1.0),
            real_background_accuracy: Some(1.0),
            tiny_fid: 3.5,
            tiny_fid_real_baseline: 1.25,
            fid_size: 32,
            saturation_generated: Some(0.5),
            saturation_real: Some(0.6),
            saturation_excess: Some(-0.1),
            images_without_object: 0,
            clipped_fraction: 0.01,
            clipped_fraction_real: 0.0,
            seconds_per_image: 0.2,
        },
    }
}

#[test]
fn csv_round_trip_and_resume_keys() -> anyhow::Result<()> {
    let file = Path::new("guidance.csv");
    let text = format!("{}\n{}\n{}\n", csv_header(), csv_row(&report(3.0)), csv_row(&report(7.5)));
    let rows = parse_csv(&text, file)?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["model"], "weights/a,b", "a quoted comma survives");
    assert_eq!(rows[1]["scale"], "7.5");
    assert_eq!(rows[0]["colour_accuracy"], "", "None is an empty cell");
    assert_eq!(rows[0]["tiny_fid"].parse::<f64>()?, 3.5);
    let r = report(7.5);
    assert!(same_settings(&rows[1], &settings_columns(&r.config, 64)));
    assert!(!same_settings(&rows[0], &settings_columns(&r.config, 64)));
    assert!(!same_settings(
        &rows[1],
        &settings_columns(&EvalConfig { seed: 1, ..r.config.clone() }, 64)
    ));
    assert!(!same_settings(&rows[1], &settings_columns(&r.config, 32)));
    // guiding in an interval only is another setting; its cell (with a comma) round-trips
    let late = EvalConfig {
        interval: Some(gen_diffusion::IntervalRange::parse("0.5,1")?),
        ..r.config.clone()
    };
    assert!(!same_settings(&rows[1], &settings_columns(&late, 64)));
    let late_report = EvalReport { config: late.clone(), ..report(7.5) };
    let back = parse_csv(&format!("{}\n{}\n", csv_header(), csv_row(&late_report)), file)?;
    assert_eq!(back[0]["interval"], "steps:0.5,1");
    assert!(same_settings(&back[0], &settings_columns(&late, 64)));
    let e = parse_csv("a,b\n1,2\n", file).unwrap_err().to_string();
    assert!(e.contains("guidance.csv") && e.contains("columns differ"), "{e}");
    let e = parse_csv(&format!("{}\n1,2\n", csv_header()), file).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("2 fields"), "{e}");
    assert!(parse_csv("", file)?.is_empty());
    // The JSON report carries the settings and the metrics.
    let json = r.to_json()?;
    assert!(
        json.contains("\"tiny_fid_real_baseline\": 1.25") && json.contains("\"method\": \"cfg\""),
        "{json}"
    );
    Ok(())
}

#[test]
fn label_map_follows_the_evaluator_config() -> anyhow::Result<()> {
    let file = Path::new("evaluator/config.json");
    let cfg = EvaluatorConfig::new(64, vec![8], 4, &gen_pretrain::data::evaluator_classes());
    let map = LabelMap::new(&cfg, file)?;
    let p = map.predicted(&Prediction { shape: 1, hue: 2, tone: 1, view: 3, background: 0 });
    assert_eq!(p.shape, Shape::ALL[1]);
    assert_eq!(p.colour, Colour::new(Hue::ALL[2], Tone::ALL[1]));
    assert_eq!(p.view, Some(View::ALL[3]));
    assert_eq!(p.background, Some(Background::ALL[0]));
    // A different order in the config is followed by name.
    let mut rev = cfg.clone();
    let mut names: Vec<String> = Shape::ALL.iter().rev().map(|s| s.name().to_string()).collect();
    rev.labels["shape"] = serde_json::json!(names.clone());
    let p = LabelMap::new(&rev, file)?.predicted(&Prediction {
        shape: 0,
        hue: 0,
        tone: 0,
        view: 0,
        background: 0,
    });
    assert_eq!(p.shape, *Shape::ALL.last().unwrap());
    assert_eq!(p.colour.tone, Tone::Plain);
    // Unknown names and wrong counts are errors naming the key.
    names[0] = "pyramid".into();
    rev.labels["shape"] = serde_json::json!(names);
    let e = LabelMap::new(&rev, file).unwrap_err().to_string();
    assert!(e.contains("labels.shape") && e.contains("unknown class `pyramid`"), "{e}");
    let mut short = cfg.clone();
    short.num_hues = 3;
    let e = LabelMap::new(&short, file).unwrap_err().to_string();
    assert!(e.contains("labels.hue") && e.contains("8 names for a head of 3"), "{e}");
    Ok(())
}

#[test]
fn samples_grid_and_chart() -> anyhow::Result<()> {
    // 2 prompts × 3 images: image i of prompt i mod 2; one row per prompt.
    let imgs: Vec<RgbImage> =
        (0..6).map(|i| RgbImage::from_pixel(4, 4, Rgb([i as u8 * 40, 0, 0]))).collect();
    let g = samples_grid(&imgs, 2, 3)?;
    assert_eq!(g.dimensions(), (3 * 4 + 2 * 2, 2 * 4 + 2));
    // row 0: images 0, 2, 4 (prompt 0); row 1: images 1, 3, 5
    assert_eq!(g.get_pixel(0, 0)[0], 0);
    assert_eq!(g.get_pixel(6, 0)[0], 80);
    assert_eq!(g.get_pixel(12, 6)[0], 200);
    assert!(samples_grid(&imgs, 2, 2).is_err());

    let dir = std::env::temp_dir().join(format!("gen-pretrain-eval-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows: Vec<BTreeMap<String, String>> = Vec::new();
    for (m, w) in [("cfg", 1.0), ("cfg", 7.5), ("apg", 1.0), ("apg", 7.5)] {
        let mut r = report(w);
        if m == "apg" {
            r.config.guidance = guidance_method("apg", w, &ApgOverrides::default())?;
            r.metrics.shape_accuracy = Some(0.25);
            r.metrics.tiny_fid = 2.0;
            r.metrics.saturation_excess = Some(0.05);
            r.metrics.clipped_fraction = 0.02;
        }
        rows.push(r.columns().into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    }
    // a third variant, APG in the second half of the steps only, its rows out of scale order
    for w in [7.5, 1.0] {
        let mut r = report(w);
        r.config.guidance = guidance_method(
            "apg",
            w,
            &ApgOverrides { norm_threshold: Some(2.0), ..Default::default() },
        )?;
        r.config.interval = Some(gen_diffusion::IntervalRange::parse("0.5,1")?);
        r.metrics.shape_accuracy = Some(if w == 1.0 { 0.75 } else { 1.0 });
        rows.push(r.columns().into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    }
    let panels = guidance_panels(&rows);
    assert_eq!(panels.len(), 6);
    assert_eq!(panels[0].series.len(), 3);
    assert_eq!(panels[0].series[0].name, "CFG");
    assert_eq!(panels[0].series[1].name, "APG eta=0 r=15 beta=-0.5");
    assert_eq!(panels[0].series[2].name, "APG eta=0 r=2 beta=-0.5 in steps:0.5,1");
    assert_eq!(panels[0].series[0].points, vec![(1.0, 0.5), (7.5, 0.5)]);
    assert_eq!(panels[0].series[1].points, vec![(1.0, 0.25), (7.5, 0.25)]);
    assert_eq!(panels[0].series[2].points, vec![(1.0, 0.75), (7.5, 1.0)], "sorted by scale");
    assert_ne!(panels[0].series[1].colour, panels[0].series[2].colour);
    assert_eq!(panels[3].reference, Some(1.25), "tiny-FID panel carries the real-vs-real baseline");
    let png = dir.join("guidance.png");
    gen_core::chart::write_panels(&png, "test", &panels, 3)?;
    let img = image::open(&png)?.to_rgb8();
    assert_eq!(img.dimensions(), (3 * 320, 36 + 2 * 280));
    let blue = img.pixels().filter(|p| p.0 == [30, 80, 220]).count();
    let orange = img.pixels().filter(|p| p.0 == [230, 110, 20]).count();
    assert!(blue > 50 && orange > 50, "lines drawn: {blue} blue, {orange} orange pixels");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
