//! The few things both Tollgate programs must agree on. Nothing in this crate does I/O: it is
//! data layouts, pure functions and formats, so that the sidecar and the control plane cannot
//! drift apart on them.

pub mod api_key;
pub mod claims;
pub mod config;
pub mod error;
pub mod ids;
pub mod keys;
pub mod protocol;
pub mod quota;
pub mod request_id;
pub mod telemetry;
pub mod tls;
pub mod window;
