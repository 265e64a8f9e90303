"""Your own model and task: the README's plugin file, registered and used from the command line, a
config file and Python, on 2 processes, checked, exported and loaded back without the trainer."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import (
    REPO,
    accelerate_launch,
    assert_ok,
    checkpoint_weights,
    cpu_env,
    run_distseq,
    run_main,
    summary,
    two_process_args,
)

from distseq.registry import MODELS, PLUGINS, TASKS

SECTION = "## Your own model and task"


def readme_plugin() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(block.splitlines()) <= 50
    return block


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "my_plugin.py"
    path.write_text(readme_plugin())
    yield path
    for registry, name in ((TASKS, "max-feature"), (MODELS, "mean-mlp")):  # this process may have imported it
        registry.remove(name)
    if str(path) in PLUGINS:
        PLUGINS.remove(str(path))


TRAIN = ["--task", "max-feature", "--model", "mean-mlp", "--hidden-size", "32", "--global-batch-size", "64",
         "--max-steps", "60", "--log-every", "20", "--eval-every", "0", "--eval-size", "512", "--no-progress",
         "--precision", "no", "--lr", "0.01", "--warmup-steps", "5"]


@pytest.mark.multiproc
def test_the_readme_plugin_trains_on_two_processes_checks_exports_and_loads(plugin, tmp_path):
    run = tmp_path / "run"
    proc = accelerate_launch(two_process_args(), ["train", "--import", str(plugin), *TRAIN, "--pool", "sum",
                                                  "--verify-data", "--run-dir", str(run)], timeout=240)
    assert_ok(proc)
    result = summary(run)
    assert json.loads((run / "config.json").read_text())["model"]["pool"] == "sum"
    assert result["world_size"] == 2 and result["step"] == 60 and result["task"] == "max-feature"
    assert result["model"] == "mean-mlp" and result["data_accounting"]["checked_until"] == 60 * 64
    assert result["eval/accuracy"] > 0.8  # chance is 0.25

    checked = run_distseq(["check-task", "max-feature", "--import", str(plugin)])
    assert_ok(checked)
    assert "task 'max-feature': keeps the stream contract (7 properties)" in checked.stdout
    assert [line.split()[0] for line in checked.stdout.splitlines()[:7]] == ["ok"] * 7

    checkpoint = run / "checkpoints" / "step-00000060"
    exported = run_distseq(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "exported")])
    assert_ok(exported)  # no --import: the checkpoint recorded the plugin
    script = (
        "import sys, torch, distseq\n"
        f"model = distseq.load_model(r'{tmp_path / 'exported'}')\n"
        "x = torch.randn(5, 10, 4, generator=torch.Generator().manual_seed(0))\n"
        "print(model(x).argmax(-1).tolist())\n"
        "assert model.pool == 'sum' and model.distseq_config['model']['pool'] == 'sum'\n"
        "assert 'accelerate' not in sys.modules and 'distseq.training.loop' not in sys.modules\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=cpu_env(PYTHONPATH=str(REPO)), cwd=tmp_path)
    assert_ok(loaded)
    predicted = run_distseq(["predict", "--checkpoint", str(checkpoint), "--random", "3"])
    assert_ok(predicted)
    assert predicted.stdout.count('"class"') == 3 and '"probabilities"' in predicted.stdout


def test_a_config_file_and_python_name_the_registered_kinds(plugin, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  task: max-feature\nmodel:\n  kind: mean-mlp\n  hidden_size: 16\n")
    result = run_main(["train", "--import", plugin, "--config", config, "--max-steps", "4", "--log-every", "2",
                       "--eval-size", "64", "--global-batch-size", "32", "--run-dir", tmp_path / "run"], capsys)
    assert_ok(result)
    assert summary(tmp_path / "run")["model"] == "mean-mlp"

    import distseq

    cfg = distseq.TrainConfig()
    cfg.data.task, cfg.data.eval_size = "max-feature", 64
    cfg.train.max_steps, cfg.train.global_batch_size, cfg.train.run_dir = 4, 32, str(tmp_path / "api")
    cfg.log.log_every = 2
    mine = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10 * 4, 4))
    wrapped = _LengthsIgnored(mine)
    before = mine[1].weight.detach().clone()
    out = distseq.train(cfg, model=wrapped)
    assert out["status"] == "complete" and out["step"] == 4 and out["model"].endswith("_LengthsIgnored")
    exported = run_main(["export", "--checkpoint", tmp_path / "api" / "checkpoints" / "step-00000004",
                         "--out", tmp_path / "x"], capsys)
    assert exported.returncode == 2 and len(exported.stderr.strip().splitlines()) == 1
    assert "a module given to distseq.train(model=...) loads back only as a registered model" in exported.stderr
    assert not torch.equal(mine[1].weight.detach(), before)  # the instance itself was trained
    saved = checkpoint_weights(tmp_path / "api" / "checkpoints" / "step-00000004")
    assert torch.equal(saved["inner.1.weight"], mine[1].weight.detach())  # and its weights checkpointed


class _LengthsIgnored(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, lengths=None):
        return self.inner(x)


def test_unknown_names_list_the_registered_ones_and_a_bad_plugin_is_one_line(tmp_path, capsys):
    result = run_main(["train", "--task", "nope", "--run-dir", tmp_path / "r"], capsys)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("distseq train: error: --task: invalid choice 'nope' "
                                            "(choose from adding, copy, ")
    assert result.stderr.strip().endswith("sum-sign; a plugin adds more: --import MODULE)")
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('my bug')\n")
    result = run_main(["train", "--import", broken, "--run-dir", tmp_path / "r"], capsys)
    assert result.returncode == 2
    assert result.stderr.strip() == f"distseq train: error: --import: cannot import {broken}: RuntimeError: my bug"
    result = run_main(["eval", "--import", "no_such_module_xyz", "--run-dir", tmp_path / "r"], capsys)
    assert result.returncode == 2 and "cannot import no_such_module_xyz: ModuleNotFoundError" in result.stderr


class SumSignLike:
    """sum-sign's contract, changed one way per test."""
    head = "binary"

    def num_features(self, spec): return 1
    def num_outputs(self, spec): return 1

    def make(self, generator, n, spec):
        x = torch.randn(n, spec.seq_len, 1, generator=generator)
        return {"x": x, "y": (x.sum((1, 2)) > 0).float()}


def test_a_registered_task_carries_its_own_validation(tmp_path, capsys):
    from distseq.errors import ConfigError
    from distseq.tasks import register_task

    @register_task("needs-even-length")
    class NeedsEven(SumSignLike):
        def validate(self, cfg):
            if cfg.data.seq_len % 2:
                raise ConfigError("--seq-len", "needs-even-length needs an even --seq-len")

    try:
        result = run_main(["train", "--task", "needs-even-length", "--seq-len", "7", "--run-dir", tmp_path], capsys)
        assert result.returncode == 2
        assert result.stderr.strip() == "distseq train: error: --seq-len: needs-even-length needs an even --seq-len"
    finally:
        TASKS.remove("needs-even-length")


def test_a_plugin_models_own_option_is_an_option_like_any_other(plugin, tmp_path, capsys):
    """--pool: in --help once imported, from the command line and a config file, validated in one line,
    recorded in config.json and the checkpoint, and part of the run's identity on resume."""
    shown = run_main(["train", "--import", plugin, "--help"], capsys)
    assert shown.returncode == 0
    unwrapped = "".join(shown.stdout.split())  # argparse wraps lines, at hyphens too
    assert "--pool{mean,sum}howthestepsarepooledbeforetheMLP(--modelmean-mlp;defaultmean)" in unwrapped
    args = ["train", "--import", plugin, *TRAIN[:4], "--max-steps", "4", "--log-every", "2", "--eval-size", "64",
            "--global-batch-size", "32", "--no-progress"]
    bad = run_main([*args, "--pool", "median", "--run-dir", tmp_path / "bad"], capsys)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "distseq train: error: --pool: invalid choice 'median' (choose from mean, sum) [an option of --model mean-mlp]")
    assert not (tmp_path / "bad").exists()
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  pool: sum\n")
    run = tmp_path / "run"
    done = run_main([*args, "--config", config, "--run-dir", run], capsys)
    assert_ok(done)
    assert json.loads((run / "config.json").read_text())["model"]["pool"] == "sum"
    meta = json.loads((run / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert meta["config"]["model"]["pool"] == "sum"
    refused = run_main([*args, "--max-steps", "6", "--run-dir", run], capsys)  # the default is mean
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        "step-00000004 was written with --pool sum; this run has mean (resume with the same value, or --resume "
        "never in a new --run-dir)")
    resumed = run_main([*args, "--max-steps", "6", "--pool", "sum", "--run-dir", run], capsys)
    assert_ok(resumed)
    assert summary(run)["step"] == 6


def test_an_option_of_another_model_is_refused_naming_its_owners(plugin, tmp_path, capsys):
    result = run_main(["train", "--import", plugin, "--model", "lstm", "--pool", "sum", "--run-dir", tmp_path], capsys)
    assert result.returncode == 2 and result.stderr.strip() == (
        "distseq train: error: --pool: is not an option of --model lstm (its own options: --bidirectional); it "
        "belongs to --model mean-mlp")


SHADOW = '''import torch
import distseq

@distseq.register_task("sum-sign"{replaces})
class ZeroLabels:
    head = "binary"
    def num_features(self, spec): return 1
    def num_outputs(self, spec): return 1
    def make(self, generator, n, spec):
        return {{"x": torch.randn(n, spec.seq_len, 1, generator=generator), "y": torch.zeros(n)}}
'''


@pytest.fixture
def shadow(tmp_path):
    """A plugin file registering ``sum-sign`` (labels all 0); whatever it registered is undone afterwards."""
    def write(replaces: bool):
        path = tmp_path / ("replacing.py" if replaces else "shadow.py")
        path.write_text(SHADOW.format(replaces=", replaces=True" if replaces else ""))
        return path

    yield write
    if TASKS.replacement("sum-sign"):
        TASKS.remove("sum-sign")  # brings the built-in back
    PLUGINS[:] = [p for p in PLUGINS if not p.startswith(str(tmp_path))]


SMALL = ["--seq-len", "6", "--hidden-size", "8", "--global-batch-size", "8", "--max-steps", "2", "--eval-size", "16",
         "--log-every", "1", "--no-progress", "--precision", "no", "--log-with", "none"]


def test_a_plugin_that_shadows_a_built_in_task_or_model_is_refused_in_one_line(shadow, tmp_path, capsys):
    path = shadow(replaces=False)
    result = run_main(["train", "--import", path, *SMALL, "--run-dir", tmp_path / "r"], capsys)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"distseq train: error: --import: task 'sum-sign' is registered twice: by "
        f"distseq.tasks.synthetic:sum_sign and by {path}:ZeroLabels; give it another name, or "
        f"register_task('sum-sign', replaces=True) to replace the first")
    assert TASKS.replacement("sum-sign") is None and not (tmp_path / "r").exists()
    model = tmp_path / "lstm.py"
    model.write_text("import torch, distseq\n\n@distseq.register_model('lstm')\n"
                     "def one_linear(cfg, task, spec):\n    return torch.nn.Linear(1, 1)\n")
    result = run_main(["train", "--import", model, *SMALL, "--run-dir", tmp_path / "r"], capsys)
    assert result.returncode == 2
    assert "model 'lstm' is registered twice: by distseq.models.recurrent:" in result.stderr
    assert f"and by {model}:one_linear" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert MODELS.replacement("lstm") is None


def test_an_explicit_replacement_runs_and_is_recorded(shadow, tmp_path, capsys):
    path = shadow(replaces=True)
    run = tmp_path / "r"
    result = run_main(["train", "--import", path, *SMALL, "--run-dir", run], capsys)
    assert result.returncode == 0, result.stderr
    record = {"name": "sum-sign", "by": f"{path}:ZeroLabels", "instead_of": "distseq.tasks.synthetic:sum_sign"}
    assert f"distseq: task 'sum-sign' is {path}:ZeroLabels, replacing distseq.tasks.synthetic:sum_sign" in result.stdout
    assert json.loads((run / "config.json").read_text())["replaced"] == {"task": record}
    assert summary(run)["replaced"] == {"task": record}
    # the same plugin again (by path, and under another module name) is harmless
    assert run_main(["train", "--import", path, *SMALL, "--max-steps", "3", "--run-dir", run], capsys).returncode == 0
    sys.path.insert(0, str(tmp_path))
    try:
        import replacing  # noqa: F401 - the same file as another module: the same definition
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("replacing", None)
    # a built-in run's checkpoint is not resumed under the replacement
    builtin = tmp_path / "builtin"
    TASKS.remove("sum-sign")
    assert run_main(["train", *SMALL, "--run-dir", builtin], capsys).returncode == 0
    PLUGINS.remove(str(path))
    refused = run_main(["train", "--import", path, *SMALL, "--max-steps", "3", "--run-dir", builtin], capsys)
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        f"{builtin / 'checkpoints' / 'step-00000002'} ran the built-in task 'sum-sign'; this process has it replaced "
        f"by {path}:ZeroLabels")
    # nor the replacement's under the built-in
    TASKS.remove("sum-sign")
    PLUGINS.remove(str(path))
    resumed = run_main(["train", *SMALL, "--max-steps", "4", "--run-dir", run], capsys)
    assert resumed.returncode == 2 and resumed.stderr.strip().endswith(
        f"ran task 'sum-sign' as replaced by {path}:ZeroLabels; --import that plugin (from its new place if it moved)")
    # its config.json runs again only with the replacement in force
    again = run_main(["train", "--config", run / "config.json", "--run-dir", tmp_path / "again"], capsys)
    assert again.returncode == 2
    assert again.stderr.strip().endswith(f"it ran task 'sum-sign' as replaced by {path}:ZeroLabels; --import that "
                                         f"plugin to run it again")
    again = run_main(["train", "--import", path, "--config", run / "config.json", "--run-dir", tmp_path / "again"],
                     capsys)
    assert again.returncode == 0, again.stderr


class IntLabels(SumSignLike):
    def make(self, generator, n, spec):
        out = super().make(generator, n, spec)
        return {**out, "y": out["y"].long()}


class Raises(SumSignLike):
    def make(self, generator, n, spec):
        raise ValueError("my task's bug")


@pytest.mark.parametrize("task, name, code, message", [
    (IntLabels, "int-labels", 2, "--task: int-labels: y is (256,) int64; head 'binary' needs (256,) float32"),
    # the task's own exception, wherever the stream meets it (a failed run, as check-task's verdict)
    (Raises, "raises", 1, "task 'raises': make(generator, 256, spec) raised ValueError: my task's bug (block 0; "
                          "distseq check-task --task raises checks its whole contract)"),
])
def test_a_task_that_breaks_its_contract_is_one_line_before_the_run_starts(task, name, code, message, register,
                                                                          tmp_path, capsys):
    register(name, task)
    result = run_main(["train", "--task", name, *SMALL, "--block-size", "256", "--run-dir", tmp_path / "r"], capsys)
    assert result.returncode == code and result.stderr.strip() == f"distseq train: error: {message}"
    assert not (tmp_path / "r").exists()  # nothing of the run written


def built(output):
    """A model builder whose forward returns ``output(x)``."""
    class Model(torch.nn.Module):
        def __init__(self, cfg, task, spec):
            super().__init__()
            self.linear = torch.nn.Linear(1, 1)

        def forward(self, x, lengths=None):
            return output(self.linear(x))  # (B, T, 1)

    return Model


@pytest.mark.parametrize("output, message", [
    (lambda h: h.sum(1), "--model: wrong-model returned (2, 1) float32 on 2 samples of --task sum-sign; its head "
                         "'binary' takes floating logits of shape (2,)"),
    (lambda h: h.sum((1, 2))[:1], "--model: wrong-model returned (1,) float32 on 2 samples of --task sum-sign; its "
                                  "head 'binary' takes floating logits of shape (2,)"),
    (lambda h: (h.sum((1, 2)) > 0).long(), "--model: wrong-model returned (2,) int64 on 2 samples of --task sum-sign; "
                                           "its head 'binary' takes floating logits of shape (2,)"),
    (lambda h: h @ torch.ones(3, 3), "--model: wrong-model raised RuntimeError: mat1 and mat2 shapes cannot be "
                                     "multiplied"),
])
def test_a_model_with_the_wrong_output_is_one_line_before_the_run_starts(output, message, tmp_path, capsys):
    from distseq.models import register_model

    register_model("wrong-model")(built(output))
    try:
        result = run_main(["train", "--model", "wrong-model", *SMALL, "--run-dir", tmp_path / "r"], capsys)
    finally:
        MODELS.remove("wrong-model")
    assert result.returncode == 2 and result.stderr.strip().startswith(f"distseq train: error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_moved_plugin_is_found_again_by_import_from_its_new_place(tmp_path):
    """The checkpoint recorded the plugin's old path; --import NEWPATH registers the same names and is enough
    for eval and export, and the message without it says so."""
    old, new = tmp_path / "old" / "my_plugin.py", tmp_path / "new" / "my_plugin.py"
    old.parent.mkdir()
    old.write_text(readme_plugin())
    run = tmp_path / "run"
    assert_ok(run_distseq(["train", "--import", str(old), *TRAIN[:4], "--max-steps", "2", "--eval-size", "32",
                           "--global-batch-size", "8", "--no-progress", "--log-with", "none", "--run-dir", str(run)]))
    new.parent.mkdir()
    old.rename(new)
    lost = run_distseq(["eval", "--run-dir", str(run)])
    assert lost.returncode == 2
    assert lost.stderr.strip() == (f"distseq eval: error: --import: this run's plugin {old} cannot be imported (no "
                                   f"such file: {old}); if it moved, pass --import with its new place")
    assert_ok(run_distseq(["eval", "--import", str(new), "--run-dir", str(run)]))
    exported = tmp_path / "exported"
    assert_ok(run_distseq(["export", "--import", str(new), "--checkpoint", str(run / "checkpoints" / "step-00000002"),
                           "--out", str(exported)]))
    script = ("import distseq\nfrom distseq.registry import import_plugin\n"
              f"import_plugin(r'{new}')\nprint(type(distseq.load_model(r'{exported}')).__name__)\n")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env=cpu_env())
    assert loaded.returncode == 0 and loaded.stdout.strip() == "MeanMLP", loaded.stderr[-2000:]


def test_load_model_on_a_missing_or_partial_directory_is_one_line(tmp_path):
    import distseq
    from distseq.errors import CheckpointError

    with pytest.raises(CheckpointError) as missing:
        distseq.load_model(tmp_path / "nowhere")
    assert str(missing.value) == (f"{tmp_path / 'nowhere'}: not an export of distseq (no such directory); distseq "
                                  f"export --checkpoint RUN/checkpoints/step-N --out {tmp_path / 'nowhere'} writes one")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"not an export of distseq \(no model.safetensors\)"):
        distseq.load_model(tmp_path / "partial")
    (tmp_path / "partial" / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"partial is a checkpoint, not an export: distseq export --checkpoint"):
        distseq.load_model(tmp_path / "partial")


@pytest.mark.slow
def test_a_task_raising_in_a_dataloader_worker_is_one_line_and_the_run_ends(tmp_path):
    """A worker's exception came back as its whole traceback, and the failed run never exited (its workers
    ignore SIGTERM, which is how multiprocessing ends them at exit)."""
    plugin = tmp_path / "late_raise.py"
    plugin.write_text("import torch, distseq\nCALLS = [0]\n\n@distseq.register_task('late-raise')\nclass LateRaise:\n"
                      "    head = 'binary'\n    def num_features(self, spec): return 1\n"
                      "    def num_outputs(self, spec): return 1\n    def make(self, generator, n, spec):\n"
                      "        CALLS[0] += 1\n        if CALLS[0] >= 4:\n            raise ValueError('my bug')\n"
                      "        x = torch.randn(n, spec.seq_len, 1, generator=generator)\n"
                      "        return {'x': x, 'y': (x.sum((1, 2)) > 0).float()}\n")
    proc = run_distseq(["train", "--import", str(plugin), "--task", "late-raise", "--block-size", "8",
                        "--samples-per-example", "8", "--num-workers", "1", "--max-steps", "20", "--global-batch-size",
                        "8", "--eval-size", "16", "--no-progress", "--log-with", "none",
                        "--run-dir", str(tmp_path / "r")], timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "distseq train: error: task 'late-raise': make(generator, 8, spec) raised ValueError: my bug (block 2; "
        "distseq check-task --task late-raise checks its whole contract)"], proc.stderr[-3000:]
