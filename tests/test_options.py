"""Each option's facts stated once and read everywhere: types from real type hints, choices from Literal
or a registry, bounds, what a resume does with it; the options a task or model owns."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import torch
from conftest import run_main

from distseq.config import TrainConfig, preset
from distseq.errors import ConfigError
from distseq.options import CHANGEABLE, IDENTITY, PER_START, facts, option
from distseq.registry import MODELS, TASKS, Registry


@dataclass
class Knobs:
    temperature: Optional[float] = option(None, "a temperature, absent for none", above=0.0, resume=CHANGEABLE)
    mode: Literal["fast", "exact"] = option("exact", "how")
    width: int = option(4, "a width", low=1, high=64)
    flag: bool = option(False, "a switch")
    label: str = option("x", "a label", flag="tag")


def test_facts_come_from_type_hints_and_the_option_call():
    by_name = {f.name: f for f in facts(Knobs)}
    assert (by_name["temperature"].kind, by_name["temperature"].optional) == (float, True)
    assert by_name["temperature"].resume == CHANGEABLE and by_name["width"].resume == IDENTITY
    assert by_name["mode"].kind is str and by_name["mode"].choices == ("fast", "exact")
    assert by_name["label"].flag == "--tag" and by_name["flag"].flag == "--flag"
    assert by_name["temperature"].check(None) is None and by_name["temperature"].check(2) == 2.0
    assert by_name["temperature"].check("1e-3") == 0.001  # YAML 1.1 reads 1e-3 as a string
    for fact, value, message in [
        (by_name["temperature"], 0.0, "--temperature: must be a finite number > 0 (got 0.0)"),
        (by_name["temperature"], float("nan"), "--temperature: must be a finite number > 0 (got nan)"),
        (by_name["temperature"], "warm", "--temperature: must be a number or absent (got 'warm')"),
        (by_name["mode"], "slow", "--mode: invalid choice 'slow' (choose from fast, exact)"),
        (by_name["width"], 65, "--width: must be an integer >= 1 and <= 64 (got 65)"),
        (by_name["width"], 2.5, "--width: must be an integer (got 2.5)"),
        (by_name["width"], True, "--width: must be an integer (got True)"),
        (by_name["flag"], "yes", "--flag: must be true or false (got 'yes')"),
        (by_name["label"], 3, "--tag: must be a string (got 3) (YAML reads yes/no/on/off as booleans and 1:3 as a "
                              "number: quote it)"),
    ]:
        with pytest.raises(ConfigError) as error:
            fact.check(value)
        assert str(error.value) == message


def test_a_type_no_option_takes_is_refused_at_registration():
    @dataclass
    class Bad:
        sizes: list = option((), "a list is not an option")

    @dataclass
    class NoDefault:
        width: int

    registry = Registry("model", "--model")
    with pytest.raises(TypeError, match=r"Bad.sizes: an option is int, float, str, bool, a Literal of these, or "
                                        r"Optional of one"):
        registry.add("bad", object(), options=Bad)
    with pytest.raises(TypeError, match=r"NoDefault.width: an option needs a default"):
        registry.add("bad", object(), options=NoDefault)
    assert "bad" not in registry


def test_every_config_field_declares_what_a_resume_does_with_it():
    from distseq.config import SECTIONS

    identity = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in facts(cls) if f.resume == IDENTITY}
    assert identity == {"data.task", "data.seq_len", "data.min_seq_len", "data.vocab_size", "data.dataset_size",
                        "data.block_size", "data.data_files", "data.data_streaming", "data.sequence_column",
                        "data.label_column", "data.eval_share", "data.token_dtype", "data.eod_id", "data.packing",
                        "model.kind", "model.hidden_size", "model.num_layers",
                        "train.global_batch_size", "train.seed"}
    per_start = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in facts(cls) if f.resume == PER_START}
    assert per_start == {"train.run_dir", "train.start_step", "checkpoint.resume", "checkpoint.overwrite"}


BUILTIN_OWNERS = {  # option: (registry, its owners)
    "positions": (MODELS, ["decoder", "transformer"]),
    "num_heads": (MODELS, ["based", "decoder", "sliding-window", "transformer"]),
    "tie_embeddings": (MODELS, ["decoder"]), "bidirectional": (MODELS, ["gru", "lstm", "rnn"]),
    "num_kv_pairs": (TASKS, ["mqar"]), "copy_len": (TASKS, ["copy", "selective-copy"]),
}


@pytest.mark.parametrize("name", list(BUILTIN_OWNERS))
def test_the_builtins_options_belong_to_their_owners(name):
    registry, owners = BUILTIN_OWNERS[name]
    assert registry.declared_options()[name] == owners


def test_options_are_read_and_set_like_fields_with_the_owners_defaults():
    cfg = TrainConfig()
    assert cfg.model.bidirectional is False  # the LSTM's own option, its default
    cfg.model.bidirectional = True
    assert cfg.model.options == {"bidirectional": True} and cfg.to_dict()["model"]["bidirectional"] is True
    assert "positions" not in cfg.to_dict()["model"]  # not the LSTM's
    with pytest.raises(AttributeError, match="no registered model declares such an option"):
        cfg.model.hiden_size = 3
    cfg.model.kind = "decoder"  # what was set stays set, whatever the order: refused, never ignored
    with pytest.raises(ConfigError, match=r"--bidirectional: is not an option of --model decoder \(its own options: "
                                          r"--num-heads, --positions, --tie-embeddings, --short-conv\); it belongs "
                                          r"to --model gru, lstm, rnn"):
        cfg.validate()
    cfg.model.bidirectional = False  # the default of every model that takes it: changes nothing, accepted
    assert cfg.validate().model.options == {} and cfg.model.positions == "sinusoidal"
    cfg.model.positions = "rope"  # before or after the kind: the same
    cfg.model.kind, cfg.model.positions = "lstm", "rope"
    cfg.model.kind = "decoder"
    assert cfg.validate().to_dict()["model"]["positions"] == "rope"
    copied = dataclasses.replace(cfg.model, hidden_size=32)
    copied.positions = "learned"
    assert cfg.model.positions == "rope"  # a copy's options are its own
    mqar = preset("mqar")
    assert mqar.task_spec().num_kv_pairs == 8 and mqar.data.num_kv_pairs == 8
    mqar.model.kind = "lstm"  # the preset's decoder options were set on it: in Python, remove them too
    with pytest.raises(ConfigError, match="--num-heads: is not an option of --model lstm"):
        mqar.validate()


@pytest.mark.parametrize("args, message", [
    (["--model", "lstm", "--positions", "rope"],
     "--positions: is not an option of --model lstm (its own options: --bidirectional); it belongs to --model "
     "decoder, transformer"),
    (["--model", "transformer", "--positions", "rope"],
     "--positions: invalid choice 'rope' (choose from sinusoidal, learned) [an option of --model transformer]"),
    (["--model", "decoder", "--bidirectional"],
     "--bidirectional: is not an option of --model decoder (its own options: --num-heads, --positions, "
     "--tie-embeddings, --short-conv); it belongs to --model gru, lstm, rnn"),
    (["--model", "gru", "--tie-embeddings"],
     "--tie-embeddings: is not an option of --model gru (its own options: --bidirectional); it belongs to --model "
     "decoder"),
    (["--task", "parity", "--num-kv-pairs", "3"],
     "--num-kv-pairs: is not an option of --task parity (its own options: none); it belongs to --task mqar"),
    (["--preset", "mqar", "--num-kv-pairs", "0"],
     "--num-kv-pairs: must be an integer >= 1 (got 0) [an option of --task mqar]"),
    (["--preset", "default", "--model", "lstm", "--num-heads", "2"],
     "--num-heads: is not an option of --model lstm (its own options: --bidirectional); it belongs to --model "
     "based, decoder, sliding-window, transformer"),
    (["--preset", "mqar", "--model", "lstm", "--positions", "rope"],
     "--positions: is not an option of --model lstm (its own options: --bidirectional); it belongs to --model "
     "decoder, transformer"),
])
def test_an_option_the_chosen_component_does_not_take_is_one_line(args, message, tmp_path, capsys):
    result = run_main(["train", *args, "--run-dir", tmp_path / "run"], capsys)
    assert result.returncode == 2 and result.stderr.strip() == f"distseq train: error: {message}"
    assert not (tmp_path / "run").exists()


def test_an_option_at_the_default_of_its_owners_changes_nothing_and_is_accepted(tmp_path, capsys):
    """What release 0.1 wrote in every config.json and its README showed (--model lstm --positions sinusoidal)
    still runs: an option the model does not take, at the default every model that takes it has."""
    shown = run_main(["train", "--preset", "mqar", "--model", "lstm", "--positions", "sinusoidal", "--num-heads", "4",
                      "--print-config"], capsys)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["model"] == {"kind": "lstm", "hidden_size": 64, "num_layers": 2, "dropout": 0.0,
                                                 "bidirectional": False}
    old = tmp_path / "config-0.1.json"
    old.write_text(json.dumps({"data": {"task": "sum-sign", "copy_len": 5, "num_kv_pairs": 8},
                               "model": {"kind": "gru", "num_heads": 4, "positions": "sinusoidal",
                                         "bidirectional": False, "tie_embeddings": False}}))
    assert run_main(["train", "--config", old, "--print-config"], capsys).returncode == 0


def test_a_plugin_written_for_release_0_1_reads_the_shared_options_it_does_not_declare():
    from distseq.models import build_model, register_model

    seen = {}

    @register_model("old-style")
    def old_style(cfg, task, spec):
        seen.update(heads=cfg.num_heads, positions=cfg.positions, copy_len=spec.copy_len)
        return torch.nn.Linear(1, 1)

    try:
        cfg = TrainConfig()
        cfg.model.kind = "old-style"
        with pytest.warns(DeprecationWarning, match="model 'old-style' reads 'num_heads' without declaring it"):
            build_model(cfg.model, TASKS["sum-sign"], cfg.task_spec())
        assert seen == {"heads": 4, "positions": "sinusoidal", "copy_len": 5}
        assert not hasattr(TrainConfig().model, "no_such_option")
        cfg.model.kind = "not-registered"
        assert not hasattr(cfg.model, "positions")  # an unknown model: no option to read, no exception
    finally:
        MODELS.remove("old-style")


def test_a_presets_options_stay_with_its_model_and_task(tmp_path, capsys):
    """--preset mqar --model lstm: the preset's data, not its decoder's heads and rotary positions; a file
    that picks another task likewise starts from that task's own defaults."""
    shown = run_main(["train", "--preset", "mqar", "--model", "lstm", "--print-config"], capsys)
    assert shown.returncode == 0, shown.stderr
    config = json.loads(shown.stdout)
    assert config["model"] == {"kind": "lstm", "hidden_size": 64, "num_layers": 2, "dropout": 0.0,
                               "bidirectional": False}
    assert config["data"]["task"] == "mqar" and config["data"]["num_kv_pairs"] == 8
    kept = json.loads(run_main(["train", "--preset", "mqar", "--positions", "learned", "--print-config"],
                               capsys).stdout)["model"]
    assert (kept["num_heads"], kept["positions"]) == (2, "learned")
    file = tmp_path / "c.yaml"
    file.write_text("data:\n  task: selective-copy\n  seq_len: 32\n")
    data = json.loads(run_main(["train", "--preset", "selective-copy", "--config", file, "--task", "copy",
                                "--print-config"], capsys).stdout)["data"]
    assert data["copy_len"] == 5  # copy's own default, not the selective-copy preset's 16


def test_a_config_file_sets_an_owned_option_and_names_an_unknown_key(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("data:\n  task: mqar\n  num_kv_pairs: 3\n  vocab_size: 32\n  seq_len: 16\nmodel:\n  kind: decoder\n"
                    "  positions: rope\n")
    config = json.loads(run_main(["train", "--config", good, "--print-config"], capsys).stdout)
    assert config["data"]["num_kv_pairs"] == 3 and config["model"]["positions"] == "rope"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  kind: decoder\n  positon: rope\n")
    result = run_main(["train", "--config", bad, "--print-config"], capsys)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"distseq train: error: --config: {bad}: unknown key model.positon (did you mean 'positions'?)")


def test_probe_and_check_task_take_their_options_from_the_same_facts(capsys):
    bad = run_main(["probe", "--seq-len", "0"], capsys)
    assert bad.returncode == 2 and bad.stderr.strip() == ("distseq probe: error: --seq-len: "
                                                          "must be an integer >= 1 (got 0)")
    refused = run_main(["check-task", "mqar", "--num-kv-pairs", "100"], capsys)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("distseq check-task: error: --seq-len: "
                                      "mqar needs --seq-len >= 4 x --num-kv-pairs "
                                      "= 400 (the pairs, then a query slot per pair) (got 64)")
    foreign = run_main(["check-task", "parity", "--copy-len", "3"], capsys)
    assert foreign.returncode == 2 and "--copy-len: is not an option of --task parity" in foreign.stderr


def test_a_plugin_option_that_takes_a_builtin_name_is_refused(capsys):
    from distseq.models import register_model

    @dataclass
    class Clash:
        seq_len: int = option(3, "clashes with --seq-len")

    register_model("clash", options=Clash)(lambda cfg, task, spec: None)
    try:
        result = run_main(["train", "--help"], capsys)
        assert result.returncode == 2 and result.stderr.strip() == (
            "distseq train: error: --import: model 'clash' declares an option 'seq_len', which is already distseq's "
            "--seq-len; rename it")
    finally:
        MODELS.remove("clash")
