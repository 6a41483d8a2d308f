"""MkDocs hooks for the pibake manual (mkdocs.yml: ``hooks: [scripts/docs_hooks.py]``).

Two pages are generated at build time, so they cannot drift from the code:

* ``reference/cli.md``: the ``--help`` text of every pibake command, taken from click itself
  (``pibake [CMD...] --help`` through click's test runner, as on an 80-column terminal);
* ``rest-reference.md``: the REST API, rendered from ``registry/openapi.json``.

Pages under docs/ that the nav in mkdocs.yml does not list are appended under "More", so a page a
helper adds later is still reachable (and ``mkdocs build --strict`` does not depend on the nav being
updated in the same commit).

``tests/test_docs.py`` imports this file to compare the generated text with ``pibake CMD --help``.
"""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATED = {"reference/cli.md", "rest-reference.md"}
# Pages the nav names in their place before they are written (other parts of the project add them);
# until a file exists its nav entry is dropped, so a strict build does not fail on it.
PENDING_PAGES = {"deploy.md", "verify.md", "rest.md", "report/deploy.md", "report/lab.md", "report/verify.md",
                 "sensors-node.md", "mqtt.md", "report/sensors.md"}

# --------------------------------------------------------------------------- CLI reference


def command_paths():
    """[("init",), ("image", "list"), ...]: every command and subcommand, in the order --help lists them."""
    import click

    from pibake.cli import cli

    paths = []

    def walk(cmd, path, parent):
        ctx = click.Context(cmd, info_name=path[-1] if path else "pibake", parent=parent)
        if path:
            paths.append(tuple(path))
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not getattr(sub, "hidden", False):
                    walk(sub, [*path, name], ctx)

    walk(cli, [], None)
    return paths


def help_text(path):
    """What ``pibake PATH... --help`` prints (80 columns), via click's runner."""
    from click.testing import CliRunner

    from pibake.cli import cli

    # terminal_width=78: what an 80-column terminal gets (click formats to columns - 2)
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="pibake", terminal_width=78)
    if result.exit_code != 0:
        raise RuntimeError(f"pibake {' '.join(path)} --help exited {result.exit_code}: {result.output}")
    return result.output


def cli_reference_markdown():
    lines = [
        "# Command reference",
        "",
        "Generated when the manual is built, from the `--help` of every command (click itself), so it",
        "always says what this version of `pibake` accepts. Examples and `--json` outputs:",
        "[Commands](../commands.md).",
        "",
        "## pibake",
        "",
        "```text",
        help_text(()).rstrip("\n"),
        "```",
        "",
    ]
    for path in command_paths():
        lines += [
            f"{'#' * min(len(path) + 2, 6)} pibake {' '.join(path)}",
            "",
            "```text",
            help_text(path).rstrip("\n"),
            "```",
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- REST reference


def _ref_name(schema):
    ref = schema.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref else None


def _schema_brief(schema):
    if not schema:
        return ""
    name = _ref_name(schema)
    if name:
        return f"[{name}](#schema-{name.lower()})"
    kind = schema.get("type", "")
    if kind == "array":
        return f"array of {_schema_brief(schema.get('items', {}))}"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    fmt = schema.get("format")
    return f"{kind} ({fmt})" if fmt else (kind or "any")


def _cell(text):
    """Text from the OpenAPI file as one Markdown table cell (no raw HTML: `<id>` must stay visible)."""
    parts = str(text or "").split("`")
    for i in range(0, len(parts), 2):  # outside `code spans` only; inside them Markdown shows < as it is
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|").replace("\n", " ")


def rest_reference_markdown(spec=None):
    if spec is None:
        spec = json.loads((REPO / "registry" / "openapi.json").read_text())
    info = spec.get("info", {})
    base = (spec.get("servers") or [{"url": ""}])[0]["url"]
    schemes = spec.get("components", {}).get("securitySchemes", {})
    lines = [
        "# REST API reference",
        "",
        f"Generated when the manual is built from `registry/openapi.json` ({info.get('title', '')}, "
        f"version {info.get('version', '')}); the registry serves the same document at "
        f"`{base}/openapi.json`. How to use it: [Registry](registry.md).",
        "",
        _cell(info.get("description", "")),
        "",
        "## Authentication",
        "",
        "| scheme | how | who |",
        "|---|---|---|",
    ]
    for name, scheme in schemes.items():
        how = scheme.get("scheme", scheme.get("type", ""))
        lines.append(f"| `{name}` | HTTP {how} | {_cell(scheme.get('description'))} |")
    lines += ["", "## Endpoints", "", "| method | path | summary | auth |", "|---|---|---|---|"]
    ops = []
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((path, method, op))
    for path, method, op in ops:
        auth = ", ".join(f"`{k}`" for sec in op.get("security", spec.get("security", [])) for k in sec) or "none"
        lines.append(f"| {method.upper()} | `{base}{path}` | {_cell(op.get('summary'))} | {auth} |")
    for path, method, op in ops:
        lines += ["", f"### {method.upper()} {base}{path}", "", _cell(op.get("summary")), ""]
        if op.get("description"):
            lines += [_cell(op["description"]), ""]
        params = op.get("parameters", []) + methods_params(spec, path)
        if params:
            lines += ["| parameter | in | type | description |", "|---|---|---|---|"]
            for p in params:
                lines.append(f"| `{p.get('name')}` | {p.get('in')} | {_schema_brief(p.get('schema', {}))} | "
                             f"{_cell(p.get('description'))} |")
            lines.append("")
        body = op.get("requestBody", {}).get("content", {})
        for ctype, content in body.items():
            lines += [f"Request body ({ctype}): {_schema_brief(content.get('schema', {}))}", ""]
        lines += ["| status | meaning | body |", "|---|---|---|"]
        for status, resp in op.get("responses", {}).items():
            schema = next(iter(resp.get("content", {}).values()), {}).get("schema", {})
            lines.append(f"| {status} | {_cell(resp.get('description'))} | {_schema_brief(schema)} |")
    lines += ["", "## Schemas"]
    for name, schema in spec.get("components", {}).get("schemas", {}).items():
        lines += ["", f'<h3 id="schema-{name.lower()}">{name}</h3>', ""]
        if schema.get("description"):
            lines += [_cell(schema["description"]), ""]
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        if props:
            lines += ["| field | type | required | description |", "|---|---|---|---|"]
            for field, sub in props.items():
                lines.append(f"| `{field}` | {_schema_brief(sub)} | {'yes' if field in required else ''} | "
                             f"{_cell(sub.get('description'))} |")
        else:
            lines.append(f"Type: {_schema_brief(schema)}")
    return "\n".join(lines) + "\n"


def methods_params(spec, path):
    """Path-level parameters (shared by every method of ``path``)."""
    return list(spec.get("paths", {}).get(path, {}).get("parameters", []))


# --------------------------------------------------------------------------- the report's index

REPORTS_MARKER = "<!-- generated-reports -->"


def report_pages_markdown(docs_dir):
    """A table of the report pages bench/ scripts wrote under docs/report/ (all but index.md)."""
    rows = ["| report | produced by | run |", "|---|---|---|"]
    pages = sorted(p for p in (Path(docs_dir) / "report").glob("*.md") if p.name != "index.md")
    for page in pages:
        text = page.read_text()
        title = next((ln[2:].strip() for ln in text.splitlines() if ln.startswith("# ")), page.stem)
        script = re.search(r"`(bench/[\w.-]+)", text)
        when = re.search(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2})", text)
        rows.append(f"| [{title}]({page.name}) | {'`' + script.group(1) + '`' if script else 'not stated'} | "
                    f"{when.group(1) + ' ' + when.group(2) + ' UTC' if when else 'not stated'} |")
    if not pages:
        return "No report page has been generated yet: run the scripts above."
    return "\n".join(rows)


# --------------------------------------------------------------------------- mkdocs hooks


def _nav_pages(nav):
    for item in nav or []:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for value in item.values():
                if isinstance(value, str):
                    yield value
                else:
                    yield from _nav_pages(value)


def unlisted_pages(docs_dir, nav):
    """Markdown pages under docs_dir that the nav does not list (generated pages count as listed)."""
    listed = set(_nav_pages(nav)) | GENERATED
    found = sorted(p.relative_to(docs_dir).as_posix() for p in Path(docs_dir).rglob("*.md"))
    return [p for p in found if p not in listed]


def drop_pending(nav, docs_dir):
    """The nav without entries for PENDING_PAGES that do not exist yet (and without emptied sections)."""
    out = []
    for item in nav or []:
        if isinstance(item, dict):
            (title, value), = item.items()
            if isinstance(value, list):
                value = drop_pending(value, docs_dir)
                if value:
                    out.append({title: value})
                continue
            if value in PENDING_PAGES and not (Path(docs_dir) / value).is_file():
                continue
        elif isinstance(item, str) and item in PENDING_PAGES and not (Path(docs_dir) / item).is_file():
            continue
        out.append(item)
    return out


def on_config(config, **kwargs):
    if config["nav"] is not None:
        config["nav"] = drop_pending(config["nav"], config["docs_dir"])
    extra = unlisted_pages(config["docs_dir"], config["nav"])
    if extra and config["nav"] is not None:
        config["nav"].append({"More": extra})
    return config


def on_page_markdown(markdown, page, config, files, **kwargs):
    if page.file.src_uri == "report/index.md" and REPORTS_MARKER in markdown:
        return markdown.replace(REPORTS_MARKER, report_pages_markdown(config["docs_dir"]))
    return markdown


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    files.append(File.generated(config, "reference/cli.md", content=cli_reference_markdown()))
    files.append(File.generated(config, "rest-reference.md", content=rest_reference_markdown()))
    return files
