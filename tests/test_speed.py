"""--compile, --activation-checkpointing, and a step path that reads the ranks' agreed flags a step later.

Compiling is slow (inductor writes and builds C++ kernels), so the runs are shared: every built-in model
is compiled once with the aot_eager backend (dynamo's graphs and AOTAutograd's backward, run eagerly:
seconds), and the decoder once with inductor, whose runs serve the resume, export and start-up tests.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import (
    DISTSEQ,
    REPO,
    Started,
    accelerate_launch,
    assert_ok,
    checkpoint_weights,
    cpu_env,
    run_here,
    summary,
    two_process_args,
    weights_at,
)
from test_honest_metrics import adding_rows

from distseq.registry import MODELS

RECURRENT = ("gru", "lstm", "rnn", "transformer")  # features models: sum-sign; the others: mqar tokens
BUILT_IN = ("based", "decoder", "gru", "hyena", "lstm", "mamba", "rnn", "sliding-window", "transformer")
MQAR = ["--task", "mqar", "--seq-len", "32", "--vocab-size", "32", "--num-kv-pairs", "4"]


def tiny(model: str, run_dir, steps: int = 20, *extra) -> list:
    task = ["--task", "sum-sign"] if model in RECURRENT else MQAR
    return ["train", "--model", model, *task, "--max-steps", str(steps), "--log-every", "10", "--eval-every",
            str(steps), "--eval-size", "64", "--global-batch-size", "16", "--hidden-size", "16", "--num-layers", "1",
            "--no-progress", "--precision", "no", "--log-with", "none", "--run-dir", str(run_dir), *extra]


def test_the_built_in_models_are_all_here():
    assert sorted(BUILT_IN) == sorted(name for name in MODELS if MODELS.get(name).__module__.startswith("distseq."))


@pytest.fixture(scope="module")
def every_model(tmp_path_factory):
    """Each built-in model trained 20 steps eagerly and compiled (aot_eager), in this process."""
    root, out = tmp_path_factory.mktemp("every-model"), {}
    for model in BUILT_IN:
        eager = run_here(tiny(model, root / f"{model}-eager"))
        compiled = run_here(tiny(model, root / f"{model}-compiled", 20, "--compile", "--compile-backend", "aot_eager"))
        assert_ok(eager)
        assert_ok(compiled)
        out[model] = (summary(root / f"{model}-eager"), summary(root / f"{model}-compiled"), compiled.stdout)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model", BUILT_IN)
def test_every_built_in_model_compiles_and_trains_as_it_does_eagerly(every_model, model):
    eager, compiled, said = every_model[model]
    assert "distseq: compile: the whole model (torch.compile, aot_eager)" in said
    assert compiled["compile"]["recompiles"] == 0  # fixed shapes: nothing compiles again after the warm-up
    assert compiled["compile"]["seconds"] > 0 and "compile" in compiled["startup"]["phases_seconds"]
    assert "compile" not in eager and "compile" not in eager["startup"]["phases_seconds"]
    assert compiled["eval/loss"] == pytest.approx(eager["eval/loss"], rel=1e-5)
    assert compiled["eval/accuracy"] == pytest.approx(eager["eval/accuracy"], abs=1e-6)


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_variable_lengths_compile_once(model, tmp_path):
    """Samples of 3..10 steps: every batch is padded to --seq-len, the lengths are values (a padding mask, or
    packing), so the graphs compile once; the losses are the eager run's."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "--compile-backend", "aot_eager"])):
        assert_ok(run_here([*tiny(model, tmp_path / name, 12), "--min-seq-len", "3", *extra]))
        runs[name] = summary(tmp_path / name)
    assert runs["compiled"]["compile"]["recompiles"] == 0
    assert runs["compiled"]["eval/loss"] == pytest.approx(runs["eager"]["eval/loss"], rel=1e-5)


@pytest.fixture(scope="module")
def inductor(tmp_path_factory):
    """The decoder with inductor: eager throughout (``eager``); eager to step 10 then resumed compiled with
    selective activation checkpointing (``to_compiled``); compiled to step 10 then resumed eagerly
    (``to_eager``, whose first session's summary is ``first_compiled``)."""
    root = tmp_path_factory.mktemp("inductor")
    compile_ = ["--compile", "--checkpoint-every", "10"]
    assert_ok(run_here(tiny("decoder", root / "eager", 20, "--checkpoint-every", "10")))
    assert_ok(run_here(tiny("decoder", root / "to_compiled", 10)))
    resumed = run_here(tiny("decoder", root / "to_compiled", 20, *compile_, "--activation-checkpointing", "selective"))
    assert_ok(resumed)
    first = run_here(tiny("decoder", root / "to_eager", 10, *compile_))
    assert_ok(first)
    first_summary = summary(root / "to_eager")
    assert_ok(run_here(tiny("decoder", root / "to_eager", 20)))
    return {"root": root, "first_compiled": first_summary, "first_said": first.stdout, "resumed_said": resumed.stdout}


@pytest.mark.slow
def test_a_compiled_run_resumes_uncompiled_and_the_reverse(inductor):
    root = inductor["root"]
    want = weights_at(root / "eager", 20)
    for name in ("to_compiled", "to_eager"):
        result = summary(root / name)
        assert result["status"] == "complete" and result["step"] == 20 and result["resumed_from"].endswith("-00000010")
        got = weights_at(root / name, 20)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    assert "compile" in summary(root / "to_compiled") and "compile" not in summary(root / "to_eager")
    assert "activation checkpointing: selective over 1 block(s)" in inductor["resumed_said"]


@pytest.mark.slow
def test_checkpoints_of_a_compiled_run_hold_the_plain_names(inductor):
    root = inductor["root"]
    compiled = checkpoint_weights(root / "to_eager" / "checkpoints" / "step-00000010")
    assert compiled.keys() == checkpoint_weights(root / "eager" / "checkpoints" / "step-00000010").keys()
    assert not [k for k in compiled if "_orig_mod" in k or "checkpoint" in k]


@pytest.mark.slow
def test_compiling_is_a_startup_phase_outside_training_time(inductor):
    first = inductor["first_compiled"]
    assert "distseq: compile: the whole model (torch.compile, inductor)" in inductor["first_said"]
    assert first["compile"]["recompiles"] == 0
    phase = first["startup"]["phases_seconds"]["compile"]
    assert phase >= first["compile"]["seconds"] > 0
    # tokens/s is over training time, which leaves the compile out
    assert first["train_seconds"] < first["wall_seconds"] - first["compile"]["seconds"]
    assert first["tokens_per_sec"] == pytest.approx(first["tokens"] / first["train_seconds"], rel=1e-6)


@pytest.mark.slow
def test_the_export_of_a_compiled_run_loads_in_a_fresh_interpreter(inductor, tmp_path):
    out = tmp_path / "export"
    assert_ok(run_here(["export", "--checkpoint", inductor["root"] / "to_eager" / "checkpoints" / "step-00000010",
                        "--out", out]))
    script = ("import sys, torch, distseq\n"
              "model = distseq.load_model(sys.argv[1])\n"
              "print('OK', type(model.forward).__name__, model(torch.zeros(2, 32, dtype=torch.long)).shape)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120,
                          env=cpu_env(), cwd=REPO)
    assert_ok(proc)
    assert proc.stdout.strip() == "OK method torch.Size([2, 32, 32])"


@pytest.mark.multiproc
def test_under_fsdp_each_block_compiles_and_recomputes_and_trains_as_one_eager_process(tmp_path):
    """2 ranks, FSDP2 over compiled (per block) and fully checkpointed blocks: the losses of plain FSDP2."""
    def sharded_run(run_dir, *extra):
        proc = accelerate_launch(two_process_args(), [*tiny("decoder", run_dir, 20, "--num-layers", "2"),
                                                      "--sharding", "fsdp", *extra])
        assert_ok(proc)
        return proc

    sharded_run(tmp_path / "eager")
    sharded = tmp_path / "sharded"
    proc = sharded_run(sharded, "--compile", "--compile-backend", "aot_eager", "--activation-checkpointing", "full")
    for line in ("distseq: activation checkpointing: full over 2 block(s)",
                 "distseq: compile: 2 block(s) (torch.compile, aot_eager)",
                 "distseq: fsdp: 2 block(s) + root sharded over 2 process(es)"):
        assert line in proc.stdout
    got, want = summary(sharded), summary(tmp_path / "eager")
    assert got["world_size"] == 2 and got["sharding"] == "fsdp" and got["compile"]["recompiles"] == 0
    assert got["eval/loss"] == pytest.approx(want["eval/loss"], rel=1e-5)


@pytest.mark.multiproc
def test_a_compiled_model_under_ddp_accumulates_gradients_as_an_eager_one(tmp_path):
    """DDP over the whole compiled model, 2 micro-batches a step (the first without the all-reduce)."""
    accumulate = ["--num-layers", "2", "--grad-accum-steps", "2"]
    assert_ok(run_here([*tiny("decoder", tmp_path / "eager", 20), *accumulate]))
    compiled = tmp_path / "compiled"
    proc = accelerate_launch(two_process_args(), [*tiny("decoder", compiled, 20), *accumulate, "--compile",
                                                  "--compile-backend", "aot_eager"])
    assert_ok(proc)
    got, want = summary(compiled), summary(tmp_path / "eager")
    assert got["world_size"] == 2 and got["sharding"] == "ddp" and got["compile"]["recompiles"] == 0
    assert got["eval/loss"] == pytest.approx(want["eval/loss"], rel=1e-5)


class Recompiling(torch.nn.Module):
    """Reads a Python counter that changes every call: dynamo guards on its value, so every step compiles."""

    def __init__(self, cfg, task, spec):
        super().__init__()
        self.linear, self.calls = torch.nn.Linear(task.num_features(spec), 1), 0

    def forward(self, x, lengths=None):
        self.calls += 1
        return self.linear(x).mean((1, 2)) * (1 + self.calls % 3)  # (B,)


class Uncompilable(torch.nn.Module):
    def __init__(self, cfg, task, spec):
        super().__init__()
        self.linear = torch.nn.Linear(task.num_features(spec), 1)

    def forward(self, x, lengths=None):
        if torch.compiler.is_compiling():  # a form only the compiler sees, which its tracing rejects
            x = x @ torch.ones(7, 7)
        return self.linear(x).mean((1, 2))  # (B,)


@pytest.fixture
def plugin_model():
    from distseq.models import register_model

    names = []

    def add(name, cls):
        register_model(name)(cls)
        names.append(name)
        return name

    yield add
    for name in names:
        MODELS.remove(name)


SMALL = ["--task", "sum-sign", "--seq-len", "6", "--global-batch-size", "8", "--eval-size", "16", "--no-progress",
         "--precision", "no", "--log-with", "none", "--compile", "--compile-backend", "aot_eager"]


def test_recompilations_are_counted_and_their_cause_named(plugin_model, tmp_path):
    name = plugin_model("recompiling", Recompiling)
    proc = run_here(["train", "--model", name, *SMALL, "--max-steps", "4", "--log-every", "2",
                     "--run-dir", tmp_path / "run"])
    assert_ok(proc)
    recompiles = summary(tmp_path / "run")["compile"]["recompiles"]
    assert recompiles >= 2
    warnings = [line for line in proc.stdout.splitlines() if "recompilation(s) since the first step" in line]
    assert len(warnings) == 2  # one per log step that saw the count grow
    assert warnings[-1].startswith(f"distseq: warning: --compile: {recompiles} recompilation(s) since the first step;"
                                   f" the latest because ")
    assert "calls" in warnings[-1]  # dynamo's reason names the guard: the counter's value


def test_a_model_that_cannot_be_compiled_is_one_line_before_the_first_step(plugin_model, tmp_path):
    name = plugin_model("uncompilable", Uncompilable)
    proc = run_here(["train", "--model", name, *SMALL, "--max-steps", "4", "--run-dir", tmp_path / "run"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distseq train: error: --compile: model {name} cannot be compiled")
    assert "must have same reduction dim" in lines[0], lines[0]  # what dynamo found, in its words
    assert lines[0].endswith("train it without --compile")
    assert not (tmp_path / "run" / "checkpoints").exists() and "step=" not in proc.stdout


def test_a_model_given_to_train_is_the_callers_again_afterwards(tmp_path):
    """train(cfg, model=m) with --compile and checkpointing replaces forwards for the run only."""
    import distseq
    from distseq.models import build_model
    from distseq.registry import TASKS

    cfg = distseq.preset("mqar")
    cfg.data.seq_len, cfg.data.vocab_size, cfg.data.num_kv_pairs, cfg.data.eval_size = 32, 32, 4, 32
    cfg.model.hidden_size, cfg.model.num_layers = 16, 2
    cfg.train.max_steps, cfg.train.global_batch_size, cfg.train.run_dir = 2, 8, str(tmp_path / "run")
    cfg.train.compile, cfg.train.compile_backend, cfg.train.activation_checkpointing = True, "aot_eager", "full"
    cfg.log.progress, cfg.log.log_with = False, "none"
    model = build_model(cfg.model, TASKS[cfg.data.task], cfg.task_spec())
    result = distseq.train(cfg, model=model)
    assert result["compile"]["recompiles"] == 0
    assert [unit for unit in [model, *model.blocks] if "forward" in unit.__dict__] == []


def test_options_of_compile_that_apply_without_it_are_refused(tmp_path):
    proc = run_here(["train", "--compile-backend", "eager", "--run-dir", tmp_path / "run"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("distseq train: error: --compile-backend: eager applies under --compile; add "
                                   "--compile or leave it out")


# ---- activation checkpointing


def gradients(model_name: str, mode: str, dropout: float = 0.1) -> dict:
    from distseq.config import preset
    from distseq.models import build_model
    from distseq.registry import TASKS
    from distseq.training.recompute import recompute_blocks

    cfg = preset("default")
    cfg.model.kind, cfg.model.hidden_size, cfg.model.num_layers, cfg.model.dropout = model_name, 16, 2, dropout
    if model_name not in RECURRENT:
        cfg.data.task, cfg.data.seq_len, cfg.data.vocab_size, cfg.data.num_kv_pairs = "mqar", 32, 32, 4
    task, spec = TASKS[cfg.data.task], cfg.task_spec()
    torch.manual_seed(0)
    model = build_model(cfg.model, task, spec)
    said = recompute_blocks(model, mode)
    batch = task.make(torch.Generator().manual_seed(1), 8, spec)
    with torch.random.fork_rng():
        torch.manual_seed(2)  # the dropout masks: the same in every mode, and replayed by the recomputation
        task.loss(model(batch["x"], batch.get("lengths")), batch["y"]).mean().backward()
    return {"said": said, **{name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("model", BUILT_IN)
def test_activation_checkpointing_gives_the_same_gradients_to_the_bit(model):
    plain = gradients(model, "none")
    assert plain.pop("said") == ""
    for mode in ("full", "selective") if model not in ("gru", "lstm", "rnn") else ("full",):
        got = gradients(model, mode)
        what = "the whole model (it has no blocks)" if model in ("gru", "lstm", "rnn") else "2 block(s)"
        assert got.pop("said") == f"activation checkpointing: {mode} over {what}"
        assert got.keys() == plain.keys()
        for name in plain:
            assert torch.equal(got[name], plain[name]), (mode, name)


@pytest.mark.parametrize("model", ["gru", "lstm", "rnn"])
def test_selective_checkpointing_of_a_model_without_blocks_is_refused(model, tmp_path):
    proc = run_here([*tiny(model, tmp_path / "run"), "--activation-checkpointing", "selective"])
    assert proc.returncode == 2 and not (tmp_path / "run").exists()
    assert proc.stderr.strip() == (f"distseq train: error: --activation-checkpointing: selective keeps each block's "
                                   f"matrix multiplies, and model {model} has no blocks (no nn.ModuleList); use full")


def test_checkpointing_a_recurrence_with_dropout_is_refused_on_a_gpu_only():
    """cuDNN draws the dropout between recurrent layers itself: a replay cannot restore it (the check reads the
    modules only, so it runs without a GPU)."""
    from distseq.errors import ConfigError
    from distseq.models.recurrent import RecurrentClassifier
    from distseq.training.recompute import check_recompute

    dropping = RecurrentClassifier("lstm", 2, 8, 2, 1, dropout=0.1)
    check_recompute(dropping, "full", "lstm", torch.device("cpu"))
    check_recompute(RecurrentClassifier("lstm", 2, 8, 2, 1), "full", "lstm", torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"--activation-checkpointing: model lstm's dropout between recurrent layers"):
        check_recompute(dropping, "full", "lstm", torch.device("cuda"))
    check_recompute(dropping, "none", "lstm", torch.device("cuda"))


# ---- the step path: flags read a step later


ADDING = ["train", "--task", "adding", "--seq-len", "6", "--global-batch-size", "8", "--max-steps", "10",
          "--eval-every", "0", "--eval-size", "32", "--no-progress", "--data-streaming", "--log-with", "none"]


def test_a_skipped_step_read_a_step_later_trains_exactly_as_one_read_at_once(tmp_path):
    """Step 4 is non-finite; logging every step reads every flag at once, every 10 steps reads it at step 5."""
    data = adding_rows(tmp_path / "d.jsonl", 80, bad_rows=(27,))  # rows 24..31 are step 4
    runs = {}
    for every in (1, 10):
        run = tmp_path / f"every-{every}"
        assert_ok(run_here([*ADDING, "--data-files", data, "--on-nonfinite", "skip", "--log-every", str(every),
                            "--checkpoint-every", "0", "--run-dir", run]))
        runs[every] = run
        assert summary(run)["skipped_steps"] == 1 and summary(run)["step"] == 10
    at_once, later = weights_at(runs[1], 10), weights_at(runs[10], 10)
    assert at_once.keys() == later.keys() and all(torch.equal(at_once[k], later[k]) for k in at_once)
    assert all(torch.isfinite(w).all() for w in later.values())


@pytest.mark.parametrize("checkpoint_every, kept", [(0, []), (2, ["step-00000002"]), (3, ["step-00000003"])])
def test_a_non_finite_step_read_later_still_stops_naming_it_and_is_never_saved(checkpoint_every, kept, tmp_path):
    """Under --on-nonfinite stop the error names step 4 whenever its flag is read (at step 5 when nothing reads
    it sooner); a checkpoint due at step 4 reads it first and is not written."""
    data = adding_rows(tmp_path / "d.jsonl", 80, bad_rows=(27,))
    run = tmp_path / "run"
    proc = run_here([*ADDING, "--data-files", data, "--log-every", "10", "--checkpoint-every", str(checkpoint_every),
                     "--run-dir", run])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "distseq train: error: non-finite loss or gradient at step 4; stopped without saving "
        "(--on-nonfinite skip skips such steps)"]
    checkpoints = run / "checkpoints"
    assert (sorted(p.name for p in checkpoints.iterdir()) if checkpoints.exists() else []) == kept


class SignalsAtMarker(torch.nn.Module):
    """Sends this process SIGTERM when it sees the value 777 in its input (a row of the data files)."""

    def __init__(self, cfg, task, spec):
        super().__init__()
        self.linear = torch.nn.Linear(task.num_features(spec), 1)

    def forward(self, x, lengths=None):
        if bool((x == 777.0).any()):
            os.kill(os.getpid(), signal.SIGTERM)
        return self.linear(x).mean((1, 2))  # (B,)


def test_a_step_saved_on_a_signal_has_its_own_flags_read_first(plugin_model, tmp_path):
    """SIGTERM arrives in step 4 (read at step 5); step 5 itself is non-finite. Before step 5 is saved its own
    flag is read: under --on-nonfinite stop the run stops naming step 5 and saves nothing; under skip it saves
    step 5 with the skipped step counted."""
    name = plugin_model("signals-at-marker", SignalsAtMarker)
    data = tmp_path / "d.jsonl"
    with open(data, "w") as handle:
        for row in range(80):  # rows 24..31 are step 4, 32..39 step 5
            values = [777.0 if row == 25 and i == 2 else 0.1 * i for i in range(6)]
            handle.write(json.dumps({"sequence": [[v, float(i in (0, 4))] for i, v in enumerate(values)],
                                     "label": 1e30 if row == 35 else 0.5}) + "\n")
    args = [*ADDING, "--model", name, "--data-files", data, "--log-every", "10", "--checkpoint-every", "0"]
    stopped = run_here([*args, "--run-dir", tmp_path / "stop"])
    assert stopped.returncode == 1, stopped.stdout[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        "distseq train: error: non-finite loss or gradient at step 5; stopped without saving "
        "(--on-nonfinite skip skips such steps)")
    assert not (tmp_path / "stop" / "checkpoints").exists()
    skipped = run_here([*args, "--on-nonfinite", "skip", "--run-dir", tmp_path / "skip"])
    assert skipped.returncode == 143, skipped.stderr[-2000:]
    result = summary(tmp_path / "skip")
    assert result["step"] == 5 and result["skipped_steps"] == 1 and result["status"] == "preempted"


@pytest.mark.multiproc
def test_two_ranks_skip_a_step_only_one_saw_as_non_finite(tmp_path):
    """The bad row is in one rank's share of step 4: both leave the update out (each holds half the weights,
    FSDP2), though the flag is read at step 5; the weights are those of one process reading it at once."""
    data = adding_rows(tmp_path / "d.jsonl", 80, bad_rows=(29,))
    args = [*ADDING, "--data-files", str(data), "--on-nonfinite", "skip", "--checkpoint-every", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert_ok(run_here([*args, "--log-every", "1", "--run-dir", one]))
    assert_ok(accelerate_launch(two_process_args(), [*args, "--log-every", "10", "--sharding", "fsdp",
                                                     "--run-dir", str(two)]))
    assert summary(two)["world_size"] == 2 and summary(two)["skipped_steps"] == 1
    want, got = weights_at(one, 10), weights_at(two, 10)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)  # 2 ranks sum in another order


@pytest.mark.multiproc
def test_a_signal_to_one_rank_stops_both_at_the_same_step_boundary(tmp_path):
    """SIGTERM reaches one rank only; the flag is agreed with the next step's all-reduce and read a step later:
    both ranks save the same step (one checkpoint written by 2 processes) and exit 143; the run then resumes."""
    run = tmp_path / "run"
    args = ["train", "--max-steps", "100000", "--log-every", "20", "--eval-every", "0", "--eval-size", "64",
            "--global-batch-size", "64", "--hidden-size", "16", "--no-progress", "--checkpoint-every", "0",
            "--precision", "no", "--run-dir", str(run)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *two_process_args(), "-m", "distseq.cli", *args]
    with Started(cmd, tmp_path / "logs", env=cpu_env(DISTSEQ_SLOW_RANK="0:5")) as launched:
        launched.wait_for_line("step=20/")
        ranks = launched.ranks()
        assert len(ranks) == 2
        ranks[1].send_signal(signal.SIGTERM)
        ended = launched.finish(timeout=120)
    assert ended.returncode != 0
    saved = [line for line in ended.stdout.splitlines() if "SIGTERM: saved" in line]
    assert len(saved) == 1, ended.stdout[-2000:]  # the main process says it once for both
    step = int(saved[0].split(" at step ")[1].split(";")[0])
    assert step > 20
    checkpoint = run / "checkpoints" / f"step-{step:08d}"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["world_size"] == 2 and sorted(p.name for p in (run / "checkpoints").iterdir()) == [checkpoint.name]
    resumed = subprocess.run([*DISTSEQ, *[a if a != "100000" else str(step + 5) for a in args]],
                             capture_output=True, text=True, timeout=120, env=cpu_env(), cwd=REPO)
    assert_ok(resumed)
    assert summary(run)["step"] == step + 5 and summary(run)["resumed_from"].endswith(checkpoint.name)
