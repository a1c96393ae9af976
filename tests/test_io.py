"""The bounded reader every user-file reader goes through (manifests, rule files, JSONL)."""

from __future__ import annotations

import os

import pytest

from vlpet_fx.io import NotRegularFile, read_at_most


def test_read_at_most_returns_the_bytes_up_to_the_limit_and_none_past_it(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 10)
    assert read_at_most(f, 10) == b"x" * 10
    assert read_at_most(f, 9) is None


def test_read_at_most_refuses_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(NotRegularFile):
        read_at_most("/dev/null", 10)
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFile):  # opened without waiting for a writer
        read_at_most(fifo, 10)


def test_sha256_file_is_hashlib_of_the_bytes(tmp_path):
    import hashlib

    from vlpet_fx.io import sha256_file

    data = bytes(range(256)) * 9000  # more than one 1 MiB piece
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
