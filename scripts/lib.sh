# shellcheck shell=bash
# Helpers shared by scripts/stack, scripts/test and tests/e2e/*.sh. Source it; do not run it.
#
# Ground rules every function here keeps:
#   * A service that was already running at DATABASE_URL / REDIS_URL is used as it is: never
#     stopped, and no database on it is dropped and no Redis data flushed.
#   * Anything these scripts start is recorded under $STACK_DIR (marker or pid file) so that it,
#     and only it, can be stopped again later.

if [[ -n "${TOLLGATE_LIB_LOADED:-}" ]]; then
    return 0
fi
TOLLGATE_LIB_LOADED=1

# --- messages -------------------------------------------------------------------------------

# All chatter goes to stderr so that functions can print results on stdout.
info() { printf '%s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# --- locations ------------------------------------------------------------------------------

# The repository is the parent of this file's folder; no git needed (CI may run from a tarball).
repo_root() {
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
}

REPO="$(repo_root)"
STACK_DIR="${TOLLGATE_STACK_DIR:-$REPO/.stack}"
# An absolute path, because processes are started from $REPO and the postgres user reads it too.
case "$STACK_DIR" in
/*) ;;
*) STACK_DIR="$PWD/$STACK_DIR" ;;
esac

DEFAULT_DATABASE_URL="postgres://postgres@127.0.0.1:5432/tollgate"
DEFAULT_REDIS_URL="redis://127.0.0.1:6379"

# Set to 1 when this shell started a private server (as opposed to reusing one); read by callers.
# shellcheck disable=SC2034
LIB_STARTED_POSTGRES=0
# shellcheck disable=SC2034
LIB_STARTED_REDIS=0

# --- privileges and packages ----------------------------------------------------------------

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root to run: $*"
    fi
}

LIB_APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "cannot install $* automatically (no apt-get); please install it"
    info "installing: $* (apt-get)"
    if [[ $LIB_APT_UPDATED -eq 0 ]]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
        LIB_APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 ||
        die "apt-get install $* failed"
}

# ensure_tools: the client programs the scripts (and the e2e tests) call.
ensure_tools() {
    local missing=() cmd pkg
    local -A pkg_of=(
        [psql]=postgresql-client [pg_isready]=postgresql-client
        [redis-cli]=redis-tools [curl]=curl [python3]=python3
    )
    for cmd in psql pg_isready redis-cli curl python3; do
        if ! command -v "$cmd" >/dev/null 2>&1; then
            pkg=${pkg_of[$cmd]}
            [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
        fi
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        apt_install "${missing[@]}"
    fi
    for cmd in setsid flock; do
        command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found (package util-linux)"
    done
}

# --- ports and readiness --------------------------------------------------------------------

# free_port: prints a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
    local port
    if command -v python3 >/dev/null 2>&1 &&
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' 2>/dev/null) &&
        [[ -n "$port" ]]; then
        printf '%s\n' "$port"
        return 0
    fi
    # Fallback without python: random high ports until one is not in use.
    local _
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        if ! port_in_use "$port"; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    die "could not find a free TCP port"
}

# port_in_use PORT: true when something accepts connections on 127.0.0.1:PORT or listens on it
# on any address (a 0.0.0.0 listener would make our 127.0.0.1 bind fail too).
port_in_use() {
    local port=$1
    if command -v ss >/dev/null 2>&1 && [[ -n "$(ss -Htln "sport = :$port" 2>/dev/null)" ]]; then
        return 0
    fi
    tcp_open "$port"
}

# tcp_open PORT: true when a TCP connection to 127.0.0.1:PORT succeeds (bash's /dev/tcp, so no
# netcat needed; the timeout guards against a filtered port).
tcp_open() {
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# port_owner PORT: a human-readable hint about who listens there (best effort).
port_owner() {
    if command -v ss >/dev/null 2>&1; then
        ss -Htlnp "sport = :$1" 2>/dev/null | awk '{print $4, $6}' | head -n 3
    fi
}

# wait_port PORT [TIMEOUT_SECONDS]: until something accepts connections on 127.0.0.1:PORT.
wait_port() {
    local port=$1 timeout=${2:-60} deadline
    deadline=$((SECONDS + timeout))
    until tcp_open "$port"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.3
    done
}

# http_code URL: the status code of a GET (000 when nothing answered).
http_code() {
    local code
    # --noproxy: a developer's http_proxy must not capture requests to this machine.
    code=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' --max-time 3 "$1" 2>/dev/null) || true
    printf '%s\n' "${code:-000}"
}

# wait_http URL [TIMEOUT_SECONDS]: until a GET answers 2xx.
wait_http() {
    local url=$1 timeout=${2:-60} deadline
    deadline=$((SECONDS + timeout))
    until [[ "$(http_code "$url")" == 2?? ]]; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# --- URLs -----------------------------------------------------------------------------------

LIB_URL_RE='^([A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)(/[^?#]*)?([?#].*)?$'

# url_db URL: the path part of a URL without its slash (database name / Redis db number).
url_db() {
    [[ $1 =~ $LIB_URL_RE ]] || die "cannot parse URL: $1"
    local path=${BASH_REMATCH[2]}
    printf '%s\n' "${path#/}"
}

# url_with_db URL NAME: the same URL with its path replaced by /NAME (query string kept).
url_with_db() {
    [[ $1 =~ $LIB_URL_RE ]] || die "cannot parse URL: $1"
    printf '%s/%s%s\n' "${BASH_REMATCH[1]}" "$2" "${BASH_REMATCH[3]}"
}

# url_port URL DEFAULT: the port of a URL's authority, or DEFAULT.
url_port() {
    [[ $1 =~ $LIB_URL_RE ]] || die "cannot parse URL: $1"
    local authority=${BASH_REMATCH[1]#*://}
    authority=${authority##*@}
    if [[ $authority =~ :([0-9]+)$ ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
    else
        printf '%s\n' "$2"
    fi
}

# Identifiers we create or drop are spelled by us; refuse anything odd rather than quote it.
valid_db_name() {
    [[ $1 =~ ^[A-Za-z_][A-Za-z0-9_]{0,62}$ ]]
}

# marker_get FILE KEY: reads KEY=VALUE files we wrote (without sourcing them).
marker_get() {
    sed -n "s/^$2=//p" "$1" 2>/dev/null | head -n 1
}

# proc_starttime PID: kernel start time of a process, to tell a live pid from a reused one.
proc_starttime() {
    [[ -r /proc/$1/stat ]] || return 1
    # Field 22 of /proc/PID/stat, counted after the "(comm)" field, which may contain spaces.
    sed 's/^.*) //' "/proc/$1/stat" | awk '{print $20}'
}

# --- PostgreSQL -----------------------------------------------------------------------------

pg_reachable() {
    timeout 10 pg_isready -q -t 3 -d "$1" >/dev/null 2>&1
}

# The newest server binaries Debian's postgresql packages installed.
pg_bindir() {
    local dir
    dir=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    if [[ -x "$dir/initdb" ]]; then
        printf '%s\n' "$dir"
    fi
}

# ensure_tls_test_servers: redis-server and PostgreSQL's server programs, which the TLS test
# (control-plane/tests/tls.rs) starts privately, TLS only, with a throwaway CA. Installs what is
# missing, and tells the test where they are and that it must not skip
# (TOLLGATE_TEST_PG_BINDIR, TOLLGATE_TEST_REQUIRE_TLS=1).
ensure_tls_test_servers() {
    local dir
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    dir=$(pg_bindir)
    if [[ -z "$dir" ]] && command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dir=$(dirname "$(command -v initdb)")
    fi
    if [[ -z "$dir" ]]; then
        apt_install postgresql
        dir=$(pg_bindir)
    fi
    [[ -n "$dir" ]] || die "PostgreSQL's initdb not found after installing postgresql"
    export TOLLGATE_TEST_PG_BINDIR=$dir TOLLGATE_TEST_REQUIRE_TLS=1
}

# PostgreSQL refuses to run as root; as root we run its programs as the postgres user.
pg_run() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# pg_base: where a private server's files live. $STACK_DIR/pg if the postgres user can reach it
# (and the socket path fits the 107-byte limit), else a per-STACK_DIR folder under /tmp.
pg_base() {
    local base="$STACK_DIR/pg" hash
    mkdir -p "$STACK_DIR"
    if pg_run test -x "$STACK_DIR" 2>/dev/null && [[ ${#base} -le 80 ]]; then
        printf '%s\n' "$base"
        return 0
    fi
    hash=$(printf '%s' "$STACK_DIR" | sha256sum | cut -c1-12)
    printf '%s\n' "/tmp/tollgate-pg-$hash"
}

# ensure_postgres: exports DATABASE_URL pointing at a server that accepts connections.
ensure_postgres() {
    local url=${DATABASE_URL:-$DEFAULT_DATABASE_URL} db marker="$STACK_DIR/postgres.started"
    db=$(url_db "$url")
    [[ -n "$db" ]] || db=tollgate

    if pg_reachable "$url"; then
        export DATABASE_URL="$url"
        return 0
    fi

    # A private server that an earlier run started for this STACK_DIR and that still runs.
    local port
    if [[ -f "$marker" ]]; then
        port=$(marker_get "$marker" port)
        if [[ -n "$port" ]] && pg_reachable "postgres://postgres@127.0.0.1:$port/postgres"; then
            info "PostgreSQL: reusing the private server on port $port (not reachable: $url)"
            export DATABASE_URL="postgres://postgres@127.0.0.1:$port/$db"
            return 0
        fi
        rm -f "$marker"
    fi

    info "PostgreSQL: nothing answers at $url; starting a private server"
    local bindir
    bindir=$(pg_bindir)
    if [[ -z "$bindir" ]]; then
        apt_install postgresql
        bindir=$(pg_bindir)
        [[ -n "$bindir" ]] || die "initdb not found under /usr/lib/postgresql/*/bin after installing postgresql"
    fi
    if [[ $EUID -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        die "user 'postgres' does not exist; cannot run a private PostgreSQL as root"
    fi

    local base data log version
    base=$(pg_base)
    data="$base/data"
    log="$base/postgres.log"
    mkdir -p "$base"
    if [[ $EUID -eq 0 ]]; then
        chown postgres: "$base"
    fi
    chmod 700 "$base"
    pg_run test -w "$base" || die "the postgres user cannot write to $base"

    # Keep a data folder from an earlier run (its databases survive `stack down`), unless it was
    # made by another PostgreSQL major version.
    version=$(basename "$(dirname "$bindir")")
    if [[ -f "$data/PG_VERSION" && "$(cat "$data/PG_VERSION")" != "$version" ]]; then
        info "PostgreSQL: discarding $data (made by version $(cat "$data/PG_VERSION"), server is $version)"
        rm -rf "$data"
    fi
    if [[ ! -f "$data/PG_VERSION" ]]; then
        rm -rf "$data"
        # trust: only this machine can connect (listen 127.0.0.1 and a socket in the data dir).
        pg_run "$bindir/initdb" -D "$data" -A trust -U postgres -E UTF8 --no-locale -N >"$base/initdb.log" 2>&1 ||
            {
                tail -n 30 "$base/initdb.log" >&2
                die "initdb failed (log: $base/initdb.log)"
            }
        # A disposable development/test server: durability is traded for speed (tests create
        # and drop many databases), and tests may open many pools at once.
        pg_run tee -a "$data/postgresql.conf" >/dev/null <<EOF

# added by scripts/lib.sh (Tollgate private dev/test server)
listen_addresses = '127.0.0.1'
unix_socket_directories = '$data'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    fi

    # A server left running from this data folder (e.g. after a crash of the script) is ours.
    if pg_run "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        pg_run "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    fi

    port=$(free_port)
    if ! pg_run "$bindir/pg_ctl" -D "$data" -l "$log" -w -t 60 -o "-p $port" start >/dev/null 2>&1; then
        tail -n 30 "$log" >&2 || true
        die "could not start the private PostgreSQL (log: $log)"
    fi
    local pid
    pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || true)
    mkdir -p "$STACK_DIR"
    cat >"$marker" <<EOF
port=$port
pid=$pid
bindir=$bindir
base=$base
data=$data
log=$log
EOF
    # shellcheck disable=SC2034
    LIB_STARTED_POSTGRES=1
    export DATABASE_URL="postgres://postgres@127.0.0.1:$port/$db"
    info "PostgreSQL: private server on 127.0.0.1:$port (pid $pid, data $data)"
}

# stop_private_postgres [--purge]: stops the server ensure_postgres started for this STACK_DIR,
# if any. --purge also deletes its data folder.
stop_private_postgres() {
    local marker="$STACK_DIR/postgres.started" data bindir pid base
    [[ -f "$marker" ]] || return 0
    data=$(marker_get "$marker" data)
    bindir=$(marker_get "$marker" bindir)
    base=$(marker_get "$marker" base)
    pid=$(marker_get "$marker" pid)
    if [[ -n "$data" && -n "$bindir" && -f "$data/postmaster.pid" ]]; then
        if ! pg_run "$bindir/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1; then
            # Only the pid the data folder names, and only if it is still that postgres.
            if [[ -n "$pid" && "$(head -n 1 "$data/postmaster.pid" 2>/dev/null)" == "$pid" ]]; then
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
    fi
    info "PostgreSQL: stopped the private server (pid ${pid:-?})"
    # Only ever delete a folder of the two shapes pg_base hands out.
    if [[ "${1:-}" == --purge ]] && [[ "$base" == "$STACK_DIR/pg" || "$base" == /tmp/tollgate-pg-* ]]; then
        rm -rf "$base"
    fi
    rm -f "$marker"
}

# purge_private_postgres_data: deletes a private server's folder left from an earlier run (its
# data survives `stack down` for reuse), unless a server still runs from it.
purge_private_postgres_data() {
    local base pid
    base=$(pg_base)
    [[ -d "$base" ]] || return 0
    pid=$(head -n 1 "$base/data/postmaster.pid" 2>/dev/null || true)
    if [[ -n "$pid" ]] && pid_alive "$pid"; then
        warn "a PostgreSQL (pid $pid) still runs from $base; not deleting it"
        return 0
    fi
    rm -rf "$base"
}

# ensure_database: creates the database DATABASE_URL names, if it does not exist yet.
ensure_database() {
    local url=${DATABASE_URL:?ensure_postgres first} db maint
    db=$(url_db "$url")
    [[ -n "$db" ]] || return 0
    valid_db_name "$db" || die "unexpected database name '$db' in DATABASE_URL"
    maint=$(url_with_db "$url" postgres)
    # \gexec runs the CREATE only when the SELECT returns a row, i.e. when the database is missing.
    psql "$maint" -X -q -v ON_ERROR_STOP=1 -v db="$db" >/dev/null <<'SQL' || die "could not create database $db"
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL
}

# --- Redis ----------------------------------------------------------------------------------

# delete_prefixed_keys URL PREFIX: deletes the keys under "PREFIX:" and only those. Refuses any
# prefix that is not a test's own (e2e + 8 hex digits), so a stack's keys can never go.
delete_prefixed_keys() {
    local url=$1 prefix=$2
    [[ $prefix =~ ^e2e[0-9a-f]{8}$ ]] || return 0
    redis-cli -u "$url" --scan --pattern "$prefix:*" 2>/dev/null |
        xargs -r -d '\n' -n 100 redis-cli -u "$url" DEL >/dev/null 2>&1 || true
}

# start_redis_cluster DIR: a throwaway three-master Redis Cluster on free ports under DIR, for
# the cluster variants of the quota tests. Sets REDIS_CLUSTER_URL (redis-cluster://...).
start_redis_cluster_once() {
    local dir=$1 ports=() p i
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    mkdir -p "$dir"
    for i in 1 2 3; do
        # A cluster node also listens on port + 10000, so both must be free and below 65536.
        for _ in $(seq 1 200); do
            p=$((20000 + RANDOM % 25000))
            [[ " ${ports[*]} " == *" $p "* ]] && continue
            port_in_use "$p" || port_in_use $((p + 10000)) || break
        done
        mkdir -p "$dir/$p"
        redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file "$dir/$p/nodes.conf" --cluster-node-timeout 2000 \
            --save "" --appendonly no --dir "$dir/$p" --daemonize yes \
            --pidfile "$dir/$p/redis.pid" --logfile "$dir/$p/redis.log" >/dev/null
        ports+=("$p")
    done
    for p in "${ports[@]}"; do
        for i in $(seq 1 50); do
            redis-cli -p "$p" ping >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
    redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 ||
        return 1
    for i in $(seq 1 100); do
        if redis-cli -p "${ports[0]}" cluster info 2>/dev/null | grep -q 'cluster_state:ok'; then
            REDIS_CLUSTER_URL="redis-cluster://127.0.0.1:${ports[0]}"
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# start_redis_cluster DIR: start_redis_cluster_once, tried up to three times on fresh ports (a
# port picked as free can be taken by another process before the node binds it).
start_redis_cluster() {
    local dir=$1 attempt
    for attempt in 1 2 3; do
        start_redis_cluster_once "$dir" && return 0
        info "the test Redis Cluster did not come up (attempt $attempt): $(tail -n 3 "$dir/create.log" 2>/dev/null | tr '\n' ' ')"
        stop_redis_cluster "$dir"
    done
    die "could not create the test Redis Cluster (three attempts)"
}


# stop_redis_cluster DIR: stops the cluster start_redis_cluster made there and removes it.
stop_redis_cluster() {
    local dir=$1 pidfile
    [[ -d $dir ]] || return 0
    for pidfile in "$dir"/*/redis.pid; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    sleep 0.2
    rm -rf "$dir"
}

redis_reachable() {
    [[ "$(timeout 5 redis-cli -u "$1" ping 2>/dev/null)" == PONG ]]
}

# ensure_redis: exports REDIS_URL pointing at a server that answers PING.
ensure_redis() {
    local url=${REDIS_URL:-$DEFAULT_REDIS_URL} marker="$STACK_DIR/redis.started" db port
    db=$(url_db "$url")

    if redis_reachable "$url"; then
        export REDIS_URL="$url"
        return 0
    fi

    if [[ -f "$marker" ]]; then
        port=$(marker_get "$marker" port)
        if [[ -n "$port" ]] && redis_reachable "redis://127.0.0.1:$port"; then
            info "Redis: reusing the private server on port $port (not reachable: $url)"
            export REDIS_URL="redis://127.0.0.1:$port${db:+/$db}"
            return 0
        fi
        rm -f "$marker"
    fi

    info "Redis: nothing answers at $url; starting a private server"
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server

    local dir="$STACK_DIR/redis" pid
    mkdir -p "$dir"
    rm -f "$dir/redis.pid"
    port=$(free_port)
    # No persistence: a private dev/test Redis holds only what the control plane rebuilds.
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no \
        --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" ||
        die "could not start redis-server (log: $dir/redis.log)"
    local deadline=$((SECONDS + 15))
    until redis_reachable "redis://127.0.0.1:$port"; do
        if ((SECONDS >= deadline)); then
            tail -n 30 "$dir/redis.log" >&2 || true
            die "the private Redis did not answer PING within 15 s (log: $dir/redis.log)"
        fi
        sleep 0.2
    done
    pid=$(cat "$dir/redis.pid" 2>/dev/null || true)
    cat >"$marker" <<EOF
port=$port
pid=$pid
starttime=$(proc_starttime "$pid" 2>/dev/null || true)
dir=$dir
log=$dir/redis.log
EOF
    # shellcheck disable=SC2034
    LIB_STARTED_REDIS=1
    export REDIS_URL="redis://127.0.0.1:$port${db:+/$db}"
    info "Redis: private server on 127.0.0.1:$port (pid $pid)"
}

# stop_private_redis [--purge]: stops the server ensure_redis started for this STACK_DIR, if any.
stop_private_redis() {
    local marker="$STACK_DIR/redis.started" pid start dir
    [[ -f "$marker" ]] || return 0
    pid=$(marker_get "$marker" pid)
    start=$(marker_get "$marker" starttime)
    dir=$(marker_get "$marker" dir)
    # Signal only the process we started: same pid and same start time.
    if [[ -n "$pid" && -n "$start" && "$(proc_starttime "$pid" 2>/dev/null)" == "$start" ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        info "Redis: stopped the private server (pid $pid)"
    fi
    if [[ "${1:-}" == --purge && "$dir" == "$STACK_DIR/redis" ]]; then
        rm -rf "$dir"
    fi
    rm -f "$marker"
}

# --- cargo ----------------------------------------------------------------------------------

# If the project keeps sqlx's offline query data, build from it rather than from whatever
# database DATABASE_URL happens to point at.
cargo_env() {
    if [[ -d "$REPO/.sqlx" && -z "${SQLX_OFFLINE+set}" ]]; then
        export SQLX_OFFLINE=true
    fi
    # A one-shot build (CI) gains nothing from incremental caches, which roughly double the size
    # of target/; a CI run once failed with "No space left on device" inside them.
    if [[ -n "${CI:-}" && -z "${CARGO_INCREMENTAL+set}" ]]; then
        export CARGO_INCREMENTAL=0
    fi
    local target_dir=${CARGO_TARGET_DIR:-$REPO/target} free_kb
    mkdir -p "$target_dir" 2>/dev/null || true
    free_kb=$(df -Pk "$target_dir" 2>/dev/null | awk 'NR == 2 { print $4 }')
    if [[ -n "$free_kb" && "$free_kb" -lt 6000000 ]]; then
        warn "only $((free_kb / 1024)) MiB free under $target_dir; a full build and test run needs about 6 GiB"
    fi
}

# cargo_bin_dir PROFILE: where cargo puts that profile's binaries (honours CARGO_TARGET_DIR
# and CARGO_BUILD_TARGET).
cargo_bin_dir() {
    local profile=$1 target_dir sub
    target_dir=${CARGO_TARGET_DIR:-$REPO/target}
    case "$target_dir" in
    /*) ;;
    *) target_dir="$REPO/$target_dir" ;;
    esac
    case "$profile" in
    dev | test) sub=debug ;;
    release | bench) sub=release ;;
    *) sub=$profile ;;
    esac
    if [[ -n "${CARGO_BUILD_TARGET:-}" ]]; then
        target_dir="$target_dir/$CARGO_BUILD_TARGET"
    fi
    printf '%s\n' "$target_dir/$sub"
}

# --- promtool -------------------------------------------------------------------------------

# ensure_promtool: sets PROMTOOL to a runnable promtool: the one on PATH, else the promtool binary
# unpacked from Debian's `prometheus` package into target/tools (once; later runs reuse it).
# Nothing is installed and no Prometheus server runs.
ensure_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        PROMTOOL=$(command -v promtool)
        return 0
    fi
    local tools="$REPO/target/tools"
    mkdir -p "$tools"
    (
        flock -w 600 9 || die "another run holds $tools/promtool.lock"
        unpack_promtool "$tools/prometheus"
    ) 9>"$tools/promtool.lock"
    PROMTOOL="$tools/prometheus/usr/bin/promtool"
    "$PROMTOOL" --version >/dev/null 2>&1 || die "$PROMTOOL does not run"
}

# unpack_promtool DIR: DIR/usr/bin/promtool from the `prometheus` .deb (`apt-get download`
# needs no root; the package lists may need fetching first). Run it in a subshell (it sets an
# EXIT trap) under promtool.lock.
unpack_promtool() {
    local target=$1 work deb
    [[ -x "$target/usr/bin/promtool" ]] && "$target/usr/bin/promtool" --version >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || die "promtool not found, and no apt-get to fetch it: install promtool"
    work=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-promtool.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT
    if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
        (cd "$work" && apt-get download prometheus >&2) || die "apt-get download prometheus failed"
    fi
    deb=$(printf '%s\n' "$work"/prometheus_*.deb | head -n 1)
    rm -rf "$target.tmp"
    mkdir -p "$target.tmp"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$target.tmp" ./usr/bin/promtool ||
        die "could not unpack promtool from $deb"
    rm -rf "$target"
    mv "$target.tmp" "$target"
}

# --- processes ------------------------------------------------------------------------------

# pid_alive PID: the process exists and is not a zombie (a zombie answers kill -0 but is gone).
pid_alive() {
    local state
    [[ -r /proc/$1/stat ]] || return 1
    state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $1}') || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# group_alive PGID: some non-zombie process is still in that process group.
group_alive() {
    if command -v ps >/dev/null 2>&1; then
        ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^[ZX]/ { found = 1 } END { exit !found }'
    else
        kill -0 -- "-$1" 2>/dev/null
    fi
}
