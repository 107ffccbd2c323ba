"""A one-node SLURM cluster on localhost for the tests (Debian's slurm 22.05 + munge).

Started and stopped by a pytest fixture; nothing is left running afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class ClusterUnavailable(RuntimeError):
    pass


def _signal_pidfile(path, sig):
    """Send ``sig`` to the process named in ``path``; False when the file or the
    process is gone (or the file is still being written)."""
    try:
        os.kill(int(path.read_text().strip()), sig)
    except (OSError, ValueError):
        return False
    return True


def cluster_fixture(cluster, what):
    """Start ``cluster`` for a test module with SLURM_CONF pointing at it (the
    sweeps' in-process squeue calls read it), and stop it afterwards."""
    try:
        cluster.start()
    except ClusterUnavailable as err:
        cluster.stop()
        import pytest

        pytest.skip(f"cannot run {what} here: {err}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONF = """ClusterName=hgatest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.txt
MailProg=/bin/true
MpiDefault=none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MinJobAge=300
KillWait=5
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.conf = self.dir / "slurm.conf"
        self.procs: list[int] = []
        self.started_munge = False

    def env(self):
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout=60):
        for tool in ("slurmctld", "slurmd", "sbatch", "munged"):
            if shutil.which(tool) is None:
                raise ClusterUnavailable(f"{tool} is not installed (scripts/setup.sh installs it)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("starting slurmctld/slurmd here needs root")
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        self.conf.write_text(CONF.format(host=host, d=self.dir, ctld_port=_free_port(),
                                         d_port=_free_port(), cpus=os.cpu_count(), mem=mem))
        self._start_munge()
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env())
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env())
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env())
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise ClusterUnavailable(f"node not idle after {timeout}s: {out.stdout} {out.stderr}\n"
                                 + self.log_tail())

    def _start_munge(self):
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        self.started_munge = True

    def log_tail(self, n=40):
        text = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.dir / name
            if p.exists():
                text.append(f"--- {name}\n" + "\n".join(p.read_text().splitlines()[-n:]))
        return "\n".join(text)

    pidfiles = ("slurmd.pid", "slurmctld.pid")

    def stop(self):
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True, env=self.env())
        pidfiles = [self.dir / name for name in self.pidfiles]
        for p in pidfiles:
            _signal_pidfile(p, signal.SIGTERM)
        deadline = time.time() + 20
        for p in pidfiles:
            # A daemon removes its pid file as it exits, so the file can vanish
            # between any two looks at it: absent means gone.
            while _signal_pidfile(p, 0) and time.time() < deadline:
                time.sleep(0.2)
        # slurmstepd children, if any job step survived, and a daemon whose pid file
        # is gone but which still runs: whatever runs with this cluster's config goes.
        subprocess.run(["pkill", "-f", f"slurmstepd.*{self.dir}"], capture_output=True)
        for daemon in ("slurmd", "slurmctld"):
            subprocess.run(["pkill", "-9", "-f", f"{daemon} -f {self.conf}"], capture_output=True)
        if self.started_munge:
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)
