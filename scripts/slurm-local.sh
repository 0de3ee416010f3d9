#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for the `cluster` tests and for trying the slurm
# profile: munge, a private MariaDB for accounting, slurmdbd, slurmctld and two slurmd
# (node1, node2, one CPU each) from Debian's packages.
#
#   scripts/slurm-local.sh up       install what is missing, start what is not running
#   scripts/slurm-local.sh status   exit 0 when every daemon runs and both nodes are idle
#   scripts/slurm-local.sh down     stop every daemon this script started (state is kept)
#
# Made for a root shell in a container (no systemd; policy-rc.d keeps postinst scripts from
# starting services): each daemon is started by hand with its PID file under $STATE, the
# log and PID directories are owned by the daemon's user, /etc/slurm/slurm.conf is written
# with a marker and never over a configuration this script did not write, and node1/node2
# resolve to 127.0.0.1 (torchrun's rendezvous uses the first node's name).
# Exit status of `up`: 0 running, 2 the packages cannot be installed (no apt), 1 otherwise.
set -euo pipefail

STATE=${RECSYS_SLURM_STATE:-/var/lib/recsys-slurm}
CONF_DIR=/etc/slurm
MARKER="# written by recsys scripts/slurm-local.sh"
DB_PORT=3307
NODES=(node1 node2)
PACKAGES=(munge slurmctld slurmd slurmdbd slurm-client mariadb-server)
TIMEOUT=${RECSYS_SLURM_TIMEOUT:-60}

say() { echo "slurm-local: $*" >&2; }
die() { say "error: $*"; exit 1; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for WHAT COMMAND...: retry COMMAND for $TIMEOUT s
  local what=$1; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then die "$what not ready after ${TIMEOUT}s (logs: $STATE/log)"; fi
    sleep 0.5
  done
}

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { say "apt-get not found: cannot install ${missing[*]}"; exit 2; }
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$STATE/log/apt.log" 2>&1; then
    apt-get update -qq --error-on=any >>"$STATE/log/apt.log" 2>&1 \
      || { say "apt-get update failed (no package registry?): see $STATE/log/apt.log"; exit 2; }
    apt-get install -y -qq --no-install-recommends "${missing[@]}" \
      >>"$STATE/log/apt.log" 2>&1 || die "apt-get install ${missing[*]} failed: see $STATE/log/apt.log"
  fi
}

node_memory_mb() {  # each node claims 45% of this machine's memory (two nodes share it)
  awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.45}' /proc/meminfo
}

write_configs() {
  local host mem
  host=$(hostname -s)
  mem=$(node_memory_mb)
  if [ -e "$CONF_DIR/slurm.conf" ] && ! grep -qF "$MARKER" "$CONF_DIR/slurm.conf"; then
    die "$CONF_DIR/slurm.conf exists and was not written by this script; move it away first"
  fi
  mkdir -p "$CONF_DIR"
  cat >"$CONF_DIR/slurm.conf" <<EOF
$MARKER
ClusterName=recsys
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No cgroups in a container: track processes by parent and bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# TorchX submits multi-replica roles as heterogeneous jobs, which only backfill starts.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# Two slurmd on one host: each node takes the sizes written here, not what it detects.
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$CONF_DIR/slurmdbd.conf" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chown slurm:slurm "$CONF_DIR/slurmdbd.conf"
  chmod 0600 "$CONF_DIR/slurmdbd.conf"
  if ! grep -qE "^127\.0\.0\.1[[:space:]].*\bnode1\b" /etc/hosts; then
    echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
  fi
}

prepare_dirs() {
  mkdir -p "$STATE"/{log,run,slurmctld,mysql-run} "$STATE"/slurmd-node{1,2}
  chown slurm:slurm "$STATE"/log "$STATE"/run "$STATE"/slurmctld
  chown mysql:mysql "$STATE"/mysql-run
  chmod 0777 "$STATE"/log "$STATE"/run  # slurm, munge and mysql write here
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /etc/munge
  chmod 0700 /etc/munge
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  pid_alive "$STATE/run/munged.pid" && return 0
  runuser -u munge -- /usr/sbin/munged --pid-file="$STATE/run/munged.pid" \
    --log-file=/var/log/munge/munged.log --force
  wait_for munge sh -c 'munge -n | unmunge'
}

start_mariadb() {
  local sock="$STATE/mysql-run/mysqld.sock"
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mkdir -p "$STATE/mysql"
    chown mysql:mysql "$STATE/mysql"
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" \
      --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed: see $STATE/log/mariadb-install.log"
  fi
  if ! pid_alive "$STATE/run/mariadbd.pid"; then
    setsid runuser -u mysql -- /usr/sbin/mariadbd --no-defaults --datadir="$STATE/mysql" \
      --bind-address=127.0.0.1 --port=$DB_PORT --socket="$sock" --skip-name-resolve \
      --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mariadb.log" \
      --innodb-buffer-pool-size=1G --innodb-log-file-size=64M \
      --innodb-lock-wait-timeout=900 >/dev/null 2>&1 &
    wait_for MariaDB mariadb --no-defaults --socket="$sock" -e "SELECT 1"
  fi
  mariadb --no-defaults --socket="$sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurmdbd() {
  if ! pid_alive "$STATE/run/slurmdbd.pid"; then
    /usr/sbin/slurmdbd || die "slurmdbd did not start: see $STATE/log/slurmdbd.log"
  fi
  wait_for slurmdbd sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx recsys; then
    sacctmgr -i add cluster recsys >/dev/null
  fi
  if ! sacctmgr -n -P list account format=account | grep -qx recsys; then
    sacctmgr -i add account recsys cluster=recsys >/dev/null
  fi
  if ! sacctmgr -n -P list user format=user | grep -qx root; then
    sacctmgr -i add user root account=recsys cluster=recsys >/dev/null
  fi
}

nodes_ready() {  # every node idle, and registered by the slurmd started now (not saved state)
  local node line
  for node in "${NODES[@]}"; do
    line=$(scontrol -o show node "$node" 2>/dev/null) || return 1
    grep -qE "State=IDLE|State=MIXED|State=ALLOCATED" <<<"$line" || return 1
    grep -q "SlurmdStartTime=None" <<<"$line" && return 1
    local started
    started=$(sed -nE 's/.*SlurmdStartTime=([^ ]+).*/\1/p' <<<"$line")
    [ "$(date -d "$started" +%s 2>/dev/null || echo 0)" -ge "$(cat "$STATE/run/slurmd-$node.started")" ] || return 1
  done
}

start_slurm() {
  if ! pid_alive "$STATE/run/slurmctld.pid"; then
    /usr/sbin/slurmctld || die "slurmctld did not start: see $STATE/log/slurmctld.log"
  fi
  wait_for slurmctld scontrol ping
  local node
  for node in "${NODES[@]}"; do
    if ! pid_alive "$STATE/run/slurmd-$node.pid"; then
      echo $(($(date +%s) - 1)) >"$STATE/run/slurmd-$node.started"
      /usr/sbin/slurmd -N "$node" || die "slurmd $node did not start: see $STATE/log/slurmd-$node.log"
    fi
  done
  # Nodes that went down (a slurmd stopped) come back when their slurmd registers.
  scontrol update nodename=node1,node2 state=resume >/dev/null 2>&1 || true
  wait_for "nodes ${NODES[*]}" nodes_ready
}

stop() {  # stop NAME: the daemon whose PID file is $STATE/run/NAME.pid
  local file="$STATE/run/$1.pid" pid
  pid_alive "$file" || { rm -f "$file"; return 0; }
  pid=$(cat "$file")
  kill "$pid"
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
  rm -f "$file"
}

status() {
  local ok=0 name
  for name in munged mariadbd slurmdbd slurmctld slurmd-node1 slurmd-node2; do
    if pid_alive "$STATE/run/$name.pid"; then echo "$name: running (pid $(cat "$STATE/run/$name.pid"))"
    else echo "$name: stopped"; ok=1; fi
  done
  if [ $ok -eq 0 ]; then
    sinfo -N -h -o "%N %T %c %m" | sed 's/^/node: /'
    nodes_ready || ok=1
  fi
  return $ok
}

case "${1:-}" in
  up)
    mkdir -p "$STATE/log"
    start=$SECONDS
    install_packages
    prepare_dirs
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm
    say "up in $((SECONDS - start))s: $(sinfo -h -o '%P %D nodes %T' | tr '\n' ' ')"
    ;;
  down)
    if [ -d "$STATE/run" ]; then
      for name in slurmd-node1 slurmd-node2 slurmctld slurmdbd mariadbd munged; do stop "$name"; done
    fi
    say "down"
    ;;
  status)
    status
    ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 64
    ;;
esac
