"""A two-node SLURM cluster on this one machine, for the multi-node tests.

Each node is a network namespace (its own interface eth0 and address on a bridge
the fixture creates) with its own host name (a UTS namespace) and its own
/etc/hosts (a mount namespace, bind-mounted) that names both nodes, as DNS would
on a real cluster: Gloo resolves the node's host name. One ``slurmd -N NAME`` (and an
``sshd`` that accepts only a key the fixture makes, for ``horovodrun -H``) runs inside
each; ``slurmctld`` runs outside, on the bridge's address, and munge's
socket is shared through the file system. Traffic goes only to the addresses
created here. ``stop`` removes everything, also after a failed start.

What did not work, for the record: ``ip netns exec`` remounts /sys, which hides
/sys/fs/cgroup, and slurmd then fails to start ("Unable to initialize cgroup
plugin"): the nodes are entered with ``nsenter --net`` instead. Without the node
names in /etc/hosts, Horovod's Gloo aborts in its process-set context ("Unable to
find address for: nodea") although HOROVOD_GLOO_IFACE is set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.slurm_cluster import CONF, ClusterUnavailable, LocalSlurm, _free_port

SUBNET = "10.213.7"
NODES = {"hgnode1": f"{SUBNET}.11", "hgnode2": f"{SUBNET}.12"}
BRIDGE = "hgbr7"
SSHD = "/usr/sbin/sshd"


def _run(*cmd, check=True):
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


class TwoNodeSlurm(LocalSlurm):
    def start(self, timeout=60):
        for tool in ("slurmctld", "slurmd", "sbatch", "munged", "ip", "nsenter", "unshare"):
            if shutil.which(tool) is None:
                raise ClusterUnavailable(f"{tool} is not installed")
        if os.geteuid() != 0:
            raise ClusterUnavailable("network namespaces need root")
        try:
            self._network()
        except subprocess.CalledProcessError as err:
            self.stop()
            raise ClusterUnavailable(f"cannot create network namespaces here: {err.stderr.strip()}") from err
        for sub in ("state",):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        conf = CONF.format(host=host, d=self.dir, ctld_port=_free_port(), d_port=_free_port(),
                           cpus=2, mem=4000)
        conf = conf.replace(f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldHost={host}({SUBNET}.1)")
        for key, value in (("SlurmdSpoolDir", f"{self.dir}/spool-%n"), ("SlurmdPidFile", f"{self.dir}/slurmd-%n.pid"),
                           ("SlurmdLogFile", f"{self.dir}/slurmd-%n.log")):
            conf = "\n".join(f"{key}={value}" if line.startswith(key + "=") else line
                             for line in conf.splitlines())
        lines = [line for line in conf.splitlines() if not line.startswith("NodeName=")]
        lines[-1:-1] = [f"NodeName={n} NodeAddr={a} CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 "
                        "RealMemory=4000 State=UNKNOWN" for n, a in NODES.items()]
        self.conf.write_text("\n".join(lines) + "\n")
        hosts = self.dir / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + "".join(f"{a} {n}\n" for n, a in NODES.items()))
        self._start_munge()
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env())
        self.ssh_key = self._ssh_config() if Path(SSHD).exists() else None
        for name in NODES:
            sshd = f" && mkdir -p /run/sshd && {SSHD} -f {self.dir}/sshd_config" if self.ssh_key else ""
            self.on_node(name, f"slurmd -f {self.conf} -N {name}{sshd}", check=True, env=self.env())
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env())
            if out.returncode == 0 and out.stdout.split() == ["idle", "idle"]:
                return self
            time.sleep(0.5)
        raise ClusterUnavailable(f"nodes not idle after {timeout}s: {out.stdout} {out.stderr}\n" + self.log_tail())

    def on_node(self, name, command, **kwargs):
        """Run the shell ``command`` inside node ``name``: its network, host name and
        /etc/hosts (what a login on that node would see)."""
        return subprocess.run(["nsenter", f"--net=/var/run/netns/{name}", "unshare", "--uts", "--mount",
                               "--propagation", "private", "sh", "-c",
                               f"mount --bind {self.dir / 'hosts'} /etc/hosts && hostname {name} && {command}"],
                              **kwargs)

    def _ssh_config(self) -> Path:
        """A key for root and an sshd configuration that accepts only it (for horovodrun -H)."""
        key = self.dir / "ssh_key"
        for path in (key, self.dir / "ssh_host_key"):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path))
        shutil.copy(f"{key}.pub", self.dir / "authorized_keys")
        (self.dir / "sshd_config").write_text(
            f"Port 22\nHostKey {self.dir}/ssh_host_key\nAuthorizedKeysFile {self.dir}/authorized_keys\n"
            f"PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n"
            "PidFile none\n")
        return key

    def _network(self):
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for i, (name, address) in enumerate(NODES.items()):
            _run("ip", "netns", "add", name)
            _run("ip", "link", "add", f"hgv7{i}", "type", "veth", "peer", "name", "eth0", "netns", name)
            _run("ip", "link", "set", f"hgv7{i}", "master", BRIDGE, "up")
            for cmd in (["ip", "addr", "add", f"{address}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                        ["ip", "link", "set", "lo", "up"]):
                _run("ip", "netns", "exec", name, *cmd)

    def log_tail(self, n=40):
        text = []
        for p in sorted(self.dir.glob("slurm*.log")):
            text.append(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-n:]))
        return "\n".join(text)

    @property
    def pidfiles(self):
        return [f"slurmd-{n}.pid" for n in NODES] + ["slurmctld.pid"]

    def stop(self):
        super().stop()
        subprocess.run(["pkill", "-f", f"sshd -f {self.dir}/sshd_config"], capture_output=True)
        time.sleep(0.5)
        for name in NODES:
            _run("ip", "netns", "del", name, check=False)
        for i in range(len(NODES)):
            _run("ip", "link", "del", f"hgv7{i}", check=False)
        _run("ip", "link", "del", BRIDGE, check=False)
