//! Benchmarks of the sidecar; nothing here is linked into a program.
//!
//! - `benches/sidecar.rs` — criterion micro-benches of the request path's parts: JWT verification
//!   (first sight and cached repeat), API-key lookup through the cache, route matching, and one
//!   Lua decision against the Redis at `REDIS_URL`. Run with `cargo bench -p tollgate-bench`.
//! - `load.sh` — the whole system under `wrk`: the demo app directly, behind nginx, and behind the
//!   sidecar with JWTs and with API keys. It writes `RESULTS.md`.
