//! Hand-written SVG line plots: enough for loss and metric curves, with no plotting crate.
//!
//! The output is a standalone `<svg>` element (no XML declaration) that browsers and GitHub
//! render: a frame, about five "nice" ticks per axis (1, 2 or 5 times a power of ten) with
//! grid lines and numeric labels, one `<polyline>` per series with at least one finite point,
//! and a legend to the right.

use std::fmt::Write as _;

/// One named curve of a line plot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Series {
    /// The legend entry.
    pub name: String,
    /// `(x, y)` points in drawing order; points with a non-finite coordinate are skipped.
    pub points: Vec<(f64, f64)>,
}

/// Tableau 10: distinct hues that stay distinguishable for common colour-vision deficiencies.
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];
/// Past ten series the colours repeat with these dash patterns.
const DASHES: [&str; 3] = ["", "6 3", "2 2"];

const PLOT_WIDTH: f64 = 520.0;
const PLOT_HEIGHT: f64 = 300.0;
const LEFT: f64 = 80.0;
const TOP: f64 = 40.0;
const LEGEND_WIDTH: f64 = 240.0;
const LEGEND_ROW: f64 = 18.0;
/// Legend names longer than this are cut with an ellipsis.
const LEGEND_CHARS: usize = 34;

/// Escapes text for an XML text node or attribute value.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A 1, 2, 5 or 10 multiple of a power of ten close to `value` (Heckbert, Graphics Gems 1990).
fn nice_step(value: f64) -> f64 {
    let exponent = value.log10().floor();
    let power = 10f64.powf(exponent);
    let fraction = value / power;
    let nice = if fraction < 1.5 {
        1.0
    } else if fraction < 3.0 {
        2.0
    } else if fraction < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * power
}

/// An axis: its drawn range and tick values.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    step: f64,
}

impl Axis {
    /// About five nice ticks covering `[min, max]` (both finite, `min <= max`).
    fn new(min: f64, max: f64) -> Self {
        let (min, max) = if max > min {
            (min, max)
        } else if min == 0.0 {
            (-1.0, 1.0)
        } else {
            (min - min.abs() * 0.1, max + max.abs() * 0.1)
        };
        let step = nice_step((max - min) / 4.0);
        if !step.is_finite() || step <= 0.0 {
            return Self { lo: min, hi: max, ticks: vec![min, max], step: max - min };
        }
        let lo = (min / step).floor() * step;
        let hi = (max / step).ceil() * step;
        let count = ((hi - lo) / step).round() as usize;
        let ticks = (0..=count.min(20)).map(|i| lo + i as f64 * step).collect();
        Self { lo, hi, ticks, step }
    }

    /// Fraction of the axis length at `value`.
    fn fraction(&self, value: f64) -> f64 {
        if self.hi > self.lo { (value - self.lo) / (self.hi - self.lo) } else { 0.5 }
    }

    /// A tick label with as many decimals as the step needs.
    fn label(&self, value: f64) -> String {
        let value = if value.abs() < self.step.abs() * 1e-9 { 0.0 } else { value };
        let magnitude = self.lo.abs().max(self.hi.abs());
        if magnitude >= 1e6 || (self.step > 0.0 && self.step < 1e-4) {
            return format!("{value:.2e}");
        }
        let decimals = if self.step >= 1.0 { 0 } else { (-self.step.log10().floor()) as usize };
        format!("{value:.decimals$}")
    }
}

/// Renders a line plot of `series` as a standalone SVG document.
///
/// Axes span the finite points of all series, extended to nice tick values; each series with at
/// least one finite point becomes one `<polyline>` (plus a dot when it has a single point) in
/// its own colour; the legend lists every series, marking those with nothing to draw. When no
/// series has a finite point, the plot area says "no data".
///
/// ```
/// use gems_metrics::report::{Series, svg_line_plot};
/// let series = [Series { name: "loss".into(), points: vec![(1.0, 2.0), (2.0, 1.5)] }];
/// let svg = svg_line_plot("Training loss", "step", "loss", &series);
/// assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
/// ```
pub fn svg_line_plot(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect())
        .collect();
    let mut svg = String::new();
    write_frame(&mut svg, series.len(), [title, x_label, y_label]);
    match bounds(&finite) {
        None => {
            // `write!` into a String cannot fail.
            let _ = writeln!(
                svg,
                r##"<text x="{}" y="{}" text-anchor="middle" fill="#666">no data</text>"##,
                LEFT + PLOT_WIDTH / 2.0,
                TOP + PLOT_HEIGHT / 2.0
            );
        }
        Some((x_min, x_max, y_min, y_max)) => {
            let plane = Plane { x_axis: Axis::new(x_min, x_max), y_axis: Axis::new(y_min, y_max) };
            plane.write_grid(&mut svg);
            plane.write_curves(&mut svg, &finite);
        }
    }
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" fill="none" stroke="black"/>"#
    );
    write_legend(&mut svg, series, &finite);
    svg.push_str("</svg>\n");
    svg
}

/// `(x_min, x_max, y_min, y_max)` over every point of `finite`, or `None` when it has none.
fn bounds(finite: &[Vec<(f64, f64)>]) -> Option<(f64, f64, f64, f64)> {
    let all = finite.iter().flatten();
    all.fold(None, |acc: Option<(f64, f64, f64, f64)>, &(x, y)| {
        Some(match acc {
            None => (x, x, y, y),
            Some((x0, x1, y0, y1)) => (x0.min(x), x1.max(x), y0.min(y), y1.max(y)),
        })
    })
}

/// Writes the opening `<svg>` tag sized for `n_series` legend rows, the white background, the
/// title and the axis labels (`labels` is title, x label, y label).
fn write_frame(svg: &mut String, n_series: usize, labels: [&str; 3]) {
    let [title, x_label, y_label] = labels;
    let bottom = TOP + PLOT_HEIGHT;
    let right = LEFT + PLOT_WIDTH;
    let width = right + LEGEND_WIDTH;
    let legend_bottom = TOP + LEGEND_ROW * (n_series as f64 + 1.0);
    let height = (bottom + 60.0).max(legend_bottom + 10.0);

    // `write!` into a String cannot fail.
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        LEFT + PLOT_WIDTH / 2.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + PLOT_WIDTH / 2.0,
        bottom + 44.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{0}" text-anchor="middle" transform="rotate(-90 18 {0})">{1}</text>"#,
        TOP + PLOT_HEIGHT / 2.0,
        escape(y_label)
    );
}

/// The plot area's two axes, mapping data coordinates to SVG coordinates.
struct Plane {
    x_axis: Axis,
    y_axis: Axis,
}

impl Plane {
    /// The SVG x coordinate of data value `x`.
    fn px(&self, x: f64) -> f64 {
        LEFT + self.x_axis.fraction(x) * PLOT_WIDTH
    }

    /// The SVG y coordinate of data value `y`.
    fn py(&self, y: f64) -> f64 {
        let bottom = TOP + PLOT_HEIGHT;
        bottom - self.y_axis.fraction(y) * PLOT_HEIGHT
    }

    /// Writes a grid line and a label at every tick of both axes.
    fn write_grid(&self, svg: &mut String) {
        let bottom = TOP + PLOT_HEIGHT;
        let right = LEFT + PLOT_WIDTH;
        // `write!` into a String cannot fail.
        for &tick in &self.x_axis.ticks {
            let x = self.px(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.2}" y1="{TOP}" x2="{x:.2}" y2="{bottom}" stroke="#e5e5e5"/><text x="{x:.2}" y="{}" text-anchor="middle">{}</text>"##,
                bottom + 18.0,
                self.x_axis.label(tick)
            );
        }
        for &tick in &self.y_axis.ticks {
            let y = self.py(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{y:.2}" x2="{right}" y2="{y:.2}" stroke="#e5e5e5"/><text x="{}" y="{:.2}" text-anchor="end">{}</text>"##,
                LEFT - 6.0,
                y + 4.0,
                self.y_axis.label(tick)
            );
        }
    }

    /// Writes one `<polyline>` per non-empty series of `finite` (plus a dot for a single point).
    fn write_curves(&self, svg: &mut String, finite: &[Vec<(f64, f64)>]) {
        for (index, points) in finite.iter().enumerate() {
            if points.is_empty() {
                continue;
            }
            let (colour, dash) = style(index);
            let coordinates: Vec<String> = points
                .iter()
                .map(|&(x, y)| format!("{:.2},{:.2}", self.px(x), self.py(y)))
                .collect();
            // `write!` into a String cannot fail.
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"/>"#,
                coordinates.join(" ")
            );
            if let [(x, y)] = points[..] {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.2}" cy="{:.2}" r="3" fill="{colour}"/>"#,
                    self.px(x),
                    self.py(y)
                );
            }
        }
    }
}

/// Writes the legend right of the plot: one row per series, cut to [`LEGEND_CHARS`] and marked
/// "(no data)" when its series in `finite` is empty.
fn write_legend(svg: &mut String, series: &[Series], finite: &[Vec<(f64, f64)>]) {
    let right = LEFT + PLOT_WIDTH;
    for (index, s) in series.iter().enumerate() {
        let (colour, dash) = style(index);
        let y = TOP + LEGEND_ROW * (index as f64 + 0.5);
        let x = right + 16.0;
        let mut name: String = s.name.chars().take(LEGEND_CHARS).collect();
        if s.name.chars().count() > LEGEND_CHARS {
            name.push('…');
        }
        if finite[index].is_empty() {
            name.push_str(" (no data)");
        }
        // `write!` into a String cannot fail.
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            x + 22.0,
            x + 28.0,
            y + 4.0,
            escape(&name)
        );
    }
}

/// Colour and dash attribute of the series at `index`.
fn style(index: usize) -> (&'static str, String) {
    let colour = PALETTE[index % PALETTE.len()];
    let dash = DASHES[(index / PALETTE.len()) % DASHES.len()];
    let dash =
        if dash.is_empty() { String::new() } else { format!(r#" stroke-dasharray="{dash}""#) };
    (colour, dash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ticks_cover_the_range() {
        let axis = Axis::new(0.13, 0.87);
        assert_eq!(axis.step, 0.2);
        assert!(axis.lo <= 0.13 && axis.hi >= 0.87);
        assert!((4..=7).contains(&axis.ticks.len()), "{:?}", axis.ticks);
        assert_eq!(axis.label(0.4), "0.4");
        let steps = Axis::new(1.0, 1000.0);
        assert_eq!(steps.label(500.0), "500");
    }

    #[test]
    fn degenerate_ranges_still_draw() {
        let constant = Axis::new(3.0, 3.0);
        assert!(constant.lo < 3.0 && constant.hi > 3.0);
        let zero = Axis::new(0.0, 0.0);
        assert!(zero.lo < 0.0 && zero.hi > 0.0);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
