//! The expert-load heatmap as an SVG file: one row per MoE layer, one cell per expert, coloured by
//! load relative to the layer's mean (so balanced layers look flat whatever the token count),
//! with each layer's MaxVio and dead-expert count on the right. Dead experts (no token) are
//! light grey, apart from the ramp, whose dark end would hide them among the barely used.

use std::fmt::Write;

use crate::audit::Audit;

/// A perceptual ramp from dark purple (idle) through teal and green to yellow (overloaded): the
/// terminal UI's.
fn colour(t: f64) -> String {
    let (r, g, b) = glimpse_tui::views::heat_rgb(t);
    format!("#{r:02x}{g:02x}{b:02x}")
}

/// The colour of an expert no token chose.
const DEAD: &str = "#d9d9d9";

/// Maps load/mean onto the ramp: 0 at no load, 0.5 at the mean, 1 at twice the mean or more.
fn scale(load: u64, mean: f64) -> f64 {
    if mean <= 0.0 {
        0.0
    } else {
        (load as f64 / mean / 2.0).min(1.0)
    }
}

pub fn svg(audit: &Audit, title: &str) -> String {
    let experts = audit.experts.max(1);
    let rows = audit.layers.len().max(1);
    let cell_w = (900.0 / experts as f64).clamp(2.0, 24.0);
    let cell_h = (600.0 / rows as f64).clamp(4.0, 24.0);
    let (left, top) = (70.0, 60.0);
    let grid_w = cell_w * experts as f64;
    // Wide enough for the legend (ramp and the dead swatch) whatever the expert count.
    let (width, height) = ((left + grid_w + 200.0).max(left + 360.0), top + cell_h * rows as f64 + 90.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{left}" y="24" font-size="16">{}</text>"#, escape(title));
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="44" fill="#555">expert load per MoE layer, relative to the layer mean ({} prompt(s))</text>"##,
        audit.prompts()
    );
    for (r, l) in audit.layers.values().enumerate() {
        let y = top + r as f64 * cell_h;
        let mean = l.counts.iter().sum::<u64>() as f64 / experts as f64;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end" dominant-baseline="middle">layer {}{}</text>"#,
            left - 6.0,
            y + cell_h / 2.0,
            l.layer,
            if audit.mtp_layer == Some(l.layer) { " mtp" } else { "" }
        );
        for (e, &c) in l.counts.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<rect x="{:.2}" y="{y:.2}" width="{cell_w:.2}" height="{cell_h:.2}" fill="{}"><title>layer {} expert {e}: {c} tokens</title></rect>"#,
                left + e as f64 * cell_w,
                if c == 0 { DEAD.to_string() } else { colour(scale(c, mean)) },
                l.layer
            );
        }
        let st = l.stats();
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" dominant-baseline="middle">MaxVio {:.2}, dead {}</text>"#,
            left + grid_w + 8.0,
            y + cell_h / 2.0,
            st.max_vio,
            st.dead
        );
    }
    let axis_y = top + rows as f64 * cell_h + 18.0;
    let _ = writeln!(s, r#"<text x="{left}" y="{axis_y:.1}">expert 0</text>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{axis_y:.1}" text-anchor="end">expert {}</text>"#,
        left + grid_w,
        experts - 1
    );
    // Legend.
    let ly = axis_y + 20.0;
    for i in 0..100 {
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{ly:.1}" width="2.1" height="12" fill="{}"/>"#,
            left + i as f64 * 2.0,
            colour(i as f64 / 99.0)
        );
    }
    let _ = writeln!(s, r#"<text x="{left}" y="{:.1}">idle</text>"#, ly + 28.0);
    let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">mean</text>"#, left + 100.0, ly + 28.0);
    let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">2x mean+</text>"#, left + 200.0, ly + 28.0);
    let dx = left + 230.0;
    let _ = writeln!(s, r#"<rect x="{dx:.1}" y="{ly:.1}" width="12" height="12" fill="{DEAD}"/>"#);
    let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">dead (no token)</text>"#, dx + 18.0, ly + 10.0);
    s += "</svg>\n";
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_ends_and_middle() {
        assert_eq!(colour(0.0), "#440154");
        assert_eq!(colour(1.0), "#fde725");
        assert_eq!(colour(0.5), "#21918c");
        assert_eq!(scale(10, 10.0), 0.5);
        assert_eq!(scale(0, 0.0), 0.0);
    }

    #[test]
    fn one_cell_per_layer_and_expert() {
        let mut a = Audit::new(3);
        a.add(1, &[0, 1, 1], 1, 1, None).unwrap();
        a.add(2, &[2, 2, 2], 1, 1, None).unwrap();
        let svg = svg(&a, "t<1>");
        assert_eq!(svg.matches("<title>layer").count(), 6);
        assert!(svg.contains("layer 2 expert 2: 3 tokens"));
        assert!(svg.contains("t&lt;1&gt;"));
    }
}
