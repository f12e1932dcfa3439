//! In-process tests against a real PostgreSQL: each test clones its own database.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod batch_isolation;
mod claim;
mod deploy;
mod edge;
mod fencing;
mod hostile_rows;
mod lease;
mod list;
mod openapi;
mod per_key;
mod plans;
mod replay;
mod retention;
mod schema;
mod tls;
