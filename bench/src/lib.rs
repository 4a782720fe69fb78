//! Benchmarks of the sidecar; nothing here is linked into a program.
//!
//! - `benches/sidecar.rs` — criterion micro-benches of the request path's parts: JWT verification
//!   (first sight and cached repeat), API-key lookup through the cache, route matching, and one
//!   Lua decision against the Redis at `REDIS_URL`. Run with `cargo bench -p tollgate-bench`.
//! - `src/bin/peers.rs` — `tollgate-peers`: Tollgate's `Store::decide` and Limitador (the
//!   `limitador` crate, Redis storage) side by side on one Redis, two instances each:
//!   decisions/s, latency, Redis commands per decision, admission accuracy.
//! - `load.sh` — the whole system under `wrk`: the demo app directly, behind nginx, and behind the
//!   sidecar with JWTs and with API keys; a connections sweep with plots, a refusal run, the peers
//!   and a scale run of 1,000,000 requests. It writes `RESULTS.md`.
