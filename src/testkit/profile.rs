//! What the benches and the memory tests read of processes: peak memory and
//! CPU time, per thread and per process name.

/// Peak resident memory (VmHWM) of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (utime + stime, in clock ticks) of each thread of this process,
/// for benches that want to say which thread bounds a number.
#[derive(Clone, Debug, Default)]
pub struct ThreadCpu(std::collections::HashMap<u32, (String, u64)>);

impl ThreadCpu {
    /// Reads `/proc/self/task/*/stat` (empty where there is no procfs).
    pub fn sample() -> ThreadCpu {
        let mut threads = std::collections::HashMap::new();
        let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
        for entry in tasks.flatten() {
            let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(named) = stat_ticks(&entry.path().join("stat")) {
                threads.insert(tid, named);
            }
        }
        ThreadCpu(threads)
    }

    /// Ticks spent since `earlier`, summed by thread name.
    pub fn since(&self, earlier: &ThreadCpu) -> std::collections::BTreeMap<String, u64> {
        let mut by_name = std::collections::BTreeMap::new();
        for (tid, (name, ticks)) in &self.0 {
            let before = earlier.0.get(tid).map_or(0, |(_, t)| *t);
            *by_name.entry(name.clone()).or_default() += ticks.saturating_sub(before);
        }
        by_name
    }
}

/// CPU time (utime + stime, in clock ticks) of process `pid` so far; 0 when
/// it cannot be read.
pub fn process_cpu_ticks(pid: u32) -> u64 {
    stat_ticks(std::path::Path::new(&format!("/proc/{pid}/stat"))).map_or(0, |(_, ticks)| ticks)
}

/// CPU time (clock ticks) of every process on the machine, summed by
/// process name (`postgres`, `pgbench`, `redis-server`, ...): with two
/// samples, who used the CPU while a bench ran.
pub fn cpu_by_process_name() -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    let processes = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    for entry in processes {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        if let Some((name, ticks)) = stat_ticks(&entry.path().join("stat")) {
            *by_name.entry(name).or_default() += ticks;
        }
    }
    by_name
}

/// The name and utime + stime of a `/proc/.../stat` file.
fn stat_ticks(path: &std::path::Path) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    let field = |i: usize| fields.get(i).and_then(|t| t.parse::<u64>().ok());
    Some((stat[open + 1..close].to_owned(), field(11)? + field(12)?))
}
