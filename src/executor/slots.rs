//! How many runs an executor keeps in flight. Fixed when `SPOOL_CONCURRENCY` is set; otherwise
//! adaptive between a floor and a cap, from what the executor observes:
//!
//! - **short runs, work waiting** (a claim came back full and runs take at most
//!   [`SHORT_RUN`] on average): the limit doubles, up to the cap, so claims come in big batches
//!   and the executor keeps the database busy instead of waiting on round trips;
//! - **long runs** (their average is above [`SHORT_RUN`]): the limit halves, down to the floor,
//!   so one executor does not take a backlog of long runs that other executors could start now.
//!
//! Every claimed run starts at once (a claim never asks for more than the free slots), so an
//! executor never holds runs it cannot start.

use std::time::Duration;

/// Runs at most this long on average count as short.
pub const SHORT_RUN: Duration = Duration::from_millis(50);
/// The adaptive limit's bounds.
pub const ADAPTIVE_FLOOR: usize = 16;
pub const ADAPTIVE_CAP: usize = 2048;

#[derive(Debug, Clone)]
pub struct Slots {
    floor: usize,
    cap: usize,
    limit: usize,
    /// Exponentially weighted average of how long runs took here (claim to end), in seconds.
    avg_run: Option<f64>,
}

impl Slots {
    pub fn fixed(n: usize) -> Self {
        Self {
            floor: n,
            cap: n,
            limit: n,
            avg_run: None,
        }
    }

    pub fn adaptive(floor: usize, cap: usize) -> Self {
        Self {
            floor,
            cap: cap.max(floor),
            limit: floor,
            avg_run: None,
        }
    }

    /// Runs this executor may have in flight now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn run_finished(&mut self, took: Duration) {
        let t = took.as_secs_f64();
        self.avg_run = Some(match self.avg_run {
            None => t,
            Some(avg) => avg + (t - avg) * 0.05,
        });
    }

    /// After a claim that asked for `asked` runs and got `got`.
    pub fn claimed(&mut self, asked: usize, got: usize) {
        if self.cap == self.floor {
            return;
        }
        // grow only on evidence: until runs have finished here, they may be long ones
        match self.avg_run {
            Some(avg) if avg > SHORT_RUN.as_secs_f64() => {
                self.limit = (self.limit / 2).max(self.floor);
            }
            Some(_) if got == asked && got > 0 => {
                self.limit = (self.limit * 2).min(self.cap);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_runs_with_work_waiting_grow_the_limit_to_the_cap() {
        let mut s = Slots::adaptive(16, 512);
        for _ in 0..10 {
            s.run_finished(Duration::from_millis(2));
            let asked = s.limit();
            s.claimed(asked, asked);
        }
        assert_eq!(s.limit(), 512);
        // a claim that comes back short leaves it where it is
        s.claimed(512, 3);
        assert_eq!(s.limit(), 512);
    }

    #[test]
    fn nothing_grows_before_a_run_has_finished() {
        let mut s = Slots::adaptive(16, 512);
        s.claimed(16, 16);
        assert_eq!(s.limit(), 16);
    }

    #[test]
    fn long_runs_shrink_it_to_the_floor() {
        let mut s = Slots::adaptive(16, 512);
        s.run_finished(Duration::from_millis(1));
        s.claimed(16, 16);
        s.claimed(32, 32);
        assert_eq!(s.limit(), 64);
        for _ in 0..100 {
            s.run_finished(Duration::from_secs(2));
        }
        for _ in 0..5 {
            s.claimed(8, 8);
        }
        assert_eq!(s.limit(), 16);
    }

    #[test]
    fn a_fixed_limit_never_moves() {
        let mut s = Slots::fixed(7);
        s.run_finished(Duration::from_millis(1));
        s.claimed(7, 7);
        assert_eq!(s.limit(), 7);
    }
}
