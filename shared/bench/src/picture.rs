//! A `make bench` run as a picture (SVG, drawn with `plotters`), from the JSON files the
//! run wrote: per concurrency level and topology, commands/s against the bare backends'
//! ceiling, command latency (median and 99th percentile), projection lag, transfers/s
//! and a transfer's request→end latency; and the rebuild rate per topology.
//!
//! It reads the JSON as values, not as [`crate::Report`]s, so that a run's files keep
//! drawing after the report gains a field.

use plotters::prelude::*;
use serde_json::Value;

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 1250;

/// What a run wrote: each topology's load report, and each rebuild's summary.
#[derive(Debug, Default)]
pub struct Run {
    /// (topology, its load report).
    pub loads: Vec<(String, Value)>,
    /// (topology, its rebuild summary: `events_per_second`, `events`, `seconds`).
    pub rebuilds: Vec<(String, Value)>,
}

/// The SVG of `run`.
pub fn svg(run: &Run) -> Result<String, String> {
    let mut out = String::new();
    draw(run, &mut out).map_err(|e| format!("drawing the bench run: {e}"))?;
    Ok(out)
}

/// One line of a panel: its name and its points (level index, value).
type Line = (String, RGBColor, Vec<(f64, f64)>);

/// A topology's colour, a shade lighter for its second line (p99, the ceiling).
fn colour(topology: usize, second: bool) -> RGBColor {
    const BASE: [(u8, u8, u8); 4] = [(40, 80, 170), (200, 90, 20), (30, 130, 60), (120, 40, 150)];
    let (r, g, b) = BASE[topology % BASE.len()];
    if second {
        let lighten = |c: u8| c + (255 - c) / 2;
        RGBColor(lighten(r), lighten(g), lighten(b))
    } else {
        RGBColor(r, g, b)
    }
}

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The concurrency levels of every load, in order.
fn levels(run: &Run) -> Vec<u64> {
    let mut levels: Vec<u64> = run
        .loads
        .iter()
        .flat_map(|(_, r)| r["levels"].as_array().cloned().unwrap_or_default())
        .filter_map(|l| l["concurrency"].as_u64())
        .collect();
    levels.sort_unstable();
    levels.dedup();
    levels
}

/// `value` of every level of `key` (`levels` or `transfers`) of `report`, at the index
/// of its concurrency among `all`.
fn per_level(
    report: &Value,
    key: &str,
    all: &[u64],
    value: impl Fn(&Value) -> f64,
) -> Vec<(f64, f64)> {
    report[key]
        .as_array()
        .map(|levels| {
            levels
                .iter()
                .filter_map(|l| {
                    let at = all
                        .iter()
                        .position(|c| Some(*c) == l["concurrency"].as_u64())?;
                    let v = value(l);
                    v.is_finite().then_some((at as f64, v))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Commands/s of a level: its deposits and withdrawals per second, as tally-bench wrote
/// them (`Level::commands_per_second`).
fn commands_per_second(level: &Value) -> f64 {
    number(&level["commands_per_second"])
}

/// The slowest bare backend of a ceiling level that a command on event store `store`
/// needs one of each of (S3 only when the events are in S3).
fn slowest(level: &Value, store: &str) -> f64 {
    ["s3_conditional_put", "broker_produce", "postgres_upsert"]
        .iter()
        .filter(|b| store != "postgres" || !b.starts_with("s3"))
        .map(|b| number(&level[b]["per_second"]))
        .filter(|v| v.is_finite())
        .fold(f64::INFINITY, f64::min)
}

fn draw(run: &Run, out: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let commit = run
        .loads
        .first()
        .and_then(|(_, r)| r["commit"].as_str())
        .unwrap_or("unknown");
    let title = format!("make bench at {commit}: per concurrency level and topology");
    let root = root.titled(&title, ("sans-serif", 20))?;
    let panels = root.split_evenly((3, 2));
    let all = levels(run);

    let mut throughput = Vec::new();
    let mut latency = Vec::new();
    let mut lag = Vec::new();
    let mut transfers = Vec::new();
    let mut to_end = Vec::new();
    for (i, (name, report)) in run.loads.iter().enumerate() {
        throughput.push((
            format!("{name}: commands/s"),
            colour(i, false),
            per_level(report, "levels", &all, commands_per_second),
        ));
        if report["ceiling"].is_object() {
            throughput.push((
                format!("{name}: ceiling (slowest bare backend)"),
                colour(i, true),
                per_level(&report["ceiling"], "levels", &all, |level| {
                    slowest(level, report["ceiling"]["store"].as_str().unwrap_or("s3"))
                }),
            ));
        }
        for (p, second) in [("p50_ms", false), ("p99_ms", true)] {
            let label = if second { "p99" } else { "p50" };
            latency.push((
                format!("{name}: deposit {label}"),
                colour(i, second),
                per_level(report, "levels", &all, |l| number(&l["ops"]["deposit"][p])),
            ));
            lag.push((
                format!("{name}: lag {label}"),
                colour(i, second),
                per_level(report, "levels", &all, |l| number(&l["projection_lag"][p])),
            ));
            to_end.push((
                format!("{name}: request→end {label}"),
                colour(i, second),
                per_level(report, "transfers", &all, |l| number(&l["to_end"][p])),
            ));
        }
        transfers.push((
            format!("{name}: transfers/s"),
            colour(i, false),
            per_level(report, "transfers", &all, |l| {
                number(&l["to_end"]["per_second"])
            }),
        ));
    }
    lines(&panels[0], "commands / s", &all, &throughput)?;
    lines(&panels[1], "command latency (ms)", &all, &latency)?;
    lines(&panels[2], "projection lag (ms)", &all, &lag)?;
    lines(&panels[3], "transfers / s", &all, &transfers)?;
    lines(&panels[4], "transfer request → end (ms)", &all, &to_end)?;
    rebuilds(&panels[5], run)?;
    root.present()?;
    Ok(())
}

/// A panel of lines over the concurrency levels (x: the levels, evenly spaced).
fn lines(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    y_desc: &str,
    levels: &[u64],
    series: &[Line],
) -> Result<(), Box<dyn std::error::Error>> {
    let top = series
        .iter()
        .flat_map(|(_, _, points)| points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.15;
    let last = levels.len().saturating_sub(1).max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .margin(14)
        .x_label_area_size(30)
        .y_label_area_size(56)
        .build_cartesian_2d(-0.2f64..last + 0.2, 0f64..top)?;
    let names = levels.to_vec();
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels(levels.len().max(2))
        .x_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 0.05 && i >= 0.0 {
                names
                    .get(i as usize)
                    .map(|c| format!("c={c}"))
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("concurrency")
        .y_desc(y_desc)
        .draw()?;
    for (name, c, points) in series.iter().filter(|(_, _, p)| !p.is_empty()) {
        let c = *c;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 12))
        .draw()?;
    Ok(())
}

/// The rebuild rate per topology, as bars.
fn rebuilds(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    run: &Run,
) -> Result<(), Box<dyn std::error::Error>> {
    let rates: Vec<(String, f64)> = run
        .rebuilds
        .iter()
        .map(|(name, r)| (name.clone(), number(&r["events_per_second"])))
        .filter(|(_, v)| v.is_finite())
        .collect();
    let top = rates.iter().map(|r| r.1).fold(1.0, f64::max) * 1.15;
    let n = rates.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .margin(14)
        .x_label_area_size(30)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..n, 0f64..top)?;
    let names: Vec<String> = rates.iter().map(|r| r.0.clone()).collect();
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_labels(rates.len().max(1) * 2 + 1)
        .x_label_formatter(&|v| {
            let i = (v - 0.5).round();
            if (v - 0.5 - i).abs() < 0.05 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("admin rebuild, from each topology's store")
        .y_desc("events / s")
        .draw()?;
    for (i, (_, rate)) in rates.iter().enumerate() {
        let x = i as f64;
        let c = colour(i, false);
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.2, 0.0), (x + 0.8, *rate)],
            c.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{rate:.0}/s"),
            (x + 0.3, rate + top * 0.03),
            ("sans-serif", 13),
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn level(c: u64, deposits: u64) -> Value {
        json!({"concurrency": c, "seconds": 1.0, "commands_per_second": 2 * deposits,
               "ops": {"deposit": {"count": deposits, "p50_ms": 2.0, "p99_ms": 9.0},
                       "withdraw": {"count": deposits}},
               "projection_lag": {"p50_ms": 1.0, "p99_ms": 4.0}})
    }

    #[test]
    fn a_run_draws_every_panel_with_its_topologies_and_the_ceiling() {
        let run = Run {
            loads: vec![
                (
                    "dev".into(),
                    json!({"commit": "abc1234", "levels": [level(1, 100), level(16, 400)],
                           "transfers": [{"concurrency": 1, "to_end": {"per_second": 50.0, "p50_ms": 8.0, "p99_ms": 12.0}}]}),
                ),
                (
                    "stack".into(),
                    json!({"commit": "abc1234", "levels": [level(1, 10), level(16, 30)],
                           "ceiling": {"levels": [{"concurrency": 1,
                               "s3_conditional_put": {"per_second": 300.0},
                               "broker_produce": {"per_second": 600.0},
                               "postgres_upsert": {"per_second": 2000.0}}]}}),
                ),
            ],
            rebuilds: vec![
                ("dev".into(), json!({"events_per_second": 78000})),
                ("stack".into(), json!({"events_per_second": 360})),
            ],
        };
        let svg = svg(&run).unwrap();
        for text in [
            "make bench at abc1234",
            "dev: commands/s",
            "stack: ceiling (slowest bare backend)",
            "command latency (ms)",
            "projection lag (ms)",
            "transfers / s",
            "dev: request→end p99",
            "c=16",
            "78000/s",
        ] {
            assert!(svg.contains(text), "{text} is missing");
        }
        // The deposit+withdraw rate: 2 × 400 at c=16 on dev is the highest point.
        assert!(commands_per_second(&level(16, 400)) == 800.0);
    }
}
