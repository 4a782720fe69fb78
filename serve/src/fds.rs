//! File descriptors: each program raises its soft open-files limit to the hard limit at start
//! (as Go's runtime does) and sizes its listeners' connection caps so that, at the caps, the
//! descriptors it needs for everything else (the admin listener, upstream and database
//! connections, Redis, files) are still there. Running out is what took the admin port down in
//! issue #12.

/// Never fewer connections than this, however low the limit.
const MIN_CONNECTIONS: usize = 16;

/// Raises the soft limit on open files to the hard limit and returns the limit now in force
/// (`None` where it cannot be read).
pub fn raise_nofile_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-files limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

/// Shrinks `limits.max_connections` until the listener's descriptors at its caps plus `reserve`
/// fit under `nofile`, and says so in the log when it had to.
pub fn fit_connections(listener: &str, limits: &mut crate::Limits, reserve: usize, nofile: u64) {
    let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
    let wanted = limits.max_connections;
    while limits.max_connections > MIN_CONNECTIONS
        && limits.descriptors().saturating_add(reserve) > nofile
    {
        limits.max_connections -= 1.max(limits.max_connections / 64);
    }
    limits.max_connections = limits.max_connections.max(MIN_CONNECTIONS);
    if limits.max_connections < wanted {
        tracing::warn!(
            listener,
            wanted,
            max_connections = limits.max_connections,
            nofile,
            reserve,
            "the open-files limit is too low for the configured max_connections; using fewer (raise the limit: ulimit -n, LimitNOFILE, the container runtime's default)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;

    #[test]
    fn connections_fit_the_descriptors() {
        let check = |wanted: usize, reserve: usize, nofile: u64| {
            let mut limits = Limits {
                max_connections: wanted,
                ..Limits::default()
            };
            fit_connections("test", &mut limits, reserve, nofile);
            limits.max_connections
        };
        assert_eq!(check(4096, 1000, 1_048_576), 4096);
        let fitted = check(4096, 1000, 4096);
        let limits = Limits {
            max_connections: fitted,
            ..Limits::default()
        };
        assert!(limits.descriptors() + 1000 <= 4096, "{fitted}");
        assert!(fitted > 2800, "{fitted}");
        assert_eq!(check(4096, 5000, 1024), MIN_CONNECTIONS);
    }
}
