//! The run as a picture (SVG, drawn with `plotters`): operations per second by outcome
//! above, their latency (median and 99th percentile) below, and every fault the nemesis
//! injected as a vertical line in its kind's colour — where a fault hurt is where the
//! lines bend.

use crate::report::Report;
use plotters::prelude::*;
use std::collections::BTreeMap;

/// A line: its name, its colour, and its value in one second.
type Series = (&'static str, RGBColor, fn(&crate::report::Second) -> u64);

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 720;

/// The SVG of `report`.
pub fn svg(report: &Report) -> Result<String, String> {
    let mut out = String::new();
    draw(report, &mut out).map_err(|e| format!("drawing the report: {e}"))?;
    Ok(out)
}

fn draw(report: &Report, out: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let violations = report.total_violations();
    let title = format!(
        "make torture: {} topology, seed {}, {} violation{}",
        report.topology,
        report.plan.seed,
        violations,
        if violations == 1 { "" } else { "s" }
    );
    let (top, bottom) = root
        .titled(&title, ("sans-serif", 20))?
        .split_vertically(HEIGHT / 2 - 10);

    // The nemesis's kinds, each with a colour of its own.
    let kinds: Vec<&str> = report
        .fault_timeline
        .iter()
        .map(|f| f.kind)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let colour: BTreeMap<&str, RGBColor> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let c = Palette99::pick(i + 3).to_rgba();
            (*k, RGBColor(c.0, c.1, c.2))
        })
        .collect();

    let ops: [Series; 3] = [
        ("ok", RGBColor(30, 130, 60), |s| s.ok),
        ("fail (a definite refusal)", RGBColor(200, 120, 20), |s| {
            s.fail
        }),
        ("info (outcome unknown)", RGBColor(190, 30, 40), |s| s.info),
    ];
    let latency: [Series; 2] = [
        ("median", RGBColor(40, 80, 170), |s| s.p50_ms),
        ("99th percentile", RGBColor(120, 40, 150), |s| s.p99_ms),
    ];
    let faults = Faults {
        report,
        kinds: &kinds,
        colour: &colour,
    };
    // Operations per second, with the fault kinds in the legend; then their latency,
    // over the seconds in which operations ended.
    panel(&top, &faults, "operations ended / s", &ops, true)?;
    panel(&bottom, &faults, "latency (ms)", &latency, false)?;
    root.present()?;
    Ok(())
}

/// The run's nemesis faults, and the colour of each kind.
struct Faults<'a> {
    report: &'a Report,
    kinds: &'a [&'a str],
    colour: &'a BTreeMap<&'a str, RGBColor>,
}

/// One half of the picture: `series` over the seconds of the load, every fault as a
/// vertical line; `with_kinds`: the fault kinds in the legend too (and every second
/// drawn, idle ones included, since a count of zero is a figure, where a latency is
/// not).
fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    faults: &Faults<'_>,
    y_desc: &str,
    series: &[Series],
    with_kinds: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let report = faults.report;
    let seconds = report.seconds.len().max(1) as f64;
    let top = report
        .seconds
        .iter()
        .flat_map(|s| series.iter().map(move |(_, _, value)| value(s)))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..seconds, 0f64..top)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("seconds of load")
        .y_desc(y_desc)
        .draw()?;
    for fault in &report.fault_timeline {
        let x = fault.at_ms as f64 / 1000.0;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, 0.0), (x, top)],
            faults.colour[fault.kind].mix(0.7).stroke_width(1),
        )))?;
    }
    for &(name, c, value) in series {
        chart
            .draw_series(LineSeries::new(
                report
                    .seconds
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| with_kinds || s.ok + s.fail + s.info > 0)
                    .map(|(i, s)| (i as f64 + 0.5, value(s) as f64)),
                c.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    if with_kinds {
        for kind in faults.kinds {
            let c = faults.colour[kind];
            let n = report
                .fault_timeline
                .iter()
                .filter(|f| f.kind == *kind)
                .count();
            chart
                .draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
                .label(format!("{kind} ×{n}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x + 9, y - 6), (x + 9, y + 6)], c.stroke_width(2))
                });
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}
