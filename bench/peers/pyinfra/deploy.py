"""The same deploy as `pibake deploy --hosts ...`, written as a pyinfra user would: Slurm and munge present,
the cluster's munge key 0400 (munge restarted when it changed), slurm.conf on the manager from the workers'
`slurmd -C` (slurmctld restarted when it changed), workers configless (`slurmd --conf-server`), slurmd
running, every worker idle in sinfo. Used by bench/deploy --peers (inventory from bench/peers/inventory.py):

    pyinfra -y --parallel N inventory.py bench/peers/pyinfra/deploy.py

pyinfra runs each operation on all its hosts before the next one, but orders operations per host (the
manager's and the workers' would interleave): two operations every host shares are the meeting points,
"manager ready" (slurmd starts only once slurmctld runs with the new slurm.conf) and the final wait for idle
(run on the manager only). Hosts without systemd (the lab's) get their daemons through /etc/init.d and slurmd
started directly.
"""

from pathlib import Path

from pyinfra import host, inventory
from pyinfra.facts.server import Command
from pyinfra.operations import apt, files, server, systemd, sysvinit

HERE = Path(__file__).resolve().parent
SYSTEMD = host.get_fact(Command, command="cat /proc/1/comm") == "systemd"
service = systemd.service if SYSTEMD else sysvinit.service
manager = inventory.get_group("manager")[0]
workers = list(inventory.get_group("workers", []))
munge_key = host.data.munge_key_file


def munge():
    key = files.put(name="munge key", src=munge_key, dest="/etc/munge/munge.key", user="munge", group="munge",
                    mode="400")
    service(name="munge restarted (key changed)", service="munge", restarted=True, _if=key.did_change)
    service(name="munge running", service="munge", running=True)
    return key


IS_MANAGER = host in inventory.get_group("manager")

if IS_MANAGER:
    apt.packages(name="Slurm controller and munge present", packages=["slurmctld", "slurm-client", "munge"])
    munge()
    for path in ("/var/spool/slurmctld", "/var/log/slurm"):
        files.directory(name=f"{path}", path=path, user="slurm", group="slurm", mode="755")
    if workers:  # Slurm 22.05 refuses a slurm.conf without nodes: slurmctld runs once there are workers
        # one NodeName line per worker, as its own `slurmd -C` prints it (RealMemory left out: lab hosts share RAM)
        nodes = [" ".join(part for part in w.get_fact(Command, command="slurmd -C").splitlines()[0].split()
                          if not part.startswith("RealMemory=")) + f" NodeAddr={w.data.ssh_hostname}" for w in workers]
        conf = files.template(name="slurm.conf", src=str(HERE / "templates" / "slurm.conf.j2"),
                              dest="/etc/slurm/slurm.conf", mode="644", nodes=nodes, manager=host.name,
                              manager_ip=host.data.ssh_hostname, cluster_name=host.data.cluster_name)
        service(name="slurmctld restarted (slurm.conf changed)", service="slurmctld", restarted=True,
                _if=conf.did_change)
        service(name="slurmctld running", service="slurmctld", running=True)
        server.shell(name="slurmctld answers",
                     commands=["for i in $(seq 240); do scontrol ping | grep -q 'is UP' && exit 0; sleep 0.25; done; "
                               "exit 1"])
else:
    apt.packages(name="Slurm node daemon and munge present",
                 packages=["slurmd", "slurm-client", "munge", "python3-psutil"])
    key = munge()
    options = files.line(name="slurmd gets its configuration from slurmctld (configless)",
                         path="/etc/default/slurmd", line="^SLURMD_OPTIONS=.*",
                         replace=f'SLURMD_OPTIONS="--conf-server {manager.data.ssh_hostname}:6817"')
    for path in ("/var/spool/slurmd", "/var/log/slurm"):
        files.directory(name=f"{path}", path=path, mode="755")

server.shell(name="manager ready", commands=["true"])  # every host: the workers' slurmd starts after this

if not IS_MANAGER:
    if SYSTEMD:
        systemd.service(name="slurmd restarted (key or options changed)", service="slurmd", restarted=True,
                        _if=lambda key=key, options=options: key.did_change() or options.did_change())
        systemd.service(name="slurmd running", service="slurmd", running=True, enabled=True)
    else:
        server.shell(name="slurmd restarted (key or options changed)",
                     commands=["pkill -x slurmd; while pgrep -x slurmd >/dev/null; do sleep 0.1; done; "
                               ". /etc/default/slurmd; slurmd $SLURMD_OPTIONS"],
                     _if=lambda key=key, options=options: key.did_change() or options.did_change())
        server.shell(name="slurmd running",
                     commands=["pgrep -x slurmd >/dev/null || { . /etc/default/slurmd; slurmd $SLURMD_OPTIONS; }"])

server.shell(name="every worker idle in sinfo",  # every host (the meeting point), run on the manager
             commands=[f"for i in $(seq 2400); do [ \"$(sinfo -h -N -t idle -o %N | sort -u | wc -l)\" -ge "
                       f"{len(workers)} ] && exit 0; sleep 0.25; done; sinfo -N; exit 1"],
             _if=lambda is_manager=IS_MANAGER: is_manager)
