//! The two figures of a soup run, as plain SVG: coefficients (α over blocks and models, the
//! paper's Figure 1) and the learning curve (loss per step, held-out accuracy per model batch).
//! Written by hand: a heat map and two polylines need no plotting library or font files.

use std::fmt::Write;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A heat map of α[l][j] (rows: blocks, columns: models) on a diverging scale: negative
/// coefficients blue, positive red, zero white; the colour bar gives the range.
pub fn coefficients(alpha: &[Vec<f64>], models: &[String], title: &str) -> String {
    let rows = alpha.len().max(1);
    let cols = alpha.first().map_or(1, Vec::len).max(1);
    let cell_w = (640.0 / cols as f64).clamp(4.0, 40.0);
    let cell_h = (480.0 / rows as f64).clamp(2.0, 20.0);
    let (left, top) = (60.0, 40.0);
    let width = left + cell_w * cols as f64 + 120.0;
    let height = top + cell_h * rows as f64 + 60.0;
    let max = alpha.iter().flatten().fold(1e-12f64, |m, a| m.max(a.abs()));
    let colour = |a: f64| {
        let t = (a / max).clamp(-1.0, 1.0);
        let fade = |t: f64| (255.0 * (1.0 - t.abs())).round() as u8;
        if t >= 0.0 {
            format!("rgb(255,{},{})", fade(t), fade(t))
        } else {
            format!("rgb({},{},255)", fade(t), fade(t))
        }
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="{left}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for (l, row) in alpha.iter().enumerate() {
        for (j, &a) in row.iter().enumerate() {
            let _ = write!(
                s,
                r#"<rect x="{:.2}" y="{:.2}" width="{cell_w:.2}" height="{cell_h:.2}" fill="{}"><title>block {l}, {}: {a:.5}</title></rect>"#,
                left + j as f64 * cell_w,
                top + l as f64 * cell_h,
                colour(a),
                escape(models.get(j).map_or("", String::as_str)),
            );
        }
    }
    let bottom = top + cell_h * rows as f64;
    let _ = write!(
        s,
        r#"<text x="{left}" y="{:.0}">models (1..{cols}) →</text>"#,
        bottom + 18.0
    );
    let _ = write!(
        s,
        r#"<text x="14" y="{top}" transform="rotate(90 14 {top})">blocks (1..{rows}) →</text>"#
    );
    // Colour bar.
    let bx = left + cell_w * cols as f64 + 30.0;
    for k in 0..=20 {
        let a = max * (1.0 - k as f64 / 10.0);
        let _ = write!(
            s,
            r#"<rect x="{bx:.0}" y="{:.0}" width="16" height="10" fill="{}"/>"#,
            top + 10.0 * k as f64,
            colour(a)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.0}" y="{:.0}">{max:+.3}</text>"#,
        bx + 20.0,
        top + 9.0
    );
    let _ = write!(
        s,
        r#"<text x="{:.0}" y="{:.0}">0</text>"#,
        bx + 20.0,
        top + 109.0
    );
    let _ = write!(
        s,
        r#"<text x="{:.0}" y="{:.0}">{:+.3}</text>"#,
        bx + 20.0,
        top + 209.0,
        -max
    );
    s.push_str("</svg>\n");
    s
}

/// Loss per step (left axis) and held-out accuracy after each evaluation (right axis, dots).
pub fn curve(losses: &[f64], accuracy: &[(usize, f64)], title: &str) -> String {
    let (w, h, left, top) = (720.0, 360.0, 60.0, 40.0);
    let (pw, ph) = (w - left - 70.0, h - top - 50.0);
    let steps = losses
        .len()
        .max(accuracy.iter().map(|(s, _)| *s).max().unwrap_or(0))
        .max(1);
    let lmax = losses.iter().cloned().fold(f64::MIN, f64::max).max(1e-12);
    let lmin = losses.iter().cloned().fold(f64::MAX, f64::min).min(lmax);
    let lspan = (lmax - lmin).max(1e-12);
    let x = |s: usize| left + pw * s as f64 / steps as f64;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        out,
        r#"<text x="{left}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    let _ = write!(
        out,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    if !losses.is_empty() {
        let points: Vec<String> = losses
            .iter()
            .enumerate()
            .map(|(s, l)| format!("{:.1},{:.1}", x(s), top + ph * (lmax - l) / lspan))
            .collect();
        let _ = write!(
            out,
            r##"<polyline fill="none" stroke="#c33" stroke-width="1" points="{}"/>"##,
            points.join(" ")
        );
    }
    for (s, a) in accuracy {
        let _ = write!(
            out,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#36c"><title>step {s}: {a:.4}</title></circle>"##,
            x(*s),
            top + ph * (1.0 - a)
        );
    }
    let _ = write!(
        out,
        r##"<text x="{left}" y="{:.0}" fill="#c33">loss {lmax:.3}</text>"##,
        top - 4.0
    );
    let _ = write!(
        out,
        r##"<text x="{left}" y="{:.0}" fill="#c33">loss {lmin:.3}</text>"##,
        top + ph + 14.0
    );
    let _ = write!(
        out,
        r##"<text x="{:.0}" y="{:.0}" fill="#36c">acc 1.0</text>"##,
        left + pw + 6.0,
        top + 8.0
    );
    let _ = write!(
        out,
        r##"<text x="{:.0}" y="{:.0}" fill="#36c">acc 0.0</text>"##,
        left + pw + 6.0,
        top + ph
    );
    let _ = write!(
        out,
        r#"<text x="{:.0}" y="{:.0}">step (0..{steps})</text>"#,
        left + pw / 2.0 - 30.0,
        top + ph + 32.0
    );
    out.push_str("</svg>\n");
    out
}
