//! `--plot FILE.svg`: the latency percentile distribution of each phase, drawn as
//! HdrHistogram plots are: latency against percentile, the percentile axis log-scaled
//! (1/(1-p)) so that the tail (99 %, 99.9 %, 99.99 %) gets as much room as the median.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// The highest percentile drawn: 99.999 %.
const TOP: f64 = 100_000.0;

/// Draws one line per named histogram (milliseconds from microseconds).
pub fn latency_svg(path: &Path, title: &str, series: &[(String, &Histogram<u64>)]) -> Result<(), String> {
    let max_ms = series.iter().map(|(_, h)| h.max() as f64 / 1000.0).fold(0.0, f64::max).max(0.001);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .margin_right(48)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..TOP).log_scale(), 0f64..max_ms * 1.1)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| percentile_label(*x))
        .draw()
        .map_err(|e| fail(&e))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, h)) in series.iter().enumerate() {
        if h.is_empty() {
            continue;
        }
        let color = colors[i % colors.len()];
        let points = h
            .iter_quantiles(4)
            .map(|v| (v.quantile_iterated_to(), v.value_iterated_to() as f64 / 1000.0))
            .filter(|(q, _)| *q < 1.0 - 1.0 / TOP)
            .map(|(q, ms)| (1.0 / (1.0 - q), ms));
        chart
            .draw_series(LineSeries::new(points, &color))
            .map_err(|e| fail(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

/// `x` = 1/(1-p) as a percentile: 10 -> "90%", 1000 -> "99.9%".
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    let digits = (x.log10().round() as usize).saturating_sub(2);
    format!("{p:.digits$}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_labelled_by_their_nines() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(100_000.0), "99.999%");
    }

    #[test]
    fn an_svg_with_a_line_per_series() {
        let dir = std::env::temp_dir().join(format!("plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("latency.svg");
        let mut a = Histogram::<u64>::new(3).unwrap();
        let mut b = Histogram::<u64>::new(3).unwrap();
        for i in 1..10_000u64 {
            a.record(1000 + i % 500).unwrap();
            b.record(2000 + i % 3000).unwrap();
        }
        latency_svg(&path, "relay", &[("alone".into(), &a), ("attacked".into(), &b)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() >= 2, "{}", &svg[..200.min(svg.len())]);
        assert!(svg.contains("attacked") && svg.contains("99.9%"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
