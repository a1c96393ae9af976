"""The bounded reader every user-file reader goes through (manifests, rule files, JSONL, images, .pt2)."""

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


def test_read_at_most_memory_follows_the_file_not_the_limit(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc" * 1000)
    # one read of limit + 1 bytes would ask for a terabyte up front (MemoryError); pieces of 1 MiB do not
    assert read_at_most(f, 1 << 40) == b"abc" * 1000
    big = tmp_path / "big"
    big.write_bytes(b"y" * ((1 << 20) * 2 + 5))  # more than one piece
    assert read_at_most(big, (1 << 20) * 2 + 5) == b"y" * ((1 << 20) * 2 + 5)
    assert read_at_most(big, (1 << 20) * 2 + 4) is None


@pytest.mark.parametrize("case, kind", [("missing", "missing"), ("dir", "directory"), ("fifo", "special"),
                                        ("big", "too_large"), ("nul", "unreadable")])
def test_read_user_file_names_each_problem_before_reading(tmp_path, case, kind):
    from vlpet_fx.io import FileProblem, read_user_file

    path = {"missing": tmp_path / "none", "dir": tmp_path, "fifo": tmp_path / "p", "big": tmp_path / "b",
            "nul": str(tmp_path / "a\x00b")}[case]
    if case == "fifo":
        os.mkfifo(path)
    if case == "big":
        path.write_bytes(b"z" * 11)
    with pytest.raises(FileProblem) as err:
        read_user_file(path, 10)
    assert err.value.kind == kind
    if kind == "too_large":
        assert (err.value.size, err.value.limit) == (11, 10)
    if kind == "special":
        import stat

        assert stat.S_ISFIFO(err.value.mode)


def test_read_user_file_refuses_a_file_that_grows_past_the_limit_after_the_check(tmp_path, monkeypatch):
    import vlpet_fx.io as vio

    f = tmp_path / "f"
    f.write_bytes(b"x" * 5)
    real_check = vio.check_user_file

    def check_then_grow(path, limit):
        real_check(path, limit)
        f.write_bytes(b"x" * 50)  # written between the check and the read

    monkeypatch.setattr(vio, "check_user_file", check_then_grow)
    with pytest.raises(vio.FileProblem) as err:
        vio.read_user_file(f, 10)
    assert err.value.kind == "grew"
    assert vio.read_user_file(tmp_path / "f", 100) == b"x" * 50
