"""``distseq bench --quick`` runs every suite end to end and writes every key with a sane type and range.

Speed is never asserted here (benchmarks are not timed tests); the figures themselves are in the
closing notes and in a full ``distseq bench`` run's report.
"""

import json
import math
import os

import pytest
import yaml
from conftest import assert_ok, cpu_env, run_distseq, run_here, summary

from distseq.bench import GOALS, SUITE_NAMES
from distseq.bench.report import PLOTS_HINT, write_report

# real training runs: left out of the fast tier (-m 'not slow'). The quick bench's own limit (600 s) binds, not
# pytest's default 300 s, which a loaded machine once reached during the module's setup
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PLOTS = {"overhead.png", "scaling.png", "time_to_accuracy.png", "precision.png", "step_time.png", "memory.png",
         "recall_induction.png", "startup.png"}


def finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # a process of its own: its suites print to the stdout they inherit
    proc = run_distseq(["bench", "--quick", "--out", str(out)], timeout=600)
    assert_ok(proc)
    return out, proc


def test_bench_quick_writes_every_key(quick_bench):
    out, proc = quick_bench
    bench = json.loads((out / "bench.json").read_text())
    assert bench["quick"] is True and bench["suites_run"] == list(SUITE_NAMES)
    assert {f"{name}.json" for name in SUITE_NAMES} <= {p.name for p in out.iterdir()}

    assert 0.2 < bench["overhead_ratio"] < 5
    assert 0.5 < bench["scaling_2proc"] < 4 and bench["scaling_efficiency"] == pytest.approx(bench["scaling_2proc"] / 2)
    assert 0 < bench["stream_ratio"] < 5 and 0 < bench["seek_ratio"] < 10
    assert finite(bench["time_to_99_s"]) and 0 < bench["time_to_99_s"] < 300
    assert finite(bench["seed_recipe_seconds"]) and bench["seed_recipe_seconds"] > 0
    assert 0.85 <= bench["seed_recipe_accuracy"] <= 1.0  # the original recipe, bug fixed, learns the task
    for key in ("overhead_ratio", "scaling_2proc", "scaling_efficiency", "stream_ratio", "seek_ratio",
                "decoder_overhead_ratio", "token_stream_ratio"):
        assert finite(bench[key]) and 0 < bench[key] < 5, key
    assert bench["token_stream_seq_len"] == 2048
    tokens = bench["suites"]["stream"]["token_tasks"]
    assert set(tokens) == {"mqar", "induction", "selective-copy"}
    assert bench["token_stream_ratio"] == min(t["ratio"] for t in tokens.values())
    # the recall suite: its headlines, both curves, one MQAR row per cell of the quick list
    assert 0 <= bench["induction_accuracy_2_layers"] <= 1 and 0 <= bench["induction_accuracy_1_layer"] <= 1
    recall = bench["suites"]["recall"]
    assert set(recall["induction_curves"]) == {"1", "2"} and all(recall["induction_curves"].values())
    assert [(r["num_kv_pairs"], r["seq_len"]) for r in bench["mqar_table"]] == [(2, 16), (4, 32)]
    for row in bench["mqar_table"]:
        assert 0 <= row["accuracy"] <= 1 and 1 <= row["steps"] <= 4 and row["train_seconds"] > 0
        assert row["steps_to_0.99"] in (None, 2, 4) and (row["steps_to_0.99"] is None) == (row["accuracy"] < 0.99)
    assert recall["config"]["mqar_4_pairs"]["model"]["short_conv"] == 3
    # the mixers suite: every mixer against attention at both lengths, attention itself at exactly 1
    speed = bench["mixer_speed_table"]
    assert {(r["model"], r["seq_len"]) for r in speed} == {
        (m, t) for m in ("decoder", "sliding-window", "based", "hyena", "mamba") for t in (32, 64)}
    for row in speed:
        assert row["tokens_per_sec"] > 0 and finite(row["speed_vs_attention"])
        assert (row["speed_vs_attention"] == 1.0) == (row["model"] == "decoder")
        assert ("activation_mb" in row) == (row["seq_len"] == 64) and row.get("activation_mb", 1) > 0
        assert ("peak_rss_mb" in row) == (row["seq_len"] == 64)
        assert row.get("peak_rss_mb", 1000) > bench["suites"]["mixers"]["process_baseline_mb"] > 50
    # the tokens suite: training from a token file against the stream, the index of 2x10^5 ids, generation both ways
    tokens = bench["suites"]["tokens"]
    assert finite(bench["lm_files_ratio"]) and 0 < bench["lm_files_ratio"] < 5
    assert bench["lm_files_ratio"] == tokens["files_tokens_per_sec"] / tokens["stream_tokens_per_sec"]
    assert tokens["lm_index"]["tokens"] == 200_200 and tokens["lm_index"]["documents"] == 200  # + an end id each
    assert bench["lm_index_seconds"] == tokens["lm_index"]["seconds"] > 0
    assert tokens["lm_index_parquet"]["tokens"] == 20_020 and tokens["lm_index_parquet_seconds"] > 0
    generation = tokens["generation"]
    assert generation["same_tokens"] is True and generation["new_tokens"] == 16
    assert bench["generation_cache_speedup"] == generation["cached_tokens_per_s"] / generation["uncached_tokens_per_s"]
    assert set(bench["goals"]) == set(GOALS)
    assert all(isinstance(g["met"], bool) for g in bench["goals"].values())

    shares = bench["step_time_shares"]
    assert set(shares) == {"data", "forward_backward", "optimizer", "logging", "other"}
    assert all(0 <= v <= 1 for v in shares.values()) and sum(shares.values()) == pytest.approx(1, abs=0.02)
    assert shares["forward_backward"] > 0.3  # an LSTM of hidden 256 spends its step in the model

    table = bench["precision_table"]
    assert {(r["model"], r["precision"]) for r in table} == {
        (m, p) for m in ("decoder", "rnn", "gru", "lstm", "transformer", "sliding-window", "based", "hyena", "mamba")
        for p in ("no", "bf16", "fp16")}
    for row in table:
        assert (row["works"] and row["steps_per_sec"] > 0) or (not row["works"] and row["steps_per_sec"] is None
                                                               and row["error"])
    assert all(r["works"] for r in table if r["precision"] == "no")

    assert set(bench["peak_rss_mb"]) == set(SUITE_NAMES) and all(50 < v < 8000 for v in bench["peak_rss_mb"].values())

    suites = bench["suites"]
    assert suites["scaling"]["samples_per_sec"]["2"] > 0 and suites["scaling"]["samples_per_sec"]["1"] > 0
    curve = suites["accuracy"]["default_curve"]
    assert len(curve) == 30 and [p["step"] for p in curve] == list(range(50, 1501, 50))
    assert all(a["train_seconds"] < b["train_seconds"] for a, b in zip(curve, curve[1:]))
    assert len(suites["accuracy"]["seed_recipe_curve"]) == 10

    assert "overhead_ratio" in proc.stdout and "stream_ratio=" in proc.stdout


def test_bench_quick_files_suite_reads_the_same_rows_both_ways(quick_bench):
    out, proc = quick_bench
    bench = json.loads((out / "bench.json").read_text())
    for key in ("files_ratio", "files_seek_ratio", "files_index_seconds", "files_index_mb"):
        assert finite(bench[key]) and bench[key] > 0, key
    files = bench["suites"]["files"]
    assert files["index_rows"] == 10**5 and files["seek_position"] == 10**7  # --quick: the seek cycles epochs
    assert finite(files["files_ratio_jsonl"]) and finite(files["files_ratio_variable"])
    assert set(files["cases"]) == {"parquet", "jsonl", "variable"}
    for name, case in files["cases"].items():
        # a digest of every row each side read, in order: the ratio compares reading the same rows
        assert case["checksum_distseq"] == case["checksum_reference"], name
        assert case["timed_rows"] >= 2 * 16384
        assert case["distseq_rows_per_sec"] > 0 and case["reference_rows_per_sec"] > 0
        assert case["index_mb"] > 0 and case["file_mb"] > 0
    assert files["cases"]["variable"]["variable"] and not files["cases"]["jsonl"]["variable"]
    assert "files_ratio=" in proc.stdout and "| `files_ratio` |" in (out / "report.md").read_text()


def test_bench_quick_report_embeds_its_plots(quick_bench):
    out, _ = quick_bench
    assert PLOTS <= {p.name for p in out.glob("*.png")}
    report = (out / "report.md").read_text()
    for name in PLOTS:
        assert f"]({name})" in report
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `overhead_ratio` |" in report and "| `time_to_99_s` |" in report


def test_report_without_matplotlib_says_how_to_get_plots(quick_bench, tmp_path, without_matplotlib):
    out, _ = quick_bench
    bench = json.loads((out / "bench.json").read_text())
    messages = []
    write_report(tmp_path, bench, messages.append)
    assert not list(tmp_path.glob("*.png"))
    assert PLOTS_HINT in (tmp_path / "report.md").read_text() and PLOTS_HINT in messages[-1]
    assert "pip install -e '.[bench]'" in PLOTS_HINT


def test_bench_quick_speed_suite_compares_compile_and_checkpointing(quick_bench):
    out, proc = quick_bench  # the quick run of every suite: its compile and checkpointing comparisons, in detail
    result = json.loads((out / "speed.json").read_text())
    bench = json.loads((out / "bench.json").read_text())
    headlines = [f"{key}_{name}" for key in ("compile_ratio", "compile_vs_plain", "compile_seconds")
                 for name in ("decoder", "lstm")]
    headlines += [f"ac_{mode}_{figure}" for mode in ("full", "selective") for figure in ("memory_cut", "tokens_cost")]
    assert all(bench[key] == result[key] for key in headlines)
    for name in ("decoder", "lstm"):
        compared = result[f"compile_{name}"]
        rates = compared["tokens_per_sec"]
        assert set(rates) == {"compiled", "eager", "plain"} and all(finite(v) and v > 0 for v in rates.values())
        assert all(len(values) == 1 for values in compared["repeats"].values())  # --quick: one repeat
        assert result[f"compile_ratio_{name}"] == pytest.approx(rates["compiled"] / rates["eager"])
        assert result[f"compile_vs_plain_{name}"] == pytest.approx(rates["compiled"] / rates["plain"])
        # the compile phase is summary.json's, outside training time; the fixed shapes compile once
        assert result[f"compile_seconds_{name}"] == compared["compile"][0]["seconds"] > 0
        assert [c["recompiles"] for c in compared["compile"]] == [0]
        assert compared["dynamo"]["frames_total"] >= 1 and compared["dynamo"]["ops_captured"] >= 1
    # the decoder's whole forward is one graph; dynamo leaves the LSTM's recurrence to eager, and the suite says so
    assert result["compile_decoder"]["dynamo"]["left_to_eager"] == []
    assert result["compile_decoder"]["dynamo"]["ops_captured"] > result["compile_lstm"]["dynamo"]["ops_captured"]
    assert "dynamo does not trace nn.LSTM" in proc.stdout
    # activation checkpointing: one fresh process per mode, memory above what was resident before the first step
    checkpointing = result["checkpointing"]
    assert checkpointing["sizes"] == {"seq_len": 2048, "batch": 2, "steps": 2, "repeats": 1, "num_layers": 2,
                                      "hidden_size": 64}
    assert result["compile_decoder"]["backend"] == result["compile_lstm"]["backend"] == "aot_eager"  # --quick
    on_cpu = result["machine"]["device"] == "cpu"
    assert checkpointing["measure"].startswith("resident peak over the training steps" if on_cpu else "cuda")
    rows = {row["mode"]: row for row in checkpointing["table"]}
    assert set(rows) == {"none", "full", "selective"}
    for row in rows.values():
        assert row["training_peak_mb"] > 1 and row["tokens_per_sec"] > 0
        assert 50 < row["before_first_step_mb"] < 4000 if on_cpu else row["before_first_step_mb"] >= 0
    assert 0 < result["ac_full_memory_cut"] < 1 and result["ac_selective_memory_cut"] < 1
    assert result["ac_full_memory_cut"] == pytest.approx(1 - rows["full"]["training_peak_mb"] /
                                                         rows["none"]["training_peak_mb"])
    assert result["ac_full_tokens_cost"] == pytest.approx(1 - rows["full"]["tokens_per_sec"] /
                                                          rows["none"]["tokens_per_sec"])
    assert all(finite(result[f"ac_{mode}_tokens_cost"]) and result[f"ac_{mode}_tokens_cost"] < 1
               for mode in ("full", "selective"))
    for key in ("compile_ratio_decoder", "ac_full_memory_cut", "ac_full_tokens_cost"):
        assert key in GOALS and isinstance(bench["goals"][key]["met"], bool)
    machine = result["machine"]
    assert machine["device"] in ("cpu", "cuda:0") and isinstance(machine["cpu_flags"], list)
    assert machine["aten_cpu_capability"] and machine["threads"] >= 1
    assert "compile_ratio_decoder" in proc.stdout and "| `ac_full_memory_cut` |" in (out / "report.md").read_text()


def test_bench_zoology_quick_is_a_sweep_that_resumes_and_ends_in_a_table_and_figures(tmp_path):
    """--quick: two models, one width, one cell, one learning rate; a second run finds every point complete and
    rebuilds the same table from the run dirs alone."""
    proc = run_distseq(["bench", "zoology", "--quick", "--out", str(tmp_path)], timeout=300)
    assert_ok(proc)
    result = json.loads((tmp_path / "zoology.json").read_text())
    rows = result["zoology_table"]
    assert {(r["model"], r["width"], r["seq_len"], r["num_kv_pairs"]) for r in rows} == {
        ("decoder", 16, 16, 2), ("mamba", 16, 16, 2)}
    sweep = tmp_path / "zoology-sweep"
    assert (sweep / "model=decoder,short-conv=3,hidden-size=16,seq-len=16,num-kv-pairs=2,lr=0.003").is_dir()
    for row in rows:
        assert row["complete"] and 0 <= row["accuracy"] <= 1 and row["lr"] == 3e-3
        assert (row["reached_at_step"] is not None) == (row["accuracy"] >= 0.99)
        [point] = sweep.glob(f"model={row['model']},*")
        assert row["state_size"] == summary(point)["state_size_per_layer"] > 0
        assert row["parameters"] == summary(point)["parameters"]
    assert result["complete"] and result["sweep_exit_code"] == 0
    # a suite named alone: bench.json holds that suite only, its headline, and no other suite's goals
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["suites_run"] == ["zoology"] and bench["quick"] is True and bench["zoology_table"] == rows
    assert bench["goals"] == {} and set(bench["peak_rss_mb"]) == set(bench["suites"]) == {"zoology"}
    table = (tmp_path / "zoology.md").read_text()
    assert table.startswith("| model | seq 16, 2 pairs, width 16 |") and "| attention |" in table
    for name in ("zoology_width.png", "zoology_state.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (tmp_path / "report.md").read_text()
    again = run_distseq(["bench", "zoology", "--quick", "--out", str(tmp_path)], timeout=300)
    assert_ok(again)
    assert "sweep: 0 of 2 point(s) to run" in again.stdout
    assert json.loads((tmp_path / "zoology.json").read_text())["zoology_table"] == rows
    # the full plan into the same directory would drop the quick points: refused in one line, nothing trained
    full = run_distseq(["bench", "zoology", "--out", str(tmp_path)], timeout=300)
    assert full.returncode == 1
    refusal = [line for line in full.stderr.splitlines() if "distseq bench: zoology: error:" in line]
    assert len(refusal) == 1 and "may only add points" in refusal[0] and "Traceback" not in full.stderr
    assert len(list(sweep.iterdir())) == len(list((tmp_path / "zoology-sweep").iterdir()))


def test_bench_zoology_on_slurm_submits_one_array_and_reports_what_is_not_done(tmp_path):
    """--backend slurm: the points go to one job array (a stand-in sbatch records its arguments), the table says
    nothing is complete yet, and a second run while the array is queued submits nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch.args\necho 4242\n')
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 4242\n")  # the array is still queued
    for tool in ("sbatch", "squeue"):
        (bin_dir / tool).chmod(0o755)
    env = cpu_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    out = tmp_path / "out"
    proc = run_distseq(["bench", "zoology", "--quick", "--backend", "slurm", "--out", str(out)], env=env)
    assert_ok(proc)
    assert "sweep: submitted job array 4242: 2 point(s)" in proc.stdout
    args = (tmp_path / "sbatch.args").read_text().split()
    assert "--array=0-1" in args and "--requeue" in args
    assert yaml.safe_load((out / "zoology-sweep.yaml").read_text())["backend"] == "slurm"
    result = json.loads((out / "zoology.json").read_text())
    assert not result["complete"] and all(r["accuracy"] is None for r in result["zoology_table"])
    assert "Not every point is complete" in (out / "report.md").read_text()
    again = run_distseq(["bench", "zoology", "--quick", "--backend", "slurm", "--out", str(out)], env=env)
    assert_ok(again)
    assert "job array 4242 is still queued or running: nothing submitted" in again.stdout
    assert len((tmp_path / "sbatch.args").read_text().splitlines()) == 1


def test_bench_names_the_suites_it_knows(tmp_path):
    proc = run_distseq(["bench", "zoo", "--out", str(tmp_path)])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(", sweep, mixers, tokens, speed, zoology)")


def test_profile_steps_writes_a_trace_and_the_shares(tmp_path):
    proc = run_here(["train", "--run-dir", str(tmp_path), "--max-steps", "8", "--eval-every", "0",
                        "--eval-size", "256", "--log-every", "4", "--no-progress", "--profile-steps", "2:6"])
    assert_ok(proc)
    traces = list((tmp_path / "tensorboard" / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"distseq/data", "distseq/forward_backward", "distseq/optimizer", "distseq/logging"} <= names
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["steps"] == [2, 6] and profile["step_ms"] > 0
    assert sum(profile["step_time_shares"].values()) == pytest.approx(1, abs=0.02)
    assert profile["top_operators"] and all(op["calls"] > 0 for op in profile["top_operators"])
    assert "distseq: profiled steps 3..6" in proc.stdout and "self cpu ms" in proc.stdout
    assert summary(tmp_path)["profile"]["steps"] == [2, 6]


def test_summary_counts_training_time_without_evaluation(tmp_path):
    assert_ok(run_here(["train", "--run-dir", str(tmp_path), "--max-steps", "40", "--eval-every", "10",
                           "--eval-size", "256", "--no-progress"]))
    result = summary(tmp_path)
    history = result["eval_history"]
    assert [p["step"] for p in history] == [10, 20, 30, 40]
    assert all(0 < a["train_seconds"] < b["train_seconds"] for a, b in zip(history, history[1:]))
    assert history[-1]["eval/accuracy"] == result["eval/accuracy"]
    assert 0 < result["train_seconds"] < result["wall_seconds"]
    assert result["steps_per_sec"] == pytest.approx(40 / result["train_seconds"])


def test_a_run_resumed_inside_the_profiled_range_profiles_from_its_first_step(tmp_path):
    common = ["train", "--run-dir", str(tmp_path), "--eval-size", "256", "--no-progress"]
    assert_ok(run_here([*common, "--max-steps", "4"]))
    proc = run_here([*common, "--max-steps", "8", "--profile-steps", "2:6"])
    assert_ok(proc)
    assert "resuming from" in proc.stdout and "profiled steps 5..6" in proc.stdout
    assert json.loads((tmp_path / "profile.json").read_text())["steps"] == [4, 6]


def test_bench_quick_checkpoint_suite_measures_sync_async_and_a_resharded_load(quick_bench):
    out, proc = quick_bench  # the quick run of every suite: its checkpoint suite, read here in detail
    result = json.loads((out / "checkpoint.json").read_text())
    bench = json.loads((out / "bench.json").read_text())
    assert "checkpoint" in bench["suites_run"] and bench["quick"] is True
    headlines = ("async_block_ratio", "save_mb_per_s", "load_mb_per_s", "reshard_load_seconds")
    assert all(bench[key] == result[key] for key in headlines)
    assert isinstance(bench["goals"]["async_block_ratio"]["met"], bool)
    assert result["goals"] == {"async_block_ratio": bench["goals"]["async_block_ratio"]}
    for key in (*headlines, "state_mb", "state_tensor_mb", "sync_block_seconds", "async_block_seconds",
                "async_total_seconds", "load_seconds", "verify_seconds", "reshard_state_mb"):
        assert finite(result[key]) and result[key] > 0, key
    # speed is not asserted; the figures hang together as defined
    assert result["async_block_ratio"] == pytest.approx(result["async_block_seconds"] / result["sync_block_seconds"])
    assert result["save_mb_per_s"] == pytest.approx(result["state_mb"] / result["sync_block_seconds"])
    assert result["load_mb_per_s"] == pytest.approx(result["state_mb"] / result["load_seconds"])
    assert result["async_total_seconds"] >= result["async_block_seconds"]
    assert all(len(times) == 3 for times in result["repeats_seconds"].values())
    # state/ as written: DCP's .metadata and one file of this one process; weights + 2 AdamW moments in it
    files = result["state_files_bytes"]
    assert set(files) == {".metadata", "__0_0.distcp"}
    assert result["state_mb"] == pytest.approx(sum(files.values()) / 1e6)
    parameters = result["model"]["parameters"]
    assert result["state_tensor_mb"] == pytest.approx(3 * 4 * parameters / 1e6, rel=0.01)
    assert result["state_tensor_mb"] < result["state_mb"] < 1.2 * result["state_tensor_mb"]
    assert result["load_exact"] is True and result["reshard_exact"] is True and result["reshard_from_ranks"] == 2
    assert set(result["reshard_state_files_bytes"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert result["quick"] is True and "QUICK" in result["note"] and "blocked" in result["note"]
    assert result["machine"]["cpu_count"] >= 1 and result["filesystem"]["type"]
    assert "async_block_ratio=" in proc.stdout


@pytest.mark.multiproc
def test_bench_quick_startup_suite_times_launch_to_the_first_step_by_phase(quick_bench):
    out, proc = quick_bench  # the quick run of every suite: its start-up launches, read here in detail
    result = json.loads((out / "startup.json").read_text())
    bench = json.loads((out / "bench.json").read_text())
    assert "startup" in bench["suites_run"] and bench["startup_seconds"] == result["startup_seconds"]
    counts = [str(n) for n in result["processes"]]
    assert counts[0] == "1" and len(counts) >= 2 and set(result["startup_seconds"]) == set(counts)
    tolerance = 0.05  # the process's start time in /proc has a resolution of 10 ms
    for n in counts:
        seconds, phases = result["startup_seconds"][n], result["phases_seconds"][n]
        assert finite(seconds) and seconds > 0, n
        assert {"imports", "rendezvous", "first_step"} <= set(phases) and all(v >= 0 for v in phases.values()), n
        # the phases are the main process's timeline inside the window that starts at the launch
        assert seconds >= sum(phases.values()) - tolerance, n
        assert result["launcher_seconds"][n] >= -tolerance, n
        assert seconds == pytest.approx(result["launcher_seconds"][n] + sum(phases.values()), abs=tolerance), n
    assert result["largest_growing_phase"] in result["phases_seconds"][counts[-1]]
    assert result["growth"] == pytest.approx(result["startup_seconds"][counts[-1]] / result["startup_seconds"]["1"])
    assert result["threads_per_process"] == 1 and result["repeats"] == 1 and result["cpu_count"] >= 1
    assert "start-up (s)" in proc.stdout and "## Start-up" in (out / "report.md").read_text()
