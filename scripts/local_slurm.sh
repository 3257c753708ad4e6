#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, private to one folder (its own munge socket, ports, state and logs),
# for the tests that submit real jobs. Needs Debian's slurmctld, slurmd, slurm-client and munge packages.
#
#   scripts/local_slurm.sh start DIR   # starts munged, slurmctld and slurmd; prints the path for SLURM_CONF
#   scripts/local_slurm.sh stop DIR    # stops them (by the pids they wrote into DIR)
#
# start exits 1 with one line on stderr saying why when the cluster cannot come up.
set -u
cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

stop() {
    for name in slurmd slurmctld munged; do
        [ -f "$dir/$name.pid" ] && kill "$(cat "$dir/$name.pid")" 2>/dev/null
    done
    return 0
}

fail() { echo "local slurm: $*" >&2; stop; exit 1; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

for bin in munged slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || fail "$bin not found (apt-get install slurmctld slurmd slurm-client munge)"
done
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
dir=$(cd "$dir" && pwd)
chmod 700 "$dir/munge"
user=$(id -un)
host=$(hostname -s)
cpus=$(nproc)
[ "$cpus" -ge 2 ] || cpus=2  # two tasks must fit (config_overrides below lets slurmd accept it)

# munge: its own key and socket, so a system munged (if any) is left alone.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none && chmod 400 "$dir/munge/munge.key"
munged --force --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed" \
    || fail "munged did not start (see $dir/munged.log)"

cat > "$dir/slurm.conf" <<CONF
ClusterName=cifar10ds
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.sock
CredType=cred/munge
SlurmUser=$user
SlurmdUser=$user
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start (see $dir/slurmctld.log)"
slurmd -f "$SLURM_CONF" -N "$host" || fail "slurmd did not start (see $dir/slurmd.log)"
for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -1)
    case "$state" in idle*|mix*|alloc*) echo "$SLURM_CONF"; exit 0 ;; esac
    sleep 0.5
done
fail "the node did not become idle in 30 s (state: ${state:-none}; see $dir/slurmd.log and $dir/slurmctld.log)"
