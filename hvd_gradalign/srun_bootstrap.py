"""Horovod's Gloo rendezvous for workers that ``srun`` started (no horovodrun).

Horovod's Gloo controller needs a rendezvous server and per-rank variables that
horovodrun would otherwise provide. Task 0 of the step starts the server (Horovod's
own launcher code, ``horovod.runner``) and publishes its address in a file that
every task can read (a folder shared between the nodes; the user's home by
default); every task then sets the HOROVOD_* variables before ``hvd.init()``.
``distributed`` calls this; Horovod's collective ops stay in ``distributed``.
"""

from __future__ import annotations

import os

_rendezvous_server = None  # kept alive for the life of the process


def started_by_srun() -> bool:
    return ("SLURM_STEP_ID" in os.environ and "HOROVOD_RANK" not in os.environ
            and int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1)


def _tasks_per_node(spec: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        if "(x" in part:
            n, times = part.rstrip(")").split("(x")
            counts += [int(n)] * int(times)
        else:
            counts.append(int(part))
    return counts


def _expand_nodelist(nodelist: str) -> list[str]:
    if "[" not in nodelist and "," not in nodelist:
        return [nodelist]
    import subprocess

    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                         capture_output=True, text=True).stdout
    return out.split()


def node_address(name: str) -> str:
    """The address of node ``name``. Gloo itself resolves the node's host name, so a
    name that does not resolve is an error here, where it can say what to do."""
    import socket

    try:
        return socket.gethostbyname(name)
    except OSError:
        raise RuntimeError(f"node {name!r} does not resolve to an address; Horovod's Gloo needs "
                           "every node's host name in DNS or /etc/hosts on every node") from None


def _gloo_iface(own_address: str, single_node: bool) -> str:
    if os.environ.get("HOROVOD_GLOO_IFACE"):
        return os.environ["HOROVOD_GLOO_IFACE"]
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == own_address for a in addrs):
            return name
    if single_node:
        return "lo"
    raise RuntimeError(
        f"cannot tell which network interface carries {own_address}; set HOROVOD_GLOO_IFACE "
        "to the interface the nodes reach each other on (e.g. eth0, ib0)")


def bootstrap_gloo(timeout_s: float = 300.0):
    import json
    import time
    from pathlib import Path

    env = os.environ
    rank = int(env["SLURM_PROCID"])
    size = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS")))
    hosts = _expand_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost")))
    per_node = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", str(size)))
    node = int(env.get("SLURM_NODEID", "0"))
    single_node = len(hosts) == 1
    folder = Path(env.get("HVD_GRADALIGN_RENDEZVOUS_DIR",
                          Path.home() / ".cache" / "hvd_gradalign" / "rendezvous"))
    folder.mkdir(parents=True, exist_ok=True)
    published = folder / f"{env.get('SLURM_JOB_ID', '0')}.{env['SLURM_STEP_ID']}.json"

    if rank == 0:
        from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
        from horovod.runner.http.http_server import RendezvousServer

        plan = get_host_assignments(parse_hosts(",".join(f"{h}:{n}" for h, n in zip(hosts, per_node))), size)
        global _rendezvous_server  # keep it alive for the life of the process
        _rendezvous_server = RendezvousServer()
        port = _rendezvous_server.start()
        _rendezvous_server.init(plan)
        address = "127.0.0.1" if single_node else node_address(hosts[0])
        tmp = published.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": address, "port": port}))
        os.replace(tmp, published)
    # Job ids repeat (a requeued task, a restarted controller): a file written
    # before this task started belongs to an earlier step and is not ours.
    import psutil

    started = psutil.Process().create_time() - 2.0
    deadline = time.time() + timeout_s
    while not (published.exists() and published.stat().st_mtime >= started):
        if time.time() > deadline:
            raise RuntimeError(f"task 0 did not publish the Gloo rendezvous in {published} within "
                               f"{timeout_s:.0f}s; HVD_GRADALIGN_RENDEZVOUS_DIR must be a folder "
                               "that all nodes share")
        time.sleep(0.2)
    info = json.loads(published.read_text())
    own = "127.0.0.1" if single_node else node_address(hosts[node])
    local_rank = int(env.get("SLURM_LOCALID", "0"))
    env.update({
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": info["address"],
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(info["port"]),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_IFACE": _gloo_iface(own, single_node),
        "HOROVOD_HOSTNAME": hosts[node],
        "HOROVOD_RANK": str(rank),
        "HOROVOD_SIZE": str(size),
        "HOROVOD_LOCAL_RANK": str(local_rank),
        "HOROVOD_LOCAL_SIZE": str(per_node[node]),
        "HOROVOD_CROSS_RANK": str(node),
        "HOROVOD_CROSS_SIZE": str(len(hosts)),
    })
    return published
