"""The run folder: what a fit may delete, its lock, its fingerprint and its portable paths
(issue "reliability 3": each reproduction, shrunk)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import yaml

from conftest import TINY, make_image_folder
from layerwise import rundir
from layerwise.cli import main
from layerwise.config import RunConfig
from layerwise.rundir import RunDir, data_fingerprint, remove_own_temp_files, writer_lock


def test_only_the_run_files_own_temp_files_are_removed(tmp_path):
    (tmp_path / "last").mkdir()
    (tmp_path / "src").mkdir()
    ours = [tmp_path / "last" / ".state.pt.abc123.tmp", tmp_path / ".config.yaml.x9.tmp"]
    theirs = [tmp_path / ".notes.tmp", tmp_path / "src" / ".draft.tmp", tmp_path / "victim" / ".metrics.jsonl.q.tmp"]
    for p in ours + theirs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert sorted(remove_own_temp_files(tmp_path)) == sorted(ours)
    assert all(p.exists() for p in theirs) and not any(p.exists() for p in ours)


def test_a_fit_in_a_project_folder_deletes_none_of_its_files(data, tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    mine = [proj / ".notes.tmp", proj / "src" / ".draft.tmp"]
    for p in mine:
        p.write_text("mine")
    assert main(["fit", str(data), *TINY, "--strategy", "head", "--epochs", "1", "--out", str(proj)]) == 0
    assert all(p.read_text() == "mine" for p in mine)


def test_a_refused_fit_touches_nothing_in_the_run_below_it(data, tmp_path):
    outer = tmp_path / "vt"
    assert main(["fit", str(data), *TINY, "--strategy", "head", "--epochs", "1", "--out", str(outer)]) == 0
    victim_tmp = outer / "victim" / "last" / ".state.pt.live.tmp"  # a writer below, mid-write
    victim_tmp.parent.mkdir(parents=True)
    victim_tmp.write_text("partial")
    assert main(["fit", str(data), *TINY, "--strategy", "head", "--epochs", "1", "--out", str(outer)]) == 2
    assert victim_tmp.read_text() == "partial"


def test_a_loser_never_unlinks_the_winners_lock(tmp_path):
    run = tmp_path / "new"
    inside = threading.Event()
    release = threading.Event()

    def winner():
        with writer_lock(run):
            inside.set()
            release.wait(10)

    th = threading.Thread(target=winner)
    th.start()
    assert inside.wait(10)
    lock = run / rundir.LOCK
    inode = lock.stat().st_ino
    with pytest.raises(rundir.RunLockedError):
        with writer_lock(run):
            pass
    assert lock.exists() and lock.stat().st_ino == inode  # still the file the winner holds
    with pytest.raises(rundir.RunLockedError):  # so a third writer is refused too
        with writer_lock(run):
            pass
    release.set()
    th.join()


def test_a_fit_stopped_before_its_config_is_written_can_start_again(data, tmp_path, monkeypatch):
    from layerwise import engine

    run = tmp_path / "run"

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C after the probe wrote its files, before config.yaml

    monkeypatch.setattr(engine, "record_probe", interrupted)
    assert main(["fit", str(data), *TINY, "--strategy", "auto", "--epochs", "1", "--out", str(run)]) == 130
    assert (run / rundir.PROBE_HEAD).exists() and not (run / rundir.CONFIG).exists()
    monkeypatch.undo()
    assert main(["fit", str(data), *TINY, "--strategy", "auto", "--epochs", "1", "--out", str(run)]) == 0


def test_the_probe_head_is_recorded_relative_to_the_run_so_a_moved_run_resumes(data, tmp_path):
    run = tmp_path / "run"
    assert main(["fit", str(data), *TINY, "--strategy", "auto", "--epochs", "2", "--no-race", "--out", str(run)]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["probe_head"] == rundir.PROBE_HEAD  # not an absolute path into this folder
    moved = tmp_path / "elsewhere"
    run.rename(moved)
    assert main(["fit", "--resume", str(moved), "--epochs", "3"]) == 0


def test_a_config_from_another_run_carries_none_of_its_evidence(data, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["fit", str(data), *TINY, "--strategy", "auto", "--epochs", "1", "--out", str(first)]) == 0
    capsys.readouterr()
    second = tmp_path / "second"
    assert main(["fit", str(data), "--config", str(first / "config.yaml"), "--out", str(second)]) == 0
    assert "auto: linear probe on frozen features" in capsys.readouterr().out  # measured again, on this data
    cfg = yaml.safe_load((second / "config.yaml").read_text())
    assert cfg["probe_head"] == rundir.PROBE_HEAD and (second / rundir.PROBE_HEAD).exists()


def test_the_fingerprint_walks_no_symlink_cycle(tmp_path):
    root = make_image_folder(tmp_path / "loop", classes=2, per_class=3)
    classes = sorted(d for d in (root / "train").iterdir())
    os.symlink("..", classes[0] / "up")
    os.symlink("..", classes[1] / "up")
    os.symlink("/", classes[1] / "disk")
    out: list[str] = []
    walker = threading.Thread(target=lambda: out.append(data_fingerprint(str(root))), daemon=True)
    walker.start()
    walker.join(60)  # it walked the disk for minutes before
    assert not walker.is_alive() and len(out[0]) == 64


def test_the_fingerprint_covers_the_images_a_csv_lists(tmp_path):
    img = make_image_folder(tmp_path / "imgs", classes=2, per_class=2, split=False)
    files = sorted(img.rglob("*.png"))
    csv = tmp_path / "data.csv"
    csv.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    before = data_fingerprint(str(csv))
    os.utime(files[0], ns=(1, 1))  # the image replaced, the CSV untouched
    assert data_fingerprint(str(csv)) != before


def test_settings_that_change_auto_or_the_weights_are_in_the_fingerprint(tmp_path):
    base = rundir.run_fingerprint(RunConfig(strategy="auto"))["config"]
    assert rundir.run_fingerprint(RunConfig(strategy="auto", probe_skill=0.95))["config"] != base
    assert rundir.run_fingerprint(RunConfig(strategy="auto", bn_shift=0.5))["config"] != base
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"one")
    a = rundir.run_fingerprint(RunConfig(weights=str(w)))
    w.write_bytes(b"two")
    assert rundir.run_fingerprint(RunConfig(weights=str(w))) != a


def test_rundir_names_every_file_once():
    run = RunDir(Path("r"))
    assert run.metrics == Path("r") / rundir.METRICS and run.state == Path("r") / rundir.STATE
    with pytest.raises(AttributeError, match="no file 'metrix'"):
        run.metrix  # noqa: B018


def test_a_model_json_nested_thousands_deep_is_a_clear_error(tmp_path):
    (tmp_path / rundir.MODEL).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(rundir.RunFileError, match="nests too deeply"):
        rundir.read_model_info(tmp_path)


@pytest.mark.parametrize("kind", ["a file", "below a file"])
def test_an_out_that_cannot_be_a_folder_is_a_clear_error(data, tmp_path, capsys, kind):
    blocker = tmp_path / "f"
    blocker.write_text("mine")
    out = blocker if kind == "a file" else blocker / "run"
    assert main(["fit", str(data), *TINY, "--strategy", "head", "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {str(out)!r}" in err and "Traceback" not in err and blocker.read_text() == "mine"
