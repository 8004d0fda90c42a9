//! `sewa report`: an SVG picture of one selection over its window — each member's own loss
//! (when the selection recorded it), SeWA's probabilities, and the chosen set — for people who
//! would rather look than read. Reads a selection JSON (a `Selection`, or any JSON with one under
//! `selection`, such as a manifest); draws with plotters. It does not select anything.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result, WithPath};

/// `sewa report` flags: `sewa report MANIFEST.json`, or `sewa report --config FILE CKPT...`.
#[derive(Clone, Debug, clap::Args)]
pub struct ReportArgs {
    /// A selection JSON (the demo's `selection.json`, a published manifest); with --config, the
    /// window's checkpoints instead.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Run a selection now with this config's objective over the checkpoints given.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Method for --config.
    #[arg(long, default_value = "sewa", requires = "config")]
    pub select: String,
    /// Members to choose with --config.
    #[arg(long, default_value_t = 5, requires = "config")]
    pub k: usize,
    /// SVG to write.
    #[arg(long, default_value = "sewa-report.svg")]
    pub out: PathBuf,
}

/// What the picture shows, per member.
#[derive(Debug, Default, PartialEq)]
pub struct Window {
    pub method: String,
    pub labels: Vec<String>,
    pub chosen: Vec<bool>,
    pub probabilities: Option<Vec<f64>>,
    pub member_losses: Option<Vec<f64>>,
    pub loss: Option<f64>,
}

fn floats(v: &Value) -> Option<Vec<f64>> {
    v.as_array()?.iter().map(|x| x.as_f64()).collect()
}

/// A per-member array of `details`: one finite value per window member, or absent.
fn per_member(d: &Value, key: &str, n: usize) -> std::result::Result<Option<Vec<f64>>, String> {
    if d[key].is_null() {
        return Ok(None);
    }
    let v = floats(&d[key]).ok_or_else(|| format!("`{key}` is not an array of numbers"))?;
    if v.len() != n {
        return Err(format!("`{key}` has {} values for a window of {n} members", v.len()));
    }
    // Plot ranges are computed from these values: keep them where their differences are finite.
    if let Some(bad) = v.iter().find(|x| !x.is_finite() || x.abs() > 1e150) {
        return Err(format!("`{key}` holds {bad}, not a plottable number"));
    }
    Ok(Some(v))
}

impl Window {
    /// Extract from a selection JSON; the error says what is missing.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let sel = v.get("selection").unwrap_or(v);
        // A manifest keeps the weights at its top level, a bare selection inside itself.
        let weights = floats(&sel["weights"])
            .or_else(|| floats(&v["weights"]))
            .ok_or("no `weights` array: not a selection or a manifest")?;
        let d = &sel["details"];
        let labels: Vec<String> = match d["members"].as_array() {
            Some(ms) => ms
                .iter()
                .enumerate()
                .map(|(i, m)| m["step"].as_u64().map_or(format!("#{i}"), |s| s.to_string()))
                .collect(),
            None => (0..weights.len()).map(|i| format!("#{i}")).collect(),
        };
        // A daemon's manifest lists only the published inputs' weights; the window is in the
        // details, with the chosen members as indices into it.
        let chosen: Vec<bool> = if weights.len() == labels.len() {
            weights.iter().map(|w| *w > 0.0).collect()
        } else {
            let idx = d["chosen"]
                .as_array()
                .ok_or("weights do not cover the window and there is no `chosen` list")?;
            let idx: Vec<u64> = idx.iter().filter_map(|i| i.as_u64()).collect();
            if let Some(bad) = idx.iter().find(|i| **i >= labels.len() as u64) {
                return Err(format!(
                    "`chosen` names member {bad}, outside the window of {}",
                    labels.len()
                ));
            }
            (0..labels.len() as u64).map(|i| idx.contains(&i)).collect()
        };
        Ok(Window {
            method: sel["method"].as_str().unwrap_or("?").to_string(),
            probabilities: per_member(d, "probabilities", labels.len())?,
            member_losses: per_member(d, "member_losses", labels.len())?,
            labels,
            chosen,
            loss: sel["loss"].as_f64().filter(|l| l.is_finite() && l.abs() <= 1e150),
        })
    }
}

/// Read the selection (or make one with `--config`), write `args.out`.
pub fn run(args: &ReportArgs) -> Result<()> {
    let (v, source) = match &args.config {
        Some(config) => {
            let opts = crate::checkpoint::OpenOptions::default();
            let opened = crate::commands::open_all(&args.inputs, &opts)?;
            let mut members: Vec<&crate::checkpoint::Checkpoint> = opened.iter().collect();
            members.sort_by_key(|c| c.step());
            let sel = crate::commands::select::run(config, &args.select, args.k, &members)?;
            (serde_json::to_value(&sel).map_err(|e| Error::Internal(e.to_string()))?, config)
        }
        None => {
            let [input] = args.inputs.as_slice() else {
                return Err(Error::Usage("report takes one selection JSON (or --config)".into()));
            };
            let text = std::fs::read_to_string(input).with_path(input)?;
            let v = serde_json::from_str(&text)
                .map_err(|e| Error::bad_input(input, format!("not JSON: {e}")))?;
            (v, input)
        }
    };
    let w = Window::from_json(&v).map_err(|m| Error::bad_input(source, m))?;
    draw(&w, &args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn plot_err(out: &Path, e: impl std::fmt::Display) -> Error {
    Error::bad_input(out, format!("cannot draw: {e}"))
}

/// Two panels over the members: probabilities (or weights) as bars, chosen ones filled; the
/// members' own losses as a line with the selection's loss as a horizontal rule.
pub fn draw(w: &Window, out: &Path) -> Result<()> {
    let n = w.labels.len();
    let root = SVGBackend::new(out, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(out, e))?;
    let (top, bottom) = root.split_vertically(280);
    let probs = w
        .probabilities
        .clone()
        .unwrap_or_else(|| w.chosen.iter().map(|c| if *c { 1.0 } else { 0.0 }).collect());
    let title = match w.loss {
        Some(l) => format!(
            "{}: chosen {} of {n}, loss {l:.4}",
            w.method,
            w.chosen.iter().filter(|c| **c).count()
        ),
        None => format!("{}: window of {n}", w.method),
    };
    let y = 0f64..1.05;
    let mut chart = panel(&top, Some(title), y, (None, "selection probability"), &w.labels, out)?;
    let bars = probs.iter().enumerate().map(|(i, p)| {
        let style = if w.chosen[i] { BLUE.filled() } else { BLUE.mix(0.3).filled() };
        Rectangle::new([(i as f64 - 0.35, 0.0), (i as f64 + 0.35, *p)], style)
    });
    chart.draw_series(bars).map_err(|e| plot_err(out, e))?;
    if let Some(losses) = &w.member_losses {
        draw_losses(&bottom, w, losses, out)?;
    }
    root.present().map_err(|e| plot_err(out, e))
}

type Axis = plotters::coord::types::RangedCoordf64;
type Panel<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<Axis, Axis>>;

/// One panel over the window's members: x = member (labelled by step), y = `y`.
fn panel<'a, 'b>(
    area: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: Option<String>,
    y: std::ops::Range<f64>,
    (x_desc, y_desc): (Option<&str>, &str),
    labels: &[String],
    out: &Path,
) -> Result<Panel<'a, 'b>> {
    let n = labels.len();
    let mut builder = ChartBuilder::on(area);
    if let Some(c) = caption {
        builder.caption(c, ("sans-serif", 18));
    }
    let mut chart = builder
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, y)
        .map_err(|e| plot_err(out, e))?;
    let label = |x: &f64| labels.get(x.round() as usize).cloned().unwrap_or_default();
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(n.min(20)).x_label_formatter(&label).y_desc(y_desc);
    if let Some(d) = x_desc {
        mesh.x_desc(d);
    }
    mesh.draw().map_err(|e| plot_err(out, e))?;
    Ok(chart)
}

fn draw_losses(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    w: &Window,
    losses: &[f64],
    out: &Path,
) -> Result<()> {
    let n = losses.len();
    let mut lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if let Some(l) = w.loss {
        lo = lo.min(l);
    }
    let pad = (hi - lo).max(1e-6) * 0.1;
    let y = lo - pad..hi + pad;
    let descs = (Some("member (step)"), "own held-out loss");
    let mut chart = panel(area, None, y, descs, &w.labels, out)?;
    let pts: Vec<(f64, f64)> = losses.iter().enumerate().map(|(i, l)| (i as f64, *l)).collect();
    chart.draw_series(LineSeries::new(pts.clone(), &BLACK)).map_err(|e| plot_err(out, e))?;
    let marks = pts.iter().enumerate().map(|(i, p)| {
        let style = if w.chosen[i] { RED.filled() } else { BLACK.into() };
        Circle::new(*p, 4, style)
    });
    chart.draw_series(marks).map_err(|e| plot_err(out, e))?;
    if let Some(l) = w.loss {
        let rule = LineSeries::new(vec![(-0.5, l), (n as f64 - 0.5, l)], RED.stroke_width(1));
        chart.draw_series(rule).map_err(|e| plot_err(out, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sewa watch` manifests list only the published inputs' weights; the window and the
    /// chosen indices are in the selection's details (regression: report indexed past the end).
    #[test]
    fn daemon_manifest_marks_chosen_members_of_the_whole_window() {
        let members: Vec<Value> =
            (0..6).map(|i| serde_json::json!({"path": format!("s{i}"), "step": 10 * i})).collect();
        let v = serde_json::json!({
            "weights": [0.5, 0.5],
            "selection": {"method": "sewa", "loss": 0.5,
                          "details": {"members": members, "chosen": [1, 4],
                                      "probabilities": [0.1, 0.9, 0.2, 0.1, 0.8, 0.3]}}
        });
        let w = Window::from_json(&v).unwrap();
        assert_eq!(w.labels, ["0", "10", "20", "30", "40", "50"]);
        assert_eq!(w.chosen, [false, true, false, false, true, false]);
        let out = tempfile::tempdir().unwrap();
        draw(&w, &out.path().join("w.svg")).unwrap();
    }

    /// A hand-edited or hostile selection JSON is an error naming what is wrong, never an
    /// index past the end (regression: `chosen[i]` was indexed straight from the JSON).
    #[test]
    fn hostile_selection_json_is_an_error_not_a_panic() {
        let members: Vec<Value> = (0..3).map(|i| serde_json::json!({"step": i})).collect();
        let cases = [
            (serde_json::json!({"chosen": [7]}), "outside the window"),
            (serde_json::json!({"chosen": [0], "probabilities": [0.5]}), "probabilities"),
            (serde_json::json!({"chosen": [0], "member_losses": [1.0, 2.0, 3.0, 4.0]}), "member_losses"),
            (serde_json::json!({"chosen": [0], "member_losses": [1.0, 1e300, -1e300]}), "plottable"),
        ];
        for (extra, want) in cases {
            let mut details = extra.clone();
            details["members"] = Value::Array(members.clone());
            let v = serde_json::json!({"weights": [1.0], "selection": {"details": details}});
            let err = Window::from_json(&v).err().unwrap_or_else(|| panic!("{extra} accepted"));
            assert!(err.contains(want), "{extra}: {err}");
        }
        // Probabilities shorter than the window used to index `chosen` past the probabilities'
        // end in `draw`; equal lengths draw.
        let details = serde_json::json!({"members": members, "chosen": [2],
                                          "probabilities": [0.1, 0.2, 0.9]});
        let v = serde_json::json!({"weights": [1.0], "selection": {"loss": 1e308, "details": details}});
        let w = Window::from_json(&v).unwrap();
        assert_eq!(w.loss, None, "an unplottable loss is dropped, not drawn");
        draw(&w, &tempfile::tempdir().unwrap().path().join("w.svg")).unwrap();
    }
}
