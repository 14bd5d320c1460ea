#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the cluster-sweep tests and for trying
# `ksd-run -m ... hydra/launcher=slurm_gpu` without a cluster (CI runs `install` and `start`).
#
#   scripts/local_slurm.sh install   # apt-get slurm-wlm and munge when missing (needs root)
#   scripts/local_slurm.sh start     # munged, slurm.conf for this host, slurmctld, slurmd; waits for idle
#   scripts/local_slurm.sh status    # sinfo
#   scripts/local_slurm.sh stop      # stops the daemons this script started (by their pid files)
#
# Every command is idempotent. The node has this machine's CPUs and memory and no GPUs, so GPU jobs
# must be submitted with `hydra.launcher.gpus_per_node=0 device=cpu`. No accounting database: submitit
# only warns that `sacct` is unavailable. State and logs live under $KSD_SLURM_DIR (default
# /var/lib/ksd-slurm); the configuration is written to /etc/slurm/slurm.conf, where the Debian
# binaries look for it.
set -euo pipefail

STATE_DIR="${KSD_SLURM_DIR:-/var/lib/ksd-slurm}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MUNGE_RUN=/run/munge
HOST="$(hostname -s)"

log() { echo "local_slurm: $*" >&2; }

as_root() {
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (it installs packages and starts system daemons)"
    exit 1
  fi
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sinfo >/dev/null; then
    log "slurm-wlm and munge already installed"
    return
  fi
  as_root
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

start_munge() {
  if pid_alive "$MUNGE_RUN/munged.pid"; then
    return
  fi
  mkdir -p /etc/munge /var/log/munge /var/lib/munge "$MUNGE_RUN"
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge "$MUNGE_RUN"
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 "$MUNGE_RUN"
  runuser -u munge -- munged --force
  log "munged started"
}

write_conf() {
  # The node line as slurmd detects this hardware (CPUs, sockets, cores, threads, RealMemory).
  local node
  node="$(slurmd -C | head -n 1)"
  mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$STATE_DIR/log"
  cat >"$CONF" <<EOF
# Written by scripts/local_slurm.sh: a one-node cluster on $HOST, no accounting, no cgroups.
ClusterName=ksdlocal
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
$node State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1; }

start() {
  as_root
  if ! command -v slurmctld >/dev/null; then
    log "slurm-wlm is not installed; run '$0 install' first"
    exit 1
  fi
  start_munge
  if ! pid_alive "$STATE_DIR/slurmctld.pid" || ! pid_alive "$STATE_DIR/slurmd.pid"; then
    write_conf
  fi
  if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
    slurmctld
    log "slurmctld started"
  fi
  if ! pid_alive "$STATE_DIR/slurmd.pid"; then
    slurmd
    log "slurmd started"
  fi
  local state=""
  for _ in $(seq 1 60); do
    state="$(node_state)"
    case "$state" in
      idle | mixed | allocated) log "node $HOST is $state"; return ;;
      down* | drain* | drained*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  log "node $HOST did not become idle (state: ${state:-unknown}); logs in $STATE_DIR/log"
  exit 1
}

stop_daemon() {
  local name="$1" pidfile="$2"
  if pid_alive "$pidfile"; then
    local pid
    pid="$(cat "$pidfile")"
    kill "$pid"
    for _ in $(seq 1 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    log "$name stopped"
  fi
}

stop() {
  stop_daemon slurmd "$STATE_DIR/slurmd.pid"
  stop_daemon slurmctld "$STATE_DIR/slurmctld.pid"
  stop_daemon munged "$MUNGE_RUN/munged.pid"
}

status() {
  if command -v sinfo >/dev/null && pid_alive "$STATE_DIR/slurmctld.pid"; then
    sinfo
  else
    log "not running"
    return 3
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
    ;;
esac
