//! Crash blame and isolation: after repeated crashes, the runs that were in flight are started
//! in small groups, alone, so that a run which kills its executor (a poison run) uses up its own
//! attempts and nobody else's.
//!
//! How blame works (see `db::runs::reclaim_owned`): when an incarnation dies, its successor takes
//! its runs back and counts an attempt only against the runs that could have caused the death —
//! the group on probation, if there was one, otherwise every run that recorded no step since its
//! last claim. A run blamed again at attempt 3 or more is a *suspect*. Suspects are started in
//! groups of 1, 2, 4, … (most attempts first); while a group is on probation nothing else starts
//! and `spool.executors.probation_runs` names the group, so a crash during probation blames only
//! the group. A group passes when its runs end or the probation period elapses; then the next
//! group starts, and once every suspect has passed, the runs held back start and claiming resumes.
//!
//! This module never talks to the database itself: the control loop records each group before
//! starting it.

use std::collections::VecDeque;

use tokio::time::Instant;

use crate::db::runs::{Reclaimed, Run};

/// A run blamed this many attempts (or more) is isolated.
const SUSPECT_AT_ATTEMPT: i32 = 3;

/// Suspects waiting to be started alone, the runs held back meanwhile, and the group on
/// probation.
#[derive(Default)]
pub struct Isolation {
    suspects: VecDeque<Run>,
    held: Vec<Run>,
    group: Option<Group>,
    next_size: usize,
    /// From the first suspect until the record is cleared and the held runs start.
    isolating: bool,
}

/// Runs on probation, and when it ends if none of them crashes the process.
pub struct Group {
    pub ids: Vec<String>,
    pub until: Instant,
}

impl Isolation {
    /// Sorts reclaimed runs: suspects are isolated; the rest start at once unless isolation is
    /// under way, in which case they wait for it. Returns the runs to start now.
    pub fn admit(&mut self, reclaimed: Vec<Reclaimed>) -> Vec<Run> {
        let mut now = Vec::new();
        for r in reclaimed {
            if r.blamed && r.run.attempt >= SUSPECT_AT_ATTEMPT {
                tracing::warn!(run = %r.run.id, attempt = r.run.attempt, "run was executing at repeated crashes; starting it in isolation");
                self.suspects.push_back(r.run);
            } else {
                now.push(r.run);
            }
        }
        if !self.isolating && self.suspects.is_empty() {
            return now;
        }
        if !self.isolating {
            self.isolating = true;
            self.next_size = 1;
        }
        let mut suspects: Vec<Run> = self.suspects.drain(..).collect();
        suspects.sort_by_key(|r| std::cmp::Reverse(r.attempt));
        self.suspects = suspects.into();
        self.held.extend(now);
        Vec::new()
    }

    /// True from the first suspect until the held runs start: nothing else may start.
    pub fn active(&self) -> bool {
        self.isolating
    }

    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// The group on probation has passed (its runs ended, or its time is up).
    pub fn group_passed(&self, running: impl Fn(&str) -> bool) -> bool {
        self.group
            .as_ref()
            .is_some_and(|g| Instant::now() >= g.until || !g.ids.iter().any(|id| running(id)))
    }

    /// Ends the current group's probation.
    pub fn end_group(&mut self) {
        self.group = None;
    }

    /// The next group to put on probation (not yet started), or `None`.
    pub fn next_group(&self) -> Option<Vec<String>> {
        if self.group.is_some() || self.suspects.is_empty() {
            return None;
        }
        let n = self.next_size.max(1).min(self.suspects.len());
        Some(self.suspects.iter().take(n).map(|r| r.id.clone()).collect())
    }

    /// Starts the next group (recorded by the caller) on probation until `until`; returns its
    /// runs.
    pub fn start_group(&mut self, until: Instant) -> Vec<Run> {
        let n = self.next_size.max(1).min(self.suspects.len());
        let runs: Vec<Run> = self.suspects.drain(..n).collect();
        self.next_size = n * 2;
        self.group = Some(Group {
            ids: runs.iter().map(|r| r.id.clone()).collect(),
            until,
        });
        runs
    }

    /// Isolation is over (every suspect passed, the record is cleared): the runs held back, to
    /// start now.
    pub fn release_held(&mut self) -> Vec<Run> {
        if self.group.is_some() || !self.suspects.is_empty() {
            return Vec::new();
        }
        self.isolating = false;
        self.next_size = 0;
        std::mem::take(&mut self.held)
    }

    /// Everything not yet started (shutdown releases them to the queue).
    pub fn take_waiting(&mut self) -> Vec<Run> {
        self.group = None;
        self.isolating = false;
        let mut all: Vec<Run> = self.suspects.drain(..).collect();
        all.append(&mut self.held);
        all
    }
}
