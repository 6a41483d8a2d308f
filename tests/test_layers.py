"""The layers pibake keeps (core <- bake, registry <- orchestration <- cli; the agents on the nodes apart) as
contracts over every import of the source, function-local ones included (tests/layers.py reads them with ast,
so an import cannot hide inside a function). A new module falls into its layer by its name. scripts/test runs
this file first, next to ruff."""

import ast
import sys

import re

import pytest

from tests import layers

# The core: data, validation, secrets, plans, the subprocess seam. Imports nothing above it.
CORE = ["pibake.errors", "pibake.model", "pibake.cluster", "pibake.plan", "pibake.secrets", "pibake.locks",
        "pibake.run", "pibake.files", "pibake.fields", "pibake.tables", "pibake.layout", "pibake.sensors_model", "pibake.rules_model", "pibake.mqtt",
        "pibake.templates"]
LAYERS = {  # layer: module prefixes; what no prefix names is orchestration (api, deploy, verify, jobs, lab, ...)
    "core": CORE,
    "bake": ["pibake.bake"],
    "registry": ["pibake.registry"],
    "firstboot": ["pibake.firstboot"],
    "cli": ["pibake.cli", "pibake.__main__"],
}
# Which layers each layer may import. firstboot imports nothing of pibake, so anyone may read it (the seed
# ships the agent's source). The package itself (pibake/__init__.py: __version__) is core.
MAY_IMPORT = {
    "core": {"core", "firstboot"},
    "bake": {"core", "bake", "firstboot"},
    "registry": {"core", "registry", "firstboot"},
    "orchestration": {"core", "bake", "registry", "firstboot", "orchestration"},
    "cli": {"cli"},
    "firstboot": {"firstboot"},
}
# The registry's REST and web handlers reach orchestration (jobs, switches, sensors) through pibake.api
# only, imported inside the handler or factory that needs it: importing the registry loads none of it.
REGISTRY_TO_API = "pibake.api"
CLI_MAY_USE = {"pibake", "pibake.api"}  # the CLI is a shell over pibake.api (pibake: __version__)

STDLIB = set(sys.stdlib_module_names)
THIRD_PARTY = {  # layer or module prefix: the outside packages it may import besides the standard library
    "pibake.firstboot": {"psutil"},
    "pibake.cli": {"click", "rich"},
}
SENSOR_LIBS = {"paho", "smbus2", "bme280", "bme680", "RPi"}  # the sensor agent's drivers and MQTT client


def layer_of(module):
    if module == "pibake":
        return "core"
    for layer, prefixes in LAYERS.items():
        if layers.within(module, prefixes):
            return layer
    return "orchestration"


def violations(imports):
    """One line per import of a pibake module that its layer may not import."""
    out = []
    for imp in imports:
        if not layers.within(imp.target, ["pibake"]) or layers.within(imp.target, [imp.module]):
            continue
        source, target = layer_of(imp.module), layer_of(imp.target)
        if source == "cli":
            allowed = target == "cli" or imp.target in CLI_MAY_USE
        elif source == "registry" and imp.target == REGISTRY_TO_API:
            allowed = imp.local
        else:
            allowed = target in MAY_IMPORT[source]
        if not allowed:
            out.append(f"{imp.module}:{imp.line} ({source}) imports {imp.target} ({target}): {imp.text}")
    return out


def outside_packages(imports):
    """Imports of packages outside pibake and the standard library where a layer allows none but a few."""
    siblings = {path.stem for path in layers.package_dirs()["pibake.firstboot"].glob("*.py")}
    out = []
    for imp in imports:
        top = imp.target.split(".")[0]
        if top in STDLIB or top == "pibake":
            continue
        for prefix, allowed in THIRD_PARTY.items():
            if not layers.within(imp.module, [prefix]):
                continue
            if "sensor" in imp.module.rpartition(".")[2]:
                allowed = allowed | SENSOR_LIBS | siblings  # the sensor files ship side by side on a node
            if top not in allowed:
                out.append(f"{imp.module}:{imp.line} imports {imp.target}: {imp.text}")
    return out


@pytest.fixture(scope="module")
def imports():
    return layers.all_imports()


def test_every_layer_imports_only_what_is_below_it(imports):
    assert violations(imports) == []


def test_the_agents_and_the_cli_use_only_their_outside_packages(imports):
    assert outside_packages(imports) == []


def test_deploy_defers_imports_only_for_start_up(imports):
    """pibake.deploy imports at the top, except what would slow every CLI start (ClusterShell's engine,
    requests), each with its reason on the line."""
    local = [i for i in imports if i.local and layers.within(i.module, ["pibake.deploy"])]
    assert local, "the reader finds deploy's deferred imports"
    assert [f"{i.module}:{i.line}: {i.text}" for i in local if "# start-up:" not in i.text] == []


def test_every_function_local_import_says_why_on_its_line(imports):
    """An import inside a function hides a dependency (issue 12): it stays only for start-up time, an optional
    package or the registry's way to pibake.api, and says which in a comment on its line."""
    def reason(text):  # the comment without a linter's pragma: what a reader is told
        comment = text.partition("#")[2]
        return re.sub(r"(pylint: *disable=\S+|noqa(: *[A-Z0-9, ]+)?)", "", comment).strip(" -:")
    assert [f"{i.module}:{i.line}: {i.text}" for i in imports if i.local and len(reason(i.text).split()) < 3] == []


def test_the_remote_programs_use_only_the_standard_library():
    folder = layers.package_dirs()["pibake.deploy"] / "remote"
    programs = sorted(folder.glob("*.py"))
    assert programs
    for path in programs:
        found = layers.imports_of(f"remote.{path.stem}", path, {})
        assert [i.text for i in found if i.target.split(".")[0] not in STDLIB] == [], path.name


@pytest.mark.parametrize("module, target, local, broken", [
    ("pibake.cluster", "pibake.bake.images", True, True),  # core reaching up, even inside a function
    ("pibake.bake.seed", "pibake.cluster", False, False),
    ("pibake.registry.app", "pibake.jobs", False, True),  # orchestration only through pibake.api ...
    ("pibake.registry.app", "pibake.api", True, False),  # ... inside the function that needs it
    ("pibake.registry.web", "pibake.api", False, True),
    ("pibake.cli.deploy_cmd", "pibake.deploy", True, True),
    ("pibake.cli.deploy_cmd", "pibake.api", False, False),
    ("pibake.firstboot.agent", "pibake.errors", True, True),
    ("pibake.deploy.steps", "pibake.cli", False, True),
    ("pibake.api", "pibake.registry.service", False, False),
])
def test_the_contract_catches_what_it_should(module, target, local, broken):
    imp = layers.Import(module, target, 1, local, f"import {target}")
    assert bool(violations([imp])) is broken


def test_the_reader_sees_function_local_and_relative_imports(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("import os\nfrom . import sibling\n\ndef f():\n    from ..errors import PibakeError\n")
    found = layers.imports_of("pibake.deploy.mod", path, {"pibake.deploy.sibling"})
    assert [(i.target, i.local) for i in found] == [("os", False), ("pibake.deploy.sibling", False),
                                                    ("pibake.errors", True)]


def test_the_core_reads_the_same_image_families_as_bake():
    """pibake.cluster reads bake/catalog.yaml's families itself (the cycle cluster -> bake.images is gone);
    bake's full reader must agree."""
    from pibake.bake.images import load_catalog
    from pibake.cluster import image_catalog

    assert image_catalog() == {name: entry.family for name, entry in load_catalog().items()}


def exception_classes():
    """(module, class, line) of every class whose bases name an exception, outside the agents on the nodes
    (firstboot: stdlib-only files of their own)."""
    found = []
    for module, path in layers.modules().items():
        if layers.within(module, ["pibake.firstboot"]):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(_names_exception(base) for base in node.bases):
                found.append((module, node.name, node.lineno))
    return found


def _names_exception(base):
    name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
    return name.endswith(("Error", "Exception")) or name in {"Exception", "BaseException"}


# Exceptions that never reach a user: each is caught inside its own module and turned into something else.
INTERNAL_EXCEPTIONS = {
    "pibake.deploy.steps.StepFailed",  # the runner makes it the host's failed result row
    "pibake.bake.allocation.Unsupported",  # the partition is then written whole
    "pibake.bake.lint._Deprecated",  # marks cloud-init's `deprecated` keyword: a lint warning
    "pibake.bake.lint.DeprecationError",  # the jsonschema error class carrying that marker
}


def test_every_error_a_user_can_see_lives_in_pibake_errors():
    """One error family (issue 12): the CLI prints a PibakeError as one line; a class elsewhere would be
    found only by reading every module."""
    from pibake import errors

    outside = [f"{m}:{line} class {name}" for m, name, line in exception_classes()
               if m != "pibake.errors" and f"{m}.{name}" not in INTERNAL_EXCEPTIONS]
    assert outside == []
    family = [name for m, name, _ in exception_classes() if m == "pibake.errors"]
    assert len(family) > 20
    assert all(issubclass(getattr(errors, name), errors.PibakeError) for name in family)
