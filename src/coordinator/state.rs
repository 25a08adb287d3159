//! The coordinator's bookkeeping as a pure state machine: workers, leases, attempts.
//!
//! No network and no clock of its own: every call takes `now`, so tests drive it with
//! virtual workers ("lose a worker", "expire a lease", "stale report") in microseconds. The
//! gRPC service is a thin shell around it.
//!
//! Sized for 671B-class plans (~46,000 tasks, hundreds of workers): no lease, heartbeat or
//! report scans the task list. Pending tasks are kept by size (a lease takes the largest that
//! fits by one range lookup), the counts and bytes done are kept as tasks change state, and lease expiry looks
//! only at leased tasks. What still walks tasks: a registration (the most memory any
//! unfinished task needs) and, until it has warned, each tick's check for a pending task no
//! worker can hold.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::wire::{Attempt, TaskId, WorkerId};

/// What one task needs from a worker.
#[derive(Debug, Clone, Copy)]
pub struct TaskNeeds {
    /// Memory to run it in one pass.
    pub working_set: u64,
    /// The least memory that can run it (streaming its largest tensor).
    pub min_memory: u64,
    /// Output bytes (progress).
    pub bytes: u64,
}

impl TaskNeeds {
    /// What task `t` needs, with `write_buffer` bytes held by its writer on top (the
    /// multipart parts it uploads).
    pub fn of(t: &crate::plan::Task, write_buffer: u64) -> Self {
        TaskNeeds {
            working_set: t.working_set() + write_buffer,
            min_memory: t.min_memory() + write_buffer,
            bytes: t.out.end - t.out.start,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskStatus {
    Pending,
    Leased {
        worker: WorkerId,
        attempt: Attempt,
        deadline: Instant,
        /// When this attempt was leased.
        since: Instant,
    },
    /// Finished; multipart part ids in part order (empty for file outputs).
    Done {
        parts: Vec<(u32, String)>,
    },
}

#[derive(Debug, Clone)]
struct TaskSlot {
    status: TaskStatus,
    /// Attempts handed out so far; the next lease gets this number.
    attempts: u32,
    /// Attempts ended by their worker's shutdown (preemption): not the task's fault, so
    /// they do not count toward --max-attempts.
    preempted: u32,
    errors: Vec<String>,
    needs: TaskNeeds,
}

#[derive(Debug, Clone)]
pub struct WorkerSlot {
    pub name: String,
    pub memory: u64,
    pub threads: u32,
    pub last_seen: Instant,
    /// Tasks this worker runs now, in lease order, with the memory reserved for each.
    pub tasks: Vec<(TaskId, u64)>,
    /// Those of them whose heartbeats reported output: their inputs are read.
    pub writing: Vec<TaskId>,
    pub tasks_done: u64,
    /// Has been answered "done" or "failed": it knows how the merge ended.
    pub told: bool,
    /// Lease calls of this worker waiting for an answer now (long polls).
    pub polling: u32,
}

impl WorkerSlot {
    pub fn in_use(&self) -> u64 {
        self.tasks.iter().map(|(_, m)| m).sum()
    }
    fn release(&mut self, task: TaskId) {
        self.tasks.retain(|(t, _)| *t != task);
        self.writing.retain(|t| *t != task);
    }
}

/// How recently leased a task must be for it to move to an idle worker (see
/// `ClusterState::take_from_a_shared_link`): one heartbeat interval at most, so it has read
/// little and its old worker stops reading it soon.
pub const MOVE_WITHIN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Running,
    /// Every task is done; the coordinator is committing.
    Committing,
    Done,
    Failed(String),
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq)]
pub enum Lease {
    Task { task: TaskId, attempt: Attempt },
    Wait,
    Done,
    Failed(String),
    UnknownWorker,
}

/// The outcome a worker reports for one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Success {
        parts: Vec<(u32, String)>,
    },
    Failure {
        message: String,
        retryable: bool,
    },
    /// The worker was stopped (SIGTERM) mid-task: run it again, without counting it.
    Preempted {
        message: String,
    },
}

/// What a report did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reported {
    /// From an old attempt or an unknown worker: dropped.
    Stale,
    Finished(TaskId),
    Retrying(TaskId),
    JobFailed(String),
}

/// Tasks and workers of one coordinator run. Fields are private: the phase changes only
/// through the calls below, so its rules (and their tests) live here.
pub struct ClusterState {
    tasks: Vec<TaskSlot>,
    /// Pending tasks by (working set, index): the smallest tells at once whether a worker
    /// can take any of them whole, the largest that fits is a range lookup.
    pending_by_size: BTreeSet<(u64, usize)>,
    done: usize,
    bytes_done: u64,
    /// When the "no worker has enough memory" warning was last given.
    warned_stuck: Option<Instant>,
    workers: BTreeMap<WorkerId, WorkerSlot>,
    next_worker: u64,
    max_attempts: u32,
    lease_timeout: Duration,
    phase: Phase,
    /// How to name a task in messages (file and tensors).
    describe: Box<dyn Fn(usize) -> String + Send + Sync>,
}

impl ClusterState {
    /// `first_worker_id` should differ between coordinator runs (a clock reading), so a
    /// worker registered with a previous run is unknown here and its reports are dropped.
    pub fn new(
        first_worker_id: u64,
        needs: Vec<TaskNeeds>,
        max_attempts: u32,
        lease_timeout: Duration,
        describe: Box<dyn Fn(usize) -> String + Send + Sync>,
    ) -> Self {
        ClusterState {
            pending_by_size: needs
                .iter()
                .enumerate()
                .map(|(i, n)| (n.working_set, i))
                .collect(),
            done: 0,
            bytes_done: 0,
            warned_stuck: None,
            tasks: needs
                .into_iter()
                .map(|needs| TaskSlot {
                    status: TaskStatus::Pending,
                    attempts: 0,
                    preempted: 0,
                    errors: Vec::new(),
                    needs,
                })
                .collect(),
            workers: BTreeMap::new(),
            next_worker: first_worker_id.max(1),
            max_attempts: max_attempts.max(1),
            lease_timeout,
            phase: Phase::Running,
            describe,
        }
    }

    /// Change a task's status, keeping the pending sets and the counts in step. Every
    /// status change goes through here.
    fn set_status(&mut self, i: usize, status: TaskStatus) {
        let slot = &mut self.tasks[i];
        let ws = slot.needs.working_set;
        match slot.status {
            TaskStatus::Pending => {
                self.pending_by_size.remove(&(ws, i));
            }
            TaskStatus::Done { .. } => {
                self.done -= 1;
                self.bytes_done -= slot.needs.bytes;
            }
            TaskStatus::Leased { .. } => {}
        }
        match status {
            TaskStatus::Pending => {
                self.pending_by_size.insert((ws, i));
            }
            TaskStatus::Done { .. } => {
                self.done += 1;
                self.bytes_done += slot.needs.bytes;
            }
            TaskStatus::Leased { .. } => {}
        }
        slot.status = status;
    }

    /// Mark a task finished before any worker runs (resumed from the journal).
    pub fn restore_done(&mut self, task: TaskId, parts: Vec<(u32, String)>) {
        if task.0 < self.tasks.len() {
            self.set_status(task.0, TaskStatus::Done { parts });
        }
        self.check_all_done();
    }

    /// Put finished tasks back in the queue (their output was lost).
    pub fn redo(&mut self, tasks: std::ops::Range<usize>) {
        for t in tasks {
            if matches!(
                self.tasks.get(t).map(|s| &s.status),
                Some(TaskStatus::Done { .. })
            ) {
                self.set_status(t, TaskStatus::Pending);
            }
        }
        if self.phase == Phase::Committing {
            self.phase = Phase::Running;
        }
    }

    pub fn register(&mut self, name: &str, memory: u64, threads: u32, now: Instant) -> WorkerId {
        let id = WorkerId(self.next_worker);
        self.next_worker += 1;
        self.workers.insert(
            id,
            WorkerSlot {
                name: name.to_string(),
                memory,
                threads,
                last_seen: now,
                tasks: Vec::new(),
                writing: Vec::new(),
                tasks_done: 0,
                told: false,
                polling: 0,
            },
        );
        id
    }

    /// Can a worker with `memory` bytes, `in_use` of them reserved, take this task now?
    /// `biggest` is the memory of the largest registered worker.
    fn fits(t: &TaskNeeds, memory: u64, in_use: u64, biggest: u64) -> bool {
        if t.working_set <= memory.saturating_sub(in_use) {
            return true;
        }
        // Too big for this worker in one pass: stream it here only if no worker could
        // take it whole.
        in_use == 0 && t.min_memory <= memory && t.working_set > biggest
    }

    pub fn lease(&mut self, worker: WorkerId, now: Instant) -> Lease {
        let ended = matches!(self.phase, Phase::Done | Phase::Failed(_));
        if let Some(w) = self.workers.get_mut(&worker) {
            w.last_seen = now;
            w.told |= ended;
        }
        match &self.phase {
            Phase::Done => return Lease::Done,
            Phase::Failed(m) => return Lease::Failed(m.clone()),
            Phase::Committing => return Lease::Wait,
            Phase::Running => {}
        }
        let Some(w) = self.workers.get(&worker) else {
            return Lease::UnknownWorker;
        };
        let (memory, in_use) = (w.memory, w.in_use());
        // The largest task first, so the last ones to finish are short and a fleet ends
        // together: an idle worker first streams a task no worker can take whole (the
        // first in plan order), then any worker takes the largest pending task that fits
        // whole (the first in plan order among equals).
        let free = memory.saturating_sub(in_use);
        let smallest = self.pending_by_size.first().map_or(u64::MAX, |&(ws, _)| ws);
        let largest = self.pending_by_size.last().map_or(0, |&(ws, _)| ws);
        let biggest = self.max_worker_memory();
        let streamed = (in_use == 0 && largest > biggest)
            .then(|| {
                self.pending_by_size
                    .range((biggest + 1, 0)..)
                    .map(|&(_, i)| i)
                    .filter(|&i| Self::fits(&self.tasks[i].needs, memory, in_use, biggest))
                    .min()
            })
            .flatten();
        let pick = streamed.or_else(|| {
            (smallest <= free).then(|| {
                let &(size, _) = self
                    .pending_by_size
                    .range(..=(free, usize::MAX))
                    .next_back()
                    .expect("the smallest fits");
                self.pending_by_size
                    .range((size, 0)..)
                    .next()
                    .map(|&(_, i)| i)
            })?
        });
        // An idle worker takes a task that waits behind another on its worker's link, when
        // it is larger than anything pending (see `take_from_a_shared_link`).
        let pick = if in_use == 0 {
            let best = pick.map_or(0, |i| self.tasks[i].needs.working_set);
            self.take_from_a_shared_link(worker, free, best, now)
                .or(pick)
        } else {
            pick
        };
        let Some(i) = pick else {
            return Lease::Wait;
        };
        let t = &mut self.tasks[i];
        let reserve = t.needs.working_set.min(memory);
        t.attempts += 1;
        let attempt = Attempt(t.attempts);
        self.set_status(
            i,
            TaskStatus::Leased {
                worker,
                attempt,
                deadline: now + self.lease_timeout,
                since: now,
            },
        );
        let w = self.workers.get_mut(&worker).expect("worker checked above");
        w.tasks.push((TaskId(i), reserve));
        w.last_seen = now;
        Lease::Task {
            task: TaskId(i),
            attempt,
        }
    }

    /// A worker that runs nothing asks for work, and another worker is reading two or more
    /// tasks over its one link: the most recently leased of them, if leased within
    /// [`MOVE_WITHIN`] (it has read little) and its output has not started, goes back to
    /// the queue (the attempt does not count) for the idle worker, when it is larger than
    /// `pending` (the working set of the best pending task, 0 for none) and fits in `free`. Largest-first alone let one worker take the two largest
    /// tasks at the start (its two slots asked before the other hosts registered), and let
    /// the last tasks of a merge share one link while other hosts idled: with a link each,
    /// the fleet ends together. The old attempt learns at its next heartbeat that its lease
    /// is gone; a report from it is stale. Returns the task, now pending.
    fn take_from_a_shared_link(
        &mut self,
        worker: WorkerId,
        free: u64,
        pending: u64,
        now: Instant,
    ) -> Option<usize> {
        let (donor, task) = self
            .workers
            .iter()
            .filter(|(id, w)| **id != worker && w.tasks.len() >= w.writing.len() + 2)
            .filter_map(|(id, w)| {
                let (t, _) = w.tasks.iter().rev().find(|(t, _)| !w.writing.contains(t))?;
                Some((*id, *t))
            })
            .filter(|(_, t)| {
                let slot = &self.tasks[t.0];
                let fresh = matches!(slot.status, TaskStatus::Leased { since, .. }
                    if now.saturating_duration_since(since) <= MOVE_WITHIN);
                let ws = slot.needs.working_set;
                fresh && ws > pending && ws <= free
            })
            .max_by_key(|(_, t)| (self.tasks[t.0].needs.working_set, std::cmp::Reverse(t.0)))?;
        let slot = &mut self.tasks[task.0];
        slot.preempted += 1;
        slot.errors.push(format!(
            "attempt {} moved to an idle worker (not counted)",
            slot.attempts
        ));
        self.set_status(task.0, TaskStatus::Pending);
        self.workers
            .get_mut(&donor)
            .expect("the donor is registered")
            .release(task);
        Some(task.0)
    }

    /// A heartbeat of `worker` reported output for `task`: its inputs are read.
    pub fn writing(&mut self, worker: WorkerId, task: TaskId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            if w.tasks.iter().any(|(t, _)| *t == task) && !w.writing.contains(&task) {
                w.writing.push(task);
            }
        }
    }

    fn max_worker_memory(&self) -> u64 {
        self.workers.values().map(|w| w.memory).max().unwrap_or(0)
    }

    /// Renew a lease. False when the lease is no longer this worker's, or the merge has
    /// failed (stop the task; the next lease says why).
    pub fn heartbeat(
        &mut self,
        worker: WorkerId,
        task: TaskId,
        attempt: Attempt,
        now: Instant,
    ) -> bool {
        let Some(w) = self.workers.get_mut(&worker) else {
            return false;
        };
        w.last_seen = now;
        if matches!(self.phase, Phase::Failed(_)) {
            return false;
        }
        let timeout = self.lease_timeout;
        match self.tasks.get_mut(task.0).map(|t| &mut t.status) {
            Some(TaskStatus::Leased {
                worker: lw,
                attempt: la,
                deadline,
                ..
            }) if *lw == worker && *la == attempt => {
                *deadline = now + timeout;
                true
            }
            _ => false,
        }
    }

    /// A worker says it is alive (between tasks).
    pub fn touch(&mut self, worker: WorkerId, now: Instant) -> bool {
        match self.workers.get_mut(&worker) {
            Some(w) => {
                w.last_seen = now;
                true
            }
            None => false,
        }
    }

    pub fn report(
        &mut self,
        worker: WorkerId,
        task: TaskId,
        attempt: Attempt,
        outcome: Outcome,
        now: Instant,
    ) -> Reported {
        let Some(w) = self.workers.get_mut(&worker) else {
            return Reported::Stale;
        };
        w.last_seen = now;
        if self.phase != Phase::Running {
            return Reported::Stale;
        }
        let Some(slot) = self.tasks.get(task.0) else {
            return Reported::Stale;
        };
        match &slot.status {
            TaskStatus::Leased {
                worker: lw,
                attempt: la,
                ..
            } if *lw == worker && *la == attempt => {}
            _ => return Reported::Stale,
        }
        if let Some(w) = self.workers.get_mut(&worker) {
            w.release(task);
        }
        match outcome {
            Outcome::Success { parts } => {
                self.set_status(task.0, TaskStatus::Done { parts });
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.tasks_done += 1;
                }
                self.check_all_done();
                Reported::Finished(task)
            }
            Outcome::Failure { message, retryable } => {
                let who = self
                    .workers
                    .get(&worker)
                    .map(|w| w.name.clone())
                    .unwrap_or_default();
                self.tasks[task.0]
                    .errors
                    .push(format!("attempt {attempt} on worker {who}: {message}"));
                self.set_status(task.0, TaskStatus::Pending);
                self.after_failure(task, retryable)
            }
            Outcome::Preempted { message } => {
                let slot = &mut self.tasks[task.0];
                slot.preempted += 1;
                slot.errors
                    .push(format!("attempt {attempt} (not counted): {message}"));
                self.set_status(task.0, TaskStatus::Pending);
                Reported::Retrying(task)
            }
        }
    }

    fn after_failure(&mut self, task: TaskId, retryable: bool) -> Reported {
        let slot = &self.tasks[task.0];
        let failures = slot.attempts - slot.preempted;
        if !retryable || failures >= self.max_attempts {
            let why = if retryable {
                format!(
                    "failed {failures} times (--max-attempts {})",
                    self.max_attempts
                )
            } else {
                "failed and cannot succeed on another attempt".to_string()
            };
            let last: Vec<&str> = slot
                .errors
                .iter()
                .rev()
                .take(3)
                .map(String::as_str)
                .collect();
            let msg = format!(
                "{} {why}; last errors: {}",
                (self.describe)(task.0),
                last.join(" | ")
            );
            self.phase = Phase::Failed(msg.clone());
            Reported::JobFailed(msg)
        } else {
            Reported::Retrying(task)
        }
    }

    /// Expire overdue leases (the task goes back with the next attempt number) and forget
    /// workers silent for three lease timeouts. Returns the tasks put back.
    pub fn tick(&mut self, now: Instant) -> Vec<TaskId> {
        let mut expired = Vec::new();
        // Leased tasks are exactly those the workers hold.
        let mut leased: Vec<usize> = self
            .workers
            .values()
            .flat_map(|w| w.tasks.iter().map(|(t, _)| t.0))
            .collect();
        leased.sort_unstable();
        for i in leased {
            if let TaskStatus::Leased {
                worker,
                attempt,
                deadline,
                ..
            } = self.tasks[i].status
            {
                if now >= deadline && self.phase == Phase::Running {
                    let name = self
                        .workers
                        .get(&worker)
                        .map(|w| w.name.clone())
                        .unwrap_or_default();
                    self.tasks[i].errors.push(format!("attempt {attempt} on worker {name}: lease expired (worker lost or stalled)"));
                    self.set_status(i, TaskStatus::Pending);
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.release(TaskId(i));
                    }
                    expired.push(TaskId(i));
                    if let Reported::JobFailed(_) = self.after_failure(TaskId(i), true) {
                        break;
                    }
                }
            }
        }
        let forget = self.lease_timeout * 3;
        self.workers.retain(|_, w| {
            !w.tasks.is_empty() || w.polling > 0 || now.duration_since(w.last_seen) < forget
        });
        self.warn_if_stuck(now);
        expired
    }

    /// Every 30 s while some pending task needs more memory than every registered worker
    /// has (workers are checked when they register, but a task put back may need more than
    /// a worker that came later): say so, instead of waiting in silence.
    fn warn_if_stuck(&mut self, now: Instant) {
        if self.workers.is_empty()
            || self
                .warned_stuck
                .is_some_and(|t| now.duration_since(t) < Duration::from_secs(30))
        {
            return;
        }
        let max = self.max_worker_memory();
        let stuck = self
            .pending_by_size
            .iter()
            .map(|&(_, i)| i)
            .filter(|&i| self.tasks[i].needs.min_memory > max)
            .min();
        if let Some(i) = stuck {
            tracing::warn!(
                "{} needs at least {} bytes of memory; no registered worker has that much (give workers a larger --memory-limit)",
                (self.describe)(i),
                self.tasks[i].needs.min_memory
            );
            self.warned_stuck = Some(now);
        }
    }

    fn check_all_done(&mut self) {
        if self.phase == Phase::Running && self.done == self.tasks.len() {
            self.phase = Phase::Committing;
        }
    }

    pub fn fail(&mut self, message: String) {
        if !matches!(self.phase, Phase::Done) {
            self.phase = Phase::Failed(message);
        }
    }

    /// Tasks done, leased and pending.
    pub fn counts(&self) -> (usize, usize, usize) {
        let pending = self.pending_by_size.len();
        (self.done, self.tasks.len() - self.done - pending, pending)
    }

    /// The unfinished task that needs the most memory even when streamed, and that memory:
    /// a worker with less could never run it.
    pub fn most_memory_needed(&self) -> Option<(TaskId, u64)> {
        self.tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| !matches!(t.status, TaskStatus::Done { .. }))
            .map(|(i, t)| (TaskId(i), t.needs.min_memory))
            .max_by_key(|&(i, m)| (m, std::cmp::Reverse(i)))
    }

    /// How to name a task in messages.
    pub fn describe(&self, task: TaskId) -> String {
        (self.describe)(task.0)
    }

    pub fn bytes_done(&self) -> u64 {
        self.bytes_done
    }

    pub fn is_done(&self, task: TaskId) -> bool {
        self.parts(task).is_some()
    }

    /// The part ids of a finished task (empty for file outputs); None if not finished.
    pub fn parts(&self, task: TaskId) -> Option<&[(u32, String)]> {
        match self.tasks.get(task.0).map(|t| &t.status) {
            Some(TaskStatus::Done { parts }) => Some(parts),
            _ => None,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The checkpoint is committed (from [`Phase::Committing`]).
    pub fn mark_committed(&mut self) {
        if self.phase == Phase::Committing {
            self.phase = Phase::Done;
        }
    }

    pub fn lease_timeout(&self) -> Duration {
        self.lease_timeout
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// A registered worker's name.
    pub fn worker_name(&self, worker: WorkerId) -> Option<String> {
        self.workers.get(&worker).map(|w| w.name.clone())
    }

    pub fn workers(&self) -> impl Iterator<Item = (WorkerId, &WorkerSlot)> {
        self.workers.iter().map(|(id, w)| (*id, w))
    }

    /// A lease call of `worker` starts or stops waiting (see [`Self::workers_to_tell`]).
    pub fn polling(&mut self, worker: WorkerId, started: bool) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.polling = if started {
                w.polling + 1
            } else {
                w.polling.saturating_sub(1)
            };
        }
    }

    /// Workers not yet told how the merge ended that will still ask: those in a long poll
    /// now, and those heard from within two heartbeat intervals (a live worker calls at
    /// least every interval). A killed worker is neither, so the end does not wait for it.
    pub fn workers_to_tell(&self, now: Instant) -> usize {
        let recent = self.lease_timeout / 2;
        self.workers
            .values()
            .filter(|w| !w.told && (w.polling > 0 || now.duration_since(w.last_seen) < recent))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(i: usize) -> TaskId {
        TaskId(i)
    }
    fn at(n: u32) -> Attempt {
        Attempt(n)
    }

    fn needs(ws: u64) -> TaskNeeds {
        TaskNeeds {
            working_set: ws,
            min_memory: ws.min(10),
            bytes: 1,
        }
    }

    fn state(n: usize) -> ClusterState {
        with_tasks(vec![needs(100); n])
    }

    /// A fresh state over these tasks: 3 attempts, 10 s leases.
    fn with_tasks(tasks: Vec<TaskNeeds>) -> ClusterState {
        ClusterState::new(
            1,
            tasks,
            3,
            Duration::from_secs(10),
            Box::new(|i| format!("task {i}")),
        )
    }

    fn ok() -> Outcome {
        Outcome::Success { parts: vec![] }
    }

    #[test]
    fn happy_path() {
        let now = Instant::now();
        let mut s = state(2);
        let w = s.register("w1", 1000, 2, now);
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(0),
                attempt: at(1)
            }
        );
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(1),
                attempt: at(1)
            }
        );
        assert_eq!(s.lease(w, now), Lease::Wait);
        assert_eq!(
            s.report(w, t(0), at(1), ok(), now),
            Reported::Finished(t(0))
        );
        assert_eq!(s.phase, Phase::Running);
        assert_eq!(
            s.report(w, t(1), at(1), ok(), now),
            Reported::Finished(t(1))
        );
        assert_eq!(s.phase, Phase::Committing);
        assert_eq!(s.lease(w, now), Lease::Wait);
        assert!(!s.workers[&w].told);
        s.phase = Phase::Done;
        // A worker registering at the very end is told too (the linger waits for it).
        let late = s.register("late", 1 << 30, 1, now);
        assert_eq!(s.lease(w, now), Lease::Done);
        assert!(s.workers[&w].told && !s.workers[&late].told);
        assert_eq!(s.lease(late, now), Lease::Done);
        assert!(s.workers[&late].told);
        assert_eq!(s.workers[&w].tasks_done, 2);
    }

    #[test]
    fn lost_worker_lease_expires_and_task_is_redone() {
        let now = Instant::now();
        let mut s = state(1);
        let a = s.register("a", 1000, 1, now);
        let b = s.register("b", 1000, 1, now);
        assert_eq!(
            s.lease(a, now),
            Lease::Task {
                task: t(0),
                attempt: at(1)
            }
        );
        assert_eq!(s.lease(b, now), Lease::Wait);
        // a's heartbeats keep it alive...
        assert!(s.heartbeat(a, t(0), at(1), now + Duration::from_secs(8)));
        assert!(s.tick(now + Duration::from_secs(15)).is_empty());
        // ...until they stop: the lease expires and b gets attempt 2.
        assert_eq!(s.tick(now + Duration::from_secs(19)), vec![t(0)]);
        assert_eq!(
            s.lease(b, now + Duration::from_secs(19)),
            Lease::Task {
                task: t(0),
                attempt: at(2)
            }
        );
        // a comes back (SIGCONT): its heartbeat is refused, its report is stale.
        assert!(!s.heartbeat(a, t(0), at(1), now + Duration::from_secs(20)));
        assert_eq!(
            s.report(a, t(0), at(1), ok(), now + Duration::from_secs(20)),
            Reported::Stale
        );
        assert!(!s.is_done(t(0)));
        assert_eq!(
            s.report(b, t(0), at(2), ok(), now + Duration::from_secs(21)),
            Reported::Finished(t(0))
        );
        assert!(s.tasks[0].errors[0].contains("lease expired"));
    }

    #[test]
    fn unknown_worker_is_ignored() {
        let now = Instant::now();
        let mut s = state(1);
        assert_eq!(s.lease(WorkerId(42), now), Lease::UnknownWorker);
        // A worker of a previous coordinator run has an id this run never gave out.
        let mut next_run = ClusterState::new(
            1000,
            vec![needs(1)],
            3,
            Duration::from_secs(1),
            Box::new(|i| i.to_string()),
        );
        assert_eq!(next_run.register("w", 10, 1, now), WorkerId(1000));
        assert_eq!(
            next_run.report(WorkerId(1), t(0), at(1), ok(), now),
            Reported::Stale
        );
        assert_eq!(
            s.report(WorkerId(42), t(0), at(1), ok(), now),
            Reported::Stale
        );
        assert!(!s.heartbeat(WorkerId(42), t(0), at(1), now));
    }

    #[test]
    fn preempted_attempts_do_not_count_toward_max_attempts() {
        let now = Instant::now();
        let mut s = state(1);
        let w = s.register("w", 1000, 1, now);
        // Five preemptions with --max-attempts 3: still running, attempts numbered on.
        for attempt in 1..=5 {
            assert_eq!(
                s.lease(w, now),
                Lease::Task {
                    task: t(0),
                    attempt: at(attempt)
                }
            );
            let r = s.report(
                w,
                t(0),
                at(attempt),
                Outcome::Preempted {
                    message: "SIGTERM".into(),
                },
                now,
            );
            assert_eq!(r, Reported::Retrying(t(0)));
        }
        // A stale report of a preempted attempt is still dropped.
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(0),
                attempt: at(6)
            }
        );
        assert_eq!(s.report(w, t(0), at(5), ok(), now), Reported::Stale);
        // Real failures still count: three of them fail the job.
        let fail = |m: &str| Outcome::Failure {
            message: m.into(),
            retryable: true,
        };
        assert_eq!(
            s.report(w, t(0), at(6), fail("a"), now),
            Reported::Retrying(t(0))
        );
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(0),
                attempt: at(7)
            }
        );
        assert_eq!(
            s.report(w, t(0), at(7), fail("b"), now),
            Reported::Retrying(t(0))
        );
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(0),
                attempt: at(8)
            }
        );
        assert!(matches!(
            s.report(w, t(0), at(8), fail("c"), now),
            Reported::JobFailed(m) if m.contains("failed 3 times")
        ));
    }

    #[test]
    fn unfinished_task_needing_most_memory() {
        let now = Instant::now();
        let mut s = with_tasks(vec![needs(100), needs(5), needs(300)]);
        assert_eq!(s.most_memory_needed(), Some((t(0), 10)));
        let w = s.register("w", 1000, 1, now);
        for _ in 0..3 {
            let Lease::Task { task, attempt } = s.lease(w, now) else {
                panic!()
            };
            s.report(w, task, attempt, ok(), now);
        }
        assert_eq!(s.most_memory_needed(), None);
    }

    #[test]
    fn retryable_failures_retry_until_max_attempts() {
        let now = Instant::now();
        let mut s = state(1);
        let w = s.register("w", 1000, 1, now);
        for attempt in 1..=2 {
            assert_eq!(
                s.lease(w, now),
                Lease::Task {
                    task: t(0),
                    attempt: at(attempt)
                }
            );
            let r = s.report(
                w,
                t(0),
                at(attempt),
                Outcome::Failure {
                    message: format!("upload failed {attempt}"),
                    retryable: true,
                },
                now,
            );
            assert_eq!(r, Reported::Retrying(t(0)));
        }
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(0),
                attempt: at(3)
            }
        );
        let r = s.report(
            w,
            t(0),
            at(3),
            Outcome::Failure {
                message: "upload failed 3".into(),
                retryable: true,
            },
            now,
        );
        let Reported::JobFailed(msg) = r else {
            panic!("{r:?}")
        };
        assert!(
            msg.contains("task 0") && msg.contains("3 times") && msg.contains("upload failed 3"),
            "{msg}"
        );
        assert!(matches!(s.lease(w, now), Lease::Failed(_)));
    }

    #[test]
    fn fatal_failure_fails_at_once() {
        let now = Instant::now();
        let mut s = state(2);
        let w = s.register("w", 1000, 1, now);
        s.lease(w, now);
        let r = s.report(
            w,
            t(0),
            at(1),
            Outcome::Failure {
                message: "bad".into(),
                retryable: false,
            },
            now,
        );
        assert!(matches!(r, Reported::JobFailed(m) if m.contains("cannot succeed")));
    }

    /// Largest-first let the first worker's two slots take the two largest tasks before the
    /// other hosts registered, so both shared one link; and at the end a worker read two
    /// tasks while others idled. An idle worker now takes the most recently leased task
    /// that waits behind another on a link, when it is larger than anything pending; a task
    /// already writing its output stays.
    #[test]
    fn an_idle_worker_takes_a_task_that_shares_a_link() {
        let now = Instant::now();
        let mut s = with_tasks(vec![needs(500), needs(500), needs(100), needs(100)]);
        let a = s.register("a", 1000, 1, now);
        let first = s.lease(a, now);
        let Lease::Task {
            task: second,
            attempt,
        } = s.lease(a, now)
        else {
            panic!("a's second slot gets a task")
        };
        assert!(matches!(first, Lease::Task { task, .. } if task == t(0)));
        assert_eq!((second, attempt), (t(1), at(1)));
        // b registers and asks: a's second large task moves to b, not a small one to b.
        let b = s.register("b", 1000, 1, now);
        assert_eq!(
            s.lease(b, now),
            Lease::Task {
                task: t(1),
                attempt: at(2)
            }
        );
        assert!(!s.heartbeat(a, t(1), at(1), now), "a's attempt is gone");
        let stale = s.report(a, t(1), at(1), Outcome::Success { parts: vec![] }, now);
        assert_eq!(stale, Reported::Stale);
        // a takes the small tasks; b, busy, takes nothing from anyone.
        assert!(matches!(s.lease(a, now), Lease::Task { task, .. } if task == t(2)));
        assert!(matches!(s.lease(b, now), Lease::Task { task, .. } if task == t(3)));
        // The end: nothing pending, a reads two tasks (0 and 2), b two (1 and 3), c is idle:
        // of equal sizes, the first in plan order moves.
        let c = s.register("c", 1000, 1, now);
        // Leased longer ago than MOVE_WITHIN: read too far to start over elsewhere.
        assert_eq!(s.lease(c, now + 2 * MOVE_WITHIN), Lease::Wait);
        assert!(matches!(s.lease(c, now), Lease::Task { task, .. } if task == t(2)));
        // a reads one task now; b writes one and reads one: nothing moves.
        s.writing(b, t(1));
        let d = s.register("d", 1000, 1, now);
        assert_eq!(s.lease(d, now), Lease::Wait);
        // The moved attempts did not count toward --max-attempts.
        for i in [1, 2] {
            assert_eq!(s.tasks[i].attempts - s.tasks[i].preempted, 1, "task {i}");
        }
    }

    /// A worker still running a task when the merge fails (its store died under it) hears
    /// so at its next heartbeat, instead of running on until its own store calls give up.
    #[test]
    fn heartbeats_stop_running_tasks_once_the_merge_failed() {
        let now = Instant::now();
        let mut s = state(2);
        let (a, b) = (s.register("a", 1000, 1, now), s.register("b", 1000, 1, now));
        assert!(matches!(s.lease(a, now), Lease::Task { .. }));
        let Lease::Task { task, attempt } = s.lease(b, now) else {
            panic!("b gets the second task")
        };
        assert!(s.heartbeat(b, task, attempt, now));
        s.report(
            a,
            t(0),
            at(1),
            Outcome::Failure {
                message: "s3://b/m/model.safetensors: connection refused".into(),
                retryable: false,
            },
            now,
        );
        assert!(!s.heartbeat(b, task, attempt, now));
        assert!(matches!(s.lease(b, now), Lease::Failed(m) if m.contains("s3://b/m")));
    }

    #[test]
    fn expiries_count_toward_max_attempts() {
        let now = Instant::now();
        let mut s = state(1);
        let w = s.register("w", 1000, 1, now);
        let mut t = now;
        for _ in 0..3 {
            assert!(matches!(s.lease(w, t), Lease::Task { .. }));
            t += Duration::from_secs(11);
            s.tick(t);
            s.touch(w, t);
        }
        assert!(matches!(s.phase, Phase::Failed(ref m) if m.contains("lease expired")));
    }

    #[test]
    fn tasks_go_only_to_workers_with_enough_memory() {
        let now = Instant::now();
        let mut s = with_tasks(vec![
            TaskNeeds {
                working_set: 500,
                min_memory: 50,
                bytes: 1,
            },
            needs(100),
        ]);
        let small = s.register("small", 200, 1, now);
        let big = s.register("big", 600, 1, now);
        // small cannot take task 0 whole, and a bigger worker exists: it gets task 1.
        assert_eq!(
            s.lease(small, now),
            Lease::Task {
                task: t(1),
                attempt: at(1)
            }
        );
        assert_eq!(s.lease(small, now), Lease::Wait);
        assert_eq!(
            s.lease(big, now),
            Lease::Task {
                task: t(0),
                attempt: at(1)
            }
        );
        // Without a big worker, the small one streams it.
        let mut s2 = with_tasks(vec![TaskNeeds {
            working_set: 500,
            min_memory: 50,
            bytes: 1,
        }]);
        let small = s2.register("small", 200, 1, now);
        assert_eq!(
            s2.lease(small, now),
            Lease::Task {
                task: t(0),
                attempt: at(1)
            }
        );
        // Nobody can run a task below its minimum.
        let mut s3 = with_tasks(vec![TaskNeeds {
            working_set: 500,
            min_memory: 300,
            bytes: 1,
        }]);
        let small = s3.register("small", 200, 1, now);
        assert_eq!(s3.lease(small, now), Lease::Wait);
    }

    #[test]
    fn resumed_tasks_are_not_leased_again() {
        let now = Instant::now();
        let mut s = state(3);
        s.restore_done(t(0), vec![(0, "etag0".into())]);
        s.restore_done(t(2), vec![]);
        let w = s.register("w", 1000, 1, now);
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(1),
                attempt: at(1)
            }
        );
        assert_eq!(s.lease(w, now), Lease::Wait);
        assert_eq!(s.counts(), (2, 1, 0));
        s.report(w, t(1), at(1), ok(), now);
        assert_eq!(s.phase, Phase::Committing);
    }

    #[test]
    fn one_worker_runs_several_tasks_within_its_memory() {
        let now = Instant::now();
        let mut s = state(3);
        let w = s.register("w", 250, 1, now);
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(0),
                attempt: at(1)
            }
        );
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(1),
                attempt: at(1)
            }
        );
        assert_eq!(
            s.lease(w, now),
            Lease::Wait,
            "a third task would exceed 250 bytes"
        );
        s.report(w, t(0), at(1), ok(), now);
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(2),
                attempt: at(1)
            }
        );
        assert_eq!(s.workers[&w].in_use(), 200);
    }

    #[test]
    fn an_idle_worker_streams_a_task_too_big_for_all_before_the_rest() {
        let now = Instant::now();
        let mut s = with_tasks([10, 500, 20, 400].map(needs).to_vec());
        let w = s.register("w", 100, 1, now);
        let leased = |s: &mut ClusterState| match s.lease(w, now) {
            Lease::Task { task, .. } => Some(task.0),
            _ => None,
        };
        // Streamed tasks take the whole worker: one at a time, in plan order, first.
        assert_eq!(leased(&mut s), Some(1));
        assert_eq!(leased(&mut s), None);
        s.report(w, t(1), at(1), ok(), now);
        assert_eq!(leased(&mut s), Some(3));
        s.report(w, t(3), at(1), ok(), now);
        assert_eq!(leased(&mut s), Some(2));
        assert_eq!(leased(&mut s), Some(0));
    }

    #[test]
    fn the_largest_task_that_fits_goes_first() {
        let now = Instant::now();
        let mut s = with_tasks([10, 50, 30, 50, 60].map(needs).to_vec());
        let big = s.register("big", 100, 1, now);
        let small = s.register("small", 40, 1, now);
        let leased = |s: &mut ClusterState, w| match s.lease(w, now) {
            Lease::Task { task, .. } => Some(task.0),
            _ => None,
        };
        // The 60 first, then the largest that fits the 40 left: the 30.
        assert_eq!(leased(&mut s, big), Some(4));
        assert_eq!(leased(&mut s, big), Some(2));
        assert_eq!(leased(&mut s, big), Some(0));
        assert_eq!(leased(&mut s, big), None);
        // A small worker takes what fits it, not a task only a big one can run (big's
        // tasks are writing their output, so none of them moves either).
        for i in [4, 2, 0] {
            s.writing(big, t(i));
        }
        assert_eq!(leased(&mut s, small), None);
        s.report(big, t(4), at(1), ok(), now);
        // Of equal sizes, the first in plan order.
        assert_eq!(leased(&mut s, big), Some(1));
        s.report(big, t(2), at(1), ok(), now);
        s.report(big, t(0), at(1), ok(), now);
        assert_eq!(leased(&mut s, big), Some(3));
    }

    #[test]
    fn lost_output_is_redone() {
        let now = Instant::now();
        let mut s = state(2);
        let w = s.register("w", 1000, 1, now);
        for i in 0..2 {
            s.lease(w, now);
            s.report(w, t(i), at(1), ok(), now);
        }
        assert_eq!(s.phase, Phase::Committing);
        s.redo(0..2);
        assert_eq!(s.phase, Phase::Running);
        assert_eq!(
            s.lease(w, now),
            Lease::Task {
                task: t(0),
                attempt: at(2)
            }
        );
    }

    #[test]
    fn silent_idle_workers_are_forgotten() {
        let now = Instant::now();
        let mut s = state(1);
        let w = s.register("w", 1000, 1, now);
        s.tick(now + Duration::from_secs(29));
        assert!(s.workers.contains_key(&w));
        s.tick(now + Duration::from_secs(31));
        assert!(!s.workers.contains_key(&w));
        assert_eq!(s.lease(w, now), Lease::UnknownWorker);
    }

    /// The kept counts and pending sets equal a recount after any sequence of leases,
    /// reports (success, failure, preemption, stale), expiries and redos.
    #[test]
    fn kept_counts_equal_a_recount() {
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let tasks: Vec<TaskNeeds> = (0..40)
            .map(|i| TaskNeeds {
                working_set: 50 + (i * 37 % 200),
                min_memory: 20,
                bytes: i + 1,
            })
            .collect();
        let mut s = ClusterState::new(
            1,
            tasks,
            1000,
            Duration::from_secs(10),
            Box::new(|i| i.to_string()),
        );
        let mut now = Instant::now();
        let ws: Vec<WorkerId> = (0..4)
            .map(|k| s.register(&format!("w{k}"), 100 + 60 * k, 1, now))
            .collect();
        for _ in 0..5000 {
            let w = ws[next(4) as usize];
            match next(10) {
                0..=3 => {
                    s.lease(w, now);
                }
                4..=7 => {
                    let held = s.workers.get(&w).and_then(|x| x.tasks.first().copied());
                    if let Some((task, _)) = held {
                        let attempt = Attempt(s.tasks[task.0].attempts);
                        let outcome = match next(4) {
                            0 => Outcome::Failure {
                                message: "x".into(),
                                retryable: true,
                            },
                            1 => Outcome::Preempted {
                                message: "x".into(),
                            },
                            _ => ok(),
                        };
                        s.report(w, task, attempt, outcome, now);
                    }
                }
                8 => {
                    now += Duration::from_secs(next(12));
                    for &w in &ws {
                        s.touch(w, now);
                    }
                    s.tick(now);
                }
                _ => {
                    let a = next(40) as usize;
                    s.redo(a..a + 3);
                }
            }
            let recount =
                |f: fn(&TaskStatus) -> bool| s.tasks.iter().filter(|t| f(&t.status)).count();
            let done = recount(|t| matches!(t, TaskStatus::Done { .. }));
            let leased = recount(|t| matches!(t, TaskStatus::Leased { .. }));
            let pending = recount(|t| *t == TaskStatus::Pending);
            assert_eq!(s.counts(), (done, leased, pending));
            let bytes: u64 = s
                .tasks
                .iter()
                .filter(|t| matches!(t.status, TaskStatus::Done { .. }))
                .map(|t| t.needs.bytes)
                .sum();
            assert_eq!(s.bytes_done(), bytes);
            let want: BTreeSet<usize> = (0..s.tasks.len())
                .filter(|&i| s.tasks[i].status == TaskStatus::Pending)
                .collect();
            let pending: BTreeSet<usize> = s.pending_by_size.iter().map(|&(_, i)| i).collect();
            assert_eq!(pending, want);
            assert_eq!(s.pending_by_size.len(), want.len());
            if s.phase == Phase::Committing {
                assert_eq!(done, s.tasks.len());
                s.redo(0..1);
            }
        }
    }

    #[test]
    fn the_end_waits_only_for_workers_that_will_ask_again() {
        let now = Instant::now();
        let mut s = state(1);
        let polling = s.register("polling", 1000, 1, now);
        let killed = s.register("killed", 1000, 1, now);
        let recent = s.register("recent", 1000, 1, now);
        assert_eq!(s.workers_to_tell(now), 3);
        s.polling(polling, true);
        let later = now + Duration::from_secs(9); // lease 10 s: heartbeat interval 2.5 s
        s.touch(recent, later - Duration::from_secs(1));
        assert_eq!(
            s.workers_to_tell(later),
            2,
            "the killed worker is not waited for"
        );
        s.phase = Phase::Done;
        assert_eq!(s.lease(polling, later), Lease::Done);
        s.polling(polling, false);
        assert_eq!(s.workers_to_tell(later), 1);
        assert_eq!(s.lease(recent, later), Lease::Done);
        assert_eq!(s.workers_to_tell(later), 0);
        assert!(!s.workers[&killed].told);
    }
}
