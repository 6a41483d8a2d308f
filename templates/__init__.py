"""cloud-init templates per role (package data, loaded with importlib.resources / Jinja2 PackageLoader)."""
