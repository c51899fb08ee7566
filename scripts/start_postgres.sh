#!/usr/bin/env bash
# Start a local PostgreSQL (Debian's package) for the ledger tests and print its URL.
#   export R1SERVE_TEST_PG_URL=$(bash scripts/start_postgres.sh)
# Installs the package when missing (needs root and apt-get); prints nothing and exits 1 when
# it cannot, and the PostgreSQL tests then skip.
set -euo pipefail
log() { echo "start_postgres: $*" >&2; }

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing Debian's postgresql"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 || { apt-get update -q >&2 && \
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; }
    else
        log "PostgreSQL is not installed and cannot be installed here"; exit 1
    fi
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h 2>/dev/null | grep -q .; then
    pg_createcluster "$version" main >&2
fi
cluster=$(pg_lsclusters -h | head -1 | awk '{print $1" "$2}')
port=$(pg_lsclusters -h | head -1 | awk '{print $3}')
pg_lsclusters -h | head -1 | grep -q online || pg_ctlcluster $cluster start >&2
for _ in $(seq 1 30); do
    su postgres -c "psql -p $port -qtAc 'select 1'" >/dev/null 2>&1 && break
    sleep 1
done
su postgres -c "psql -p $port -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='r1serve'\"" | grep -q 1 || \
    su postgres -c "psql -p $port -qc \"CREATE ROLE r1serve LOGIN PASSWORD 'r1serve'\"" >&2
su postgres -c "psql -p $port -qtAc \"SELECT 1 FROM pg_database WHERE datname='r1serve_test'\"" | grep -q 1 || \
    su postgres -c "createdb -p $port -O r1serve r1serve_test" >&2
echo "postgresql+psycopg://r1serve:r1serve@127.0.0.1:$port/r1serve_test"
