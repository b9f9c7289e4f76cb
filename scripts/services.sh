#!/usr/bin/env bash
# services.sh: real PostgreSQL 15 and a MongoDB-wire server for tokmeter's test suite.
#
# Usage:
#   scripts/services.sh start         install if needed, start both (reuses healthy running ones)
#   scripts/services.sh stop          stop exactly what this script started (idempotent)
#   scripts/services.sh restart       stop + start, same ports, same data
#   scripts/services.sh restart-pg    restart PostgreSQL only (same port, same data)
#   scripts/services.sh restart-mongo restart the MongoDB-wire server only
#   scripts/services.sh status        show what is running (exit 0 only if both are healthy)
#   scripts/services.sh env           print the path of the env file (exit 1 if not written yet)
#   scripts/services.sh clean         stop, then delete all state (data, venv, ports)
#
#   scripts/services.sh start && . "$(scripts/services.sh env)"
#
# Both servers listen on 127.0.0.1 only, on free ports picked on first start and kept in
# $DIR/pg.port and $DIR/mongo.port so that a restart comes back on the same ports.
#
# State lives in TOKMETER_SERVICES_DIR (default: <repo root>/.services):
#   env.sh            exports for the tests (written at start, removed at stop)
#   pg.port pg.pid    PostgreSQL port and postmaster PID
#   pg.root           where the PostgreSQL data dir lives (see below)
#   mongo.port mongo.pid mongo-data/ mongo.log secantusd.toml secantus-venv/
#
# PostgreSQL (Debian's postgresql-15; apt-get installed when /usr/lib/postgresql/15/bin is absent
# and we are root). As root, initdb/pg_ctl run as the `postgres` user through runuser, so the
# data dir must be reachable by that user. It is $DIR/pg (owned by postgres, mode 700) when
# postgres can traverse every parent of $DIR; otherwise (e.g. a checkout under /root, mode 700)
# it falls back to /var/lib/postgresql/tokmeter-<sha1(DIR)> (or /tmp/tokmeter-pg-<sha1(DIR)>),
# and pg.root records which. No parent directory's permissions are ever changed.
# Run as a non-root user, initdb/pg_ctl run directly as that user under $DIR/pg.
# Auth is trust (any password works); the superuser is `postgres` with password `postgres`;
# database `tokmeter`; no unix socket (TCP on 127.0.0.1 only); fsync off.
#
# MongoDB-wire server: secantusdb==0.7.0b3 (GPL-2.0, run as a separate process, never
# imported) in its own venv $DIR/secantus-venv, started with secantusd-py.
#
# Env overrides: TOKMETER_SERVICES_DIR, TOKMETER_PG_BIN (default /usr/lib/postgresql/15/bin),
# TOKMETER_SECANTUS_VENV, TOKMETER_SECANTUS_PYTHON (interpreter for that venv, default python3),
# TOKMETER_SERVICES_TIMEOUT (seconds to wait for a server, default 60).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
DIR=${TOKMETER_SERVICES_DIR:-$REPO_ROOT/.services}
PG_BIN=${TOKMETER_PG_BIN:-/usr/lib/postgresql/15/bin}
PG_DB=tokmeter
PG_USER=postgres
PG_PASSWORD=postgres
MONGO_DB=tokmeter
SECANTUS_SPEC="secantusdb==0.7.0b3"
SECANTUS_VERSION="0.7.0b3"
TIMEOUT=${TOKMETER_SERVICES_TIMEOUT:-60}

log() { printf '%s\n' "services: $*" >&2; }
die() { log "error: $*"; exit 1; }

now() { printf '%s' "${EPOCHREALTIME:-$(date +%s.%N)}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1

init_dir() {
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd -P)
    ENV_FILE=$DIR/env.sh
    SECANTUS_VENV=${TOKMETER_SECANTUS_VENV:-$DIR/secantus-venv}
    MONGO_DATA=$DIR/mongo-data
}

# Serialise concurrent invocations (e.g. several test workers calling `start`).
# Every server is launched with fd 9 closed (`9>&-`) so that it does not inherit the lock.
take_lock() {
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$DIR/.lock"
        flock -w 300 9 || die "could not take $DIR/.lock"
    fi
}

# ---------------------------------------------------------------- ports

# True if nothing listens on 127.0.0.1:$1.
port_free() {
    local port=$1
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$port" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
PY
    else
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 1; fi
    fi
}

pick_port() {
    local port
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 40000))
        if port_free "$port"; then echo "$port"; return; fi
    done
    die "no free port found"
}

# Port for service $1 (pg|mongo): the recorded one if still free, else a new one.
service_port() {
    local name=$1 file="$DIR/$1.port" port=""
    [ -s "$file" ] && port=$(cat "$file")
    if [ -n "$port" ] && ! port_free "$port"; then
        log "warning: recorded $name port $port is taken by another process; picking a new one"
        port=""
    fi
    [ -n "$port" ] || port=$(pick_port)
    echo "$port" >"$file"
    echo "$port"
}

# ---------------------------------------------------------------- PostgreSQL

as_pg() {
    if [ "$IS_ROOT" -eq 1 ]; then
        (cd / && runuser -u postgres -- "$@" 9>&-)
    else
        (cd / && "$@" 9>&-)
    fi
}

install_pg() {
    [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/pg_ctl" ] && [ -x "$PG_BIN/pg_isready" ] && return 0
    [ "$IS_ROOT" -eq 1 ] || die "$PG_BIN/initdb not found; install postgresql-15 as root (apt-get install -y postgresql-15)"
    local t0 created_policy=0
    t0=$(now)
    log "installing postgresql-15 with apt-get ..."
    # Keep the package's own 'main' cluster from being started by its postinst.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql-15
    } </dev/null >"$DIR/apt.log" 2>&1 || rc=$?
    [ "$created_policy" -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || { tail -n 20 "$DIR/apt.log" >&2; die "apt-get install postgresql-15 failed (log: $DIR/apt.log)"; }
    [ -x "$PG_BIN/initdb" ] || die "postgresql-15 installed but $PG_BIN/initdb is missing"
    log "installed postgresql-15 ($(elapsed "$t0"))"
}

# Decide (once) where the cluster lives; sets PG_ROOT, PG_DATA, PG_LOG.
pg_locate() {
    if [ -s "$DIR/pg.root" ]; then
        PG_ROOT=$(cat "$DIR/pg.root")
    else
        PG_ROOT=$DIR/pg
        if [ "$IS_ROOT" -eq 1 ]; then
            id postgres >/dev/null 2>&1 ||
                useradd --system --no-create-home --home-dir /var/lib/postgresql --shell /bin/sh postgres
            mkdir -p "$PG_ROOT"
            chown postgres:postgres "$PG_ROOT"
            chmod 700 "$PG_ROOT"
            if ! runuser -u postgres -- test -w "$PG_ROOT" -a -x "$PG_ROOT" 2>/dev/null; then
                rmdir "$PG_ROOT" 2>/dev/null || true
                local h
                h=$(printf '%s' "$DIR" | sha1sum | cut -c1-12)
                if [ -d /var/lib/postgresql ] && runuser -u postgres -- test -w /var/lib/postgresql 2>/dev/null; then
                    PG_ROOT=/var/lib/postgresql/tokmeter-$h
                else
                    PG_ROOT=/tmp/tokmeter-pg-$h
                fi
                log "user postgres cannot reach $DIR; PostgreSQL data goes to $PG_ROOT"
            fi
        fi
        echo "$PG_ROOT" >"$DIR/pg.root"
    fi
    PG_DATA=$PG_ROOT/data
    PG_LOG=$PG_ROOT/server.log
}

pg_running() {
    [ -f "$PG_DATA/PG_VERSION" ] || return 1
    as_pg "$PG_BIN/pg_ctl" status -D "$PG_DATA" >/dev/null 2>&1
}

pg_ready() {
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$1" -U "$PG_USER" -d postgres -t 2 >/dev/null 2>&1
}

pg_psql() { # port, sql
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U "$PG_USER" -d postgres -tAc "$2"
}

pg_record_pid() {
    head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null >"$DIR/pg.pid" || true
}

start_pg() {
    install_pg
    pg_locate
    if pg_running; then
        local port
        port=$(cat "$DIR/pg.port" 2>/dev/null || true)
        if [ -n "$port" ] && pg_ready "$port"; then
            pg_record_pid
            log "PostgreSQL 15 already running on 127.0.0.1:$port (pid $(cat "$DIR/pg.pid")) ... ok"
            PG_PORT=$port
            return 0
        fi
        log "PostgreSQL running but not healthy; restarting it"
        stop_pg
    fi
    local t0
    t0=$(now)
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
        if [ "$IS_ROOT" -eq 1 ]; then
            mkdir -p "$PG_ROOT"
            chown postgres:postgres "$PG_ROOT"
            chmod 700 "$PG_ROOT"
        else
            mkdir -p "$PG_ROOT"
            chmod 700 "$PG_ROOT"
        fi
        rm -rf "$PG_DATA"
        as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_USER" --auth=trust -E UTF8 --locale=C \
            --no-instructions >"$DIR/initdb.log" 2>&1 ||
            { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
        printf "include_if_exists = 'tokmeter.conf'\n" |
            as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
    fi
    PG_PORT=$(service_port pg)
    as_pg tee "$PG_DATA/tokmeter.conf" >/dev/null <<EOF
# written by scripts/services.sh at every start
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = ''
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    log "starting PostgreSQL 15 on 127.0.0.1:$PG_PORT (data: $PG_DATA) ..."
    as_pg "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" -s >/dev/null ||
        { tail -n 20 "$PG_LOG" >&2 2>/dev/null || true; die "pg_ctl start failed (log: $PG_LOG)"; }
    local deadline=$((SECONDS + TIMEOUT))
    until pg_ready "$PG_PORT"; do
        [ "$SECONDS" -lt "$deadline" ] || { tail -n 20 "$PG_LOG" >&2 || true; die "PostgreSQL not ready after ${TIMEOUT}s"; }
        sleep 0.1
    done
    pg_record_pid
    if [ "$(pg_psql "$PG_PORT" "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
        pg_psql "$PG_PORT" "CREATE DATABASE $PG_DB" >/dev/null
        pg_psql "$PG_PORT" "ALTER USER $PG_USER PASSWORD '$PG_PASSWORD'" >/dev/null
    fi
    log "PostgreSQL 15 on 127.0.0.1:$PG_PORT (pid $(cat "$DIR/pg.pid")) ... ok ($(elapsed "$t0"))"
}

stop_pg() {
    pg_locate_existing || { rm -f "$DIR/pg.pid"; return 0; }
    if pg_running; then
        local t0
        t0=$(now)
        log "stopping PostgreSQL (data: $PG_DATA) ..."
        as_pg "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t "$TIMEOUT" -s >/dev/null ||
            die "pg_ctl stop failed"
        log "stopped PostgreSQL ($(elapsed "$t0"))"
    fi
    rm -f "$DIR/pg.pid"
}

# Like pg_locate, but never creates anything; false if there is no cluster.
pg_locate_existing() {
    [ -s "$DIR/pg.root" ] || return 1
    [ -x "$PG_BIN/pg_ctl" ] || return 1
    PG_ROOT=$(cat "$DIR/pg.root")
    PG_DATA=$PG_ROOT/data
    PG_LOG=$PG_ROOT/server.log
    [ -f "$PG_DATA/PG_VERSION" ]
}

# ---------------------------------------------------------------- MongoDB-wire (SecantusDB)

secantus_ok() {
    [ -x "$SECANTUS_VENV/bin/secantusd-py" ] &&
        "$SECANTUS_VENV/bin/python" -c "
import importlib.metadata as m, sys
import pymongo
sys.exit(0 if m.version('secantusdb') == '$SECANTUS_VERSION' else 1)" 2>/dev/null
}

install_secantus() {
    secantus_ok && return 0
    local t0 py=${TOKMETER_SECANTUS_PYTHON:-python3}
    t0=$(now)
    command -v "$py" >/dev/null 2>&1 || die "$py not found (set TOKMETER_SECANTUS_PYTHON)"
    log "installing $SECANTUS_SPEC into $SECANTUS_VENV ..."
    rm -rf "$SECANTUS_VENV"
    if ! "$py" -m venv "$SECANTUS_VENV" >"$DIR/secantus-install.log" 2>&1; then
        if [ "$IS_ROOT" -eq 1 ] && command -v apt-get >/dev/null 2>&1; then
            log "python venv module unusable; installing python3-venv with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv </dev/null >>"$DIR/secantus-install.log" 2>&1 || true
            rm -rf "$SECANTUS_VENV"
        fi
        "$py" -m venv "$SECANTUS_VENV" >>"$DIR/secantus-install.log" 2>&1 ||
            { cat "$DIR/secantus-install.log" >&2; die "could not create $SECANTUS_VENV"; }
    fi
    "$SECANTUS_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input \
        "$SECANTUS_SPEC" </dev/null >>"$DIR/secantus-install.log" 2>&1 ||
        { tail -n 20 "$DIR/secantus-install.log" >&2; die "pip install $SECANTUS_SPEC failed"; }
    secantus_ok || die "$SECANTUS_SPEC installed but not usable (log: $DIR/secantus-install.log)"
    log "installed $SECANTUS_SPEC ($(elapsed "$t0"))"
}

# True if $1 is a live secantusd-py serving our storage path.
mongo_pid_ours() {
    local pid=$1 cmd
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmd == *secantusd-py* && $cmd == *"--storage-path $MONGO_DATA "* ]]
}

mongo_pid() {
    local pid=""
    [ -s "$DIR/mongo.pid" ] && pid=$(cat "$DIR/mongo.pid")
    if mongo_pid_ours "$pid"; then echo "$pid"; else return 1; fi
}

# Wait until pid $1 serves a ping on port $2 (pymongo from the secantus venv).
mongo_wait() {
    "$SECANTUS_VENV/bin/python" - "$1" "$2" "$TIMEOUT" <<'PY'
import os, sys, time
import pymongo
pid, port, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
last = None
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"secantusd-py (pid {pid}) exited")
    try:
        with pymongo.MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=500,
                                 connectTimeoutMS=500) as c:
            c.admin.command("ping")
        sys.exit(0)
    except Exception as e:  # not up yet
        last = e
        time.sleep(0.1)
sys.exit(f"no ping answer on 127.0.0.1:{port} after {timeout}s: {last}")
PY
}

start_mongo() {
    install_secantus
    local pid port t0
    if pid=$(mongo_pid); then
        port=$(cat "$DIR/mongo.port" 2>/dev/null || true)
        if [ -n "$port" ] && TIMEOUT=5 mongo_wait "$pid" "$port" 2>/dev/null; then
            log "MongoDB-wire (secantusdb) already running on 127.0.0.1:$port (pid $pid) ... ok"
            MONGO_PORT=$port
            return 0
        fi
        log "MongoDB-wire server running but not healthy; restarting it"
        stop_mongo
    fi
    rm -f "$DIR/mongo.pid"
    t0=$(now)
    MONGO_PORT=$(service_port mongo)
    mkdir -p "$MONGO_DATA"
    # An explicit (empty) config file turns off secantusd's config auto-discovery.
    : >"$DIR/secantusd.toml"
    log "starting MongoDB-wire (secantusdb $SECANTUS_VERSION) on 127.0.0.1:$MONGO_PORT (data: $MONGO_DATA) ..."
    # Launch in its own session (survives the caller's Ctrl-C / process group) and get its exact PID.
    pid=$("$SECANTUS_VENV/bin/python" - "$DIR/mongo.log" "$SECANTUS_VENV/bin/secantusd-py" \
        --config "$DIR/secantusd.toml" --host 127.0.0.1 --port "$MONGO_PORT" \
        --storage-path "$MONGO_DATA" --log-level INFO <<'PY'
import subprocess, sys
with open(sys.argv[1], "ab") as log:
    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True, cwd="/")
print(p.pid)
PY
9>&-)
    echo "$pid" >"$DIR/mongo.pid"
    if ! mongo_wait "$pid" "$MONGO_PORT"; then
        tail -n 20 "$DIR/mongo.log" >&2 || true
        stop_mongo
        die "MongoDB-wire server did not come up (log: $DIR/mongo.log)"
    fi
    log "MongoDB-wire on 127.0.0.1:$MONGO_PORT (pid $pid) ... ok ($(elapsed "$t0"))"
}

stop_mongo() {
    local pid t0
    SECANTUS_VENV=${SECANTUS_VENV:-$DIR/secantus-venv}
    if pid=$(mongo_pid); then
        t0=$(now)
        log "stopping MongoDB-wire server (pid $pid) ..."
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && mongo_pid_ours "$pid"; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                log "warning: pid $pid ignored SIGTERM for 30 s; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                sleep 0.5
                break
            fi
            sleep 0.1
        done
        log "stopped MongoDB-wire server ($(elapsed "$t0"))"
    elif [ -s "$DIR/mongo.pid" ]; then
        log "stale $DIR/mongo.pid (pid $(cat "$DIR/mongo.pid") is not our secantusd-py); removing it"
    fi
    rm -f "$DIR/mongo.pid"
}

# ---------------------------------------------------------------- env file

write_env() {
    local tmp=$ENV_FILE.tmp
    cat >"$tmp" <<EOF
# written by scripts/services.sh start; removed by stop
export TOKMETER_SERVICES_DIR='$DIR'
export TOKMETER_TEST_POSTGRES_DSN='postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB'
export TOKMETER_TEST_MONGO_URI='mongodb://127.0.0.1:$MONGO_PORT'
# LightRAG's PostgreSQL storages (lightrag.kg.postgres_impl.ClientManager.get_config)
export POSTGRES_HOST='127.0.0.1'
export POSTGRES_PORT='$PG_PORT'
export POSTGRES_USER='$PG_USER'
export POSTGRES_PASSWORD='$PG_PASSWORD'
export POSTGRES_DATABASE='$PG_DB'
# LightRAG's MongoDB storages (lightrag.kg.mongo_impl.ClientManager.get_client)
export MONGO_URI='mongodb://127.0.0.1:$MONGO_PORT/'
export MONGO_DATABASE='$MONGO_DB'
EOF
    mv -f "$tmp" "$ENV_FILE"
}

# ---------------------------------------------------------------- commands

cmd_start() {
    local t0
    t0=$(now)
    start_pg
    start_mongo
    write_env
    log "ready ($(elapsed "$t0")); env: $ENV_FILE"
}

cmd_stop() {
    stop_mongo
    stop_pg
    rm -f "$ENV_FILE"
}

cmd_status() {
    local ok=0 pid port
    if pg_locate_existing && pg_running && port=$(cat "$DIR/pg.port" 2>/dev/null) && pg_ready "$port"; then
        echo "postgres: running on 127.0.0.1:$port pid $(head -n 1 "$PG_DATA/postmaster.pid") data $PG_DATA"
    else
        echo "postgres: stopped"; ok=1
    fi
    SECANTUS_VENV=${SECANTUS_VENV:-$DIR/secantus-venv}
    if pid=$(mongo_pid); then
        echo "mongo: running on 127.0.0.1:$(cat "$DIR/mongo.port") pid $pid data $MONGO_DATA"
    else
        echo "mongo: stopped"; ok=1
    fi
    [ -f "$ENV_FILE" ] && echo "env: $ENV_FILE"
    return "$ok"
}

cmd_clean() {
    cmd_stop
    local root=""
    [ -s "$DIR/pg.root" ] && root=$(cat "$DIR/pg.root")
    case "$root" in
        /var/lib/postgresql/tokmeter-*|/tmp/tokmeter-pg-*) rm -rf "$root" ;;
    esac
    rm -rf "$DIR"
    log "removed $DIR"
}

main() {
    local cmd=${1:-}
    case "$cmd" in
        start|stop|restart|restart-pg|restart-mongo|status|env|clean) ;;
        -h|--help|help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; return 0 ;;
        *) die "usage: $0 {start|stop|restart|restart-pg|restart-mongo|status|env|clean}" ;;
    esac
    init_dir
    if [ "$cmd" = env ]; then
        echo "$ENV_FILE"
        [ -f "$ENV_FILE" ] || { log "$ENV_FILE does not exist (run: $0 start)"; return 1; }
        return 0
    fi
    take_lock
    case "$cmd" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        restart) cmd_stop; cmd_start ;;
        restart-pg) stop_pg; cmd_start ;;
        restart-mongo) stop_mongo; cmd_start ;;
        status) cmd_status ;;
        clean) cmd_clean ;;
    esac
}

main "$@"
