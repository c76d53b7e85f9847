"""Atomic files and run directories: nothing half-written, no earlier result lost."""

from __future__ import annotations

import json

import pytest

from bayeslora.io import atomic_path, read_json, write_dir_atomic, write_json_atomic
from bayeslora.runs import RunExistsError, new_run_dir


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"accuracy": 0.5})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"accuracy": 0.')
        raise RuntimeError("killed mid-write")
    assert read_json(target) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_corrupt_json_is_named(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": ')
    with pytest.raises(ValueError, match=r"x\.json is not valid JSON"):
        read_json(path)


def test_directory_is_replaced_only_after_success(tmp_path):
    target = tmp_path / "adapter"
    write_dir_atomic(target, lambda d: (d / "w").write_text("old"))

    def fail(d):
        (d / "w").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir_atomic(target, fail)
    assert (target / "w").read_text() == "old"
    write_dir_atomic(target, lambda d: (d / "w").write_text("new"))
    assert (target / "w").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_run_dir_is_refused_then_replaced_safely(tmp_path):
    run = tmp_path / "run"
    with new_run_dir(run) as path:
        (path / "result").write_text("first")
    with pytest.raises(RunExistsError, match="--overwrite"), new_run_dir(run):
        pass
    # a failed overwrite puts the earlier run back
    with pytest.raises(RuntimeError), new_run_dir(run, overwrite=True) as path:
        (path / "result").write_text("second")
        raise RuntimeError("NaN loss")
    assert (run / "result").read_text() == "first"
    failed = [p for p in tmp_path.iterdir() if p.name.startswith("run.failed-")]
    assert len(failed) == 1 and (failed[0] / "result").read_text() == "second"
    with new_run_dir(run, overwrite=True) as path:
        (path / "result").write_text("third")
    assert (run / "result").read_text() == "third"
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir()))


@pytest.mark.parametrize("wrote, resumable, left", [(False, False, "nothing"), (True, False, "failed"),
                                                    (True, True, "kept")])  # fmt: skip
def test_a_failed_new_run_never_blocks_the_next_attempt(tmp_path, wrote, resumable, left):
    """Empty: removed; with files: moved aside as <name>.failed-<time>; with a checkpoint: kept for --resume."""
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), new_run_dir(run, resumable=lambda path: resumable) as path:
        if wrote:
            (path / "train_log.jsonl").write_text("{}\n")
        raise KeyboardInterrupt
    failed = [p for p in tmp_path.iterdir() if p.name.startswith("run.failed-")]
    assert run.exists() == (left == "kept")
    assert len(failed) == (left == "failed")
    if left != "kept":
        with new_run_dir(run) as path:  # the next attempt
            (path / "result").write_text("ok")
