#!/usr/bin/env bash
# bench/decide-cost.sh — what each part of lua/decide.lua costs Redis.
#
# Runs decide.lua and variants of it with one part taken out (the settle marker's SET, the usage
# bucket's HINCRBYs, the user hash's HSET, every write, everything after the HMGET) under
# redis-benchmark on a private redis-server, one metered decision with one rate limit per call,
# as the sidecar makes it for POST /l3/{patient}; each marker key is new (__rand_int__), as each
# request's is. Prints, per variant, Redis's own time per EVALSHA (INFO commandstats
# usec_per_call) and the calls/s redis-benchmark reached. The differences between rows are what
# the removed part costs. Nothing of the project's Redis is touched.
#
#   bench/decide-cost.sh                 every variant
#   DECIDE_COST_PORT=6399 DECIDE_COST_CALLS=400000 bench/decide-cost.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${DECIDE_COST_PORT:-6399}
CALLS=${DECIDE_COST_CALLS:-400000}
for tool in redis-server redis-cli redis-benchmark python3; do
    command -v "$tool" >/dev/null || { echo "decide-cost: $tool is needed" >&2; exit 2; }
done
TMP=$(mktemp -d /tmp/tollgate-decide-cost.XXXXXX)
cli() { redis-cli -p "$PORT" "$@"; }
cleanup() {
    cli SHUTDOWN NOSAVE >/dev/null 2>&1 || true
    rm -rf "$TMP"
}
trap cleanup EXIT

# The variants, cut out of the real script; a cut that no longer matches fails loudly.
python3 - "$REPO/lua/decide.lua" "$TMP" <<'EOF'
import sys
src, out = open(sys.argv[1]).read(), sys.argv[2]
marker = '''  local marked = redis.call("SET", KEYS[3], int(take) .. "|" .. int(start) .. "|" .. mode,
    "NX", "PX", ARGV[14])'''
amount = '''    if take > 0 then redis.call("HINCRBY", KEYS[2], "a:" .. suffix, take) end\n'''
calls = '''    redis.call("HINCRBY", KEYS[2], "n:" .. suffix, 1)\n'''
hset = '''if #writes > 0 then redis.call("HSET", KEYS[1], unpack(writes)) end'''
first = '''if not got[1] then return { "missing" } end'''
def cut(text, part, by=""):
    assert part in text, f"decide.lua changed: cannot find {part!r}"
    return text.replace(part, by)
variants = {
    "full": src,
    "no-marker": cut(src, marker, "  local marked = true"),
    "no-amount-hincrby": cut(src, amount),
    "no-bucket": cut(cut(src, amount), calls),
    "no-hset": cut(src, hset),
    "no-writes": cut(cut(cut(cut(src, amount), calls), hset), marker, "  local marked = true"),
    "hmget-only": cut(src, first, 'if got[1] then return { "read" } end'),
}
for name, text in variants.items():
    open(f"{out}/{name}.lua", "w").write(text)
open(f"{out}/order", "w").write("\n".join(variants) + "\n")
EOF

redis-server --port "$PORT" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no \
    --dir "$TMP" --logfile "$TMP/redis.log" >/dev/null
for _ in $(seq 50); do cli PING >/dev/null 2>&1 && break; sleep 0.1; done

USER_ID=0b6c5a0e-1111-2222-3333-444455556666
USER_KEY="tg:{s:1}:u:$USER_ID"
BUCKET="tg:{s:1}:b:1764547200000"
MARKER="tg:{s:1}:m:__rand_int__"
# decide.lua's arguments for one metered call with one rate limit (lua/decide.lua's header).
ARGS=(1764547300000 0 "$USER_ID" 1 1 "q:idoctor:api_calls_l3_detect"
    "c:idoctor:api_calls_l3_detect" "idoctor|api_calls_l3_detect|POST /l3/{patient}" 1 fixed month
    1764547200000 1767225600000 10000 "r:idoctor:per-second" 1000000 1000 1000000)

echo "redis $(redis-server --version | awk '{print $3}' | sed s/v=//), $CALLS calls per variant, 16 connections, pipeline 8"
printf '%-20s %12s %10s %s\n' variant "µs/EVALSHA" "calls/s" "answer"
while read -r name; do
    cli FLUSHALL >/dev/null
    cli HSET "$USER_KEY" status active tva 0 plan pro "q:idoctor:api_calls_l3_detect" \
        "100000000000|month" >/dev/null
    sha=$(cli SCRIPT LOAD "$(cat "$TMP/$name.lua")")
    answer=$(cli EVALSHA "$sha" 3 "$USER_KEY" "$BUCKET" "tg:{s:1}:m:probe" "${ARGS[@]}" | head -n 1)
    cli CONFIG RESETSTAT >/dev/null
    rate=$(redis-benchmark -p "$PORT" -n "$CALLS" -c 16 -P 8 -r 100000000 -q \
        EVALSHA "$sha" 3 "$USER_KEY" "$BUCKET" "$MARKER" "${ARGS[@]}" 2>&1 |
        tr '\r' '\n' | tail -n 1 | sed 's/.*: \([0-9.]*\) requests per second.*/\1/')
    usec=$(cli INFO commandstats | sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p' | tr -d '\r')
    printf '%-20s %12s %10s %s\n' "$name" "$usec" "${rate%.*}" "$answer"
done <"$TMP/order"
