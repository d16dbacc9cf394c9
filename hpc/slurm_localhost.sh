#!/usr/bin/env bash
# slurm_localhost.sh -- a real single-node Slurm with accounting (slurmdbd + MariaDB) on this
# machine, for moespec's `cluster` tests and for trying `moespec submit --executor slurm` locally.
#
#   bash hpc/slurm_localhost.sh start    # install if missing, configure, start, wait for the node
#   bash hpc/slurm_localhost.sh status   # which daemons run (and which this script started), sinfo
#   bash hpc/slurm_localhost.sh stop     # stop the daemons THIS script started, by their PIDs
#   bash hpc/slurm_localhost.sh restart
#
# Targets Debian 12 / Ubuntu as root (or through sudo), with or without systemd: daemons are
# started directly, since containers and CI VMs often have no init system that apt could use.
# Idempotent: packages are installed only when missing (one `apt-get update` first), config files
# are rewritten only when their content changes, running daemons are left alone unless a config
# they read changed, and a node that came back DOWN/DRAINED is resumed.
#
# Only processes this script started are ever stopped: each one's PID is recorded under
# $STATE_DIR when it is started, and `stop` signals exactly those PIDs (after checking that the
# PID still belongs to the same program). A munged or MariaDB that was already running (systemd,
# another user) is used as is and never stopped.
#
# Knobs (environment):
#   SLURM_PARTITION=debug        partition name (moespec's built-in localhost profile uses "debug")
#   SLURM_CPUS=N                 CPUs to advertise (default: what `slurmd -C` detects)
#   SLURM_MEM_MB=N               RealMemory (default: detected minus 5%, so the node is never
#                                drained for "Low RealMemory")
#   SLURM_MAX_ARRAY_SIZE=1001    MaxArraySize (Slurm's default: array indices 0..1000)
#   SLURM_CRED_EXPIRE=10         AuthInfo=cred_expire; also how long a requeued job waits before it
#                                may start again (Slurm default 120 s; short for requeue tests)
#   SLURM_SPOOL=/var/lib/slurm/slurmd   slurmd spool (use a tmp dir where /var is noexec)
#   SLURM_WAIT_S=60              how long to wait for the node to become idle
set -euo pipefail

ACTION="${1:-start}"
PARTITION="${SLURM_PARTITION:-debug}"
MAX_ARRAY="${SLURM_MAX_ARRAY_SIZE:-1001}"
CRED_EXPIRE="${SLURM_CRED_EXPIRE:-10}"
SPOOL="${SLURM_SPOOL:-/var/lib/slurm/slurmd}"
WAIT_S="${SLURM_WAIT_S:-60}"
NODE=localhost
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/lib/slurm/slurmctld
STATE_DIR=/run/moespec-slurm        # PID files of the daemons this script started (root only)
DAEMON_PIDS=$STATE_DIR/daemons      # the Slurm daemons' own pid files (they run as SlurmUser)
DB_PASS_FILE=$CONF_DIR/.moespec-dbpass
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)

log() { printf '[slurm_localhost %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "run as root (sudo is not available)"
  exec sudo -E bash "$0" "$@"
fi

# ------------------------------------------------------------------------------------------ PIDs
# A recorded PID is "ours" only while that process still runs the program we started
# (guards against PID reuse after the daemon died).
ours_alive() {  # ours_alive <name> <comm>
  local f="$STATE_DIR/$1.pid" p
  [ -s "$f" ] || return 1
  p="$(cat "$f")"
  [ -n "$p" ] && [ -r "/proc/$p/comm" ] && [ "$(cat "/proc/$p/comm")" = "$2" ]
}

record_pid() {  # record_pid <name> <pid>
  install -d -m 0755 "$STATE_DIR"
  echo "$2" > "$STATE_DIR/$1.pid"
}

stop_ours() {  # stop_ours <name> <comm>
  local name="$1" comm="$2" p _i
  if ours_alive "$name" "$comm"; then
    p="$(cat "$STATE_DIR/$name.pid")"
    log "stopping $name (pid $p)"
    kill "$p" 2>/dev/null || true
    for _i in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then log "$name (pid $p) did not exit in 15 s; SIGKILL"; kill -9 "$p" 2>/dev/null || true; fi
  elif [ -e "$STATE_DIR/$name.pid" ]; then
    log "$name: recorded pid is gone (already stopped)"
  fi
  rm -f "$STATE_DIR/$name.pid"
}

wait_for() {  # wait_for <seconds> <what> <command...>
  local secs="$1" what="$2" _i; shift 2
  for _i in $(seq 1 $(( secs * 10 ))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out after ${secs}s waiting for $what (logs: $LOG_DIR)"
}

# --------------------------------------------------------------------------------------- install
install_packages() {
  local p missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then log "packages already installed"; return; fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Without systemd, package scripts cannot start services ("policy-rc.d denied execution");
  # that is expected: this script starts the daemons itself.
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# ------------------------------------------------------------------------------------- configure
SLURM_CONF_CHANGED=0
DBD_CONF_CHANGED=0
write_if_changed() {  # write_if_changed <path> <mode> <owner:group>; content on stdin; sets CHANGED
  local path="$1" mode="$2" owner="$3" tmp
  tmp="$(mktemp)"
  cat > "$tmp"
  CHANGED=0
  if [ -f "$path" ] && cmp -s "$tmp" "$path"; then rm -f "$tmp"; return; fi
  install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$tmp" "$path"
  rm -f "$tmp"
  log "wrote $path"
  CHANGED=1
}

node_line() {
  # What slurmd itself will report, so the node is not drained for a mismatch.
  local hw cpus mem topo
  hw="$(slurmd -C | head -1)"
  cpus="${SLURM_CPUS:-$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")}"
  mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
  mem="${SLURM_MEM_MB:-$(( mem * 95 / 100 ))}"
  topo="$(grep -o 'SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw" || true)"
  [ -n "${SLURM_CPUS:-}" ] && topo=""   # an overridden CPU count would contradict the topology
  echo "NodeName=$NODE NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$cpus $topo RealMemory=$mem State=UNKNOWN"
}

configure() {
  install -d -m 0755 "$CONF_DIR"
  install -d -o slurm -g slurm -m 0755 "$LOG_DIR" "$CTLD_STATE" /var/lib/slurm
  install -d -o root -g root -m 0755 "$SPOOL" "$STATE_DIR"
  install -d -o slurm -g slurm -m 0755 "$DAEMON_PIDS"
  if [ ! -s /etc/munge/munge.key ]; then   # minimal images may skip the postinst key
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 0700 /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  if [ ! -s "$DB_PASS_FILE" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$DB_PASS_FILE")
  fi

  write_if_changed "$CONF_DIR/slurm.conf" 0644 root:root <<EOF
# Written by moespec hpc/slurm_localhost.sh: a single-node Slurm for tests. Do not edit by hand.
ClusterName=moespec-local
SlurmctldHost=localhost
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job (submitit checkpoint + requeue) must wait
# before it can start again (default 120 s).
AuthInfo=cred_expire=$CRED_EXPIRE
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$DAEMON_PIDS/slurmctld.pid
SlurmdPidFile=$DAEMON_PIDS/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups: works in unprivileged containers and VMs without systemd. --mem is then only a
# scheduling number (no OOM kills).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# batch_sched_delay=0 starts batch jobs at once (default: up to 3 s later); bf_interval and
# sched_interval re-evaluate pending (e.g. requeued) jobs every 5 s instead of 30/60 s.
SchedulerParameters=batch_sched_delay=0,bf_interval=5,sched_interval=5
# Cancel a job whose afterok dependency can never be satisfied (moespec also passes
# --kill-on-invalid-dep=yes, since real clusters may not set this).
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
# Slurm's default, so tests meet the same array limit as real clusters.
MaxArraySize=$MAX_ARRAY
MinJobAge=300
KillWait=10
InactiveLimit=0
$(node_line)
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  SLURM_CONF_CHANGED=$CHANGED

  write_if_changed "$CONF_DIR/slurmdbd.conf" 0600 slurm:slurm <<EOF
# Written by moespec hpc/slurm_localhost.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=$DAEMON_PIDS/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageUser=slurm
StoragePass=$(cat "$DB_PASS_FILE")
StorageLoc=moespec_slurm_acct_db
EOF
  DBD_CONF_CHANGED=$CHANGED
}

# ----------------------------------------------------------------------------------------- start
start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then log "munged is running"; return; fi
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --force
  wait_for 10 munged sh -c 'munge -n | unmunge'
  record_pid munged "$(cat /run/munge/munged.pid)"
  log "munged started (pid $(cat "$STATE_DIR/munged.pid"))"
}

start_mariadb() {
  if mariadb-admin ping >/dev/null 2>&1; then
    log "mariadb is running"
  else
    install -d -o mysql -g root -m 0755 /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
    rm -f /run/mysqld/mysqld.pid
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file=/run/mysqld/mysqld.pid \
      >>/var/log/moespec-slurm-mariadb.log 2>&1 < /dev/null &
    wait_for 30 mariadb mariadb-admin ping
    wait_for 10 "mariadb pid file" test -s /run/mysqld/mysqld.pid
    record_pid mariadbd "$(cat /run/mysqld/mysqld.pid)"
    log "mariadb started (pid $(cat "$STATE_DIR/mariadbd.pid"))"
  fi
  local pass; pass="$(cat "$DB_PASS_FILE")"
  mariadb -e "CREATE DATABASE IF NOT EXISTS moespec_slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
    ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
    GRANT ALL ON moespec_slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON moespec_slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

# start_daemon <name> <comm> <changed> <ready-check...>: start unless running; restart ours when
# its config changed; never touch one this script did not start.
start_daemon() {
  local name="$1" comm="$2" changed="$3"; shift 3
  if ours_alive "$name" "$comm"; then
    if [ "$changed" = 1 ]; then stop_ours "$name" "$comm"; else log "$name is running"; return; fi
  elif pgrep -x "$comm" >/dev/null 2>&1; then
    [ "$changed" = 1 ] && log "WARNING: $name was not started by this script and its config changed; restart it yourself"
    log "$name is running (not started by this script; left alone)"
    return
  fi
  case "$name" in
    slurmdbd) /usr/sbin/slurmdbd ;;
    slurmctld) /usr/sbin/slurmctld ;;
    slurmd) /usr/sbin/slurmd -N "$NODE" ;;
  esac
  wait_for 30 "$name pid file" test -s "$DAEMON_PIDS/$name.pid"
  record_pid "$name" "$(cat "$DAEMON_PIDS/$name.pid")"
  wait_for 30 "$name" "$@"
  log "$name started (pid $(cat "$STATE_DIR/$name.pid"))"
}

dbd_up() { exec 3<>/dev/tcp/127.0.0.1/6819; }

wait_idle() {
  local _i st
  for _i in $(seq 1 $(( WAIT_S * 5 ))); do
    st="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)"
    case "$st" in
      idle|mixed|allocated|completing) log "node $NODE is $st; partition $PARTITION ready"; return 0 ;;
      down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  sinfo -N -l >&2 || true
  die "node $NODE did not become idle within ${WAIT_S}s (see $LOG_DIR/*.log)"
}

do_start() {
  local t0=$SECONDS restart_slurm
  install_packages
  configure
  start_munge
  start_mariadb
  start_daemon slurmdbd slurmdbd "$DBD_CONF_CHANGED" dbd_up
  # slurmd must restart with slurmctld when slurm.conf changes ("appears to have a different
  # slurm.conf" otherwise).
  restart_slurm=$SLURM_CONF_CHANGED
  start_daemon slurmctld slurmctld "$restart_slurm" scontrol ping
  start_daemon slurmd slurmd "$restart_slurm" true
  wait_idle
  log "ready in $(( SECONDS - t0 ))s (sinfo, sbatch, sacct; stop with: bash $0 stop)"
}

do_stop() {
  stop_ours slurmd slurmd
  stop_ours slurmctld slurmctld
  stop_ours slurmdbd slurmdbd
  stop_ours mariadbd mariadbd
  stop_ours munged munged
}

do_status() {
  local n comm
  for n in munged mariadbd slurmdbd slurmctld slurmd; do
    comm="$n"
    if ours_alive "$n" "$comm"; then echo "$n: running, started by this script (pid $(cat "$STATE_DIR/$n.pid"))"
    elif pgrep -x "$comm" >/dev/null 2>&1; then echo "$n: running (not started by this script)"
    else echo "$n: stopped"; fi
  done
  sinfo 2>/dev/null || true
}

case "$ACTION" in
  start) do_start ;;
  stop) do_stop ;;
  restart) do_stop; do_start ;;
  status) do_status ;;
  *) die "usage: $0 [start|stop|restart|status]" ;;
esac
