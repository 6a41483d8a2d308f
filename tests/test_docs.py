"""The manual cannot drift: it builds strictly, and every block of it that shows a command or a file is
marked, claimed by a test, and run or checked against the real thing.

**Marks.** A fenced block is named by a first line ``# doc-test: NAME`` (```sh, ```console, ```python,
```yaml) or by an HTML comment ``<!-- doc-test: NAME -->`` on the line before its fence (```json, ```text).
Every ```sh/```console/```bash/```python/```yaml block is marked; a ```json block is marked unless it is the
output sample right after a run block; an unmarked ```text or bare block may show output, never a command
(`test_every_block_that_shows_a_command_or_a_file_is_marked`).

**Modes** (``BLOCKS``, per page, in page order):

- ``run``: every line is a pibake command, run here in order in one temporary directory per page (HOME
  there too, with ~/.ssh/id_ed25519.pub, a synthetic Pi image pi.img (and pi.img.xz where a page names it),
  and the files a page shows with ``# file: NAME``). A line ending in ``# exits N`` must exit N. A ```json
  block right after a run block shows the output of its last command: its keys (recursively) must be the keys
  the real command prints.
- ``lab``: run, in order, as root, by ``tests/e2e/test_docs_lab.py`` against one lab (a manager and three
  workers booted from the images the quick start burns); this file also parses their pibake lines.
- ``check``: a file or an output sample compared here with what pibake really reads or prints
  (``CHECKS``).
- ``test: FILE[::FUNCTION]``: another test runs or checks the block (the file must name the block or the
  page, and the function must exist).
- ``parse: REASON``: only parsed, because it cannot run on a test machine. The pibake lines go through the
  real click tree (an unknown option, a bad value or a removed command fails); Python blocks are compiled and
  every ``pibake`` name they import and call must exist and accept the arguments given. The reason names the
  test that runs the same code path for real. The parse-only blocks are exactly these:

  - writing a real SD card (``--device /dev/sdX``): qs-pi-burn, cmd-burn-card, ts-reseed, mig-burn
    (tests/test_cli_burn.py burns to loop devices standing in for /dev/sdb, /dev/sdc);
  - downloading an OS image from the internet: cmd-image-get, img-get, img-verify-cached
    (tests/bake/test_images.py downloads, resumes and verifies against a local HTTP server);
  - img-api (the same download plus a real /dev/sdb; tests/bake/test_images.py, tests/bake/test_devices.py);
  - lab-api, lab-api-pieces: the Python calls under `pibake lab` (the CLI is one call each, run by
    tests/e2e/test_docs_lab.py; the pieces by tests/lab/ and tests/e2e/test_lab.py);
  - ts-timesync: chrony and systemd-timesyncd, which only run under systemd on a Pi (the lab has no
    systemd; tests/bake/test_seed.py checks the chrony and timesyncd files the seed writes).
"""

import ast
import importlib
import importlib.util
import inspect
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

from tests.fixtures_plugin import make_ssh_key

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BLOCK_RE = re.compile(r"```sh\n(.*?)```(?:\s*```json\n(.*?)```)?", re.S)
FENCE_RE = re.compile(r"(?:^<!-- doc-test: ([a-z0-9-]+) -->\n)?^```([a-z]*)\n(.*?)^```", re.S | re.M)
MARK_RE = re.compile(r"# doc-test: ([a-z0-9-]+)")
EXITS_RE = re.compile(r"\s+#\s*exits (\d+)\s*$")
COMMAND_LINE_RE = re.compile(r"^\s*(\$ |sudo |ssh |curl |scripts/|pibake [a-z-])", re.M)

CARD = "parse: writes a real SD card (tests/test_cli_burn.py burns to loop devices standing in for /dev/sdb)"
DOWNLOAD = ("parse: downloads an OS image from the internet (tests/bake/test_images.py downloads, resumes and "
            "verifies against a local HTTP server)")

# Every marked block of the pages this file owns, in page order, with its mode (see the docstring).
BLOCKS = {
    "index.md": {},
    "quickstart-pi.md": {
        "qs-pi-init": "run",
        "qs-pi-burn": CARD,
        "qs-pi-verify": "lab",
        "qs-pi-check": "lab",
    },
    "quickstart-lab.md": {
        "qs-lab-demo": "test: tests/e2e/test_demo.py::test_readme_demo_ends_with_verify_passing",
        "qs-lab-init": "run",
        "qs-lab-burn": "run",
        "qs-lab-up": "lab",
        "qs-lab-down": "lab",
    },
    "commands.md": {
        "cmd-help": "run",
        "cmd-init": "run",
        "cmd-render": "run",
        "cmd-burn-file": "run",
        "cmd-burn-card": CARD,
        "cmd-reseed": "run",
        "cmd-image-list": "run",
        "cmd-image-get": DOWNLOAD,
        "cmd-image-bake": "test: tests/target/test_bake.py",
        "cmd-devices": "run",
        "cmd-token-show": "run",
        "cmd-token-rotate": "run",
        "cmd-registry-serve": "lab",
        "cmd-registry-nodes": "run",
        "cmd-registry-slurm-conf": "run",
        "cmd-registry-accept": "lab",
        "cmd-agent": "lab",
        "cmd-lab": "lab",
        "cmd-lab-power": "test: tests/e2e/test_recover_lab.py::test_the_docs_power_commands_are_the_ones_run_here",
        "cmd-lab-target": "test: tests/target/test_boot.py",
        "cmd-deploy": "lab",
        "cmd-verify": "lab",
        "cmd-switch": "test: tests/switches/test_docs_blocks.py::test_commands_page_switch_block",
        "cmd-mqtt": "test: tests/test_mqtt.py::test_cli_mqtt_setup",
        "cmd-recover": ("parse: needs a hung node on a plug (tests/e2e/test_recover_lab.py recovers a frozen lab "
                        "node through the Kasa simulator with these commands; tests/switches/test_recover.py runs "
                        "recover_node with the simulator as the plug)"),
        "cmd-sensors": "test: tests/registry/test_cli_sensors.py::test_commands_page_sensors_block",
    },
    "security.md": {
        "sec-perms": "run",
        "sec-rotate": "run",
    },
    "troubleshooting.md": {
        "ts-clock": "lab",
        "ts-timesync": ("parse: chrony and systemd-timesyncd run under systemd on a Pi, the lab has no systemd "
                        "(tests/bake/test_seed.py checks the chrony and timesyncd files of the seed)"),
        "ts-nodes": "lab",
        "ts-token": "run",
        "ts-reseed": CARD,
        "ts-lab": "lab",
    },
    "migration-cloudmesh.md": {
        "mig-inventory": "run",
        "mig-init": "run",
        "mig-render": "run",
        "mig-burn": CARD,
    },
    "comparison.md": {},
    "home-cloud.md": {},
    "agent.md": {
        "agent-run": "lab",
        "agent-config": "lab",
    },
    "apt-cache.md": {
        "apt-cache-yaml": "test: tests/test_apt_cache.py::test_the_docs_block_turns_the_cache_on",
    },
    "cluster-yaml.md": {
        "cy-errors": "check",
        "cy-full": "test: tests/test_cluster.py::test_docs_full_example_loads_and_validates",
        "cy-minimal": "test: tests/test_cluster.py::test_docs_full_example_loads_and_validates",
        "cy-plan": "check",
    },
    "images-and-devices.md": {
        "img-list": "run",
        "img-get": DOWNLOAD,
        "img-verify-cached": DOWNLOAD,
        "img-verify-local": "run",
        "img-devices": "run",
        "img-api": ("parse: downloads an image and opens /dev/sdb (tests/bake/test_images.py and "
                    "tests/bake/test_devices.py run these functions on a local HTTP server and recorded disks)"),
    },
    "init.md": {
        "init-examples": "test: tests/test_cli_init.py::test_docs_init_examples_run",
    },
    "lab.md": {
        "lab-by-hand": "lab",
        "lab-power": "test: tests/e2e/test_recover_lab.py::test_the_docs_power_commands_are_the_ones_run_here",
        "lab-api": ("parse: the functions under `pibake lab up/status/shell/down`, one call each, which "
                    "tests/e2e/test_docs_lab.py runs"),
        "lab-api-pieces": "parse: one lab host booted piece by piece, as tests/e2e/test_lab.py and tests/lab/ do",
    },
    "registry.md": {
        "reg-serve-usage": "check",
        "reg-settings": "test: tests/registry/test_docs.py::test_settings_example_is_accepted_by_the_registry",
    },
    "rest.md": {
        "rest-health": "test: tests/e2e/test_rest_jobs.py",
        "rest-job-sample": "lab",
        "rest-verify": "test: tests/e2e/test_rest_jobs.py",
        "rest-deploy": "test: tests/e2e/test_rest_jobs.py",
        "rest-jobs": "test: tests/e2e/test_rest_jobs.py",
        "rest-python": "lab",
    },
    "verify.md": {
        "verify-run": "test: tests/e2e/test_verify.py",
        "verify-text-sample": "lab",
        "verify-json": "test: tests/e2e/test_verify.py",
        "verify-json-sample": "lab",
        "verify-report": "test: tests/e2e/test_verify.py",
        "verify-bench": "test: tests/e2e/test_verify.py",
        "verify-python": "lab",
    },
    "switches.md": {
        "sw-config": "test: tests/switches/test_config.py::test_docs_example_loads",
        "sw-credentials": "test: tests/switches/test_docs_blocks.py::test_switches_page_blocks",
        "sw-commands": "test: tests/switches/test_docs_blocks.py::test_switches_page_blocks",
        "sw-recover": ("parse: needs a hung node on a plug (tests/e2e/test_recover_lab.py recovers a frozen lab "
                       "node through the Kasa simulator with this command; tests/switches/test_recover.py runs "
                       "recover_node with the simulator as the plug)"),
        "sw-rest": "test: tests/registry/test_switches_api.py::test_switches_page_rest_block",
        "sw-python": "test: tests/switches/test_docs_blocks.py::test_switches_page_blocks",
        "sw-auto": ("parse: needs hung nodes on plugs (tests/e2e/test_recover_lab.py runs `switch auto --once` on "
                    "a frozen lab node; tests/switches/test_auto.py runs the rounds with the Kasa simulator as the "
                    "plug)"),
        "sw-rules": "test: tests/switches/test_rules.py::test_the_docs_rule_switches_the_fan_from_stored_readings",
        "sw-rules-list": "test: tests/registry/test_rules_api.py::test_rules_over_rest_on_the_page_and_in_the_cli",
    },
    "mqtt.md": {
        "mqtt-config": "test: tests/test_mqtt.py::test_docs_mqtt_page_blocks",
        "mqtt-acl": "test: tests/test_mqtt.py::test_docs_mqtt_page_blocks",
        "mqtt-discovery": "test: tests/test_mqtt.py::test_docs_mqtt_page_blocks",
    },
    "sensors-node.md": {
        "sn-burn": ("parse: writes a real SD card from a downloaded image (tests/bake/test_burn.py burns sensor "
                    "image files: test_sensor_card_gets_i2c_in_config_txt, test_board_zero_w_picks_the_armhf_image)"),
        "sn-settings": "test: tests/firstboot/test_sensor_docs.py::test_sensors_node_page_blocks",
        "sn-node-check": "test: tests/firstboot/test_sensor_docs.py::test_sensors_node_page_blocks",
    },
    "sensors.md": {
        "sens-settings": "test: tests/registry/test_readings.py::test_docs_settings_example_is_accepted",
        "sens-body": "test: tests/registry/test_readings.py::test_docs_body_is_accepted_once",
        "sens-rest": "test: tests/registry/test_readings.py::test_sensors_page_rest_block",
        "sens-python": "test: tests/registry/test_cli_sensors.py::test_sensors_page_python_block",
        "sens-cli": "test: tests/registry/test_cli_sensors.py::test_sensors_page_cli_block",
    },
    "report/index.md": {},
}
OWN_PAGES = BLOCKS  # the name other modules used
LAB_MODULE = REPO / "tests" / "e2e" / "test_docs_lab.py"


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


def fenced_blocks(text):
    """[(name or None, language, body without its mark line, follows_sh)] of every fenced block of a page."""
    out = []
    last_end, last_lang = None, None
    for m in FENCE_RE.finditer(text):
        html_name, lang, body = m.group(1), m.group(2), m.group(3)
        first = body.split("\n", 1)[0].strip()
        mark = MARK_RE.fullmatch(first)
        name = html_name or (mark.group(1) if mark else None)
        if mark:
            body = body.split("\n", 1)[1] if "\n" in body else ""
        follows_sh = last_lang == "sh" and not text[last_end:m.start()].strip()
        out.append((name, lang, body, follows_sh))
        last_end, last_lang = m.end(), lang
    return out


def page_block(page, name):
    """(language, body) of block ``name`` on ``page``."""
    for block_name, lang, body, _ in fenced_blocks((DOCS / page).read_text()):
        if block_name == name:
            return lang, body
    raise AssertionError(f"docs/{page} has no block {name}")


def all_marked_blocks():
    out = []
    for page in sorted(DOCS.rglob("*.md")):
        for name, *_ in fenced_blocks(page.read_text()):
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
    rows = re.findall(r"^\| `lab ([\w-]+)([^`]*)` \|", (DOCS / "quickstart-lab.md").read_text(), re.M)
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


def test_every_block_that_shows_a_command_or_a_file_is_marked():
    problems = []
    for page in sorted(DOCS.rglob("*.md")):
        rel = page.relative_to(DOCS).as_posix()
        if rel.startswith("report/"):
            continue  # written by bench/ scripts and their owners, not part of the manual's examples
        text = page.read_text()
        for name, lang, body, follows_sh in fenced_blocks(text):
            if name:
                continue
            if lang in ("sh", "bash", "console", "python", "yaml"):
                problems.append(f"{rel}: a ```{lang} block without a doc-test mark: {body[:60]!r}")
            elif lang == "json" and not follows_sh:
                problems.append(f"{rel}: a ```json block that is neither marked nor the output of a run block")
            elif lang in ("", "text") and COMMAND_LINE_RE.search(body):
                problems.append(f"{rel}: a ```{lang} block shows a command: {COMMAND_LINE_RE.search(body).group(0)!r}")
        outside = FENCE_RE.sub("", text)
        indented = re.search(r"\n\n((?: {4}.*\n)+)", outside)
        if indented and COMMAND_LINE_RE.search(indented.group(1).replace("    ", "", 1)):
            problems.append(f"{rel}: an indented code block shows commands: fence it as ```sh with a mark")
    assert not problems, "\n".join(problems)


def test_every_doc_test_block_in_the_manual_is_claimed_by_a_test():
    blocks = all_marked_blocks()
    assert blocks
    names = [name for _, name in blocks]
    assert len(names) == len(set(names)), "two blocks share a doc-test name"
    sources = "\n".join(p.read_text() for p in (REPO / "tests").rglob("*.py") if p.name != "test_docs.py")
    own = {name for page in BLOCKS.values() for name in page}
    unclaimed = [f"{page}: {name}" for page, name in blocks
                 if name not in own and not re.search(rf"[\"']{re.escape(name)}[\"']", sources)]
    assert not unclaimed, f"doc-test blocks no test runs: {unclaimed}"


def test_own_pages_mark_every_block_and_this_file_knows_each():
    for page, expected in BLOCKS.items():
        names = [name for name, *_ in fenced_blocks((DOCS / page).read_text()) if name]
        assert names == list(expected), f"{page}: blocks {names}, this test knows {list(expected)}"
        for name, lang, body, _ in fenced_blocks((DOCS / page).read_text()):
            assert not name or body.strip(), f"{page}: {name} is empty"


def test_each_mode_names_a_test_that_exists():
    lab_source = LAB_MODULE.read_text()
    for page, blocks in BLOCKS.items():
        for name, mode in blocks.items():
            if mode in ("run", "check"):
                assert mode == "run" or name in CHECKS, f"{page} {name}: no check in CHECKS"
            elif mode == "lab":
                assert f'"{name}"' in lab_source, f"{page} {name}: tests/e2e/test_docs_lab.py does not run it"
            elif mode.startswith("test: "):
                target = mode[len("test: "):]
                path, _, func = target.partition("::")
                source = (REPO / path).read_text()
                lines = [ln for block, lns, _ in doc_blocks((DOCS / page).read_text()) if block == name for ln in lns]
                programs = {ln.split()[0] for ln in lines}
                assert page.split("/")[-1] in source or f'"{name}"' in source or (
                    programs and all(prog in source for prog in programs)), f"{page} {name}: {path} never runs it"
                assert not func or re.search(rf"^def {func}\(", source, re.M), f"{page} {name}: no {target}"
            else:
                assert mode.startswith("parse: "), f"{page} {name}: unknown mode {mode!r}"
                tests = re.findall(r"tests/[\w/]+(?:\.py)?", mode)
                assert tests and all((REPO / t).exists() for t in tests), \
                    f"{page} {name}: the reason must name the test that runs this code path: {mode}"


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
    make_ssh_key(home / ".ssh", "docs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIBAKE_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(tmp_path / "cache"), PIBAKE_IMAGE_CACHE=str(tmp_path / "images"),
               COLUMNS="80", TZ="UTC")
    return home, env


def synthetic_image(path):
    from pibake.bake.synthetic import build_pi_image

    build_pi_image(str(path), size="160M", boot_size="64M")


# Commands that talk to other machines or the internet, or may touch this machine's Slurm (accept and remove
# apply slurm.conf the way the last `registry serve` did): never run by this file, whatever a page says (the
# network rule: tests contact only loopback and their own namespaces; 10.1.1.x is an example).
# tests/e2e/test_docs_lab.py runs them inside a lab's network namespace.
NEVER_RUN = {("verify",), ("deploy",), ("agent",), ("registry", "serve"), ("registry", "accept"),
             ("registry", "remove"), ("image", "get"), ("lab",), ("burn",)}


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


def parse_line(page, name, line, home):
    """Check one line of a block that is not run here: its pibake part through the real click tree, the
    agent's options against agent.py --help, a scripts/ program's options against its --help, anything
    else as shell syntax."""
    argv, _ = split_line(line)
    if any(os.path.basename(a) == "pibake" for a in argv):
        # the pibake part of `pibake ...`, `sudo pibake ...`, `ssh HOST sudo /opt/pibake/bin/pibake ...`
        start = next(i for i, a in enumerate(argv) if os.path.basename(a) == "pibake") + 1
        env_argv = [a.replace("~/", str(home) + "/") if a.startswith("~/") else a for a in argv[start:]]
        for i, arg in enumerate(env_argv):  # files and folders the options require to exist
            if re.search(r"\.(yaml|whl|json)$", arg) and not os.path.isabs(arg):
                (home / arg).parent.mkdir(parents=True, exist_ok=True)
                (home / arg).touch(exist_ok=True)
            if i and env_argv[i - 1] == "--from-images":
                (home / arg).mkdir(parents=True, exist_ok=True)
        try:
            parse_only(env_argv, home)
        except click.exceptions.Exit:
            pass
        except click.ClickException as exc:
            pytest.fail(f"{page} {name}: `{line}` does not parse: {exc.format_message()}")
    elif any(a.endswith("/agent.py") for a in argv):
        help_text = subprocess.run([sys.executable, str(REPO / "firstboot" / "agent.py"), "--help"],
                                   capture_output=True, text=True, timeout=60).stdout
        for option in (a for a in argv if a.startswith("-")):
            assert re.search(rf"{re.escape(option)}\b", help_text), f"{page} {name}: agent.py has no {option}"
    elif argv and argv[0].startswith("scripts/"):
        assert os.access(REPO / argv[0], os.X_OK), f"{page} {name}: {argv[0]} is not an executable script"
        proc = subprocess.run([str(REPO / argv[0]), "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{argv[0]} --help: {proc.stderr}"
        for option in (a for a in argv[1:] if a.startswith("--")):
            assert option in proc.stdout, f"{page} {name}: {argv[0]} --help does not offer {option}"
    else:
        proc = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{page} {name}: `{line}` is not valid shell: {proc.stderr}"


def check_python_block(source):
    """Compile a Python block and check every pibake name it imports exists and every call of one binds
    to its signature (argument count and keyword names). Returns the number of calls checked."""
    tree = ast.parse(source)
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pibake":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pibake":
                    names[alias.asname or alias.name] = importlib.import_module(alias.name)
    checked = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in names:
            target, label = names[func.id], func.id
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and \
                inspect.ismodule(names.get(func.value.id)):
            module = names[func.value.id]
            assert hasattr(module, func.attr), f"{module.__name__} has no {func.attr}"
            target, label = getattr(module, func.attr), f"{func.value.id}.{func.attr}"
        else:
            continue
        if not callable(target):
            continue
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            continue
        try:
            sig.bind(*[None] * len(node.args), **{k.arg: None for k in node.keywords})
        except TypeError as exc:
            raise AssertionError(f"{label}(...) at line {node.lineno}: {exc}") from None
        checked += 1
    return checked


@pytest.mark.parametrize("page", [p for p, blocks in BLOCKS.items() if blocks])
def test_page_commands(page, sandbox):
    home, env = sandbox
    text = (DOCS / page).read_text()
    modes = BLOCKS[page]
    sh_blocks = [b for b in doc_blocks(text) if b[0] in modes]
    run_or_parse = [b for b in sh_blocks if modes[b[0]] == "run" or modes[b[0]].startswith("parse")
                    or modes[b[0]] == "lab"]
    needs_image = any("pi.img" in ln for _, lines, _ in run_or_parse for ln in lines)
    if needs_image:
        if not (shutil.which("mcopy") and shutil.which("mkfs.vfat") and shutil.which("sfdisk")):
            pytest.skip("mtools, dosfstools and fdisk are needed for the synthetic Pi image")
        synthetic_image(home / "pi.img")
        if "pi.img.xz" in text:
            subprocess.run(["xz", "-T0", "-1", "-k", str(home / "pi.img")], check=True, timeout=120)
    for match in re.finditer(r"```yaml\n(?:# doc-test: [a-z0-9-]+\n)?# file: ([\w./-]+)\n(.*?)```", text, re.S):
        (home / match.group(1)).write_text(match.group(2))
    run_lines = [ln for name, lines, _ in sh_blocks if modes[name] == "run" for ln in lines]
    if run_lines and not any(ln.startswith("pibake init") for ln in run_lines):
        # a page that shows no init of its own works on a cluster made the way the quick start makes it
        run_line(["pibake", "init", "--manager", "red00", "--manager-ip", "10.1.1.10", "--network", "10.1.1.0/24"],
                 0, home, env)
    ran = parsed = 0
    for name, lines, json_text in sh_blocks:
        mode = modes[name]
        if mode == "check":
            continue
        if mode.startswith("test: ") and any(ln.rstrip().endswith("\\") for ln in lines):
            # a multi-line script (rest.md's curl examples): its test runs it whole; here, its syntax
            proc = subprocess.run(["bash", "-n", "-c", "\n".join(lines)], capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, f"{page} {name}: not valid shell: {proc.stderr}"
            parsed += 1
            continue
        for line in lines:
            argv, code = split_line(line)
            if mode == "run":
                out = run_line(argv, code, home, env)
                ran += 1
            else:  # parse-only here; "lab" and "test:" blocks run in the tests their mode names
                parse_line(page, name, line, home)
                parsed += 1
        if json_text is not None:
            if mode.startswith("test: "):
                continue  # the test that runs the block compares its sample
            assert mode == "run", f"{page} {name}: a JSON sample after a block that is not run"
            assert isinstance(out, (dict, list)), f"{page} {name}: the last command printed no JSON"
            assert keys_of(json.loads(json_text)) == keys_of(out), \
                f"{page} {name}: the JSON shown differs in shape from what the command prints now: " \
                f"{json.dumps(keys_of(out), sort_keys=True)}"
    for name, lang, body, _ in fenced_blocks(text):
        if name in modes and lang == "python" and modes[name] != "check":
            assert check_python_block(body), f"{page} {name}: no pibake call checked"
            parsed += 1
    assert ran or parsed or all(m.startswith("test: ") or m == "check" for m in modes.values())
    if page == "security.md":
        check_security_page_modes(text, home)


def check_security_page_modes(text, home):
    """The modes the security page's table states are the modes `pibake init` and `render` produce."""
    rows = re.findall(r"^\| `(secrets/[\w.-]+)` \| (0[0-7]{3}) \|", text, re.M)
    assert len(rows) == 9, rows
    cluster = home / "cluster"
    assert oct(os.stat(cluster / "secrets").st_mode & 0o777) == "0o700"
    for rel, mode in rows:
        assert oct(os.stat(cluster / rel).st_mode & 0o777) == "0o" + mode[1:], rel
    seeds = home / "seeds"
    assert oct(os.stat(seeds / "red01").st_mode & 0o777) == "0o700"
    for seed_file in (seeds / "red01").iterdir():
        assert oct(os.stat(seed_file).st_mode & 0o777) == "0o600", seed_file


# --------------------------------------------------------------------------- files and output samples


def check_cy_errors(sandbox):
    """The error shown for a bad network and a bad DNS address is the line pibake prints for such a file."""
    home, env = sandbox
    _, body = page_block("cluster-yaml.md", "cy-errors")
    (home / "cluster").mkdir()
    (home / "cluster" / "cluster.yaml").write_text(
        "name: red\nmanager: red00\nmanager_ip: 10.1.1.10\nnetwork: 10.1.1.0/33\ndns:\n- 10.1.1.1\n- 1.1.1\n")
    proc = subprocess.run([sys.executable, "-m", "pibake", "render", "--hostname", "red01", "--ip", "10.1.1.11",
                           "--out", "seeds"], cwd=home, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == body.strip()


def check_cy_plan(sandbox):
    """The plan.yaml shown is what `pibake render` records for red01, and pibake reads it back."""
    from pibake.plan import recorded_plan

    home, env = sandbox
    _, body = page_block("cluster-yaml.md", "cy-plan")
    run_line(["pibake", "init", "--manager", "red00", "--manager-ip", "10.1.1.10", "--network", "10.1.1.0/24"],
             0, home, env)
    run_line(["pibake", "render", "--hostname", "red01", "--ip", "10.1.1.11", "--out", "seeds"], 0, home, env)
    import yaml

    assert yaml.safe_load((home / "cluster" / "plan.yaml").read_text()) == yaml.safe_load(body)
    (node,) = recorded_plan(home / "cluster")
    assert (node.hostname, node.ip, node.role) == ("red01", "10.1.1.11", "worker")


def check_reg_serve_usage(sandbox):
    """Every option of the `registry serve` usage exists, and its --apply choices are the real ones."""
    _, body = page_block("registry.md", "reg-serve-usage")
    help_text = load_hooks().help_text(("registry", "serve"))
    assert body.startswith("pibake --cluster DIR registry serve ")
    for option in re.findall(r"--[a-z][a-z-]*", body.split("registry serve", 1)[1]):
        assert re.search(rf"{option}\b", help_text), f"registry serve has no {option}"
    from pibake.cli import cli

    apply = next(p for p in cli.commands["registry"].commands["serve"].params if p.name == "slurm_apply")
    (shown,) = re.findall(r"--apply ([a-z|]+)", body)
    assert shown.split("|") == list(apply.type.choices)


CHECKS = {"cy-errors": check_cy_errors, "cy-plan": check_cy_plan, "reg-serve-usage": check_reg_serve_usage}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_checked_blocks(name, sandbox):
    CHECKS[name](sandbox)


# --------------------------------------------------------------------------- the checks can fail


def test_parse_only_refuses_what_the_cli_refuses(tmp_path):
    assert parse_only(["lab", "up", "--workers", "3"], tmp_path).name == "up"
    with pytest.raises(click.NoSuchOption):
        parse_only(["lab", "up", "--no-such-option"], tmp_path)
    with pytest.raises(click.BadParameter):
        parse_only(["render", "--role", "king", "--out", "x"], tmp_path)
    with pytest.raises(click.UsageError):
        parse_only(["no-such-command"], tmp_path)


def test_python_blocks_are_checked_against_the_real_api():
    assert check_python_block("from pibake.verify import verify\nverify('cluster', bench=False)\n") == 1
    with pytest.raises(AssertionError, match="no_such"):
        check_python_block("from pibake import api\napi.no_such('x')\n")
    with pytest.raises(AssertionError, match="unexpected keyword"):
        check_python_block("from pibake.verify import verify\nverify('cluster', colour=True)\n")
    with pytest.raises(AssertionError):
        check_python_block("from pibake.verify import no_such_function\n")


def test_unmarked_command_blocks_are_found():
    text = "x\n\n```\npibake image list\n```\n\n```text\nok   registry\n```\n"
    (name, lang, body, _), (name2, lang2, body2, _) = fenced_blocks(text)
    assert name is None and COMMAND_LINE_RE.search(body) and not COMMAND_LINE_RE.search(body2)
    marked = "<!-- doc-test: a-b -->\n```json\n{}\n```\n```yaml\n# doc-test: c-d\nk: 1\n```\n"
    assert [(n, lang, b) for n, lang, b, _ in fenced_blocks(marked)] == [("a-b", "json", "{}\n"), ("c-d", "yaml", "k: 1\n")]


def test_commands_that_reach_other_machines_are_never_run():
    assert touches_network(["verify"]) and touches_network(["deploy", "--hosts", "red01"])
    assert touches_network(["image", "get", "x"]) and touches_network(["burn", "--device", "/dev/sdb"])
    assert touches_network(["registry", "serve"]) and touches_network(["registry", "accept", "red05"])
    assert touches_network(["lab", "up"]) and touches_network(["agent", "run", "--config", "agent.json"])
    assert not touches_network(["burn", "--image", "pi.img", "--output", "out/{hostname}.img"])
    assert not touches_network(["image", "list"]) and not touches_network(["token", "show"])
    # and no block this file runs holds one, nor anything but pibake (ssh, curl: only in the lab module)
    for page, modes in BLOCKS.items():
        for name, lines, _ in doc_blocks((DOCS / page).read_text()):
            if modes.get(name) == "run":
                for line in lines:
                    argv, _ = split_line(line)
                    assert argv[0] == "pibake" and not touches_network(argv[1:]), f"{page} {name}: {line}"


def test_a_json_sample_of_another_shape_is_caught():
    assert keys_of({"a": [{"b": 1}]}) != keys_of({"a": [{"c": 1}]})
    assert keys_of([{"hostname": "x", "ip": "y"}]) == keys_of([{"hostname": "z", "ip": "w"}])
