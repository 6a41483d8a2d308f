"""apt_cache: true (docs/apt-cache.md): the real apt-cacher-ng and the real apt, with the proxy-detect program
the seed writes onto every node. A local repository (one 200 kB package built with dpkg-deb) stands in for
the Debian mirror, served on loopback by a server that counts what it sends: two nodes fetch the package, the
mirror sends it once; with the cache gone, a node still installs, directly."""

import gzip
import hashlib
import http.server
import os
import random
import socket
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pibake import layout
from pibake.bake.seed import render_template
from pibake.cluster import load_cluster
from pibake.errors import ConfigError
from tests.bake.seed_fixtures import cluster_for, render
from tests.conftest import needs_program
from tests.fixtures_plugin import update_cluster_yaml, wait_for_port

pytestmark = needs_program("apt-cacher-ng", "apt-get", "dpkg-deb", "dpkg-scanpackages")

PACKAGE = "pibake-cache-probe"


def free_port():
    """A free loopback port below 32768: apt-cacher-ng 3.7 can neither listen on a higher one ("Error resolving
    address for binding") nor fetch from one (503 Connection refused), and the kernel's ephemeral ports start
    at 32768."""
    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32767")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A one-package apt repository on loopback; ``served`` counts the GETs answered 200 per path."""
    root = tmp_path_factory.mktemp("mirror")
    pkg = root / "build"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(f"Package: {PACKAGE}\nVersion: 1.0\nArchitecture: all\n"
                                            "Maintainer: pibake tests <root@localhost>\nDescription: probe\n")
    (pkg / "usr/share" / PACKAGE).mkdir(parents=True)
    (pkg / "usr/share" / PACKAGE / "blob").write_bytes(os.urandom(200_000))
    repo = root / "repo"
    (repo / "pool").mkdir(parents=True)
    deb = repo / "pool" / f"{PACKAGE}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(deb)], check=True, capture_output=True)
    index = subprocess.run(["dpkg-scanpackages", "pool", "/dev/null"], cwd=repo, check=True, capture_output=True)
    (repo / "Packages.gz").write_bytes(gzip.compress(index.stdout))  # apt asks for a compressed index first
    served = Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        # Keep the connection open, 404s included, as a real mirror does: apt-cacher-ng pipelines its requests
        # upstream, and http.server's own 404 closes the connection, losing the requests queued behind it
        # (acng then answers 503)
        protocol_version = "HTTP/1.1"

        def send_error(self, code, message=None, explain=None):
            body = f"{code}\n".encode()
            self.send_response(code, message)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(repo), **kwargs)

        def send_response(self, code, message=None):
            if code == 200:
                served[self.path] += 1
            super().send_response(code, message)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)  # apt-cacher-ng: below 32768
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "port": server.server_address[1],
           "served": served, "deb": f"/pool/{deb.name}", "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()}
    server.shutdown()


@pytest.fixture
def cache(tmp_path, mirror):
    """apt-cacher-ng as the manager runs it, on loopback (its own port, cache and log directories; the
    mirror's port allowed as a stand-in for port 80)."""
    conf = tmp_path / "acng"
    conf.mkdir()
    port = free_port()
    (conf / "acng.conf").write_text(
        f"CacheDir: {tmp_path}/cache\nLogDir: {tmp_path}/log\nSupportDir: /usr/lib/apt-cacher-ng\n"
        f"Port: {port}\nBindAddress: 127.0.0.1\nForeGround: 1\nAllowUserPorts: 80 {mirror['port']}\n")
    for d in ("cache", "log"):
        (tmp_path / d).mkdir()
    program = "/usr/sbin/apt-cacher-ng"
    proc = subprocess.Popen([program, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_port(port, proc, "apt-cacher-ng")
    yield {"port": port, "proc": proc}
    proc.terminate()
    proc.wait(10)


def detect_program(tmp_path, port):
    """The seed's proxy-detect program, rendered for a manager on loopback at ``port``."""
    path = tmp_path / "pibake-apt-proxy"
    path.write_text(render_template("pibake-apt-proxy.sh.j2", manager_ip="127.0.0.1", port=port))
    path.chmod(0o755)
    return path


def node_fetches(tmp_path, name, mirror, detect):
    """One node's first-boot apt, confined to its own directories: update, then download the package (as
    `apt-get install` would, without unpacking it onto this machine). Returns the .deb's sha256."""
    d = tmp_path / name
    for sub in ("lists/partial", "archives/partial", "etc"):
        (d / sub).mkdir(parents=True)
    (d / "etc/sources.list").write_text(f"deb [trusted=yes] {mirror['url']} ./\n")
    opts = ["-o", f"Dir::Etc::SourceList={d}/etc/sources.list", "-o", "Dir::Etc::SourceParts=/nonexistent",
            "-o", f"Dir::State::Lists={d}/lists", "-o", f"Dir::Cache::Archives={d}/archives",
            "-o", "Debug::NoLocking=1", "-o", f"Acquire::http::Proxy-Auto-Detect={detect}", "-q"]
    for args in (["update"], ["-y", "install", "--download-only", PACKAGE]):
        proc = subprocess.run(["apt-get", *opts, *args], capture_output=True, text=True, timeout=120)
        # (apt asks for Packages.xz, .bz2, .lzma before .gz: those 404s are "Err:" lines, not failures)
        assert proc.returncode == 0 and "Failed to fetch" not in proc.stderr, proc.stdout + proc.stderr
    deb = d / "archives" / f"{PACKAGE}_1.0_all.deb"
    return hashlib.sha256(deb.read_bytes()).hexdigest()


def test_two_nodes_fetch_a_package_the_mirror_sends_once(tmp_path, mirror, cache):
    detect = detect_program(tmp_path, cache["port"])
    said = subprocess.run([str(detect), f"{mirror['url']}/Packages"], capture_output=True, text=True, timeout=10)
    assert said.stdout.strip() == f"http://127.0.0.1:{cache['port']}"
    before = mirror["served"][mirror["deb"]]
    assert node_fetches(tmp_path, "red01", mirror, detect) == mirror["sha256"]
    assert node_fetches(tmp_path, "red02", mirror, detect) == mirror["sha256"]
    assert mirror["served"][mirror["deb"]] - before == 1


def test_with_the_cache_down_a_node_fetches_directly(tmp_path, mirror):
    detect = detect_program(tmp_path, free_port())  # nothing listens there
    said = subprocess.run([str(detect), f"{mirror['url']}/Packages"], capture_output=True, text=True, timeout=10)
    assert said.stdout.strip() == "DIRECT"
    before = mirror["served"][mirror["deb"]]
    assert node_fetches(tmp_path, "red03", mirror, detect) == mirror["sha256"]
    assert mirror["served"][mirror["deb"]] - before == 1


def test_the_seed_sends_every_node_but_the_manager_to_the_managers_cache():
    cluster = cluster_for(apt_cache=True)
    for role in ("worker", "sensor"):
        files = {f["path"]: f for f in yaml.safe_load(render(role, cluster=cluster).user_data)["write_files"]}
        detect = files[layout.APT_PROXY_DETECT]
        assert detect["permissions"] == "0755"
        assert f"/dev/tcp/{cluster.manager_ip}/{layout.APT_CACHE_PORT}" in detect["content"]
        assert files[layout.APT_PROXY_CONF]["content"].splitlines()[-1] == \
            f'Acquire::http::Proxy-Auto-Detect "{layout.APT_PROXY_DETECT}";'
    manager = yaml.safe_load(render("manager", cluster=cluster).user_data)
    assert "apt-cacher-ng" in manager["packages"]
    assert layout.APT_PROXY_CONF not in {f["path"] for f in manager["write_files"]}


def test_the_docs_block_turns_the_cache_on(make_cluster):
    """docs/apt-cache.md's apt-cache-yaml block, added to a cluster.yaml, loads and turns the cache on."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "apt-cache.md").read_text()
    block = page.split("# doc-test: apt-cache-yaml\n", 1)[1].split("```", 1)[0]
    cluster_dir = make_cluster()
    assert load_cluster(cluster_dir).apt_cache is False
    update_cluster_yaml(cluster_dir, yaml.safe_load(block))
    assert load_cluster(cluster_dir).apt_cache is True
    update_cluster_yaml(cluster_dir, {"apt_cache": "yes"})
    with pytest.raises(ConfigError, match="apt_cache"):
        load_cluster(cluster_dir)
