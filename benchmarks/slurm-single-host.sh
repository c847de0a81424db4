#!/bin/sh
# A single-host Slurm (slurmctld + slurmd on this machine) from the distribution's
# packages, tuned per Slurm's high-throughput guide
# (https://slurm.schedmd.com/high_throughput.html), for benchmarks/peers.py.
#
#   sudo benchmarks/slurm-single-host.sh start [SLOTS]   # install if needed, start
#   sudo benchmarks/slurm-single-host.sh stop
#
# Debian/Ubuntu: installs slurm-wlm with apt-get. No accounting database, no cgroups:
# the cheapest configuration the guide describes. Everything lives in $SLURM_DIR.
set -eu
SLURM_DIR=${SLURM_DIR:-/var/tmp/corral-slurm}
SLOTS=${2:-16}
CONF=$SLURM_DIR/slurm.conf

start() {
    if ! command -v slurmctld >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
    fi
    mkdir -p "$SLURM_DIR/state" "$SLURM_DIR/spool" "$SLURM_DIR/log"
    # munge authenticates slurm's messages; one key, this host only
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    if ! pgrep -x munged >/dev/null; then
        # started here: stop stops it too
        runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
        pgrep -n -x munged >"$SLURM_DIR/munged.pid"
    fi
    host=$(hostname -s)
    cat >"$CONF" <<CONF
ClusterName=corralbench
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# high-throughput guide: no accounting, cheapest tracking, quiet logs, purge finished
# jobs at once, schedule often but in batches, large job limits
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SlurmctldDebug=error
SlurmdDebug=error
MinJobAge=2
MaxJobCount=1000000
MaxArraySize=1000001
MessageTimeout=30
SchedulerType=sched/builtin
SchedulerParameters=defer,batch_sched_delay=1,sched_min_interval=100000,default_queue_depth=1000,max_rpc_cnt=150
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
NodeName=$host CPUs=$SLOTS State=UNKNOWN
PartitionName=bench Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    ln -sf "$CONF" /etc/slurm/slurm.conf 2>/dev/null || { mkdir -p /etc/slurm && ln -sf "$CONF" /etc/slurm/slurm.conf; }
    slurmctld -f "$CONF" -i
    slurmd -f "$CONF"
    i=0
    until sinfo -h -o %T 2>/dev/null | grep -q idle; do
        i=$((i + 1))
        if [ $i -gt 60 ]; then
            echo "slurm did not come up; see $SLURM_DIR/log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "slurm is up: $(sinfo -h -o '%P %D %c %T')"
}

stop() {
    for f in "$SLURM_DIR/slurmd.pid" "$SLURM_DIR/slurmctld.pid" "$SLURM_DIR/munged.pid"; do
        if [ -s "$f" ]; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            i=0
            while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do
                i=$((i + 1))
                sleep 0.1
            done
        fi
    done
    echo "slurm stopped"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start [SLOTS] | stop" >&2
    exit 2
    ;;
esac
