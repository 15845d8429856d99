"""A run directory is ncfast's only by its marker, and nothing else in it is ever changed
(issue 19): foreign files, links, other processes' temporary names, damaged checkpoints, an
analysis that is interrupted or races a training. docs/bad_inputs.md lists the answers."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from ncfast.paper.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ncfast.paper.rundir import (
    RUN_FORMAT,
    RunDirectory,
    RunDirectoryError,
    is_run_directory,
    run_marker,
)
from tests.helpers.cli_runs import RUN, assert_clean_error, copy_run, invoke, posix_only

COMPAT_RUN = Path(__file__).resolve().parents[1] / "data" / "run_v0_1_0"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run stopped after epoch 1 of 2, with its analysis."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    result = invoke(*RUN, "--stop-after", "1", "--out", out)
    assert result.exit_code == 0, result.output
    result = invoke("analyze", out, "--robustness-samples", "0", "--quiet", "--format", "png")
    assert result.exit_code == 0, result.output
    return out


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: a file's bytes, a link's target, None for a folder."""
    out: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = os.readlink(path).encode()
        elif path.is_file():
            out[key] = path.read_bytes()
        else:
            out[key] = None
    return out


# ----------------------------------------------------------------- 1. the run's marker
def test_the_marker_accepts_this_release_and_0_1_0_and_nothing_else(tmp_path, stopped_run):
    assert json.loads((stopped_run / "config.json").read_text())["format"] == RUN_FORMAT
    assert is_run_directory(stopped_run) and is_run_directory(COMPAT_RUN)
    for text in ('{"dataset": "x"}', "[1]", "not json", '{"ncfast_version": 1}'):
        (tmp_path / "config.json").write_text(text)
        assert run_marker(tmp_path) is None, text
    (tmp_path / "config.json").write_text('{"format": "other", "ncfast_version": "0.2"}')
    assert not is_run_directory(tmp_path)


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_files_of_ncfast_names_are_never_replaced(tmp_path, overwrite):
    extra = ("--overwrite",) if overwrite else ()
    u = tmp_path / "u"
    (u / "analysis").mkdir(parents=True)
    (u / "analysis" / "paper.tex").write_text("my paper")
    (u / "config.json").write_text('{"mine": true}')
    before = snapshot(u)
    result = invoke(*RUN, *extra, "--out", u)
    assert_clean_error(result, 1, "is not a run directory of ncfast", "choose another --out")
    assert snapshot(u) == before
    # No config.json at all: an analysis folder alone is not a run's either.
    (u / "config.json").unlink()
    before = snapshot(u)
    assert_clean_error(invoke(*RUN, *extra, "--out", u), 1, "holds analysis but is not a run")
    assert snapshot(u) == before


def test_overwrite_removes_only_the_files_ncfast_wrote(tmp_path, stopped_run):
    run = copy_run(stopped_run, tmp_path)
    (run / "analysis" / "paper.tex").write_text("mine")
    (run / "analysis" / "figures" / "mine.png").write_bytes(b"png")
    (run / "notes.txt").write_text("mine too")
    result = invoke("analyze", run, "--robustness-samples", "0", "--quiet")
    assert_clean_error(result, 1, "holds files ncfast analyze did not write (figures/mine.png")
    assert invoke(*RUN, "--stop-after", "1", "--overwrite", "--out", run).exit_code == 0
    left = snapshot(run)
    assert left["analysis/paper.tex"] == b"mine" and left["analysis/figures/mine.png"] == b"png"
    assert left["notes.txt"] == b"mine too"
    assert not (run / "analysis" / "report.json").exists()
    assert not [p for p in (run / "analysis" / "figures").iterdir() if p.name != "mine.png"]


def test_a_sweep_folder_is_no_run_directory(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text("{}")
    before = snapshot(tmp_path / "s")
    for extra in ((), ("--overwrite",)):
        result = invoke(*RUN, *extra, "--out", tmp_path / "s")
        assert_clean_error(result, 1, "is a sweep folder (sweep.json), not a run directory")
    assert snapshot(tmp_path / "s") == before
    assert not is_run_directory(tmp_path / "s")


# --------------------------------------------------------------------------- 2. links
@posix_only
def test_a_symlinked_lock_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "R").mkdir()
    (tmp_path / "R" / ".ncfast.lock").symlink_to(victim)
    result = invoke(*RUN, "--out", tmp_path / "R")
    assert_clean_error(result, 1, ".ncfast.lock is a symbolic link")
    assert victim.read_text() == "precious"


@posix_only
@pytest.mark.parametrize("name", ["checkpoint.pt", "metrics.jsonl", "config.json"])
def test_symlinked_run_files_are_refused(tmp_path, stopped_run, name):
    run = copy_run(stopped_run, tmp_path)
    target = tmp_path / f"elsewhere-{name}"
    (run / name).rename(target)
    (run / name).symlink_to(target)
    before = target.read_bytes()
    for args in (
        ("train", "--resume", "--out", run, "--quiet"),
        (*RUN, "--overwrite", "--out", run),
    ):
        result = invoke(*args)
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert "symbolic link" in result.output or "not a run directory" in result.output
    assert target.read_bytes() == before


@posix_only
def test_a_dangling_link_as_out_is_named(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    result = invoke(*RUN, "--out", tmp_path / "link")
    assert_clean_error(result, 1, "is a symbolic link to", "which does not exist")
    assert not (tmp_path / "gone").exists()


# ------------------------------------------------- 3 and 15. the lock and its leftovers
def test_only_a_killed_owners_leftovers_are_removed(tmp_path):
    folder = tmp_path / "R"
    folder.mkdir()
    users = [folder / ".ncfast-trash-mine", folder / ".config.json.mine.tmp"]
    users[0].mkdir()
    (users[0] / "keep").write_text("mine")
    users[1].write_text("mine")
    killed = RunDirectory(folder)
    theirs = [folder / f".checkpoint.pt.ncfast-{killed.token}-x.tmp"]
    theirs.append(folder / f".ncfast-{killed.token}-trash")
    theirs[0].write_bytes(b"partial")
    theirs[1].mkdir()
    (folder / ".ncfast.lock").write_text(json.dumps({"pid": 1, "token": killed.token}))
    with RunDirectory(folder) as taken:
        assert taken.stale_owner["token"] == killed.token
        assert all(p.exists() for p in users) and not any(p.exists() for p in theirs)
    assert (users[0] / "keep").read_text() == "mine"


def test_a_taken_over_lock_names_its_new_owner(tmp_path):
    folder = tmp_path / "R"
    folder.mkdir()
    # A longer stale owner than the new one: truncated and written from the start.
    (folder / ".ncfast.lock").write_text(json.dumps({"pid": 1, "host": "h" * 500}))
    with RunDirectory(folder):
        owner = json.loads((folder / ".ncfast.lock").read_bytes())
        assert owner["pid"] == os.getpid()
        with pytest.raises(RunDirectoryError, match=f"in use by PID {os.getpid()} on "):
            RunDirectory(folder).lock()


# ------------------------------------------------------ 4 and 6. checkpoint integrity
def _flip_a_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        entry = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size)
    name_len, extra_len = struct.unpack(
        "<HH", data[entry.header_offset + 26 : entry.header_offset + 30]
    )
    data[entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_refused_by_resume_and_analyze(tmp_path, stopped_run):
    run = copy_run(stopped_run, tmp_path)
    _flip_a_tensor_byte(run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(run / "checkpoint.pt")
    before = snapshot(run)
    assert_clean_error(invoke("train", "--resume", "--out", run, "--quiet"), 1, "checksum")
    assert_clean_error(invoke("analyze", run, "--quiet"), 1, "checksum")
    assert snapshot(run) == before


def test_a_zip_with_two_entries_of_one_name_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"a": torch.zeros(2)})
    with zipfile.ZipFile(path) as archive:
        entries = [(i, archive.read(i)) for i in archive.infolist()]
    with zipfile.ZipFile(tmp_path / "dup.pt", "w") as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        for info, data in entries:
            out.writestr(info, data)
        out.writestr(entries[0][0], b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="several entries named archive/data.pkl"):
        load_checkpoint(tmp_path / "dup.pt")


# -------------------------------------------------------------- 7 and 8. analyze
@posix_only
def test_analyze_and_training_exclude_each_other(tmp_path, stopped_run):
    run = copy_run(stopped_run, tmp_path)
    with RunDirectory(run).lock():
        result = invoke("analyze", run, "--robustness-samples", "0", "--quiet")
        assert_clean_error(result, 1, f"in use by PID {os.getpid()}", "(ncfast train)")
    before = snapshot(run)
    with RunDirectory(run, command="analyze").lock_for_reading():
        result = invoke(*RUN, "--overwrite", "--out", run)
        assert_clean_error(result, 1, "(ncfast analyze)", "wait for that analysis to end")
    assert snapshot(run) == before


def test_an_interrupted_analysis_leaves_the_previous_one_whole(tmp_path, stopped_run, monkeypatch):
    import ncfast.paper.analyze as analyze_module

    run = copy_run(stopped_run, tmp_path)
    before = snapshot(run)

    def interrupted(report, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze_module, "summary_markdown", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analyze_module.analyze(run / "checkpoint.pt", robustness_samples=0, progress=False)
    assert snapshot(run) == before  # no mix, no staging folder left


def test_analysis_of_a_diverged_checkpoint_gives_command_line_advice(tmp_path, stopped_run):
    run = copy_run(stopped_run, tmp_path)
    payload = load_checkpoint(run / "checkpoint.pt")
    payload["model"]["body.0.weight"][0, 0, 0, 0] = float("nan")
    save_checkpoint(run / "checkpoint.pt", payload)
    result = invoke("analyze", run, "--robustness-samples", "0", "--quiet")
    assert_clean_error(result, 1, "weights are not finite", "lower --lr")
    assert "ClassStats" not in result.output and "on_invalid" not in result.output
    result = invoke("train", "--resume", "--out", run, "--quiet")
    assert_clean_error(result, 1, f"checkpoint {run / 'checkpoint.pt'}: its weights are not")
    assert "diverged at epoch" not in result.output  # the checkpoint is blamed, not training


def test_resuming_from_weights_near_the_float32_limit_blames_the_checkpoint(tmp_path, stopped_run):
    run = copy_run(stopped_run, tmp_path)
    payload = load_checkpoint(run / "checkpoint.pt")
    for value in payload["model"].values():
        if value.is_floating_point() and value.dim() > 1:
            value.fill_(1e38)
    save_checkpoint(run / "checkpoint.pt", payload)
    result = invoke("train", "--resume", "--out", run, "--quiet")
    assert_clean_error(result, 1, "outputs are not finite", "cannot be resumed", "--overwrite")


def test_analyze_names_out_only_when_it_was_given(tmp_path, stopped_run):
    run = copy_run(stopped_run, tmp_path)
    for entry in sorted((run / "analysis").rglob("*"), reverse=True):
        entry.rmdir() if entry.is_dir() else entry.unlink()
    (run / "analysis").rmdir()
    (run / "analysis").write_text("a file")
    result = invoke("analyze", run, "--quiet")
    assert_clean_error(result, 2, "the run's analysis folder (give --out DIR)")
    assert "--out:" not in result.output


# ------------------------------------------------------------------------ 19. messages
def test_warnings_show_one_line_without_their_source(tmp_path, stopped_run):
    run = copy_run(stopped_run, tmp_path)
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b'{"epoch": 9, "spl')
    result = invoke("table", run, "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if "incomplete last line" in ln)
    assert line.startswith("Warning: ") and "warnings.warn" not in result.output
