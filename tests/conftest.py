import os
import shutil

import pytest


def needs_root(reason="needs root"):
    return pytest.mark.skipif(os.geteuid() != 0, reason=reason)


def needs_program(*names):
    missing = [n for n in names if not (shutil.which(n) or shutil.which(n, path="/usr/sbin:/sbin"))]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")
