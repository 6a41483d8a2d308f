"""The manual cannot drift: it builds strictly, every marked command is claimed by a test, and the
commands on the pages this file owns are run (or, where they need real Pis or a card, parsed by the
real click CLI).

Blocks are fenced ```sh blocks whose first line is ``# doc-test: NAME``. A line ending in
``# exits N`` is expected to exit N. A ```json block right after a run block shows the output of its
last command: its keys (recursively) must be the keys the real command prints.
"""

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BLOCK_RE = re.compile(r"```sh\n(.*?)```(?:\s*```json\n(.*?)```)?", re.S)
MARK_RE = re.compile(r"# doc-test: ([a-z0-9-]+)")
EXITS_RE = re.compile(r"\s+#\s*exits (\d+)\s*$")

# Blocks on the pages this file owns. "run": every line is a pibake command, run in order in one
# temporary directory per page (HOME there too, with ~/.ssh/id_ed25519.pub, a synthetic Pi image
# pi.img, and for the migration page the inventory shown on that page). "parse": the pibake lines
# are parsed by the real click CLI without running (they need Pis, a card, root or a running lab);
# the reason says what runs them for real, if anything.
OWN_PAGES = {
    "index.md": {},
    "quickstart-pi.md": {
        "qs-pi-init": "run",
        "qs-pi-burn": "parse: writes real SD cards (tests/test_cli_burn.py runs burn on loop devices)",
        "qs-pi-verify": "parse: contacts the Pis (tests/e2e/test_verify.py runs verify in the lab)",
        "qs-pi-check": "parse: runs on a real manager over ssh",
    },
    "quickstart-lab.md": {
        "qs-lab-demo": "parse: scripts/demo needs root and builds a lab (tests/e2e/test_lab.py runs the same steps)",
        "qs-lab-init": "run",
        "qs-lab-burn": "run",
        "qs-lab-up": "parse: boots namespace hosts as root (tests/e2e/test_lab.py)",
        "qs-lab-down": "parse: needs a running lab (tests/e2e/test_lab.py)",
    },
    "commands.md": {
        "cmd-help": "run",
        "cmd-init": "run",
        "cmd-render": "run",
        "cmd-burn-file": "run",
        "cmd-burn-card": "parse: writes a real SD card",
        "cmd-reseed": "run",
        "cmd-image-list": "run",
        "cmd-image-get": "parse: downloads an OS image from the internet",
        "cmd-devices": "run",
        "cmd-token-show": "run",
        "cmd-token-rotate": "run",
        "cmd-registry-serve": "parse: a long-running server (tests/registry/ start it)",
        "cmd-registry-nodes": "run",
        "cmd-registry-slurm-conf": "run",
        "cmd-registry-accept": "parse: needs an enrolled, pending node (tests/registry/)",
        "cmd-agent": "parse: needs a registry to enrol with (tests/firstboot/, tests/e2e/)",
        "cmd-lab": "parse: needs root and a lab (tests/e2e/test_lab.py)",
        "cmd-deploy": "parse: needs machines reachable over ssh",
        "cmd-verify": "parse: contacts the cluster's machines (tests/e2e/test_verify.py runs it in the lab)",
    },
    "security.md": {
        "sec-perms": "run",
        "sec-rotate": "run",
    },
    "troubleshooting.md": {
        "ts-nodes": "parse: runs on a real manager over ssh",
        "ts-token": "run",
        "ts-reseed": "parse: rewrites a real SD card",
        "ts-lab": "parse: needs a running lab",
    },
    "migration-cloudmesh.md": {
        "mig-init": "run",
        "mig-render": "run",
        "mig-burn": "parse: writes real SD cards",
    },
    "comparison.md": {},
    "report/index.md": {},
}


def load_hooks():
    spec = importlib.util.spec_from_file_location("pibake_docs_hooks", REPO / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_blocks(text):
    """[(name or None, [lines], json_text or None)] of the ```sh blocks of a page."""
    blocks = []
    for body, json_text in BLOCK_RE.findall(text):
        lines = [ln for ln in body.splitlines() if ln.strip()]
        mark = MARK_RE.fullmatch(lines[0].strip()) if lines else None
        blocks.append((mark.group(1) if mark else None, [ln for ln in lines[1:] if not ln.lstrip().startswith("#")],
                       json_text or None))
    return blocks


def all_marked_blocks():
    out = []
    for page in sorted(DOCS.rglob("*.md")):
        for name, lines, _ in doc_blocks(page.read_text()):
            if name:
                out.append((page.relative_to(DOCS).as_posix(), name))
    return out


# --------------------------------------------------------------------------- the site


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install mkdocs; it is in the test extras)")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for page in ["index.html", "reference/cli.html", "rest-reference.html", "report/index.html"]:
        assert (site / page).is_file(), page
    # every page under docs/ became a page of the site (listed in the nav or added under "More")
    for md in DOCS.rglob("*.md"):
        assert (site / md.relative_to(DOCS).with_suffix(".html")).is_file(), md


def test_nav_lists_pages_that_exist_and_more_collects_the_rest(tmp_path):
    import yaml

    hooks = load_hooks()
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    listed = list(hooks._nav_pages(config["nav"]))
    missing = [p for p in listed if p not in hooks.GENERATED | hooks.PENDING_PAGES and not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml nav names pages that do not exist: {missing}"
    nav = [{"A": "a.md"}, {"S": [{"P": "deploy.md"}]}, {"T": [{"Q": "rest.md"}, {"B": "sub/b.md"}]}]
    assert hooks.drop_pending(nav, tmp_path) == [{"A": "a.md"}, {"T": [{"B": "sub/b.md"}]}]
    (tmp_path / "a.md").write_text("# a\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# b\n")
    assert hooks.unlisted_pages(tmp_path, [{"A": "a.md"}]) == ["sub/b.md"]


def test_command_reference_is_what_pibake_help_prints():
    """The generated reference holds, for every command, exactly what `pibake CMD --help` prints."""
    hooks = load_hooks()
    page = hooks.cli_reference_markdown()
    paths = hooks.command_paths()
    assert ("init",) in paths and ("lab", "up") in paths and ("registry", "serve") in paths
    env = dict(os.environ, COLUMNS="80", TERM="dumb")
    for path in [(), *paths]:
        proc = subprocess.run([sys.executable, "-m", "pibake", *path, "--help"], capture_output=True, text=True,
                              env=env, timeout=60, cwd=REPO)
        assert proc.returncode == 0, (path, proc.stderr)
        assert proc.stdout.rstrip("\n") in page, f"reference/cli.md differs from `pibake {' '.join(path)} --help`"


def test_commands_page_shows_every_command():
    """Each command and subcommand of the CLI appears in a tested block of docs/commands.md."""
    lines = [ln for _, block, _ in doc_blocks((DOCS / "commands.md").read_text()) for ln in block]
    missing = [" ".join(path) for path in load_hooks().command_paths()
               if not any(re.search(rf"pibake {re.escape(' '.join(path))}(\s|$)", ln) for ln in lines)]
    assert not missing, f"docs/commands.md has no example of: {missing}"


def test_the_lab_quick_start_offers_only_what_pibake_lab_help_offers():
    hooks = load_hooks()
    rows = re.findall(r"^\| `lab (\w+)([^`]*)` \|", (DOCS / "quickstart-lab.md").read_text(), re.M)
    assert {sub for sub, _ in rows} == {p[1] for p in hooks.command_paths() if p[0] == "lab" and len(p) == 2}
    for sub, usage in rows:
        help_text = hooks.help_text(("lab", sub))
        for option in re.findall(r"--[a-z][a-z-]*", usage):
            assert re.search(rf"{option}\b", help_text), f"quickstart-lab.md: `lab {sub}` has no {option}"


def test_rest_reference_covers_every_operation_of_the_openapi_file():
    hooks = load_hooks()
    spec = json.loads((REPO / "registry" / "openapi.json").read_text())
    page = hooks.rest_reference_markdown(spec)
    base = spec["servers"][0]["url"]
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            if method in ("get", "post", "put", "patch", "delete"):
                assert f"### {method.upper()} {base}{path}" in page
                for status in op.get("responses", {}):
                    assert f"| {status} |" in page
    for name in spec["components"]["schemas"]:
        assert f'id="schema-{name.lower()}"' in page


# --------------------------------------------------------------------------- no block left unclaimed


def test_every_doc_test_block_in_the_manual_is_claimed_by_a_test():
    blocks = all_marked_blocks()
    assert blocks
    names = [name for _, name in blocks]
    assert len(names) == len(set(names)), "two blocks share a doc-test name"
    sources = "\n".join(p.read_text() for p in (REPO / "tests").rglob("*.py") if p.name != "test_docs.py")
    own = {name for page in OWN_PAGES.values() for name in page}
    unclaimed = [f"{page}: {name}" for page, name in blocks
                 if name not in own and not re.search(rf"[\"']{re.escape(name)}[\"']", sources)]
    assert not unclaimed, f"doc-test blocks no test runs: {unclaimed}"


def test_own_pages_mark_every_sh_block_and_this_file_knows_each():
    for page, expected in OWN_PAGES.items():
        blocks = doc_blocks((DOCS / page).read_text())
        names = [name for name, _, _ in blocks]
        assert None not in names, f"{page}: a ```sh block without a '# doc-test: NAME' line"
        assert names == list(expected), f"{page}: blocks {names}, this test knows {list(expected)}"
        assert all(lines for _, lines, _ in blocks), f"{page}: an empty block"


# --------------------------------------------------------------------------- running the blocks


def split_line(line):
    m = EXITS_RE.search(line)
    code = int(m.group(1)) if m else 0
    line = EXITS_RE.sub("", line) if m else line
    return shlex.split(line, comments=True), code


def keys_of(value):
    """The shape of a JSON value: dict keys recursively, a list by its first element."""
    if isinstance(value, dict):
        return {k: keys_of(v) for k, v in value.items()}
    if isinstance(value, list):
        return [keys_of(value[0])] if value else []
    return None


def parse_only(argv, cwd):
    """Resolve argv through the real click tree (types, choices, required options) without running it."""
    from pibake.cli import cli

    old = os.getcwd()
    os.chdir(cwd)
    try:
        ctx = cli.make_context("pibake", list(argv))
        cmd = cli
        while isinstance(cmd, click.Group):
            rest = [*ctx._protected_args, *ctx.args]
            assert rest, f"{argv}: no command"
            name, cmd, rest = cmd.resolve_command(ctx, rest)
            ctx = cmd.make_context(name, rest, parent=ctx)
        return cmd
    finally:
        os.chdir(old)


@pytest.fixture
def sandbox(tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "docs", "-f",
                    str(home / ".ssh" / "id_ed25519")], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIBAKE_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(tmp_path / "cache"), PIBAKE_IMAGE_CACHE=str(tmp_path / "images"),
               COLUMNS="80", TZ="UTC")
    return home, env


def synthetic_image(path):
    from pibake.bake.synthetic import build_pi_image

    build_pi_image(str(path), size="160M", boot_size="64M")


# Commands that talk to other machines or the internet: never run by this test, whatever a page says
# (the network rule: tests contact only loopback and their own namespaces; 10.1.1.x is an example).
NEVER_RUN = {("verify",), ("deploy",), ("agent",), ("registry", "serve"), ("image", "get"), ("lab",), ("burn",)}


def touches_network(args):
    if "--help" in args or "--version" in args:
        return False
    words = [a for a in args if not a.startswith("-")]
    return any(tuple(words[:len(cmd)]) == cmd for cmd in NEVER_RUN) and not (
        words[:1] == ["burn"] and "--output" in args)


def run_line(argv, code, cwd, env):
    assert argv[0] == "pibake", f"run blocks hold only pibake commands: {argv}"
    assert not touches_network(argv[1:]), f"{shlex.join(argv)} would contact other machines: mark its block parse"
    argv = [a.replace("~/", env["HOME"] + "/") if a.startswith("~/") else a for a in argv[1:]]
    proc = subprocess.run([sys.executable, "-m", "pibake", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == code, f"pibake {shlex.join(argv)}: exit {proc.returncode}, wanted {code}: {proc.stderr}"
    if "--json" in argv and code == 0:
        return json.loads(proc.stdout)
    if code:
        assert proc.stderr.startswith("pibake: error: ") and "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("page", [p for p, blocks in OWN_PAGES.items() if blocks])
def test_page_commands(page, sandbox):
    home, env = sandbox
    text = (DOCS / page).read_text()
    needs_image = any("pi.img" in ln for _, lines, _ in doc_blocks(text) for ln in lines)
    if needs_image:
        if not (shutil.which("mcopy") and shutil.which("mkfs.vfat") and shutil.which("sfdisk")):
            pytest.skip("mtools, dosfstools and fdisk are needed for the synthetic Pi image")
        synthetic_image(home / "pi.img")
    for match in re.finditer(r"```yaml\n# file: ([\w./-]+)\n(.*?)```", text, re.S):
        (home / match.group(1)).write_text(match.group(2))
    run_lines = [ln for name, lines, _ in doc_blocks(text) if OWN_PAGES[page][name] == "run" for ln in lines]
    if run_lines and not any(ln.startswith("pibake init") for ln in run_lines):
        # a page that shows no init of its own works on a cluster made the way the quick start makes it
        run_line(["pibake", "init", "--manager", "red00", "--manager-ip", "10.1.1.10", "--network", "10.1.1.0/24"],
                 0, home, env)
    ran = 0
    for name, lines, json_text in doc_blocks(text):
        mode = OWN_PAGES[page][name]
        for line in lines:
            argv, code = split_line(line)
            if mode == "run":
                out = run_line(argv, code, home, env)
                ran += 1
            elif any(os.path.basename(a) == "pibake" for a in argv):
                # the pibake part of `pibake ...`, `sudo pibake ...`, `ssh HOST sudo /opt/pibake/bin/pibake ...`
                start = next(i for i, a in enumerate(argv) if os.path.basename(a) == "pibake") + 1
                env_argv = [a.replace("~/", str(home) + "/") if a.startswith("~/") else a for a in argv[start:]]
                for arg in env_argv:  # files the options require to exist
                    if re.search(r"\.(yaml|whl|json)$", arg) and not os.path.isabs(arg):
                        (home / arg).parent.mkdir(parents=True, exist_ok=True)
                        (home / arg).touch(exist_ok=True)
                try:
                    parse_only(env_argv, home)
                except click.exceptions.Exit:
                    pass
                except click.ClickException as exc:
                    pytest.fail(f"{page} {name}: `{line}` does not parse: {exc.format_message()}")
            elif argv and argv[0].startswith("scripts/"):
                assert os.access(REPO / argv[0], os.X_OK), f"{page} {name}: {argv[0]} is not an executable script"
                proc = subprocess.run([str(REPO / argv[0]), "--help"], capture_output=True, text=True, timeout=60)
                assert proc.returncode == 0, f"{argv[0]} --help: {proc.stderr}"
                for option in (a for a in argv[1:] if a.startswith("--")):
                    assert option in proc.stdout, f"{page} {name}: {argv[0]} --help does not offer {option}"
        if json_text is not None:
            assert mode == "run", f"{page} {name}: a JSON sample after a block that is not run"
            assert isinstance(out, (dict, list)), f"{page} {name}: the last command printed no JSON"
            assert keys_of(json.loads(json_text)) == keys_of(out), \
                f"{page} {name}: the JSON shown differs in shape from what the command prints now"
    assert ran or all(m != "run" for m in OWN_PAGES[page].values())
    if page == "security.md":
        check_security_page_modes(text, home)


def check_security_page_modes(text, home):
    """The modes the security page's table states are the modes `pibake init` and `render` produce."""
    rows = re.findall(r"^\| `(secrets/[\w.-]+)` \| (0[0-7]{3}) \|", text, re.M)
    assert len(rows) == 7, rows
    cluster = home / "cluster"
    assert oct(os.stat(cluster / "secrets").st_mode & 0o777) == "0o700"
    for rel, mode in rows:
        assert oct(os.stat(cluster / rel).st_mode & 0o777) == "0o" + mode[1:], rel
    seeds = home / "seeds"
    assert oct(os.stat(seeds / "red01").st_mode & 0o777) == "0o700"
    for seed_file in (seeds / "red01").iterdir():
        assert oct(os.stat(seed_file).st_mode & 0o777) == "0o600", seed_file


def test_parse_only_refuses_what_the_cli_refuses(tmp_path):
    assert parse_only(["lab", "up", "--workers", "3"], tmp_path).name == "up"
    with pytest.raises(click.NoSuchOption):
        parse_only(["lab", "up", "--no-such-option"], tmp_path)
    with pytest.raises(click.BadParameter):
        parse_only(["render", "--role", "king", "--out", "x"], tmp_path)
    with pytest.raises(click.UsageError):
        parse_only(["no-such-command"], tmp_path)


def test_commands_that_reach_other_machines_are_never_run():
    assert touches_network(["verify"]) and touches_network(["deploy", "--hosts", "red01"])
    assert touches_network(["image", "get", "x"]) and touches_network(["burn", "--device", "/dev/sdb"])
    assert not touches_network(["burn", "--image", "pi.img", "--output", "out/{hostname}.img"])
    assert not touches_network(["image", "list"]) and not touches_network(["token", "show"])


def test_a_json_sample_of_another_shape_is_caught():
    assert keys_of({"a": [{"b": 1}]}) != keys_of({"a": [{"c": 1}]})
    assert keys_of([{"hostname": "x", "ip": "y"}]) == keys_of([{"hostname": "z", "ip": "w"}])
