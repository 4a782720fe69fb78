//! Tollgate's sidecar as a library: `main.rs` parses the command line and calls in here.

pub mod config;
