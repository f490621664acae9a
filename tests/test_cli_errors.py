"""One error policy for every subcommand: bad input -> ``fastinv X: message``, exit 2, no
traceback unless --debug; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import types

import pytest

from fastinv import cli
from fastinv.errors import BadFileError, FastinvError, MissingFileError


def _run(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def test_invert_with_a_missing_inverter_prints_the_message_and_exits_2(capsys, tmp_path):
    missing = tmp_path / "no-such-run"
    rc, err = _run(capsys, ["invert", "reconstruct", "--inverter", str(missing),
                            "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                            "--device", "cpu"])
    assert rc == 2
    assert err.startswith("fastinv invert: ") and str(missing) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_invert_with_a_corrupt_checkpoint_names_the_file(capsys, tmp_path):
    bad = tmp_path / "step_00000001.pt"
    bad.write_text("not a checkpoint\n")
    rc, err = _run(capsys, ["invert", "reconstruct", "--inverter", str(bad), "--data",
                            str(tmp_path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2 and err.startswith("fastinv invert: ") and str(bad) in err
    assert "text file" in err and "Traceback" not in err


def test_demo_with_a_bad_out_path_prints_the_message_and_exits_2(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, err = _run(capsys, ["demo", "--preset", "tiny", "--out", str(blocker / "run"),
                            "--device", "cpu"])
    assert rc == 2
    assert err.startswith("fastinv demo: ") and "a-file" in err and "Traceback" not in err


def test_debug_adds_the_traceback(capsys, tmp_path):
    missing = tmp_path / "no-such-run"
    rc, err = _run(capsys, ["invert", "reconstruct", "--inverter", str(missing), "--data",
                            str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu",
                            "--debug"])
    assert rc == 2 and "Traceback" in err and "fastinv invert: " in err


@pytest.mark.parametrize("exc", [FastinvError("bad value x"), BadFileError("bad file y"),
                                 MissingFileError("missing z"),
                                 FileNotFoundError(2, "No such file or directory", "/nope")])
def test_every_subcommand_reports_user_errors_the_same_way(capsys, monkeypatch, exc):
    def run(args):
        raise exc

    monkeypatch.setattr(cli, "_load", lambda name: types.SimpleNamespace(
        register=lambda p: None, run=run))
    rc, err = _run(capsys, ["bench"])
    assert rc == 2 and err.startswith("fastinv bench: ") and "Traceback" not in err
    if isinstance(exc, FileNotFoundError) and not isinstance(exc, FastinvError):
        assert err.strip() == "fastinv bench: No such file or directory: /nope"
    else:
        assert err.strip() == f"fastinv bench: {exc}"


def test_config_errors_are_user_errors(capsys, monkeypatch):
    from fastinv.train.config import ConfigError

    def run(args):
        raise ConfigError("unknown key --foo; did you mean --steps?")

    monkeypatch.setattr(cli, "_load", lambda name: types.SimpleNamespace(
        register=lambda p: None, run=run))
    rc, err = _run(capsys, ["train"])
    assert rc == 2 and err.strip() == "fastinv train: unknown key --foo; did you mean --steps?"


def test_a_bug_keeps_its_traceback(monkeypatch):
    def run(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "_load", lambda name: types.SimpleNamespace(
        register=lambda p: None, run=run))
    with pytest.raises(KeyError):
        cli.main(["bench"])


@pytest.mark.parametrize("argv", [
    ["demo", "--preset", "tiny", "--out", "unused", "--device", "cuda"],
    ["invert", "reconstruct", "--inverter", "unused", "--data", "unused", "--out", "unused",
     "--device", "cuda"],
])
def test_cuda_without_a_gpu_is_a_message_not_a_traceback(capsys, monkeypatch, argv):
    # every command resolves its device in one place (train.distributed.resolve_device)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    rc, err = _run(capsys, argv)
    assert rc == 2 and err.startswith(f"fastinv {argv[0]}: ") and "no CUDA GPU" in err
    assert "Traceback" not in err
