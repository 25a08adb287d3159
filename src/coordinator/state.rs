//! The coordinator's bookkeeping as a pure state machine: workers, leases, attempts.
//!
//! No network and no clock of its own: every call takes `now`, so tests drive it with
//! virtual workers ("lose a worker", "expire a lease", "stale report") in microseconds. The
//! gRPC service is a thin shell around it.

use std::collections::BTreeMap;
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
    pub fn of(t: &crate::plan::Task) -> Self {
        TaskNeeds {
            working_set: t.working_set(),
            min_memory: t.min_memory(),
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
    /// Tasks this worker runs now, with the memory reserved for each.
    pub tasks: Vec<(TaskId, u64)>,
    pub tasks_done: u64,
    /// Has been answered "done" or "failed": it knows how the merge ended.
    pub told: bool,
}

impl WorkerSlot {
    pub fn in_use(&self) -> u64 {
        self.tasks.iter().map(|(_, m)| m).sum()
    }
    fn release(&mut self, task: TaskId) {
        self.tasks.retain(|(t, _)| *t != task);
    }
}

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

    /// Mark a task finished before any worker runs (resumed from the journal).
    pub fn restore_done(&mut self, task: TaskId, parts: Vec<(u32, String)>) {
        if let Some(t) = self.tasks.get_mut(task.0) {
            t.status = TaskStatus::Done { parts };
        }
        self.check_all_done();
    }

    /// Put finished tasks back in the queue (their output was lost).
    pub fn redo(&mut self, tasks: std::ops::Range<usize>) {
        for t in tasks {
            if let Some(slot) = self.tasks.get_mut(t) {
                if matches!(slot.status, TaskStatus::Done { .. }) {
                    slot.status = TaskStatus::Pending;
                }
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
                tasks_done: 0,
                told: false,
            },
        );
        id
    }

    /// Can a worker with `memory` bytes, `in_use` of them reserved, take this task now?
    fn fits(&self, t: &TaskNeeds, memory: u64, in_use: u64) -> bool {
        if t.working_set <= memory.saturating_sub(in_use) {
            return true;
        }
        if in_use > 0 {
            return false;
        }
        // Too big for this worker in one pass: stream it here only if no worker could
        // take it whole.
        let biggest = self.workers.values().map(|w| w.memory).max().unwrap_or(0);
        t.min_memory <= memory && t.working_set > biggest
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
        let pick = (0..self.tasks.len()).find(|&i| {
            self.tasks[i].status == TaskStatus::Pending
                && self.fits(&self.tasks[i].needs, memory, in_use)
        });
        let Some(i) = pick else {
            let stuck = self.tasks.iter().enumerate().find(|(_, t)| {
                t.status == TaskStatus::Pending && t.needs.min_memory > self.max_worker_memory()
            });
            if let (Some((i, t)), 0) = (stuck, in_use) {
                tracing::warn!(
                    "{} needs at least {} bytes of memory; no registered worker has that much (give workers a larger --memory-limit)",
                    (self.describe)(i),
                    t.needs.min_memory
                );
            }
            return Lease::Wait;
        };
        let t = &mut self.tasks[i];
        let reserve = t.needs.working_set.min(memory);
        t.attempts += 1;
        let attempt = Attempt(t.attempts);
        t.status = TaskStatus::Leased {
            worker,
            attempt,
            deadline: now + self.lease_timeout,
        };
        let w = self.workers.get_mut(&worker).expect("worker checked above");
        w.tasks.push((TaskId(i), reserve));
        w.last_seen = now;
        Lease::Task {
            task: TaskId(i),
            attempt,
        }
    }

    fn max_worker_memory(&self) -> u64 {
        self.workers.values().map(|w| w.memory).max().unwrap_or(0)
    }

    /// Renew a lease. False when the lease is no longer this worker's (stop the task).
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
        let timeout = self.lease_timeout;
        match self.tasks.get_mut(task.0).map(|t| &mut t.status) {
            Some(TaskStatus::Leased {
                worker: lw,
                attempt: la,
                deadline,
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
        _now: Instant,
    ) -> Reported {
        if !self.workers.contains_key(&worker) || self.phase != Phase::Running {
            return Reported::Stale;
        }
        let Some(slot) = self.tasks.get_mut(task.0) else {
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
                slot.status = TaskStatus::Done { parts };
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
                slot.errors
                    .push(format!("attempt {attempt} on worker {who}: {message}"));
                slot.status = TaskStatus::Pending;
                self.after_failure(task, retryable)
            }
            Outcome::Preempted { message } => {
                slot.preempted += 1;
                slot.errors
                    .push(format!("attempt {attempt} (not counted): {message}"));
                slot.status = TaskStatus::Pending;
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
        for i in 0..self.tasks.len() {
            if let TaskStatus::Leased {
                worker,
                attempt,
                deadline,
            } = self.tasks[i].status
            {
                if now >= deadline && self.phase == Phase::Running {
                    let name = self
                        .workers
                        .get(&worker)
                        .map(|w| w.name.clone())
                        .unwrap_or_default();
                    self.tasks[i].errors.push(format!("attempt {attempt} on worker {name}: lease expired (worker lost or stalled)"));
                    self.tasks[i].status = TaskStatus::Pending;
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
        self.workers
            .retain(|_, w| !w.tasks.is_empty() || now.duration_since(w.last_seen) < forget);
        expired
    }

    fn check_all_done(&mut self) {
        if self.phase == Phase::Running
            && self
                .tasks
                .iter()
                .all(|t| matches!(t.status, TaskStatus::Done { .. }))
        {
            self.phase = Phase::Committing;
        }
    }

    pub fn fail(&mut self, message: String) {
        if !matches!(self.phase, Phase::Done) {
            self.phase = Phase::Failed(message);
        }
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for t in &self.tasks {
            match t.status {
                TaskStatus::Done { .. } => c.0 += 1,
                TaskStatus::Leased { .. } => c.1 += 1,
                TaskStatus::Pending => c.2 += 1,
            }
        }
        c
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
        self.tasks
            .iter()
            .filter(|t| matches!(t.status, TaskStatus::Done { .. }))
            .map(|t| t.needs.bytes)
            .sum()
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

    pub fn workers(&self) -> impl Iterator<Item = (WorkerId, &WorkerSlot)> {
        self.workers.iter().map(|(id, w)| (*id, w))
    }

    /// Registered workers not yet told how the merge ended.
    pub fn untold_workers(&self) -> usize {
        self.workers.values().filter(|w| !w.told).count()
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
}
