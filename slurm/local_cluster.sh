#!/usr/bin/env bash
# A real one-node Slurm on this machine, for testing the launchers: `local_cluster.sh up|down`.
# Installs munge, slurmctld and slurmd from Debian's packages when missing (needs root), writes a
# slurm.conf describing this host, and starts the daemons; state lives in $TIDAR_SLURM_DIR.
set -euo pipefail
dir=${TIDAR_SLURM_DIR:-/tmp/tidar-slurm}
conf=$dir/slurm.conf

down() {
  for pid in "$dir"/slurmd.pid "$dir"/slurmctld.pid; do
    [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  pkill -u munge munged 2>/dev/null || true
}

up() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
  down
  mkdir -p "$dir"/{state,spool,log} /etc/munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 0400 /etc/munge/munge.key
  su -s /bin/sh munge -c "munged --force"
  host=$(hostname)
  cat > "$conf" <<CONF
ClusterName=tidar
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
MpiDefault=none
KillWait=30
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  mkdir -p /etc/slurm && cp "$conf" /etc/slurm/slurm.conf
  slurmctld -f "$conf"
  slurmd -f "$conf"
  for _ in $(seq 60); do
    sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && { echo "slurm up on $host ($dir)"; return 0; }
    sleep 1
  done
  echo "slurm did not come up; see $dir/log" >&2
  return 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
