"""A temporary directory that other users (www-data, nobody, nginx's workers) can reach.

pytest's tmp_path lives under a 0700 directory, so children that run as another user can
neither exec scripts there nor connect to sockets there. Import the fixture into a test
module with `from support.pubdir import pub`."""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import pytest


@pytest.fixture
def pub():
    d = tempfile.mkdtemp(prefix="spawnd-pub-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
