//! How much memory this process may use, and how it is shared out: the one place that
//! answers "how big may this be".
//!
//! A process has one limit (`--memory-limit`, by default half the machine or container).
//! A worker gives its tasks all of it but a reserve ([`task_budget`]); embedded mode keeps
//! only enough tasks in flight to overlap reads, compute and writes ([`pipeline_budget`]);
//! the executor admits tasks against that budget with a semaphore, a task too large for it
//! is streamed (the floor is [`crate::plan::TensorJob::min_memory`]), and idle buffers kept
//! for reuse are a quarter of it ([`idle_buffers`]). The coordinator schedules by the same
//! figures, which workers report at registration.

use crate::plan::MergePlan;

/// Memory this process may use by default: half of physical memory, or of the cgroup
/// limit when that is smaller (containers).
pub fn default_memory_limit() -> u64 {
    let physical = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    physical.min(cgroup) / 2
}

/// Of a whole-process memory limit (say a container's), what a worker's tasks may use: all
/// but a reserve for the runtime, connections and allocator slack (1/8, at most 1 GiB).
pub fn task_budget(limit: u64) -> u64 {
    limit - (limit / 8).min(1 << 30)
}

/// The least whole-process limit whose [`task_budget`] is at least `budget`.
pub fn limit_for_task_budget(budget: u64) -> u64 {
    // task_budget never decreases as the limit grows, and gives at most 1 GiB away.
    let (mut lo, mut hi) = (budget, budget.saturating_add(1 << 30));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if task_budget(mid) >= budget {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// This process's peak resident memory (VmHWM), when the OS tells it.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Memory for tasks in flight in embedded mode: the largest task plus two ordinary ones
/// (of `task_size`, up to 1.5x) keeps reads, compute and writes overlapping; more would only
/// raise the footprint. Never above `limit`.
pub fn pipeline_budget(plan: &MergePlan, limit: u64, task_size: u64) -> u64 {
    let largest = plan
        .tasks
        .iter()
        .map(|t| t.working_set())
        .max()
        .unwrap_or(0);
    let typical = task_size + task_size / 2;
    limit.min(largest + 2 * typical)
}

/// Idle buffers kept for reuse, of a budget for tasks in flight.
pub fn idle_buffers(budget: u64) -> usize {
    (budget / 4) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_budget_keeps_a_reserve() {
        assert_eq!(task_budget(8 << 20), 7 << 20);
        assert_eq!(task_budget(16 << 30), 15 << 30);
        assert_eq!(task_budget(0), 0);
        for b in [0, 1, 7, 1 << 20, 7 << 30, 100 << 30] {
            let l = limit_for_task_budget(b);
            assert!(
                task_budget(l) >= b && (l == 0 || task_budget(l - 1) < b),
                "{b} -> {l}"
            );
        }
    }

    #[test]
    fn the_machine_answers() {
        assert!(default_memory_limit() > 0);
        assert!(peak_rss().unwrap() > 0);
        assert_eq!(idle_buffers(4 << 20), 1 << 20);
    }
}
