#!/usr/bin/env bash
# Apache Kafka from Maven Central, run from its jars: a single KRaft node
# (broker and controller in one process) or a cluster of three.
#
# Sourced by scripts/services.sh (kser_kafka_up), or run as a command, which
# is how the fault tests stop, kill and restart nodes:
#
#   scripts/kafka.sh install              resolve the jars; print their directory
#   scripts/kafka.sh up DIR [NODES]       format and start NODES (1 or 3) in DIR;
#                                         print the bootstrap servers
#   scripts/kafka.sh stop DIR N           SIGTERM node N and wait for it to exit
#   scripts/kafka.sh kill DIR N           SIGKILL node N
#   scripts/kafka.sh start DIR N          start node N again (same ports, same data)
#   scripts/kafka.sh down DIR             stop every node of DIR
#
# The version is pinned in scripts/kafka/pom.xml (and compose.yaml). The jars
# are resolved by Maven (cached in ~/.m2) and copied to ~/.cache/kser; both
# caches are checked, never relied on. Each node logs to DIR/node-N/kafka.log.

KSER_BROKER_POM_DIR=${KSER_BROKER_POM_DIR:-"$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/kafka"}
KSER_CACHE=${KSER_CACHE:-"$HOME/.cache/kser"}
# How long a node may take to start before the launcher gives up.
KSER_BROKER_START_TIMEOUT=${KSER_BROKER_START_TIMEOUT:-120}

kafka_log() { printf '==> %s\n' "$*" >&2; }
kafka_die() { printf 'kafka: %s\n' "$*" >&2; return 1; }

kafka_version() {
  sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KSER_BROKER_POM_DIR/pom.xml"
}

# Sets KSER_BROKER_LIBS to a directory holding the broker's jars.
kafka_install() {
  command -v java >/dev/null 2>&1 || {
    kafka_die "Java is not installed: Apache Kafka needs a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"
    return 1
  }
  local version pom_sum libs
  version=$(kafka_version)
  [ -n "$version" ] || { kafka_die "no <kafka.version> in $KSER_BROKER_POM_DIR/pom.xml"; return 1; }
  pom_sum=$(cat "$KSER_BROKER_POM_DIR/pom.xml" | sha256sum | cut -c1-12)
  libs="$KSER_CACHE/kafka-$version-$pom_sum"
  # The marker is written last, with the list of jars: a copy cut short or
  # tampered with is resolved again.
  if [ -f "$libs/.complete" ] && (cd "$libs" && sha256sum --check --quiet .complete 2>/dev/null); then
    KSER_BROKER_LIBS=$libs
    export KSER_BROKER_LIBS
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || {
    kafka_die "Maven is not installed: it resolves Apache Kafka $version from Maven Central (apt-get install maven)"
    return 1
  }
  kafka_log "resolving Apache Kafka $version from Maven Central"
  rm -rf "$libs.tmp" && mkdir -p "$libs.tmp"
  local out
  if ! out=$(mvn -B -q -f "$KSER_BROKER_POM_DIR/pom.xml" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$libs.tmp" 2>&1); then
    rm -rf "$libs.tmp"
    printf '%s\n' "$out" | grep -m 1 -E 'ERROR' >&2
    kafka_die "Maven could not resolve org.apache.kafka:kafka_2.13:$version (is Maven Central reachable?)"
    return 1
  fi
  (cd "$libs.tmp" && sha256sum -- *.jar > .complete)
  rm -rf "$libs" && mv "$libs.tmp" "$libs"
  KSER_BROKER_LIBS=$libs
  export KSER_BROKER_LIBS
}

# A free TCP port below the kernel's ephemeral range: a port the kernel hands
# out (bind to 0) can be taken as the source port of some outgoing connection
# before the node that was given it binds it, seconds later. Ports given as
# arguments are not drawn (those already handed to other nodes).
kafka_free_port() {
  python3 -c '
import random, socket, sys
taken = {int(p) for p in sys.argv[1:]}
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
candidates = range(10000, low) if low > 11000 else None
for _ in range(500):
    port = random.choice(candidates) if candidates else 0
    if port in taken:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    chosen = s.getsockname()[1]
    s.close()
    print(chosen)
    break
else:
    raise SystemExit("no free port")
' "$@"
}

# Writes DIR/node-N/server.properties for every node and formats storage.
kafka_configure() {
  local dir=$1 nodes=$2 n voters="" used="" cluster_id rf isr
  case "$nodes" in
    1) rf=1 isr=1 ;;
    3) rf=3 isr=2 ;;
    *) kafka_die "a cluster has 1 or 3 nodes, not $nodes"; return 1 ;;
  esac
  for n in $(seq 1 "$nodes"); do
    mkdir -p "$dir/node-$n"
    kafka_free_port $used > "$dir/node-$n/port"
    used+=" $(cat "$dir/node-$n/port")"
    kafka_free_port $used > "$dir/node-$n/controller-port"
    used+=" $(cat "$dir/node-$n/controller-port")"
    voters+="${voters:+,}$n@127.0.0.1:$(cat "$dir/node-$n/controller-port")"
  done
  # A cluster id starting with '-' would read as an option: draw another.
  cluster_id=$(python3 -c '
import base64, uuid
while True:
    cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not cid.startswith("-"):
        print(cid)
        break')
  for n in $(seq 1 "$nodes"); do
    local port controller
    port=$(cat "$dir/node-$n/port") controller=$(cat "$dir/node-$n/controller-port")
    cat > "$dir/node-$n/server.properties" <<EOF
node.id=$n
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
controller.quorum.voters=$voters
log.dirs=$dir/node-$n/data
num.partitions=6
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=12
transaction.state.log.num.partitions=6
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
auto.create.topics.enable=true
# A fresh group forms at once instead of waiting 3 s for more members.
group.initial.rebalance.delay.ms=0
# Consumer groups of the KIP-848 protocol take their session timeout and
# heartbeat interval from the broker (45 s and 5 s by default). A member
# killed without leaving keeps its partitions for the session timeout, so
# this test broker uses 6 s and 1 s: what the tests give classic consumers
# (session.timeout.ms=6000). Production brokers keep Kafka's defaults.
group.consumer.session.timeout.ms=6000
group.consumer.min.session.timeout.ms=6000
group.consumer.heartbeat.interval.ms=1000
group.consumer.min.heartbeat.interval.ms=500
# Records up to 8 MB, so tests can reach the producer's own size limit first.
message.max.bytes=8388608
replica.fetch.max.bytes=8388608
EOF
    kafka_java_command "$dir"
    "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format --ignore-formatted \
      -t "$cluster_id" -c "$dir/node-$n/server.properties" \
      >"$dir/node-$n/format.log" 2>&1 || {
      cat "$dir/node-$n/format.log" >&2
      kafka_die "could not format the storage of node $n"
      return 1
    }
  done
  echo "$nodes" > "$dir/nodes"
}

# Sets KAFKA_JAVA to the command that runs a Kafka main class with the jars
# of DIR's cluster.
kafka_java_command() {
  local dir=$1 heap
  read -r -a heap <<< "${KSER_BROKER_HEAP:--Xms256m -Xmx768m}"
  KAFKA_JAVA=(java "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$KSER_BROKER_POM_DIR/log4j2.properties"
    -cp "$(cat "$dir/libs")/*")
}

# Starts node N of DIR in the background; its pid goes to DIR/node-N/pid.
kafka_start_node() {
  local dir=$1 n=$2
  [ -f "$dir/node-$n/server.properties" ] || { kafka_die "no node $n in $dir"; return 1; }
  local port
  port=$(cat "$dir/node-$n/port")
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    kafka_die "port $port of node $n is taken by another process"
    return 1
  fi
  rm -f "$dir/node-$n/pid"
  # setsid: a test's Ctrl-C or SIGTERM to its process group leaves the
  # cluster to `down`. The subshell records its pid, then becomes the JVM.
  (
    echo "$BASHPID" > "$dir/node-$n/pid"
    kafka_java_command "$dir"
    exec setsid "${KAFKA_JAVA[@]}" kafka.Kafka "$dir/node-$n/server.properties"
  ) >>"$dir/node-$n/kafka.log" 2>&1 < /dev/null &
  local i
  for i in $(seq 1 50); do [ -s "$dir/node-$n/pid" ] && break; sleep 0.02; done
}

# Waits until node N logs that it started, or its process exits.
kafka_wait_node() {
  local dir=$1 n=$2 pid started deadline
  pid=$(cat "$dir/node-$n/pid")
  deadline=$((SECONDS + KSER_BROKER_START_TIMEOUT))
  # Count the lines that say so: a restarted node appends to the same log.
  started=$(cat "$dir/node-$n/started" 2>/dev/null || echo 0)
  while [ $SECONDS -lt $deadline ]; do
    if [ "$(grep -c 'Kafka Server started' "$dir/node-$n/kafka.log" 2>/dev/null)" -gt "$started" ]; then
      echo $((started + 1)) > "$dir/node-$n/started"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$dir/node-$n/kafka.log" >&2
      kafka_die "node $n exited while starting (log: $dir/node-$n/kafka.log)"
      return 1
    fi
    sleep 0.2
  done
  tail -n 30 "$dir/node-$n/kafka.log" >&2
  kafka_die "node $n did not start within ${KSER_BROKER_START_TIMEOUT}s (log: $dir/node-$n/kafka.log)"
  return 1
}

kafka_signal_node() {
  local dir=$1 n=$2 signal=$3 pid i
  pid=$(cat "$dir/node-$n/pid" 2>/dev/null) || return 0
  kill -"$signal" "$pid" 2>/dev/null || return 0
  # Wait for it to exit: a restart reuses its ports and its data.
  for i in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# Starts a cluster of NODES in DIR and prints its bootstrap servers.
kafka_up() {
  local dir=$1 nodes=${2:-1} n servers=""
  kafka_install || return 1
  mkdir -p "$dir"
  echo "$KSER_BROKER_LIBS" > "$dir/libs"
  kafka_configure "$dir" "$nodes" || return 1
  for n in $(seq 1 "$nodes"); do kafka_start_node "$dir" "$n" || return 1; done
  for n in $(seq 1 "$nodes"); do
    kafka_wait_node "$dir" "$n" || { kafka_down "$dir"; return 1; }
    servers+="${servers:+,}127.0.0.1:$(cat "$dir/node-$n/port")"
  done
  echo "$servers" > "$dir/bootstrap"
  echo "$servers"
}

kafka_down() {
  local dir=$1 n
  [ -f "$dir/nodes" ] || return 0
  for n in $(seq 1 "$(cat "$dir/nodes")"); do kafka_signal_node "$dir" "$n" TERM & done
  wait
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  case "${1:-}" in
    install) kafka_install && echo "$KSER_BROKER_LIBS" ;;
    up) kafka_up "${2:?DIR}" "${3:-1}" ;;
    stop) kafka_signal_node "${2:?DIR}" "${3:?node}" TERM ;;
    kill) kafka_signal_node "${2:?DIR}" "${3:?node}" KILL ;;
    start) kafka_start_node "${2:?DIR}" "${3:?node}" && kafka_wait_node "$2" "$3" ;;
    down) kafka_down "${2:?DIR}" ;;
    *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
fi
