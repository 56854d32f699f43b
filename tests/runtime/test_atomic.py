import pytest

from brainldm.runtime.atomic import atomic_path, write_text_atomic


def test_success_replaces_and_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_directories(tmp_path):
    target = tmp_path / "bundle"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("x")
    assert (target / "a").read_text() == "x"
