//! Fault scenarios: a private nats-server and three real executors (`spool-1`..`spool-3`) per
//! test on its own database, killed, stopped and restarted with real signals; plus the seeded
//! chaos run (`just chaos` runs the long version). The oracle is the steps' own ledger and a log
//! of terminal transitions (see `oracle.rs`).

#[path = "../common/mod.rs"]
mod common;

mod chaos;
mod cluster;
mod node_death;
mod oracle;
mod relay;
mod scenarios;
