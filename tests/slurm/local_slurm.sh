#!/usr/bin/env bash
# A one-node SLURM on this machine, for the cluster tests (`make test-cluster`): munged, slurmctld and slurmd with a
# configuration of their own under $METALORA_SLURM_DIR (default /tmp/metalora-slurm), so that nothing of the host's
# /etc/slurm is read or written. Needs root and Debian's packages (installed when missing).
#
#   tests/slurm/local_slurm.sh start    install if needed, write the configuration, start the daemons, wait until the
#                                       node is idle; prints the line to source: export SLURM_CONF=...
#   tests/slurm/local_slurm.sh stop     cancel every job, stop the daemons (munged too when this script started it)
#
# Each failure is one line on stderr naming what failed (and a daemon's last log line) and exits non-zero.
set -uo pipefail

DIR=${METALORA_SLURM_DIR:-/tmp/metalora-slurm}
CONF=$DIR/etc/slurm.conf
# procps gives pgrep and pkill, which a minimal image may lack.
PACKAGES=(slurmctld slurmd slurm-client munge procps)

fail() {
    echo "local_slurm: $*" >&2
    exit 1
}

last_log_line() {
    [[ -s $1 ]] && echo " (last line of $1: $(tail -n 1 "$1"))"
}

install_packages() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    command -v apt-get >/dev/null || fail "${missing[*]} missing and there is no apt-get to install them"
    # Package lists may be stale on a fresh machine: refresh them only when the first try fails.
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >"$DIR/apt.log" 2>&1 ||
        { apt-get update -q >>"$DIR/apt.log" 2>&1 &&
            apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$DIR/apt.log" 2>&1; } ||
        fail "apt-get could not install ${missing[*]}$(last_log_line "$DIR/apt.log")"
}

write_config() {
    local host cpus memory
    host=$(hostname -s)
    cpus=$(nproc)
    # Memory is not a consumable here (CR_CPU), but a node must declare some: 90% of what the machine has.
    memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$DIR"/{etc,state,spool,log,run}
    cat >"$CONF" <<EOF
# Written by tests/slurm/local_slurm.sh: one node, this host, every CPU a schedulable slot.
ClusterName=metalora-local
# Reached on loopback, so that the host's name need not resolve.
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# A finished job stays visible to squeue and scontrol for this long.
MinJobAge=600
# Seconds between the SIGTERM of a cancel or requeue and the SIGKILL (submitit's jobs ignore SIGTERM, waiting for
# the kill): 30 by default, shortened so that a cancelled test job stops at once.
KillWait=3
SchedulerParameters=defer_batch=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if pgrep -x munged >/dev/null; then
        return
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    [[ -s /etc/munge/munge.key ]] || fail "/etc/munge/munge.key is missing (reinstall the munge package)"
    runuser -u munge -- /usr/sbin/munged >"$DIR/log/munged.out" 2>&1 ||
        fail "munged did not start$(last_log_line "$DIR/log/munged.out")$(last_log_line /var/log/munge/munged.log)"
    touch "$DIR/run/munged.ours"
}

wait_idle() {
    local state
    for _ in $(seq 60); do
        state=$(SLURM_CONF=$CONF sinfo -h -N -o '%t' 2>/dev/null | head -n 1)
        if [[ $state == idle || $state == mix || $state == alloc ]]; then
            return
        fi
        sleep 1
    done
    fail "the node did not become idle within 60 s (state '${state:-none}')$(last_log_line "$DIR/log/slurmd.log")"
}

start() {
    [[ $(id -u) -eq 0 ]] || fail "needs root (it installs packages and starts system daemons)"
    mkdir -p "$DIR"
    install_packages
    stop_daemons
    write_config
    start_munge
    export SLURM_CONF=$CONF
    /usr/sbin/slurmctld -c || fail "slurmctld did not start$(last_log_line "$DIR/log/slurmctld.log")"
    /usr/sbin/slurmd || fail "slurmd did not start$(last_log_line "$DIR/log/slurmd.log")"
    wait_idle
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
    if [[ -f $CONF ]]; then
        SLURM_CONF=$CONF scancel --full --quiet --user root 2>/dev/null
    fi
    local pid
    for daemon in slurmd slurmctld; do
        if [[ -f $DIR/run/$daemon.pid ]]; then
            pid=$(cat "$DIR/run/$daemon.pid")
            kill "$pid" 2>/dev/null
            for _ in $(seq 20); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.5
            done
            rm -f "$DIR/run/$daemon.pid"
        fi
    done
}

stop() {
    stop_daemons
    if [[ -f $DIR/run/munged.ours ]]; then
        pkill -x munged
        rm -f "$DIR/run/munged.ours"
    fi
}

case ${1:-} in
start) start ;;
stop) stop ;;
*) fail "usage: $0 start|stop" ;;
esac
