//! `sewa report --history`: one SVG of a whole `sewa watch` run from its publication history
//! (`history::Entry`, oldest first) — each member's own loss by training step, the published
//! average's loss at the step it was published, and which members each publication used.
//! Pure: entries in, SVG text out; reading the file is `history::read`'s, writing it the
//! command's.

use std::collections::BTreeMap;

use plotters::prelude::*;

use crate::history::Entry;

/// Publications drawn: the newest this many (a history holds up to a few thousand).
pub const MAX_DRAWN: usize = 500;

/// Colours the test and the legend agree on: member losses, published losses, used members.
pub const MEMBER: RGBColor = RGBColor(100, 100, 100);
pub const PUBLISHED: RGBColor = RGBColor(220, 30, 30);
pub const USED: RGBColor = RGBColor(30, 80, 220);

/// One publication's newest step and the (step, weight) of each member it used.
pub type Publication = (Option<u64>, Vec<(u64, f64)>);

/// What the picture shows, taken from the entries.
#[derive(Debug, Default, PartialEq)]
pub struct Run {
    /// (step, own loss) of every member a selection recorded a loss for, the latest record
    /// of each step, by step.
    pub members: Vec<(u64, f64)>,
    /// (step of the newest window member, loss) per publication with both.
    pub published: Vec<(u64, f64)>,
    /// Per publication, oldest first: its newest step and (step, weight) of each member used.
    pub publications: Vec<Publication>,
    /// Publications in the history before the newest `MAX_DRAWN`.
    pub left_out: usize,
}

impl Run {
    pub fn of(entries: &[Entry]) -> Run {
        let left_out = entries.len().saturating_sub(MAX_DRAWN);
        let entries = &entries[left_out..];
        let mut members = BTreeMap::new();
        for e in entries {
            members.extend(e.window.iter().map(|w| (w.step, w.loss)));
            members.extend(e.members.iter().filter_map(|m| Some((m.step, m.loss?))));
        }
        let published = entries.iter().filter_map(|e| Some((e.step?, e.loss?))).collect();
        let publications = entries
            .iter()
            .map(|e| (e.step, e.members.iter().map(|m| (m.step, m.weight)).collect()))
            .collect();
        Run { members: members.into_iter().collect(), published, publications, left_out }
    }

    /// The training steps the picture spans, padded so one step still has a width.
    fn steps(&self) -> std::ops::Range<f64> {
        let used = self.publications.iter().flat_map(|p| p.1.iter().map(|m| m.0).chain(p.0));
        let all = self.members.iter().chain(&self.published).map(|p| p.0).chain(used);
        let (lo, hi) = all.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
        let (lo, hi) = if lo > hi { (0.0, 1.0) } else { (lo as f64, hi as f64) };
        let pad = ((hi - lo) * 0.04).max(1.0);
        lo - pad..hi + pad
    }

    /// The losses drawn, padded (room on top for the legend).
    fn losses(&self) -> std::ops::Range<f64> {
        let all = self.members.iter().chain(&self.published).map(|p| p.1);
        let (lo, hi) =
            all.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| (l.min(x), h.max(x)));
        if lo > hi {
            return 0.0..1.0;
        }
        let span = (hi - lo).max(1e-6 * hi.abs().max(1.0));
        lo - span * 0.1..hi + span * 0.45
    }
}

/// Steps are whole numbers; axis positions between them print rounded.
fn step_label(x: &f64) -> String {
    format!("{x:.0}")
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// The SVG of `entries`; the error says why it cannot be drawn.
pub fn draw(entries: &[Entry]) -> Result<String, String> {
    let run = Run::of(entries);
    if run.publications.is_empty() {
        return Err("no publication recorded yet".into());
    }
    let mut svg = String::new();
    {
        let rows = run.publications.len() as u32;
        let height = 380 + (14 * rows).clamp(200, 1400);
        let root = SVGBackend::with_string(&mut svg, (1000, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(380);
        draw_losses(&top, &run)?;
        draw_publications(&bottom, &run)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn title(run: &Run) -> String {
    let n = run.publications.len();
    let mut t = format!("sewa watch run: {n} publications, {} members' losses", run.members.len());
    if run.left_out > 0 {
        t.push_str(&format!(" (the {} oldest publications not drawn)", run.left_out));
    }
    t
}

/// Loss by training step: each member's own, and the published average's.
fn draw_losses(area: &Area<'_>, run: &Run) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mut chart = ChartBuilder::on(area)
        .caption(title(run), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(run.steps(), run.losses())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("training step")
        .x_label_formatter(&step_label)
        .y_desc("loss on the selection data")
        .draw()
        .map_err(|e| err(&e))?;
    let series = [
        (&run.members, MEMBER, "each member's own loss"),
        (&run.published, PUBLISHED, "the published average's loss (at its newest member's step)"),
    ];
    for (points, colour, label) in series {
        if points.is_empty() {
            continue;
        }
        let pts: Vec<(f64, f64)> = points.iter().map(|(s, l)| (*s as f64, *l)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(1)))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, colour.filled())))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 3), (x + 14, y + 3)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| err(&e))
}

/// One row per publication (oldest at the top), a dot at each member it used, sized by weight.
fn draw_publications(area: &Area<'_>, run: &Run) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let n = run.publications.len();
    let rows = n as f64 - 0.5..-0.5;
    let mut chart = ChartBuilder::on(area)
        .caption("members each publication used (dot area: weight)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(150)
        .build_cartesian_2d(run.steps(), rows)
        .map_err(|e| err(&e))?;
    let label = |y: &f64| {
        let i = y.round();
        let publication = (i >= 0.0).then(|| run.publications.get(i as usize)).flatten();
        let step = publication.and_then(|p| p.0).map_or("?".into(), |s| s.to_string());
        publication.map_or(String::new(), |_| format!("#{} at step {step}", i as usize + 1))
    };
    chart
        .configure_mesh()
        .x_desc("training step of the member")
        .x_label_formatter(&step_label)
        .y_labels(n.min(25))
        .y_label_formatter(&label)
        .draw()
        .map_err(|e| err(&e))?;
    let dots = run.publications.iter().enumerate().flat_map(|(i, (_, used))| {
        used.iter().map(move |(step, w)| {
            let r = 2.0 + 6.0 * w.clamp(0.0, 1.0).sqrt();
            Circle::new((*step as f64, i as f64), r.round() as u32, USED.filled())
        })
    });
    chart.draw_series(dots).map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{EntryMember, StepLoss};

    fn entry(step: u64, used: &[(u64, f64)], loss: Option<f64>) -> Entry {
        Entry {
            at: "t".into(),
            step: Some(step),
            method: "greedy".into(),
            loss,
            members: used
                .iter()
                .map(|(s, w)| EntryMember {
                    path: s.to_string().into(),
                    step: *s,
                    weight: *w,
                    loss: None,
                })
                .collect(),
            window: (1..=step).map(|s| StepLoss { step: s, loss: 1.0 / s as f64 }).collect(),
        }
    }

    fn circles(svg: &str, colour: RGBColor) -> usize {
        let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", colour.0, colour.1, colour.2);
        svg.lines().filter(|l| l.contains("<circle") && l.contains(&fill)).count()
    }

    /// Every member loss, every published loss and every used member is one dot; each
    /// publication has its row label.
    #[test]
    fn every_point_and_publication_is_drawn() {
        let entries = [
            entry(2, &[(1, 0.5), (2, 0.5)], Some(0.4)),
            entry(3, &[(2, 0.5), (3, 0.5)], Some(0.3)),
            entry(5, &[(3, 0.25), (4, 0.25), (5, 0.5)], None),
        ];
        let run = Run::of(&entries);
        assert_eq!(run.members.len(), 5);
        assert_eq!(run.published, [(2, 0.4), (3, 0.3)]);
        let svg = draw(&entries).unwrap();
        assert_eq!(circles(&svg, MEMBER), 5);
        assert_eq!(circles(&svg, PUBLISHED), 2);
        assert_eq!(circles(&svg, USED), 7);
        for label in ["#1 at step 2", "#2 at step 3", "#3 at step 5", "3 publications"] {
            assert!(svg.contains(label), "no {label:?}");
        }
    }

    /// Degenerate runs draw: one step only, no losses at all, extreme steps; none is empty.
    #[test]
    fn degenerate_runs_draw_and_an_empty_one_is_an_error() {
        let mut lone = entry(7, &[(7, 1.0)], Some(2.0));
        lone.window.clear();
        assert!(draw(&[lone.clone()]).unwrap().contains("#1 at step 7"));
        let bare = Entry { loss: None, members: vec![], ..lone.clone() };
        draw(&[bare]).unwrap();
        let far = Entry { step: Some(u64::MAX), ..entry(0, &[(0, 1.0)], Some(-1e150)) };
        draw(&[far, lone]).unwrap();
        assert!(draw(&[]).unwrap_err().contains("no publication"));
    }

    #[test]
    fn only_the_newest_publications_are_drawn() {
        let entries: Vec<Entry> =
            (0..MAX_DRAWN as u64 + 3).map(|s| entry(s, &[(s, 1.0)], None)).collect();
        let run = Run::of(&entries);
        assert_eq!((run.publications.len(), run.left_out), (MAX_DRAWN, 3));
        assert_eq!(run.publications[0].0, Some(3));
    }
}
