"""The command line: help explains every option; a bad value is one line naming the option, exit 2."""


import pytest
from conftest import run_distseq, run_here

from distseq.cli import main
from distseq.config import SECTIONS, TrainConfig
from distseq.errors import ConfigError
from distseq.options import facts

# (arguments, option the one-line message must name)
BAD_OPTIONS = [
    (["--model", "transformerz"], "--model"),
    (["--task", "nope"], "--task"),
    (["--precision", "fp8"], "--precision"),
    (["--preset", "huge"], "--preset"),
    (["--hidden-size", "-4"], "--hidden-size"),
    (["--hidden-size", "abc"], "--hidden-size"),
    (["--num-layers", "0"], "--num-layers"),
    (["--seq-len", "0"], "--seq-len"),
    (["--global-batch-size", "0"], "--global-batch-size"),
    (["--global-batch-size", "100", "--grad-accum-steps", "3"], "--global-batch-size"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--max-steps", "0"], "--max-steps"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--log-every", "0"], "--log-every"),
    (["--eval-every", "-5"], "--eval-every"),
    (["--dataset-size", "0"], "--dataset-size"),
    (["--block-size", "0"], "--block-size"),
    (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
    (["--schedule", "linear"], "--schedule"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--precision", "fp16"], "--precision"),  # valid name, but fp16 cannot run on a CPU
    (["--no-such-option", "1"], "--no-such-option"),
    (["--seq-len", "10", "--min-seq-len", "20"], "--min-seq-len"),
    (["--min-seq-len", "0"], "--min-seq-len"),
    (["--vocab-size", "1"], "--vocab-size"),
    (["--task", "copy", "--seq-len", "8", "--copy-len", "5"], "--seq-len"),
    (["--task", "copy", "--seq-len", "12", "--min-seq-len", "6"], "--min-seq-len"),
    (["--task", "adding", "--min-seq-len", "1"], "--min-seq-len"),
    (["--start-step", "1500"], "--start-step"),
    (["--data-files", "/no/such/file.jsonl"], "--data-files"),
    (["--samples-per-example", "0"], "--samples-per-example"),
    (["--eval-size", "0"], "--eval-size"),
    (["--profile-steps", "5:2"], "--profile-steps"),
    (["--profile-steps", "10:2000"], "--profile-steps"),
    (["--profile-steps", "7"], "--profile-steps"),
]


@pytest.mark.parametrize("args,option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_exit_2(args, option, tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--run-dir", str(run_dir), "--no-progress", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and "Traceback" not in err, err
    assert not run_dir.exists()  # nothing was written


def test_run_dir_that_is_a_file_is_rejected(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--run-dir", str(target)])
    assert exit_info.value.code == 2 and "--run-dir" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_bad_option_in_a_real_process_has_no_traceback(tmp_path):
    proc = run_distseq(["train", "--run-dir", str(tmp_path / "r"), "--lr", "-1"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "distseq train: error: --lr: must be a finite number > 0 (got -1.0)"


def test_validate_names_the_option_for_python_callers():
    cfg = TrainConfig()
    cfg.model.kind = "cnn"
    with pytest.raises(ConfigError) as error:
        cfg.validate()
    kinds = "based, decoder, gru, hyena, lstm, mamba, rnn, sliding-window, transformer"
    assert error.value.option == "--model" and kinds in str(error.value)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for cls in SECTIONS.values():
        for fact in facts(cls):
            assert fact.flag in text
    for required in ["--preset", "--run-dir", "--max-steps", "--task", "--model", "--hidden-size", "--num-layers",
                     "--seq-len", "--global-batch-size", "--grad-accum-steps", "--lr", "--seed", "--precision",
                     "--num-workers", "--log-every", "--eval-every", "--dataset-size"]:
        assert required in text
    kinds = "{based,decoder,gru,hyena,lstm,mamba,rnn,sliding-window,transformer}"  # the registered kinds
    assert kinds in text and "{auto,no,bf16,fp16}" in text


def test_top_level_help_lists_commands():
    proc = run_here(["--help"])
    assert proc.returncode == 0 and "train" in proc.stdout and "distseq launch" in proc.stdout
