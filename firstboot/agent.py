"""pibake first-boot agent (placeholder until the agent issue lands).

Contract with the seed (templates/) and the registry:

* installed by cloud-init ``write_files`` at ``/usr/local/lib/pibake/agent.py`` (0755) and run as
  ``python3 /usr/local/lib/pibake/agent.py --config /etc/pibake/agent.json``; also run by
  ``pibake agent run --config FILE``;
* config JSON (0600)::

    {"registry_url": "https://red00:8443", "join_token": "K10...", "ca_cert": "/etc/pibake/ca.crt",
     "hostname": "red01", "role": "worker", "manager": "red00", "manager_ip": "10.1.1.10",
     "credential_file": "/etc/pibake/node-credential", "boot_dir": "/boot/firmware"}

* stdlib + requests + psutil only: cloud-init ships this one file to a bare Pi.
"""

import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pibake-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="agent config JSON")
    args = parser.parse_args(argv)
    with open(args.config, encoding="utf-8") as fh:
        config = json.load(fh)
    print(f"pibake-agent: enrolment with {config.get('registry_url')} is not built yet", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
