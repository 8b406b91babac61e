//! A description of the machine the harness runs on: CPUs, memory,
//! kernel, and the disk under the benchmark directory.

use std::path::Path;

use serde_json::json;

use crate::util::command_line;

/// What the report says about the machine.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// MemTotal in KiB.
    pub mem_kib: u64,
    /// Kernel release.
    pub kernel: String,
    /// Block device under the benchmark directory, e.g. `/dev/vda`.
    pub disk: String,
    /// Its size, driver, rotational flag, sector sizes.
    pub disk_info: String,
    /// Filesystem type of the benchmark directory.
    pub fstype: String,
}

impl Machine {
    /// Reads /proc and /sys; `dir` is where the benchmark files live.
    pub fn probe(dir: &Path) -> Machine {
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let d = dir.to_string_lossy();
        let df = command_line("df", &["--output=source,fstype", &d]);
        let mut it = df.lines().nth(1).unwrap_or("").split_whitespace();
        let disk = it.next().unwrap_or("?").to_owned();
        let fstype = it.next().unwrap_or("?").to_owned();
        let disk_info = describe_disk(&disk);
        Machine {
            nproc,
            cpu_model,
            mem_kib,
            kernel,
            disk,
            disk_info,
            fstype,
        }
    }

    /// One line: `2 CPUs (model), 23.4 GiB RAM, Linux 6.18, /dev/vda (…), ext4`.
    pub fn line(&self) -> String {
        let model = if self.cpu_model.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.cpu_model)
        };
        format!(
            "{} CPUs{model}, {:.1} GiB RAM, Linux {}, disk {} ({}), {}",
            self.nproc,
            self.mem_kib as f64 / (1u64 << 20) as f64,
            self.kernel,
            self.disk,
            self.disk_info,
            self.fstype
        )
    }

    /// JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "nproc": self.nproc,
            "cpu_model": self.cpu_model,
            "mem_kib": self.mem_kib,
            "kernel": self.kernel,
            "disk": self.disk,
            "disk_info": self.disk_info,
            "fstype": self.fstype,
            "summary": self.line(),
        })
    }
}

/// Size, driver, rotational flag and sector sizes of a block device from
/// /sys/block (a partition is described by its parent disk).
fn describe_disk(dev: &str) -> String {
    let Some(name) = dev.strip_prefix("/dev/") else {
        return "not a block device".into();
    };
    let mut sys = format!("/sys/class/block/{name}");
    if Path::new(&sys).join("partition").exists() {
        if let Ok(p) = std::fs::canonicalize(&sys) {
            if let Some(parent) = p.parent() {
                sys = parent.to_string_lossy().into_owned();
            }
        }
    }
    let read = |f: &str| {
        std::fs::read_to_string(Path::new(&sys).join(f))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let sectors: u64 = read("size").parse().unwrap_or(0);
    let driver = std::fs::read_link(Path::new(&sys).join("device/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "?".into());
    let model = read("device/model");
    let rot = match read("queue/rotational").as_str() {
        "0" => "non-rotational",
        "1" => "rotational",
        _ => "rotational?",
    };
    let mut parts = vec![format!(
        "{:.0} GiB",
        sectors as f64 * 512.0 / (1u64 << 30) as f64
    )];
    if !model.is_empty() {
        parts.push(model);
    }
    parts.push(driver);
    parts.push(rot.into());
    parts.push(format!(
        "{}/{} B sectors",
        read("queue/logical_block_size"),
        read("queue/physical_block_size")
    ));
    let sched = read("queue/scheduler");
    // "none [mq-deadline] kyber": the bracketed one is in use.
    let sched = sched
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or(&sched);
    parts.push(format!("scheduler {sched}"));
    parts.join(", ")
}
