//! `sewa report`: an SVG picture of one selection over its window — each member's own loss
//! (when the selection recorded it), SeWA's probabilities, and the chosen set — for people who
//! would rather look than read. Extracts what to draw from a parsed selection JSON (a
//! `Selection`, or any JSON with one under `selection`, such as a manifest); draws with
//! plotters. It reads no input file and selects nothing: `commands::report` does both.
//! `history` draws a whole `sewa watch` run instead (`sewa report --history`).

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::select::Details;

pub mod history;

/// What the picture shows, per member.
#[derive(Debug, Default, PartialEq)]
pub struct Window {
    /// The method as the JSON names it (drawn as a title, not interpreted; "?" when absent).
    pub method: String,
    pub labels: Vec<String>,
    pub chosen: Vec<bool>,
    /// Chosen members that the optimiser's top-k did not hold: swapped in by polishing.
    pub polished: Vec<bool>,
    /// Members of the optimiser's top-k that polishing swapped out.
    pub dropped: Vec<bool>,
    pub probabilities: Option<Vec<f64>>,
    pub member_losses: Option<Vec<f64>>,
    pub loss: Option<f64>,
    /// Oracle calls the selection spent (optimise + polish), when recorded.
    pub oracle_calls: Option<u64>,
}

fn floats(v: &Value) -> Option<Vec<f64>> {
    v.as_array()?.iter().map(|x| x.as_f64()).collect()
}

/// A per-member array of the details: one finite value per window member, or absent.
fn per_member(
    v: &Option<Vec<f64>>,
    key: &str,
    n: usize,
) -> std::result::Result<Option<Vec<f64>>, String> {
    let Some(v) = v else { return Ok(None) };
    if v.len() != n {
        return Err(format!("`{key}` has {} values for a window of {n} members", v.len()));
    }
    // Plot ranges are computed from these values: keep them where their differences are finite.
    if let Some(bad) = v.iter().find(|x| !x.is_finite() || x.abs() > 1e150) {
        return Err(format!("`{key}` holds {bad}, not a plottable number"));
    }
    Ok(Some(v.clone()))
}

/// The selection's details, typed; absent details are empty ones.
fn details(sel: &Value) -> std::result::Result<Details, String> {
    match &sel["details"] {
        Value::Null => Ok(Details::default()),
        d => serde_json::from_value(d.clone()).map_err(|e| format!("selection details: {e}")),
    }
}

impl Window {
    /// Extract from a selection JSON; the error says what is missing.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let sel = v.get("selection").unwrap_or(v);
        // A manifest keeps the weights at its top level, a bare selection inside itself.
        let weights = floats(&sel["weights"])
            .or_else(|| floats(&v["weights"]))
            .ok_or("no `weights` array: not a selection or a manifest")?;
        let d = details(sel)?;
        let labels: Vec<String> = match &d.members {
            Some(ms) => ms
                .iter()
                .enumerate()
                .map(|(i, m)| m.step.map_or(format!("#{i}"), |s| s.to_string()))
                .collect(),
            None => (0..weights.len()).map(|i| format!("#{i}")).collect(),
        };
        // A daemon's manifest lists only the published inputs' weights; the window is in the
        // details, with the chosen members as indices into it.
        let chosen: Vec<bool> = if weights.len() == labels.len() {
            weights.iter().map(|w| *w > 0.0).collect()
        } else {
            let idx = d
                .chosen
                .as_ref()
                .ok_or("weights do not cover the window and there is no `chosen` list")?;
            let idx: std::collections::HashSet<usize> = idx.iter().copied().collect();
            if let Some(bad) = idx.iter().find(|i| **i >= labels.len()) {
                return Err(format!(
                    "`chosen` names member {bad}, outside the window of {}",
                    labels.len()
                ));
            }
            (0..labels.len()).map(|i| idx.contains(&i)).collect()
        };
        // SeWA records its top-k before polishing; chosen members outside it were swapped in.
        let (polished, dropped) = match &d.top_k {
            Some(top) => {
                let top: std::collections::HashSet<usize> = top.iter().copied().collect();
                let pairs = chosen
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (*c && !top.contains(&i), !*c && top.contains(&i)));
                pairs.unzip()
            }
            None => (vec![false; labels.len()], vec![false; labels.len()]),
        };
        Ok(Window {
            polished,
            dropped,
            oracle_calls: d.oracle_calls.map(|c| c as u64),
            method: sel["method"].as_str().unwrap_or("?").to_string(),
            probabilities: per_member(&d.probabilities, "probabilities", labels.len())?,
            member_losses: per_member(&d.member_losses, "member_losses", labels.len())?,
            labels,
            chosen,
            loss: sel["loss"].as_f64().filter(|l| l.is_finite() && l.abs() <= 1e150),
        })
    }
}

fn plot_err(out: &Path, e: impl std::fmt::Display) -> Error {
    Error::bad_input(out, format!("cannot draw: {e}"))
}

/// Two panels over the members: probabilities (or weights) as bars — chosen ones solid, those
/// swapped in by polishing in another colour — and the members' own losses as a line with the
/// selection's loss as a labelled rule. Each panel has a legend; the title says method, k, K and
/// the oracle calls spent, so a chosen member with a low bar reads as what it is.
pub fn draw(w: &Window, out: &Path) -> Result<()> {
    let root = SVGBackend::new(out, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(out, e))?;
    let (top, bottom) = root.split_vertically(300);
    draw_bars(&top, w, out)?;
    if let Some(losses) = &w.member_losses {
        draw_losses(&bottom, w, losses, out)?;
    }
    root.present().map_err(|e| plot_err(out, e))
}

fn title(w: &Window) -> String {
    let (k, n) = (w.chosen.iter().filter(|c| **c).count(), w.labels.len());
    let mut t = format!("{}: k = {k} of K = {n}", w.method);
    if let Some(l) = w.loss {
        t.push_str(&format!(", loss {l:.4}"));
    }
    if let Some(c) = w.oracle_calls {
        t.push_str(&format!(", {c} oracle calls"));
    }
    t
}

/// Which bar style a member gets, with its legend text.
#[derive(Clone, Copy, PartialEq)]
enum Bar {
    Chosen,
    Polished,
    Dropped,
    Other,
}

impl Bar {
    fn of(w: &Window, i: usize) -> Bar {
        match (w.chosen[i], w.polished[i], w.dropped[i]) {
            (true, true, _) => Bar::Polished,
            (true, false, _) => Bar::Chosen,
            (false, _, true) => Bar::Dropped,
            _ => Bar::Other,
        }
    }
    fn style(self) -> ShapeStyle {
        match self {
            Bar::Chosen => BLUE.filled(),
            Bar::Polished => RGBColor(230, 120, 0).filled(),
            Bar::Dropped => RGBColor(230, 120, 0).mix(0.3).filled(),
            Bar::Other => BLUE.mix(0.25).filled(),
        }
    }
    fn label(self, has_probs: bool) -> &'static str {
        match (self, has_probs) {
            (Bar::Chosen, true) => "chosen (top-k of the probabilities)",
            (Bar::Chosen, false) => "chosen",
            (Bar::Polished, _) => "chosen: swapped in by polishing",
            (Bar::Dropped, _) => "top-k, swapped out by polishing",
            (Bar::Other, _) => "not chosen",
        }
    }
}

fn draw_bars(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    w: &Window,
    out: &Path,
) -> Result<()> {
    let probs = w
        .probabilities
        .clone()
        .unwrap_or_else(|| w.chosen.iter().map(|c| if *c { 1.0 } else { 0.0 }).collect());
    let y_desc = if w.probabilities.is_some() { "selection probability" } else { "chosen" };
    let mut chart = panel(area, Some(title(w)), 0f64..1.15, (None, y_desc), &w.labels, out)?;
    for kind in [Bar::Chosen, Bar::Polished, Bar::Dropped, Bar::Other] {
        let members: Vec<usize> = (0..probs.len()).filter(|&i| Bar::of(w, i) == kind).collect();
        if members.is_empty() {
            continue;
        }
        let bars = members.iter().map(|&i| {
            Rectangle::new([(i as f64 - 0.35, 0.0), (i as f64 + 0.35, probs[i])], kind.style())
        });
        chart
            .draw_series(bars)
            .map_err(|e| plot_err(out, e))?
            .label(kind.label(w.probabilities.is_some()))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], kind.style()));
    }
    legend(&mut chart, out)
}

fn legend<'a, 'b: 'a>(chart: &mut Panel<'a, 'b>, out: &Path) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| plot_err(out, e))
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
    let mut hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if let Some(l) = w.loss {
        (lo, hi) = (lo.min(l), hi.max(l));
    }
    // Room above the highest point for the legend.
    let span = (hi - lo).max(1e-6);
    let y = lo - span * 0.1..hi + span * 0.45;
    let descs = (Some("member (step)"), "own held-out loss");
    let mut chart = panel(area, None, y, descs, &w.labels, out)?;
    let pts: Vec<(f64, f64)> = losses.iter().enumerate().map(|(i, l)| (i as f64, *l)).collect();
    chart
        .draw_series(LineSeries::new(pts.clone(), &BLACK))
        .map_err(|e| plot_err(out, e))?
        .label("each member's own loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], BLACK));
    for chosen in [true, false] {
        let style = if chosen { RED.filled() } else { BLACK.into() };
        let marks = pts.iter().enumerate().filter(|(i, _)| w.chosen[*i] == chosen);
        let series = chart
            .draw_series(marks.map(|(_, p)| Circle::new(*p, 4, style)))
            .map_err(|e| plot_err(out, e))?;
        if chosen {
            series.label("chosen member").legend(move |(x, y)| Circle::new((x + 7, y), 4, style));
        }
    }
    if let Some(l) = w.loss {
        let rule = LineSeries::new(vec![(-0.5, l), (n as f64 - 0.5, l)], RED.stroke_width(1));
        let label = format!("loss of the average of the chosen: {l:.4}");
        chart
            .draw_series(rule)
            .map_err(|e| plot_err(out, e))?
            .label(label)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], RED));
    }
    legend(&mut chart, out)
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
        assert_eq!(w.polished, [false; 6], "no top_k recorded: nothing marked as polished");
        let out = tempfile::tempdir().unwrap();
        draw(&w, &out.path().join("w.svg")).unwrap();
    }

    /// A chosen member with a low probability was swapped in by polishing: the picture says so
    /// (it looked like a bug), and the title carries method, k, K and the oracle calls.
    #[test]
    fn polishing_swaps_are_marked_and_the_title_says_the_cost() {
        let members: Vec<Value> = (0..4).map(|i| serde_json::json!({"step": i})).collect();
        let details = serde_json::json!({"members": members, "chosen": [0, 3], "top_k": [0, 1],
            "probabilities": [0.9, 0.7, 0.2, 0.04], "member_losses": [1.0, 0.9, 0.8, 0.85],
            "oracle_calls": 42});
        let v = serde_json::json!({"weights": [0.5, 0.0, 0.0, 0.5],
            "selection": {"method": "sewa", "loss": 0.7, "details": details}});
        let w = Window::from_json(&v).unwrap();
        assert_eq!(w.polished, [false, false, false, true]);
        assert_eq!(w.dropped, [false, true, false, false]);
        assert_eq!(title(&w), "sewa: k = 2 of K = 4, loss 0.7000, 42 oracle calls");
        let out = tempfile::tempdir().unwrap();
        let svg = out.path().join("w.svg");
        draw(&w, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        for label in [
            "swapped in by polishing",
            "swapped out by polishing",
            "not chosen",
            "each member",
            "loss of the average of the chosen: 0.7000",
        ] {
            assert!(text.contains(label), "legend lacks {label:?}");
        }
    }

    /// A hand-edited or hostile selection JSON is an error naming what is wrong, never an
    /// index past the end (regression: `chosen[i]` was indexed straight from the JSON).
    #[test]
    fn hostile_selection_json_is_an_error_not_a_panic() {
        let members: Vec<Value> = (0..3).map(|i| serde_json::json!({"step": i})).collect();
        let cases = [
            (serde_json::json!({"chosen": [7]}), "outside the window"),
            (serde_json::json!({"chosen": [0], "probabilities": [0.5]}), "probabilities"),
            (
                serde_json::json!({"chosen": [0], "member_losses": [1.0, 2.0, 3.0, 4.0]}),
                "member_losses",
            ),
            (
                serde_json::json!({"chosen": [0], "member_losses": [1.0, 1e300, -1e300]}),
                "plottable",
            ),
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
        let v =
            serde_json::json!({"weights": [1.0], "selection": {"loss": 1e308, "details": details}});
        let w = Window::from_json(&v).unwrap();
        assert_eq!(w.loss, None, "an unplottable loss is dropped, not drawn");
        draw(&w, &tempfile::tempdir().unwrap().path().join("w.svg")).unwrap();
    }
}
