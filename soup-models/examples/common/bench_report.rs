//! What the step benchmarks report alike (`step_bench`, `lm_step_bench`): medians of timed
//! rounds, the process's peak RSS, and one JSON line per phase.

/// The median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One JSON line per phase of the step: `fields` (already JSON, without braces), the phase,
/// every round's seconds and their median.
pub fn print_phases(fields: &str, phases: [(&str, &mut Vec<f64>); 3]) {
    for (phase, v) in phases {
        let rounds: Vec<String> = v.iter().map(|s| format!("{s:.4}")).collect();
        println!(
            "{{{fields},\"phase\":\"{phase}\",\"seconds\":[{}],\"median_s\":{:.4}}}",
            rounds.join(","),
            median(v)
        );
    }
}
