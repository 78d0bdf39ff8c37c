#!/usr/bin/env bash
# Shows redis-streamd working on a fresh machine: builds it, starts a throwaway
# redis-server on a free loopback port (installing the Debian package if missing) unless
# REDIS_URL is given, runs the daemon on config/example.toml, pushes two entries, and
# shows one acked and one in the dead-letter stream. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."

need_redis_cli() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "== installing redis-server (Debian package)"
    if [ "$(id -u)" -ne 0 ]; then echo "need root to apt-get install redis-server" >&2; exit 1; fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
}
need_redis_cli

workdir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$workdir"
}
trap cleanup EXIT

if [ -z "${REDIS_URL:-}" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$workdir" \
    --daemonize no >"$workdir/redis.log" 2>&1 &
  pids+=($!)
  REDIS_URL="redis://127.0.0.1:$port/0"
  for _ in $(seq 100); do redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1 && break; sleep 0.1; done
  echo "== throwaway redis-server on port $port"
fi
rcli() { redis-cli -u "$REDIS_URL" "$@"; }

echo "== building (cargo build --release)"
cargo build --release --quiet

export REDIS_STREAMD_REDIS_URL="$REDIS_URL"
./target/release/redis-streamd --config config/example.toml --check
./target/release/redis-streamd --config config/example.toml >"$workdir/daemon.log" 2>&1 &
daemon=$!
pids+=($daemon)
for _ in $(seq 100); do grep -q '"\?ready' "$workdir/daemon.log" 2>/dev/null && break; sleep 0.1; done

ok=$(rcli XADD orders '*' payload 'hello from the quickstart')
bad=$(rcli XADD orders '*' payload 'fail: this one is poison')
echo "== pushed $ok (will succeed) and $bad (always fails; max_attempts = 3)"

for _ in $(seq 200); do
  [ "$(rcli XLEN orders:dlq)" -ge 1 ] && [ "$(rcli XPENDING orders order-workers | head -1)" = "0" ] && break
  sleep 0.1
done

echo "== pending entries in orders/order-workers (0 = everything acked or dead-lettered):"
rcli XPENDING orders order-workers | head -1
echo "== orders:dlq:"
rcli XRANGE orders:dlq - +
kill -TERM "$daemon"; wait "$daemon" || true
echo "== daemon log:"
cat "$workdir/daemon.log"
