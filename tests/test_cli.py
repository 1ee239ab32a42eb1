"""The one entry point: every command has --help; user errors are one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.cli import build_parser, main


def _commands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


def test_every_command_has_help(capsys: pytest.CaptureFixture) -> None:
    cmds = list(_commands(build_parser()))
    assert ("data", "synth") in cmds and ("data", "validate") in cmds and ("generate",) in cmds
    for cmd in cmds:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: g2p" in capsys.readouterr().out


def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "data" in out.stdout


def test_config_dump_prints_a_preset(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "dump", "--preset", "tiny"]) == 0
    assert "block_out_channels" in capsys.readouterr().out


def test_bad_params_file_is_one_clear_line(tmp_path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("validate:\n  max_n_fraction: lots\n")
    rc = main(["data", "validate", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--params", str(p)])
    assert rc == 2
    assert "validate.max_n_fraction" in capsys.readouterr().err
