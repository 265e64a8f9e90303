"""``distseq check-task``: built-in tasks keep the stream contract; broken user tasks fail the right
property, naming the right sample; the command line prints one line per property and one error line."""

import random
import textwrap

import pytest
import torch
from conftest import cpu_env, run_distseq, run_here

from distseq.config import TrainConfig
from distseq.data.contract import PROPERTIES, check_task, format_findings
from distseq.data.stream import SampleSource
from distseq.errors import ConfigError
from distseq.registry import TASKS

BUILTINS = sorted(name for name in TASKS if not TASKS[name].language_model)  # lm's windows: tests/test_lm_data.py
# small token shapes that still exercise every part: 3 pairs fill all 3 query slots of mqar's 12 steps
TOKEN_SHAPES = {"mqar": dict(vocab_size=16, num_kv_pairs=3), "induction": dict(vocab_size=5),
                "selective-copy": dict(vocab_size=5, copy_len=4)}


def config(task: str, **data) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.task = task
    for name, value in data.items():
        setattr(cfg.data, name, value)
    return cfg.validate()


def by_name(findings) -> dict:
    assert [f.name for f in findings] == list(PROPERTIES)
    for f in findings:
        assert f.detail and "\n" not in f.detail
    return {f.name: f for f in findings}


def failed(findings) -> list:
    return [f.name for f in findings if not f.ok]


class SumSign:
    """A well-behaved user task (the built-in sum-sign rule); the broken ones below change one thing."""

    head = "binary"

    def num_features(self, spec):
        return 1

    def num_outputs(self, spec):
        return 1

    def draw(self, gen, n, spec):
        return torch.randn(n, spec.seq_len, 1, generator=gen)  # (n, T, 1)

    def make(self, gen, n, spec):
        x = self.draw(gen, n, spec)
        return {"x": x, "y": self.label(x, None, spec)}

    def label(self, x, lengths, spec):
        return (x.sum(dim=(1, 2)) > 0).to(torch.float32)


# --- built-in tasks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", BUILTINS)
def test_every_builtin_task_keeps_the_contract(task):
    shape = TOKEN_SHAPES.get(task, {})
    try:  # variable lengths where the task allows them (copy and the token tasks have a fixed length)
        cfg = config(task, seq_len=12, min_seq_len=3, block_size=100, **shape)
    except ConfigError:
        cfg = config(task, seq_len=12, block_size=100, **shape)
    findings = by_name(check_task(cfg))
    assert failed(findings.values()) == [], format_findings(task, findings.values())
    assert not findings["cross-process determinism"].detail.startswith("not checked")
    assert not findings["labels"].detail.startswith("not checked")


# --- broken user tasks -------------------------------------------------------------------------------
class GlobalTorchRng(SumSign):
    def draw(self, gen, n, spec):
        return torch.randn(n, spec.seq_len, 1)  # the global RNG, not ``gen``


class GlobalPythonRngAtRow5(SumSign):
    def draw(self, gen, n, spec):
        x = torch.randn(n, spec.seq_len, 1, generator=gen)
        x[5 % n, 0, 0] += random.random()  # Python's global RNG, in row 5 of each block only
        return x


@pytest.mark.parametrize("task_class, index", [(GlobalTorchRng, 0), (GlobalPythonRngAtRow5, 5)])
def test_a_task_ignoring_its_generator_is_not_deterministic(register, task_class, index):
    name = register("broken-global-rng", task_class())
    findings = by_name(check_task(config(name)))
    assert failed(findings.values())[0] == "determinism"
    assert findings["determinism"].detail.startswith(f"sample {index}: x ")
    assert "between two calls" in findings["determinism"].detail
    rng = "torch's global RNG" if task_class is GlobalTorchRng else "Python's global RNG (random)"
    assert findings["determinism"].detail.endswith(f"make() draws from {rng} instead of the generator it is given")
    assert findings["shapes"].ok and findings["labels"].ok and findings["distinct blocks"].ok
    # registered in this process only: another process cannot know it, and says so
    assert findings["cross-process determinism"].ok
    assert findings["cross-process determinism"].detail.startswith("not checked")


class ReseedsTorchGlobalRng(SumSign):
    def draw(self, gen, n, spec):
        torch.manual_seed(gen.initial_seed())  # deterministic, but moves training's RNG under its feet
        return torch.randn(n, spec.seq_len, 1)


def test_a_task_touching_the_global_rng_fails_determinism_even_when_repeatable(register):
    name = register("broken-reseeds", ReseedsTorchGlobalRng())
    findings = by_name(check_task(config(name)))
    assert failed(findings.values()) == ["determinism"]
    assert findings["determinism"].detail.startswith("sample 0: drawing block 0, make() changed the state of torch's "
                                                     "global RNG")


class LabelDisagrees(SumSign):
    def make(self, gen, n, spec):
        x = self.draw(gen, n, spec)
        return {"x": x, "y": (x.sum(dim=(1, 2)) > 0.05).to(torch.float32)}  # label() says > 0


def test_a_label_that_disagrees_with_y_names_the_first_such_sample(register):
    name = register("broken-label", LabelDisagrees())
    cfg = config(name)
    block = SampleSource(name, cfg.task_spec(), cfg.train.seed, cfg.data.block_size).span(0, cfg.data.block_size)
    sums = block["x"].sum(dim=(1, 2))
    expected = int(((sums > 0) & (sums <= 0.05)).nonzero()[0])  # where the two rules disagree first
    findings = by_name(check_task(cfg))
    assert failed(findings.values()) == ["labels"]
    assert findings["labels"].detail.startswith(f"sample {expected}: label() gives 1.0 but make() gave y = 0.0")


class WrongYDtype(SumSign):
    def make(self, gen, n, spec):
        out = super().make(gen, n, spec)
        return {"x": out["x"], "y": out["y"].to(torch.int64)}


class WrongYShape(SumSign):
    def make(self, gen, n, spec):
        out = super().make(gen, n, spec)
        return {"x": out["x"], "y": out["y"][:, None]}


class ClassOutOfRangeAtRow7(SumSign):
    head = "classes"

    def num_outputs(self, spec):
        return 3

    def make(self, gen, n, spec):
        x = self.draw(gen, n, spec)
        y = torch.randint(0, 3, (n,), generator=gen)
        y[7 % n] = 3
        return {"x": x, "y": y}

    label = None


class WrongKeys(SumSign):
    def make(self, gen, n, spec):
        out = super().make(gen, n, spec)
        return {"x": out["x"], "target": out["y"]}


class Raises(SumSign):
    def make(self, gen, n, spec):
        raise RuntimeError("boom\nsecond line")


@pytest.mark.parametrize("task_class, start", [
    (WrongYDtype, "block 0, make(generator, 1024, spec): y is (1024,) int64; head 'binary' needs (1024,) float32"),
    (WrongYShape, "block 0, make(generator, 1024, spec): y is (1024, 1) float32; head 'binary' needs (1024,) float32"),
    (ClassOutOfRangeAtRow7, "sample 7: y is outside [0, 3)"),
    (WrongKeys, "block 0, make(generator, 1024, spec): make() returned keys ['target', 'x']: lacks y and has "
                "unexpected target"),
    (Raises, "make(generator, 1024, spec) raised RuntimeError: boom"),
])
def test_a_task_returning_the_wrong_things_fails_shapes_in_one_line(register, task_class, start):
    name = register("broken-shapes", task_class())
    findings = by_name(check_task(config(name)))  # never raises: every failure is a finding
    assert failed(findings.values())[0] == "shapes"
    assert findings["shapes"].detail.startswith(start), findings["shapes"].detail
    if task_class in (WrongYDtype, ClassOutOfRangeAtRow7):
        assert failed(findings.values()) == ["shapes"]  # the stream itself is still deterministic
    elif task_class is WrongYShape:
        assert failed(findings.values()) == ["shapes", "labels"]  # label() gives (n,), y is (n, 1)
    else:  # nothing can be drawn: every property that draws fails, each in one line naming why
        assert "cross-process determinism" not in failed(findings.values())  # not registered out of process
        assert set(failed(findings.values())) == set(PROPERTIES) - {"cross-process determinism"}


class OwnGenerator(SumSign):
    def draw(self, gen, n, spec):
        return torch.randn(n, spec.seq_len, 1, generator=torch.Generator().manual_seed(0))  # not ``gen``


def test_a_task_with_its_own_seeded_generator_repeats_one_block(register):
    name = register("broken-own-generator", OwnGenerator())
    findings = by_name(check_task(config(name)))
    assert failed(findings.values()) == ["distinct blocks"]
    assert findings["distinct blocks"].detail.startswith("sample 1024: block 1 repeats block 0 exactly")
    assert findings["distinct blocks"].detail.endswith("make() ignores the generator's seed")


class OnePossibleSample(SumSign):
    def draw(self, gen, n, spec):
        return torch.ones(n, spec.seq_len, 1)


def test_a_task_with_one_possible_sample_is_told_so_not_that_it_ignores_the_seed(register):
    name = register("one-sample", OnePossibleSample())
    findings = by_name(check_task(config(name)))
    assert findings["distinct blocks"].detail.endswith("every sample is the same: at these options the task has one "
                                                       "possible sample")


def small_configs(task: str):
    """Every combination of small shapes and options that validation accepts for ``task``, smallest first."""
    declared = TASKS.options(task)
    option = next(iter(declared.__dataclass_fields__)) if declared else None
    for seq_len in range(1, 9):
        for vocab_size in range(2, 6):
            for value in (1, 2, 3) if option else (None,):
                for min_seq_len in sorted({None, 1, seq_len // 2}, key=lambda m: m or 0):
                    data = dict(seq_len=seq_len, vocab_size=vocab_size, min_seq_len=min_seq_len or None,
                                block_size=64, **({option: value} if option else {}))
                    try:
                        yield config(task, **data)
                    except ConfigError:
                        continue


def quick_findings(cfg) -> list:
    """The properties check-task finds in this process (all but cross-process determinism, which starts one)."""
    from distseq.data import contract

    task = cfg.data.task
    ctx = contract._Context(task, TASKS[task], cfg.task_spec(), cfg.train.seed, cfg.data.block_size, 256)
    runs = contract.probe_runs(ctx.block_size)
    checks = {"shapes": lambda: contract._shapes(ctx), "determinism": lambda: contract._determinism(ctx, runs),
              "labels": lambda: contract._labels(ctx, runs), "distinct blocks": lambda: contract._distinct_blocks(ctx)}
    return [f"{name}: {finding.detail}" for name, check in checks.items()
            if not (finding := contract._guarded(name, check)).ok]


@pytest.mark.slow
@pytest.mark.parametrize("task", BUILTINS)
def test_validation_refuses_what_check_task_would_reject_for_a_built_in_task(task):
    """Over every small shape and option validation accepts, the task keeps the contract: what it cannot
    keep (selective-copy with one data token and no room to move them) is refused by validation, with the
    true reason, before check-task (or a run) could meet it."""
    accepted = list(small_configs(task))
    assert accepted, f"no small shape of {task} validates"
    for cfg in accepted:
        assert quick_findings(cfg) == [], (task, cfg.to_dict()["data"])


@pytest.mark.slow
@pytest.mark.parametrize("task", BUILTINS)
def test_check_task_passes_each_built_in_task_at_its_validated_minimum_shape(task):
    smallest = next(small_configs(task))
    assert failed(check_task(smallest)) == [], smallest.to_dict()["data"]


def test_selective_copy_with_one_data_token_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as refused:
        config("selective-copy", seq_len=6, copy_len=3, vocab_size=3)
    assert str(refused.value) == ("--vocab-size: selective-copy needs --vocab-size >= 4 (noise, marker and at least "
                                  "two data tokens: with one, every answer is the same token) (got 3)")


class BlockNormalised(SumSign):
    def draw(self, gen, n, spec):
        x = torch.randn(n, spec.seq_len, 1, generator=gen)
        return x - x.mean()  # every sample depends on its block-mates, so on n = K


def test_a_task_depending_on_n_keeps_the_contract(register):
    """Samples that depend on the block (make is always called with n = --block-size) are still a pure
    function of (seed, K, index): K is part of the data's identity, so no property fails."""
    name = register("block-normalised", BlockNormalised())
    assert failed(check_task(config(name))) == []


# --- the command line ----------------------------------------------------------------------------------
def test_cli_check_task_on_lm_says_its_samples_are_the_files():
    result = run_here(["check-task", "lm"])
    assert result.returncode == 2 and result.stderr.strip() == (
        "distseq check-task: error: TASK: lm's samples are windows of your --data-files, not drawn by the task: "
        "check-task proves the contract of a task that draws its own")


def test_cli_check_task_prints_one_ok_line_per_property():
    result = run_here(["check-task", "sum-sign"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(PROPERTIES) + 1
    for line, name in zip(lines, PROPERTIES):
        assert line.split()[0] == "ok" and f" {name} " in line
    assert lines[-1] == "task 'sum-sign': keeps the stream contract (7 properties)"


PID_PLUGIN = """
import os
import torch
import distseq

@distseq.register_task("pid-task")
class PidTask:
    head = "regression"

    def num_features(self, spec):
        return 1

    def num_outputs(self, spec):
        return 1

    def make(self, gen, n, spec):
        x = torch.rand(n, spec.seq_len, 1, generator=gen)  # (n, T, 1)
        y = x.sum(dim=(1, 2))
        x[3 % n, 0, 0] += os.getpid()  # the same on every call, different in another process
        return {"x": x, "y": y}
"""


def test_cli_check_task_of_a_plugin_differing_between_processes_fails_in_one_line(tmp_path):
    plugin = tmp_path / "tmp_plugin.py"
    plugin.write_text(textwrap.dedent(PID_PLUGIN))
    result = run_distseq(["check-task", "pid-task", "--import", str(plugin)], timeout=120, env=cpu_env())
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "distseq check-task: error: task 'pid-task' breaks the stream contract: cross-process determinism: "
        "sample 3: x differs between this process and a fresh one (per-sample sha256)")
    assert "FAIL  cross-process determinism" in result.stdout
