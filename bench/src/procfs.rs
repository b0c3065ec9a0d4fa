//! A process's memory and CPU time from /proc (Linux), for the benchmarks.

/// A `/proc/PID/status` memory field such as `VmRSS:` or `VmHWM:`, in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// User plus system CPU seconds the process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks as f64 / 100.0)
}

/// What a child process used over its whole life.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub wall_seconds: f64,
    /// User plus system, all threads; read from the exited process before it
    /// is reaped, so nothing is missed at the end.
    pub cpu_seconds: f64,
    /// The highest resident set seen (sampled every 10 ms).
    pub peak_rss_kib: u64,
    pub success: bool,
}

/// Waits for `child` to exit while sampling it (blocking: call it off the
/// async runtime's threads).
pub fn measure(child: &mut std::process::Child) -> std::io::Result<Usage> {
    let pid = child.id();
    let started = std::time::Instant::now();
    let (mut peak, mut cpu) = (0, 0.0);
    loop {
        peak = peak.max(status_kib(pid, "VmHWM:").unwrap_or(0));
        cpu = cpu_seconds(pid).unwrap_or(cpu);
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.trim_start().chars().next())
            });
        if matches!(state, Some('Z') | None) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let wall_seconds = started.elapsed().as_secs_f64();
    let status = child.wait()?;
    Ok(Usage {
        wall_seconds,
        cpu_seconds: cpu,
        peak_rss_kib: peak,
        success: status.success(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_memory_and_cpu_time() {
        let me = std::process::id();
        assert!(super::status_kib(me, "VmRSS:").is_some_and(|k| k > 0));
        let spin: u64 = (0..20_000_000u64).fold(0, |a, b| a ^ b.wrapping_mul(31));
        assert!(spin != 1);
        assert!(super::cpu_seconds(me).is_some_and(|s| s > 0.0));
    }

    #[test]
    fn a_child_is_measured_to_its_end() {
        // Busy for about 0.3 CPU seconds, then gone.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 60000 ]; do i=$((i+1)); done"])
            .spawn()
            .unwrap();
        let usage = super::measure(&mut child).unwrap();
        assert!(usage.success);
        assert!(usage.cpu_seconds > 0.02, "{usage:?}");
        assert!(usage.cpu_seconds <= usage.wall_seconds + 0.05, "{usage:?}");
        assert!(usage.peak_rss_kib > 0, "{usage:?}");
    }
}
