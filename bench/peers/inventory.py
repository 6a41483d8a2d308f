#!/usr/bin/env python3
"""bench/peers/inventory.py: the Ansible inventory (YAML) and the pyinfra inventory (Python) for the peers'
deploys, from the same host list bench/deploy gives pibake.

    bench/peers/inventory.py --out DIR --manager mgr=10.77.215.10 --worker b01=10.77.215.12 ... \\
        --ssh-key KEY --ssh-config CONFIG --munge-key cluster/secrets/munge.key
    ansible-playbook -i DIR/inventory.yml -f N bench/peers/ansible/site.yml
    pyinfra -y --parallel N DIR/inventory.py bench/peers/pyinfra/deploy.py

Both log in as root with the given key (Ansible through the given ssh_config, as pibake's ssh; pyinfra, which
speaks ssh through paramiko, with the key and its own known_hosts file, accepting new host keys as the
ssh_config does). ``munge_key_file`` is the cluster's key, which both copy to the hosts.
"""

import argparse
import pprint
from pathlib import Path

import yaml


def ansible_inventory(manager, workers, *, ssh_config, munge_key, cluster_name):
    """Inventory dict: groups ``manager`` (one host) and ``workers``, each host with its ``ansible_host``."""
    return {"all": {
        "vars": {"ansible_user": "root", "ansible_ssh_common_args": f"-F {ssh_config}",
                 "munge_key_file": str(munge_key), "cluster_name": cluster_name},
        "children": {
            "manager": {"hosts": {manager[0]: {"ansible_host": manager[1]}}},
            "workers": {"hosts": {name: {"ansible_host": ip} for name, ip in workers}},
        },
    }}


def pyinfra_inventory(manager, workers, *, ssh_key, known_hosts, munge_key, cluster_name):
    """Text of a pyinfra inventory file: groups ``manager`` and ``workers`` of (name, data) tuples."""
    common = {"ssh_user": "root", "ssh_key": str(ssh_key), "ssh_known_hosts_file": str(known_hosts),
              "ssh_strict_host_key_checking": "accept-new", "ssh_look_for_keys": False, "ssh_allow_agent": False,
              "munge_key_file": str(munge_key), "cluster_name": cluster_name}

    def hosts(pairs):
        return [(name, dict(common, ssh_hostname=ip)) for name, ip in pairs]
    return ("# pyinfra inventory written by bench/peers/inventory.py\n"
            f"manager = {pprint.pformat(hosts([manager]))}\n"
            f"workers = {pprint.pformat(hosts(workers))}\n")


def write_inventories(out, manager, workers, *, ssh_key, ssh_config, munge_key, cluster_name="deploy"):
    """inventory.yml (Ansible) and inventory.py (pyinfra) in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ansible = out / "inventory.yml"
    ansible.write_text(yaml.safe_dump(ansible_inventory(manager, workers, ssh_config=ssh_config,
                                                        munge_key=munge_key, cluster_name=cluster_name)))
    pyinfra = out / "inventory.py"
    pyinfra.write_text(pyinfra_inventory(manager, workers, ssh_key=ssh_key, known_hosts=out / "known_hosts.pyinfra",
                                         munge_key=munge_key, cluster_name=cluster_name))
    return ansible, pyinfra


def _pair(text):
    name, sep, ip = text.partition("=")
    if not sep or not name or not ip:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=IP")
    return name, ip


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for inventory.yml and inventory.py")
    ap.add_argument("--manager", required=True, type=_pair, help="NAME=IP of the manager")
    ap.add_argument("--worker", action="append", default=[], type=_pair, help="NAME=IP of a worker (repeat)")
    ap.add_argument("--ssh-key", required=True, help="private key that logs in as root")
    ap.add_argument("--ssh-config", required=True, help="ssh_config for Ansible's OpenSSH")
    ap.add_argument("--munge-key", required=True, help="the cluster's munge key (cluster/secrets/munge.key)")
    ap.add_argument("--cluster-name", default="deploy")
    args = ap.parse_args()
    for path in write_inventories(args.out, args.manager, args.worker, ssh_key=args.ssh_key,
                                  ssh_config=args.ssh_config, munge_key=args.munge_key,
                                  cluster_name=args.cluster_name):
        print(path)


if __name__ == "__main__":
    main()
