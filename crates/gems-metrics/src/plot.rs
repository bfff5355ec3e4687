//! Hand-written SVG plots, with no plotting crate: line plots for loss and metric curves, and
//! scatter plots of groups of runs (one marker per run, the groups' medians with whiskers).
//!
//! The output is a standalone `<svg>` element (no XML declaration) that browsers and GitHub
//! render: a frame, about five "nice" ticks per axis (1, 2 or 5 times a power of ten; on a
//! logarithmic axis the 1-2-5 values of each decade) with grid lines and numeric labels, the
//! curves or markers, and a legend to the right.

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
    /// Logarithmic: positions by `log10` of the value, ticks at 1, 2 and 5 times powers of ten.
    log: bool,
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
            return Self { lo: min, hi: max, ticks: vec![min, max], step: max - min, log: false };
        }
        let lo = (min / step).floor() * step;
        let hi = (max / step).ceil() * step;
        let count = ((hi - lo) / step).round() as usize;
        let ticks = (0..=count.min(20)).map(|i| lo + i as f64 * step).collect();
        Self { lo, hi, ticks, step, log: false }
    }

    /// A logarithmic axis covering `[min, max]` (both finite and positive, `min <= max`): it
    /// runs from the largest 1-2-5 value at or below `min` to the smallest at or above `max`,
    /// with a tick at each 1-2-5 value between them, or only at the powers of ten when that
    /// would be more than ten ticks.
    fn log(min: f64, max: f64) -> Self {
        let (min, max) = if max > min { (min, max) } else { (min / 2.0, max * 2.0) };
        let mut values = Vec::new();
        let (first, last) = (min.log10().floor() as i32 - 1, max.log10().ceil() as i32 + 1);
        for exponent in first..=last {
            for mantissa in [1.0, 2.0, 5.0] {
                values.push(mantissa * 10f64.powi(exponent));
            }
        }
        // Tolerate rounding in the powers: 1e-9 relative.
        let mut lo =
            values.iter().rev().find(|&&v| v <= min * (1.0 + 1e-9)).copied().unwrap_or(min);
        let mut hi = values.iter().find(|&&v| v >= max * (1.0 - 1e-9)).copied().unwrap_or(max);
        let is_power = |v: f64| (v.log10() - v.log10().round()).abs() < 1e-9;
        if values.iter().filter(|&&v| v >= lo && v <= hi).count() > 10 {
            // Whole decades, so that the ends have ticks too.
            lo = 10f64.powf(lo.log10().floor());
            hi = 10f64.powf(hi.log10().ceil());
            values.retain(|&v| is_power(v));
        }
        let ticks = values
            .into_iter()
            .filter(|&v| v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9))
            .collect();
        Self { lo, hi, ticks, step: lo, log: true }
    }

    /// The axis over `[min, max]`: logarithmic when `log`, both are positive and they span at
    /// least a decade (a narrower range reads better on a linear axis's finer ticks), else
    /// linear.
    fn spanning(min: f64, max: f64, log: bool) -> Self {
        if log && min > 0.0 && max >= 10.0 * min {
            Self::log(min, max)
        } else {
            Self::new(min, max)
        }
    }

    /// Fraction of the axis length at `value`.
    fn fraction(&self, value: f64) -> f64 {
        if self.hi <= self.lo {
            0.5
        } else if self.log {
            (value.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (value - self.lo) / (self.hi - self.lo)
        }
    }

    /// A tick label with as many decimals as the step needs (on a logarithmic axis, as the
    /// value itself needs).
    fn label(&self, value: f64) -> String {
        if self.log {
            let decimals = if value >= 1.0 { 0 } else { (-value.log10().floor()) as usize };
            return format!("{value:.decimals$}");
        }
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
        None => write_no_data(&mut svg),
        Some((x_min, x_max, y_min, y_max)) => {
            let plane = Plane { x_axis: Axis::new(x_min, x_max), y_axis: Axis::new(y_min, y_max) };
            plane.write_grid(&mut svg);
            plane.write_curves(&mut svg, &finite);
        }
    }
    write_border(&mut svg);
    write_legend(&mut svg, series, &finite);
    svg.push_str("</svg>\n");
    svg
}

/// Whether `value` can be drawn on an axis that is logarithmic when `log`: finite, and positive
/// on a logarithmic one.
fn drawable(value: f64, log: bool) -> bool {
    value.is_finite() && (!log || value > 0.0)
}

/// Writes the plot area's black border.
fn write_border(svg: &mut String) {
    // `write!` into a String cannot fail.
    let _ = writeln!(
        svg,
        r#"<rect x="{LEFT}" y="{TOP}" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" fill="none" stroke="black"/>"#
    );
}

/// Writes "no data" in the middle of the plot area.
fn write_no_data(svg: &mut String) {
    // `write!` into a String cannot fail.
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#666">no data</text>"##,
        LEFT + PLOT_WIDTH / 2.0,
        TOP + PLOT_HEIGHT / 2.0
    );
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
        let name = legend_name(&s.name, finite[index].is_empty());
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

/// A group of points of a scatter plot, such as the seeds of one configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PointGroup {
    /// The legend entry.
    pub name: String,
    /// One `(x, y)` per member; points an axis cannot show (a non-finite coordinate, or one not
    /// positive on a logarithmic axis) are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A labelled reference line across a scatter plot, such as a floor or the untuned model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reference {
    /// Written along the line.
    pub label: String,
    /// Where the line crosses its axis.
    pub value: f64,
    /// A vertical line at x = `value`; else a horizontal one at y = `value`.
    pub vertical: bool,
}

/// What [`svg_scatter_plot`] draws.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scatter {
    /// The title above the plot.
    pub title: String,
    /// The x axis's label.
    pub x_label: String,
    /// The y axis's label.
    pub y_label: String,
    /// A logarithmic x axis when the x values span at least a decade (the x label then says
    /// "(log scale)"), else a linear one; either way x values that are not positive are left
    /// out.
    pub log_x: bool,
    /// The groups, each in its own colour and marker shape.
    pub groups: Vec<PointGroup>,
    /// Reference lines, drawn dashed and grey beneath the markers; they widen the axes to fit.
    pub references: Vec<Reference>,
}

/// Renders a scatter plot of groups of points as a standalone SVG document.
///
/// Each member of a group is a small hollow marker in the group's colour and shape; the group's
/// median (of x and of y separately) is a large filled marker, with whiskers from the smallest
/// to the largest member on each axis when it has more than one. So three seeds of a
/// configuration read as one point with its spread. The legend lists every group, marking those
/// with nothing to draw; reference lines carry their labels inside the plot.
///
/// ```
/// use gems_metrics::report::{PointGroup, Scatter, svg_scatter_plot};
/// let plot = Scatter {
///     title: "Ranking against retention".into(),
///     log_x: true,
///     groups: vec![PointGroup { name: "gems".into(), points: vec![(48.0, 0.06), (47.0, 0.04)] }],
///     ..Scatter::default()
/// };
/// let svg = svg_scatter_plot(&plot);
/// assert!(svg.starts_with("<svg") && svg.contains("<circle"));
/// ```
pub fn svg_scatter_plot(plot: &Scatter) -> String {
    let x_drawable = |x: f64| drawable(x, plot.log_x);
    let finite: Vec<Vec<(f64, f64)>> = plot
        .groups
        .iter()
        .map(|g| {
            g.points.iter().copied().filter(|&(x, y)| x_drawable(x) && y.is_finite()).collect()
        })
        .collect();
    let references: Vec<&Reference> = plot
        .references
        .iter()
        .filter(|r| if r.vertical { x_drawable(r.value) } else { r.value.is_finite() })
        .collect();
    let plane = bounds(&finite).map(|(mut x_min, mut x_max, mut y_min, mut y_max)| {
        for r in &references {
            let (lo, hi) =
                if r.vertical { (&mut x_min, &mut x_max) } else { (&mut y_min, &mut y_max) };
            *lo = lo.min(r.value);
            *hi = hi.max(r.value);
        }
        Plane { x_axis: Axis::spanning(x_min, x_max, plot.log_x), y_axis: Axis::new(y_min, y_max) }
    });
    let x_label = match &plane {
        Some(plane) if plane.x_axis.log => format!("{} (log scale)", plot.x_label),
        _ => plot.x_label.clone(),
    };
    let mut svg = String::new();
    write_frame(&mut svg, plot.groups.len(), [&plot.title, &x_label, &plot.y_label]);
    match plane {
        None => write_no_data(&mut svg),
        Some(plane) => {
            plane.write_grid(&mut svg);
            plane.write_references(&mut svg, &references);
            plane.write_groups(&mut svg, &finite);
        }
    }
    write_border(&mut svg);
    write_marker_legend(&mut svg, &plot.groups, &finite);
    svg.push_str("</svg>\n");
    svg
}

/// The median of `values` (not empty): the middle one, or the mean of the middle two.
pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

impl Plane {
    /// Writes each reference as a dashed grey line across the plot with its label inside.
    fn write_references(&self, svg: &mut String, references: &[&Reference]) {
        let (bottom, right) = (TOP + PLOT_HEIGHT, LEFT + PLOT_WIDTH);
        for r in references {
            // `write!` into a String cannot fail.
            let _ = if r.vertical {
                let x = self.px(r.value);
                writeln!(
                    svg,
                    r##"<line x1="{x:.2}" y1="{TOP}" x2="{x:.2}" y2="{bottom}" stroke="#888" stroke-dasharray="5 3"/><text x="{:.2}" y="{}" font-size="10" fill="#555">{}</text>"##,
                    x + 3.0,
                    TOP + 12.0,
                    escape(&r.label)
                )
            } else {
                let y = self.py(r.value);
                writeln!(
                    svg,
                    r##"<line x1="{LEFT}" y1="{y:.2}" x2="{right}" y2="{y:.2}" stroke="#888" stroke-dasharray="5 3"/><text x="{}" y="{:.2}" font-size="10" fill="#555" text-anchor="end">{}</text>"##,
                    right - 4.0,
                    y - 3.0,
                    escape(&r.label)
                )
            };
        }
    }

    /// Writes every group of `finite`: a hollow marker per point, then the median as a filled
    /// marker with whiskers over the points' range on each axis.
    fn write_groups(&self, svg: &mut String, finite: &[Vec<(f64, f64)>]) {
        for (index, points) in finite.iter().enumerate() {
            if points.is_empty() {
                continue;
            }
            let (colour, _) = style(index);
            let shape = index / PALETTE.len();
            for &(x, y) in points {
                marker(svg, shape, (self.px(x), self.py(y)), 3.0, ("none", colour));
            }
            let mut xs: Vec<f64> = points.iter().map(|p| p.0).collect();
            let mut ys: Vec<f64> = points.iter().map(|p| p.1).collect();
            let (mx, my) = (self.px(median(&mut xs)), self.py(median(&mut ys)));
            if points.len() > 1 {
                let (x0, x1) = (self.px(xs[0]), self.px(xs[xs.len() - 1]));
                let (y0, y1) = (self.py(ys[0]), self.py(ys[ys.len() - 1]));
                // `write!` into a String cannot fail.
                let _ = writeln!(
                    svg,
                    r#"<path d="M{x0:.2},{my:.2}H{x1:.2}M{mx:.2},{y0:.2}V{y1:.2}" stroke="{colour}" stroke-width="1.2" fill="none"/>"#
                );
            }
            marker(svg, shape, (mx, my), 5.5, (colour, "black"));
        }
    }
}

/// Writes a marker of `shape` (circle, square, triangle, diamond, by `shape % 4`) of radius
/// `r` centred at `at`, with `paint` = (fill, stroke).
fn marker(svg: &mut String, shape: usize, at: (f64, f64), r: f64, paint: (&str, &str)) {
    let ((x, y), (fill, stroke)) = (at, paint);
    let style = format!(r#"fill="{fill}" stroke="{stroke}" stroke-width="1""#);
    let polygon = |corners: &[(f64, f64)]| {
        let points: Vec<String> =
            corners.iter().map(|(dx, dy)| format!("{:.2},{:.2}", x + dx * r, y + dy * r)).collect();
        format!(r#"<polygon points="{}" {style}/>"#, points.join(" "))
    };
    let element = match shape % 4 {
        0 => format!(r#"<circle cx="{x:.2}" cy="{y:.2}" r="{r}" {style}/>"#),
        1 => polygon(&[(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]),
        2 => polygon(&[(0.0, -1.15), (1.0, 0.75), (-1.0, 0.75)]),
        _ => polygon(&[(0.0, -1.2), (1.0, 0.0), (0.0, 1.2), (-1.0, 0.0)]),
    };
    // `write!` into a String cannot fail.
    let _ = writeln!(svg, "{element}");
}

/// Writes the scatter plot's legend right of the plot: one row per group with its marker, cut
/// to [`LEGEND_CHARS`] and marked "(no data)" when its points in `finite` are empty.
fn write_marker_legend(svg: &mut String, groups: &[PointGroup], finite: &[Vec<(f64, f64)>]) {
    let x = LEFT + PLOT_WIDTH + 16.0;
    for (index, group) in groups.iter().enumerate() {
        let (colour, _) = style(index);
        let y = TOP + LEGEND_ROW * (index as f64 + 0.5);
        marker(svg, index / PALETTE.len(), (x + 11.0, y), 5.0, (colour, "black"));
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}">{}</text>"#,
            x + 28.0,
            y + 4.0,
            escape(&legend_name(&group.name, finite[index].is_empty()))
        );
    }
}

/// A legend entry: `name` cut to [`LEGEND_CHARS`] with an ellipsis, marked "(no data)" when
/// `empty`.
fn legend_name(name: &str, empty: bool) -> String {
    let mut text: String = name.chars().take(LEGEND_CHARS).collect();
    if name.chars().count() > LEGEND_CHARS {
        text.push('…');
    }
    if empty {
        text.push_str(" (no data)");
    }
    text
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
    fn log_axes_tick_at_one_two_five() {
        let axis = Axis::spanning(47.2, 16_441.0, true);
        assert_eq!((axis.lo, axis.hi), (20.0, 20_000.0));
        assert_eq!(axis.ticks.len(), 10, "{:?}", axis.ticks);
        assert_eq!(axis.label(5000.0), "5000");
        assert!((axis.fraction(200.0) - 1.0 / 3.0).abs() < 1e-12, "a decade is a third");
        // Many decades keep only the powers of ten; a value below 1 keeps its decimals.
        let wide = Axis::log(0.05, 3.0e6);
        assert_eq!(wide.ticks.first().copied(), Some(0.01));
        assert!(wide.ticks.iter().all(|t| (t.log10() - t.log10().round()).abs() < 1e-9));
        assert_eq!(wide.label(0.01), "0.01");
        // Non-positive values and less than a decade fall back to a linear axis; one value
        // still spans a range.
        assert!(!Axis::spanning(0.0, 10.0, true).log);
        assert!(!Axis::spanning(47.0, 62.0, true).log && Axis::spanning(47.0, 470.0, true).log);
        let single = Axis::log(35.3, 35.3);
        assert!(single.lo < 35.3 && single.hi > 35.3);
        let admits = |v: f64| drawable(v, single.log);
        assert!(!admits(0.0) && admits(1.0) && !admits(f64::NAN));
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0]), 2.5);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
