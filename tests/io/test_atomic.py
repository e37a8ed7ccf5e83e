"""Atomic writes leave files and folders with the user's umask mode, not mkstemp's 0600 / mkdtemp's 0700."""

import os
import stat

import pytest

from omnijax.io.atomic import atomic_path, atomic_write


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_file_and_folder_get_umask_mode(tmp_path, umask_022):
    f = atomic_write(str(tmp_path / "a.json"), "{}")
    assert _mode(f) == 0o644
    with atomic_path(str(tmp_path / "out"), directory=True) as tmp:
        with open(os.path.join(tmp, "x.txt"), "w") as fh:
            fh.write("x")
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "x.txt") == 0o644
    os.umask(0o077)  # a private umask stays private
    assert _mode(atomic_write(str(tmp_path / "b.bin"), b"x")) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin", "out"]  # no temporaries left
