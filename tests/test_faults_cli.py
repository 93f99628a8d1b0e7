"""Bad input on the command line: one ``error:`` line and exit status 2, the traceback only with
``--debug`` (the cases that need no compiled model; the text path's are in test_text_path)."""

from __future__ import annotations

import pytest

from rdlm.cli import main


def one_error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_debug_shows_the_traceback_instead(tmp_path, capsys):
    argv = ["prepare", "--tokenizer", "chars", "--output", str(tmp_path), str(tmp_path / "no.txt")]
    assert "no.txt' does not exist" in one_error_line(capsys, argv)
    with pytest.raises(FileNotFoundError, match="no.txt"):
        main([*argv, "--debug"])


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    ("train.lr=.nan", "train.lr=nan is invalid: expected a finite number"),
    ("model.rope_base=.inf", "model.rope_base=inf is invalid: expected a finite number"),
    ("sample.num_steps=5000", "sample.num_steps=5000 is invalid: must be an integer in [1, 1024]"),
])
def test_config_values_are_checked_before_anything_runs(override, message, capsys):
    assert message in one_error_line(capsys, ["train", "configs/tiny.yaml", override])


def test_sample_and_eval_refuse_bad_arguments_by_name(tmp_path, capsys):
    assert "does not exist" in one_error_line(
        capsys, ["eval", "--checkpoint", str(tmp_path / "none"), "--num-steps", "1"])
    assert "--num-steps=2000 is invalid" in one_error_line(
        capsys, ["eval", "--checkpoint", str(tmp_path / "none"), "--num-steps", "1,2000"])
    assert "give --prompt TEXT, --prompt-file FILE (or -) or --tokens" in one_error_line(
        capsys, ["sample", "--checkpoint", str(tmp_path)])
    assert "1 problem(s): - is not a directory" in one_error_line(
        capsys, ["convert", "huginn-to-rdlm", str(tmp_path / "none"), str(tmp_path / "out")])
