//! Figures as plain SVG: the coefficients of a soup (α over blocks and models, the paper's
//! Figure 1), its learning curve, and line charts. The `soup` binary and `cargo xtask reproduce`
//! both draw with this crate, so their figures look alike. Hand-written rather than a plotting
//! library: the viewer renders the text with its own fonts, so no font files are needed, and the
//! figures are a few hundred lines of std. Every chart has axes with round tick values, a light
//! grid, axis labels and a legend.

use std::fmt::Write;

/// `text` safe inside SVG text and attributes.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Series colours (of `line_chart`, which `xtask` draws with), distinguishable in print and for the common colour-vision deficiencies.
const COLOURS: [&str; 6] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// About `n` round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi], and their spacing.
pub fn ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, f64) {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, lo + 0.5)
    };
    let raw = (hi - lo) / n.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let values = (first..=last).map(|k| k as f64 * step).collect();
    (values, step)
}

/// A tick value with as many decimals as its spacing needs.
fn label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    format!("{v:.decimals$}")
}

/// A plot area: pixel box and data ranges.
struct Axes {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x: (f64, f64),
    y: (f64, f64),
}

impl Axes {
    fn px(&self, x: f64) -> f64 {
        self.left + self.width * (x - self.x.0) / (self.x.1 - self.x.0).max(1e-12)
    }

    fn py(&self, y: f64) -> f64 {
        self.top + self.height * (self.y.1 - y) / (self.y.1 - self.y.0).max(1e-12)
    }

    /// The ranges widened to whole ticks, so the frame starts and ends on a labelled value.
    fn snapped(mut self) -> Self {
        for r in [&mut self.x, &mut self.y] {
            let (_, step) = ticks(r.0, r.1, 6);
            let lo = (r.0 / step).floor() * step;
            let hi = (r.1 / step).ceil() * step;
            *r = if hi > lo {
                (lo, hi)
            } else {
                (lo - step, lo + step)
            };
        }
        self
    }

    /// Frame, grid, tick labels on the bottom and left, and the axis labels.
    fn draw(&self, s: &mut String, xlabel: &str, ylabel: &str) {
        let (l, t, w, h) = (self.left, self.top, self.width, self.height);
        let (xt, xstep) = ticks(self.x.0, self.x.1, 6);
        for v in xt {
            let x = self.px(v);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{:.1}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                t + h,
                t + h + 14.0,
                label(v, xstep)
            );
        }
        let (yt, ystep) = ticks(self.y.0, self.y.1, 5);
        for v in yt {
            let y = self.py(v);
            let _ = write!(
                s,
                r##"<line x1="{l}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                l + w,
                l - 5.0,
                y + 4.0,
                label(v, ystep)
            );
        }
        let _ = write!(
            s,
            r##"<rect x="{l}" y="{t}" width="{w}" height="{h}" fill="none" stroke="#444"/>"##
        );
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            l + w / 2.0,
            t + h + 32.0,
            escape(xlabel)
        );
        let (yx, yy) = (l - 48.0, t + h / 2.0);
        let _ = write!(
            s,
            r#"<text x="{yx:.1}" y="{yy:.1}" text-anchor="middle" transform="rotate(-90 {yx:.1} {yy:.1})">{}</text>"#,
            escape(ylabel)
        );
    }
}

/// A legend box at (x, y): one entry per (name, colour, drawn as a line or a dot).
fn legend(s: &mut String, x: f64, y: f64, entries: &[(String, &str, bool)]) {
    let width = 24.0
        + 6.5
            * entries
                .iter()
                .map(|(n, _, _)| n.chars().count())
                .max()
                .unwrap_or(0) as f64;
    let _ = write!(
        s,
        r##"<rect x="{x}" y="{y}" width="{width:.0}" height="{:.0}" fill="white" fill-opacity="0.9" stroke="#888"/>"##,
        8.0 + 16.0 * entries.len() as f64
    );
    for (k, (name, colour, line)) in entries.iter().enumerate() {
        let cy = y + 12.0 + 16.0 * k as f64;
        if *line {
            let _ = write!(
                s,
                r#"<line x1="{:.0}" y1="{cy:.0}" x2="{:.0}" y2="{cy:.0}" stroke="{colour}" stroke-width="2"/>"#,
                x + 4.0,
                x + 18.0
            );
        } else {
            let _ = write!(
                s,
                r#"<circle cx="{:.0}" cy="{cy:.0}" r="3" fill="{colour}"/>"#,
                x + 11.0
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.0}" y="{:.0}">{}</text>"#,
            x + 22.0,
            cy + 4.0,
            escape(name)
        );
    }
}

fn open(w: f64, h: f64, title: &str) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="{:.0}" y="20" font-size="14" text-anchor="middle">{}</text>"#,
        w / 2.0,
        escape(title)
    )
}

/// Width and height of a [`line_chart`], in px.
pub const CHART_SIZE: (f64, f64) = (680.0, 380.0);

/// A line chart of named series of (x, y) points with a dot at every point (`xtask`'s figures).
pub fn line_chart(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let (w, h) = CHART_SIZE;
    let points = series.iter().flat_map(|(_, s)| s.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let axes = Axes {
        left: 70.0,
        top: 40.0,
        width: w - 70.0 - 170.0,
        height: h - 40.0 - 50.0,
        x: (x0, x1),
        y: (y0, y1),
    }
    .snapped();
    let mut s = open(w, h, title);
    axes.draw(&mut s, xlabel, ylabel);
    for (k, (name, pts)) in series.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let line: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", axes.px(x), axes.py(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            line.join(" ")
        );
        for &(x, y) in pts {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"><title>{}: {x}, {y:.4}</title></circle>"#,
                axes.px(x),
                axes.py(y),
                escape(name)
            );
        }
    }
    let entries: Vec<(String, &str, bool)> = series
        .iter()
        .enumerate()
        .map(|(k, (n, _))| (n.clone(), COLOURS[k % COLOURS.len()], true))
        .collect();
    legend(&mut s, axes.left + axes.width + 12.0, axes.top, &entries);
    s.push_str("</svg>\n");
    s
}

/// Loss per step (left axis, labelled `loss_axis`) and accuracy after each evaluation (right
/// axis, dots, labelled `accuracy_axis`).
pub fn curve(
    losses: &[f64],
    accuracy: &[(usize, f64)],
    title: &str,
    (loss_axis, accuracy_axis): (&str, &str),
) -> String {
    let (w, h) = (720.0, 380.0);
    let steps = losses
        .len()
        .max(accuracy.iter().map(|(s, _)| *s).max().unwrap_or(0))
        .max(1);
    let finite = || losses.iter().copied().filter(|l| l.is_finite());
    let lmax = finite().fold(f64::MIN, f64::max);
    let lmin = finite().fold(f64::MAX, f64::min);
    let (lmin, lmax) = if lmin <= lmax {
        (lmin, lmax)
    } else {
        (0.0, 1.0)
    };
    let axes = Axes {
        left: 70.0,
        top: 40.0,
        width: w - 70.0 - 190.0,
        height: h - 40.0 - 50.0,
        x: (0.0, steps as f64),
        y: (lmin, lmax),
    }
    .snapped();
    let mut s = open(w, h, title);
    axes.draw(&mut s, "step", loss_axis);
    // Right axis: accuracy in [0, 1].
    let (right, (t, hgt)) = (axes.left + axes.width, (axes.top, axes.height));
    let ay = |a: f64| t + hgt * (1.0 - a);
    for k in 0..=5 {
        let a = k as f64 / 5.0;
        let _ = write!(
            s,
            r##"<line x1="{right:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#1f77b4"/><text x="{:.1}" y="{:.1}" fill="#1f77b4">{a:.1}</text>"##,
            right + 4.0,
            right + 7.0,
            ay(a) + 4.0,
            y = ay(a),
        );
    }
    let (rx, ry) = (right + 40.0, t + hgt / 2.0);
    let _ = write!(
        s,
        r##"<text x="{rx:.1}" y="{ry:.1}" text-anchor="middle" fill="#1f77b4" transform="rotate(90 {rx:.1} {ry:.1})">{accuracy_axis}</text>"##
    );
    if !losses.is_empty() {
        let points: Vec<String> = losses
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, l)| format!("{:.1},{:.1}", axes.px(i as f64), axes.py(*l)))
            .collect();
        let _ = write!(
            s,
            r##"<polyline fill="none" stroke="#d62728" stroke-width="1" points="{}"/>"##,
            points.join(" ")
        );
    }
    for (step, a) in accuracy {
        let _ = write!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#1f77b4"><title>step {step}: {a:.4}</title></circle>"##,
            axes.px(*step as f64),
            ay(*a)
        );
    }
    legend(
        &mut s,
        right + 58.0,
        t,
        &[
            ("loss per step".into(), "#d62728", true),
            ("accuracy".into(), "#1f77b4", false),
        ],
    );
    s.push_str("</svg>\n");
    s
}

/// The colour limit of the heat map: the 98th percentile of |α|, so that a few outlying blocks
/// do not wash out every other cell (cells beyond it are drawn saturated and counted).
pub fn colour_limit(alpha: &[Vec<f64>]) -> f64 {
    let mut abs: Vec<f64> = alpha
        .iter()
        .flatten()
        .map(|a| a.abs())
        .filter(|a| a.is_finite())
        .collect();
    if abs.is_empty() {
        return 1.0;
    }
    abs.sort_by(f64::total_cmp);
    let at = ((abs.len() - 1) as f64 * 0.98).round() as usize;
    abs[at].max(1e-12)
}

/// A diverging colour: −limit blue, 0 white, +limit red, saturated beyond.
fn diverging(a: f64, limit: f64) -> String {
    let t = (a / limit).clamp(-1.0, 1.0);
    let fade = |t: f64| (255.0 * (1.0 - t.abs())).round() as u8;
    if t >= 0.0 {
        format!("rgb(255,{},{})", fade(t), fade(t))
    } else {
        format!("rgb({},{},255)", fade(t), fade(t))
    }
}

/// A heat map of α[l][j] (rows: blocks, columns: models) on a diverging scale, with indexed axes
/// (hover a cell for its block and model) and a colour bar with ticks.
pub fn coefficients(alpha: &[Vec<f64>], models: &[String], title: &str) -> String {
    let rows = alpha.len().max(1);
    let cols = alpha.first().map_or(1, Vec::len).max(1);
    let cell_w = (640.0 / cols as f64).clamp(4.0, 40.0);
    let cell_h = (480.0 / rows as f64).clamp(2.0, 20.0);
    let (left, top) = (70.0, 40.0);
    let (pw, ph) = (cell_w * cols as f64, cell_h * rows as f64);
    let width = left + pw + 190.0;
    let height = top + ph + 60.0;
    let limit = colour_limit(alpha);
    let mut s = open(width, height, title);
    for (l, row) in alpha.iter().enumerate() {
        for (j, &a) in row.iter().enumerate() {
            let _ = write!(
                s,
                r#"<rect x="{:.2}" y="{:.2}" width="{cell_w:.2}" height="{cell_h:.2}" fill="{}"><title>block {l}, model {j} {}: α = {a:.5}</title></rect>"#,
                left + j as f64 * cell_w,
                top + l as f64 * cell_h,
                diverging(a, limit),
                escape(models.get(j).map_or("", String::as_str)),
            );
        }
    }
    let _ = write!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw:.2}" height="{ph:.2}" fill="none" stroke="#444"/>"##
    );
    // Index ticks: about 12 labelled models and 16 labelled blocks.
    let every = |n: usize, labels: usize| {
        let (_, step) = ticks(0.0, n as f64, labels);
        (step.round() as usize).max(1)
    };
    for j in (0..cols).step_by(every(cols, 12)) {
        let x = left + (j as f64 + 0.5) * cell_w;
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#444"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{j}</text>"##,
            top + ph,
            top + ph + 4.0,
            top + ph + 15.0
        );
    }
    for l in (0..rows).step_by(every(rows, 16)) {
        let y = top + (l as f64 + 0.5) * cell_h;
        let _ = write!(
            s,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{left}" y2="{y:.1}" stroke="#444"/><text x="{:.1}" y="{:.1}" text-anchor="end">{l}</text>"##,
            left - 4.0,
            left - 6.0,
            y + 4.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">model (index in coefficients.json)</text>"#,
        left + pw / 2.0,
        top + ph + 34.0
    );
    let (yx, yy) = (left - 40.0, top + ph / 2.0);
    let _ = write!(
        s,
        r#"<text x="{yx:.1}" y="{yy:.1}" text-anchor="middle" transform="rotate(-90 {yx:.1} {yy:.1})">block (index in coefficients.json)</text>"#
    );
    // Colour bar: 200 px from +limit (top) to −limit, with ticks.
    let (bx, bh) = (left + pw + 30.0, 200.0);
    for k in 0..100 {
        let a = limit * (1.0 - 2.0 * (k as f64 + 0.5) / 100.0);
        let _ = write!(
            s,
            r#"<rect x="{bx:.0}" y="{:.1}" width="16" height="2.1" fill="{}"/>"#,
            top + 2.0 * k as f64,
            diverging(a, limit)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{bx:.0}" y="{top}" width="16" height="{bh}" fill="none" stroke="#444"/>"##
    );
    let (tv, step) = ticks(-limit, limit, 4);
    for v in tv {
        let y = top + bh * (limit - v) / (2.0 * limit);
        let _ = write!(
            s,
            r##"<line x1="{:.0}" y1="{y:.1}" x2="{:.0}" y2="{y:.1}" stroke="#444"/><text x="{:.0}" y="{:.1}">{}</text>"##,
            bx + 16.0,
            bx + 20.0,
            bx + 23.0,
            y + 4.0,
            label(v, step)
        );
    }
    let beyond = alpha.iter().flatten().filter(|a| a.abs() > limit).count();
    let (lo, hi) = alpha
        .iter()
        .flatten()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &a| {
            (lo.min(a), hi.max(a))
        });
    for (k, line) in [
        "α".to_string(),
        format!("range {lo:.3} … {hi:.3}"),
        format!("{beyond} beyond ±{limit:.3}"),
        "drawn saturated".to_string(),
    ]
    .iter()
    .enumerate()
    {
        let _ = write!(
            s,
            r#"<text x="{bx:.0}" y="{:.0}">{}</text>"#,
            top + bh + 18.0 + 14.0 * k as f64,
            escape(line)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (t, step) = ticks(0.0, 1.0, 5);
        assert_eq!(step, 0.2);
        assert_eq!(t.len(), 6);
        let (t, step) = ticks(83.2, 86.7, 6);
        assert_eq!(step, 1.0);
        assert_eq!(t, vec![84.0, 85.0, 86.0]);
        let (t, _) = ticks(-16.0, 16.0, 4);
        assert!(
            t.contains(&0.0) && t.contains(&-10.0) && t.contains(&10.0),
            "{t:?}"
        );
        assert_eq!(label(0.30000000000000004, 0.1), "0.3");
        assert_eq!(label(2000.0, 500.0), "2000");
    }

    #[test]
    fn a_few_outliers_do_not_set_the_colour_scale() {
        let mut alpha = vec![vec![0.1, -0.2, 0.3]; 99];
        alpha.push(vec![16.0, -16.0, 0.0]);
        let limit = colour_limit(&alpha);
        assert_eq!(limit, 0.3);
        let svg = coefficients(&alpha, &["a".into(), "b".into(), "c".into()], "t");
        assert!(svg.contains("2 beyond ±0.300"), "the outliers are counted");
    }

    #[test]
    fn charts_carry_ticks_and_a_legend() {
        let svg = line_chart(
            "t",
            "models",
            "accuracy",
            &[("greedy".into(), vec![(8.0, 85.1), (16.0, 85.6)])],
        );
        assert!(
            svg.contains(">greedy</text>") && svg.contains(">16</text>"),
            "{svg}"
        );
        let svg = curve(
            &[2.0, 1.5, 1.0],
            &[(3, 0.5)],
            "c",
            ("entropy per step", "mean test accuracy"),
        );
        assert!(svg.contains(">accuracy</text>") && svg.contains(">loss per step</text>"));
        assert!(
            svg.contains(">entropy per step</text>") && svg.contains(">mean test accuracy</text>")
        );
        assert!(svg.contains(">0.5</text>"), "accuracy ticks");
    }
}
