"""Request bodies are checked against the schemas of ``openapi.json``, the document the registry publishes.

One home for the REST contract: what the document says a body may be is what the server accepts. The
server's own code checks only what a schema cannot say (a host list ClusterShell cannot expand, the
pairing of ssh options). ``x-problem`` in a schema is the one-line message a client sees when a value
breaks it (``x-anyOf-problem`` for an ``anyOf`` of the object itself). ``x-field`` names the
``pibake.fields`` validator whose rule the schema states (its pattern is that field's ``pattern``, a test
holds them equal) and whose one message the client gets.
"""

import functools
import json
from importlib import resources

import jsonschema

from pibake import fields


@functools.cache
def _document_text():
    return resources.files("pibake.registry").joinpath("openapi.json").read_text(encoding="utf-8")


def openapi_document():
    """The OpenAPI 3.0 document (a fresh copy: callers may change it)."""
    return json.loads(_document_text())


def _json_schema(node):
    """OpenAPI 3.0 schema objects as JSON Schema draft 4: ``nullable: true`` adds ``null`` to the type
    (the only 3.0 keyword draft 4 reads differently; a boolean exclusiveMinimum is draft 4's own)."""
    if isinstance(node, list):
        return [_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def _validator(name):
    components = _json_schema(openapi_document()["components"])
    schema = {"$ref": f"#/components/schemas/{name}", "components": components}
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


def problems(name, body):
    """How ``body`` breaks the document's schema ``name``: one ``"field: what to fix"`` line per field, in the
    schema's field order; empty when it conforms."""
    validator = _validator(name)
    order = list(validator.schema["components"]["schemas"][name].get("properties", {}))
    found = {}
    for error in validator.iter_errors(body):
        for field, message in _describe(error):
            found.setdefault(field, message)

    def position(field):
        head = field.split(".")[0].split("[")[0]
        return order.index(head) if head in order else len(order)
    return [f"{field}: {message}" if field else message for field, message in
            sorted(found.items(), key=lambda item: (position(item[0]), item[0]))]


def _describe(error):
    """[(field, message)] for one jsonschema error, worded for the client."""
    field = _field(error.absolute_path)
    schema, kind = error.schema, error.validator
    properties = schema.get("properties", {})
    if kind == "required":  # one error per missing name, each naming it only in its English message
        return [(_join(field, name), properties.get(name, {}).get("x-problem", "is required"))
                for name in error.validator_value if name not in error.instance]
    if kind == "additionalProperties":
        unknown = sorted(set(error.instance) - set(properties))
        return [(field, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(properties))}")]
    if kind == "type" and schema.get("type") == "object" and "x-problem" not in schema:
        return [(field, "must be an object" if field else "the request body must be a JSON object")]
    if "x-field" in schema:  # a field pibake validates everywhere: its one message (pibake.fields)
        message = fields.FIELDS[schema["x-field"]].problem(error.instance) or schema.get("x-problem")
    else:
        message = schema.get(f"x-{kind}-problem") or schema.get("x-problem") or error.message[:200]
    if ": " in message and not field:  # an object-level message that names its field itself
        field, message = message.split(": ", 1)
    return [(field, message)]


def _field(path):
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(parent, name):
    return f"{parent}.{name}" if parent else name
