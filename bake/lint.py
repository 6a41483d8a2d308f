"""Lint a seed with cloud-init's own JSON schema plus pibake's checks.

STUB: being built (issue 2).
"""

from pibake.errors import NotBuiltError


def lint_seed(seed):
    """Return a ``LintReport`` (errors, warnings) for a ``pibake.model.Seed``."""
    raise NotBuiltError("seed lint")
