"""The stream suite: the data pipeline against raw ``torch.randn`` on this machine, in one run.

It compares, per process, the samples/s of
  (a) raw ``torch.randn`` of the same shape in blocks (the reference),
  (b) the distseq stream through ``datasets`` + DataLoader with 0 and 2 workers,
  (c) a naive ``datasets`` generator yielding one sample per example (a short run, for the record),
and the time to the first batch at stream position 0 and 10^12, and the cost of ``--verify-data``.
The token tasks are measured at seq_len 2,048 in tokens/s: the stream against ``torch.randint`` blocks of
the stream's block size (``token_stream_ratio``, the lowest of the three), and each task's ``make`` alone.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable, Dict, Iterator

import torch

from distseq.config import DataConfig
from distseq.data.stream import Layout, SampleSource, micro_batches, steps_per_example, train_loader
from distseq.registry import TASKS
from distseq.tasks import TaskSpec, spec_for

SEEK_POSITION = 10**12
TOKEN_SEQ_LEN = 2048
# the token tasks' shapes at TOKEN_SEQ_LEN: Zoology's MQAR vocabulary, Mamba's selective copying
TOKEN_SHAPES = {
    "mqar": dict(vocab_size=8192, num_kv_pairs=64),
    "induction": dict(vocab_size=8192),
    "selective-copy": dict(vocab_size=16, copy_len=16),
}
TOKEN_MICRO_BATCH = 64


def samples_per_sec(make_iterator: Callable[[], Iterator], samples_per_item: int, seconds: float) -> float:
    """Consume items for about ``seconds`` (after one warm-up item); return samples/s."""
    items = make_iterator()
    next(items)
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        next(items)
        count += 1
    return count * samples_per_item / elapsed


def _raw_blocks(spec: TaskSpec, features: int, block: int) -> Iterator[torch.Tensor]:
    while True:
        yield torch.randn(block, spec.seq_len, features)  # (K, T, F)


def _stream(task: str, spec: TaskSpec, micro_batch: int, workers: int, first_step: int = 0) -> Iterator[dict]:
    """The trainer's stream for one process, with the default block size and example grouping."""
    defaults = DataConfig()
    source = SampleSource(task, spec, seed=0, block_size=defaults.block_size)
    loader = train_loader(source, Layout(micro_batch, 1, 1), 0, first_step, 10**9, defaults.samples_per_example,
                          workers)
    return micro_batches(loader, micro_batch)


def _naive(spec: TaskSpec) -> Iterator[dict]:
    """What the stream replaces: one datasets example per sample, collated by the DataLoader."""
    from datasets import IterableDataset

    def one_per_example():
        while True:
            x = torch.randn(spec.seq_len, 1)
            yield {"x": x, "y": float(x.sum() > 0)}

    dataset = IterableDataset.from_generator(one_per_example)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=256))


def _first_batch_seconds(first_step: int, spec: TaskSpec, micro_batch: int) -> float:
    started = time.perf_counter()
    next(_stream("sum-sign", spec, micro_batch, 0, first_step=first_step))
    return time.perf_counter() - started


def _randint_tokens_per_sec(vocab_size: int, block: int, seq_len: int, seconds: float) -> float:
    """Tokens/s of ``torch.randint(0, V, (block, T))`` blocks: the reference for the token stream."""
    gen = torch.Generator().manual_seed(0)
    torch.randint(0, vocab_size, (block, seq_len), generator=gen)
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or count == 0:
        torch.randint(0, vocab_size, (block, seq_len), generator=gen)
        count += 1
    return count * block * seq_len / elapsed


def _make_tokens_per_sec(name: str, spec: TaskSpec, block: int, seconds: float) -> float:
    """Tokens/s of the task's ``make`` alone, one block at a time (what the stream adds is the rest)."""
    make, gen = TASKS[name].make, torch.Generator()
    make(gen.manual_seed(0), block, spec)
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or count == 0:
        make(gen.manual_seed(count + 1), block, spec)
        count += 1
    return count * block * spec.seq_len / elapsed


def _stream_tokens_per_sec(name: str, spec: TaskSpec, micro_batch: int, seconds: float, warm: bool) -> float:
    """Tokens/s of the real stream (SampleSource, train_loader, micro_batches; 0 workers), timed over
    whole ``datasets`` examples (each is generated when its first micro-batch is asked for, so a
    partial one would count its cost without all of its tokens); ``warm``: the first one untimed."""
    sample_bytes = SampleSource(name, spec, seed=0, block_size=DataConfig().block_size).sample_bytes()
    per_example = steps_per_example(Layout(micro_batch, 1, 1), DataConfig().samples_per_example, sample_bytes)
    items = _stream(name, spec, micro_batch, 0)
    for _ in range(per_example if warm else 0):
        next(items)
    examples, started = 0, time.perf_counter()
    while True:
        for _ in range(per_example):
            next(items)
        examples += 1
        if (elapsed := time.perf_counter() - started) >= seconds:
            return examples * per_example * micro_batch * spec.seq_len / elapsed


def token_stream_benchmark(seconds: float, warm: bool = True, seq_len: int = TOKEN_SEQ_LEN,
                           micro_batch: int = TOKEN_MICRO_BATCH) -> Dict:
    """Per token task: the stream's tokens/s against ``torch.randint`` blocks of the stream's block size
    measured around it (half before, half after), and ``make`` alone against the same reference.

    On one thread, as a DataLoader worker generates (``torch.randint`` is one thread at any setting, and
    the small parallel ops of a task only lose to a second thread on a busy machine)."""
    block = DataConfig().block_size
    tasks = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, shape in TOKEN_SHAPES.items():
            spec = spec_for(name, seq_len, **shape)
            before = _randint_tokens_per_sec(spec.vocab_size, block, seq_len, seconds / 4)
            make = _make_tokens_per_sec(name, spec, block, seconds / 2)
            stream = _stream_tokens_per_sec(name, spec, micro_batch, seconds, warm)
            after = _randint_tokens_per_sec(spec.vocab_size, block, seq_len, seconds / 4)
            reference = 2 / (1 / before + 1 / after)  # tokens/s over equal token counts
            tasks[name] = {"stream_tokens_per_sec": stream, "randint_tokens_per_sec": reference,
                           "ratio": stream / reference, "make_tokens_per_sec": make, "make_ratio": make / reference,
                           **shape}
    finally:
        torch.set_num_threads(threads)
    return {"token_tasks": tasks, "token_stream_ratio": min(t["ratio"] for t in tasks.values()),
            "token_stream_seq_len": seq_len, "token_micro_batch": micro_batch, "token_torch_threads": 1}


def verify_data_overhead(steps: int, repeats: int) -> Dict[str, float]:
    """The cost of --verify-data on the default preset, two ways, in the same run.

    ``verify_data_overhead``: the accounting work of one step (digest of each micro-batch, plus the
    check of the expected range amortised over a log window), timed in isolation, divided by the
    measured step time. ``verify_data_overhead_end_to_end``: median wall time with it on vs off,
    alternated; a ~1% effect is below this figure's noise on a shared machine.
    """
    from distseq.config import preset
    from distseq.data.verify import Digest
    from distseq.training.loop import train

    seconds = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for verify in (False, True):
                cfg = preset("default")
                cfg.train.max_steps, cfg.train.eval_every, cfg.data.eval_size = steps, 0, 256
                cfg.train.verify_data, cfg.log.progress, cfg.log.log_every = verify, False, steps
                cfg.train.run_dir = f"{tmp}/{repeat}-{verify}"
                seconds[verify].append(train(cfg)["wall_seconds"])
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])

    cfg = preset("default")
    micro = torch.arange(cfg.train.global_batch_size // cfg.train.grad_accum_steps, dtype=torch.int64)
    window = cfg.train.global_batch_size * cfg.log.log_every
    digest, reps = Digest(), 2000
    started = time.perf_counter()
    for _ in range(reps):
        digest.add(micro)
    add_seconds = (time.perf_counter() - started) / reps
    started = time.perf_counter()
    for _ in range(10):
        Digest.of_range(0, window)
    check_seconds = (time.perf_counter() - started) / 10
    per_step = add_seconds * cfg.train.grad_accum_steps + check_seconds / cfg.log.log_every
    return {"verify_data_overhead": per_step / (off / steps), "verify_data_overhead_end_to_end": on / off - 1,
            "step_ms_verify_off": 1000 * off / steps, "step_ms_verify_on": 1000 * on / steps,
            "verify_data_ms_per_step": 1000 * per_step}


def stream_suite(quick: bool, log: Callable[[str], None] = print) -> Dict:
    if quick:
        return stream_benchmark(seconds=0.2, verify_steps=20, repeats=1, warm_tokens=False, log=log)
    return stream_benchmark(log=log)


def stream_benchmark(seconds: float = 2.0, seq_len: int = 10, micro_batch: int = 256,
                     verify_steps: int = 300, repeats: int = 3, warm_tokens: bool = True,
                     log: Callable[[str], None] = print) -> Dict:
    spec = TaskSpec(seq_len, seq_len)
    block = DataConfig().block_size  # the reference draws blocks of the size the stream draws
    raw = samples_per_sec(lambda: _raw_blocks(spec, 1, block), block, seconds)
    ours = {w: samples_per_sec(lambda w=w: _stream("sum-sign", spec, micro_batch, w), micro_batch, seconds)
            for w in (0, 2)}
    naive = samples_per_sec(lambda: _naive(spec), 256, min(seconds, 1.0))
    best = max(ours.values())

    tasks = {}
    for name, task in TASKS.items():
        if task.tokens:  # measured at their own length, in tokens/s (token_stream_benchmark)
            continue
        task_spec = spec_for(name, max(seq_len, 11)) if name == "copy" else spec
        reference = samples_per_sec(lambda: _raw_blocks(task_spec, task.num_features(task_spec), block), block,
                                    seconds / 2)
        stream = samples_per_sec(lambda: _stream(name, task_spec, micro_batch, 0), micro_batch, seconds / 2)
        tasks[name] = {"stream_ratio": stream / reference, "stream_samples_per_sec": stream,
                       "raw_samples_per_sec": reference}

    step = SEEK_POSITION // micro_batch
    at_zero = statistics.median(_first_batch_seconds(0, spec, micro_batch) for _ in range(5))
    far = statistics.median(_first_batch_seconds(step, spec, micro_batch) for _ in range(5))

    tokens = token_stream_benchmark(seconds, warm=warm_tokens)
    verify = verify_data_overhead(verify_steps, repeats)
    result = {
        **verify,
        **tokens,
        "task": "sum-sign",
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "raw_samples_per_sec": raw,
        "stream_samples_per_sec": best,
        "stream_samples_per_sec_by_workers": {str(w): v for w, v in ours.items()},
        "naive_samples_per_sec": naive,
        "stream_ratio": best / raw,
        "naive_ratio": naive / raw,
        "first_batch_seconds_at_0": at_zero,
        "first_batch_seconds_at_1e12": far,
        "seek_ratio": far / at_zero,
        "tasks": tasks,
        "torch_threads": torch.get_num_threads(),
    }
    log(stream_table(result))
    return result


def stream_table(r: Dict) -> str:
    rows = [
        ("raw torch.randn blocks (reference)", r["raw_samples_per_sec"], 1.0),
        ("distseq stream, 0 workers", r["stream_samples_per_sec_by_workers"]["0"],
         r["stream_samples_per_sec_by_workers"]["0"] / r["raw_samples_per_sec"]),
        ("distseq stream, 2 workers", r["stream_samples_per_sec_by_workers"]["2"],
         r["stream_samples_per_sec_by_workers"]["2"] / r["raw_samples_per_sec"]),
        ("naive datasets, 1 sample/example", r["naive_samples_per_sec"], r["naive_ratio"]),
    ]
    lines = [f"{'stream (sum-sign, seq %d, batch %d)' % (r['seq_len'], r['micro_batch']):<40} "
             f"{'samples/s':>12} {'ratio':>8}"]
    lines += [f"{name:<40} {rate:>12,.0f} {ratio:>8.3f}" for name, rate, ratio in rows]
    lines += [f"{'task ' + name:<40} {t['stream_samples_per_sec']:>12,.0f} {t['stream_ratio']:>8.3f}"
              for name, t in r["tasks"].items()]
    lines.append(f"stream_ratio={r['stream_ratio']:.3f} (goal >= 0.5)  "
                 f"seek_ratio={r['seek_ratio']:.3f} (goal <= 1.1; "
                 f"first batch {r['first_batch_seconds_at_0'] * 1000:.1f} ms "
                 f"at 0, {r['first_batch_seconds_at_1e12'] * 1000:.1f} ms at 10^12)")
    lines.append(f"{'tokens (seq %d, batch %d, 1 thread)' % (r['token_stream_seq_len'], r['token_micro_batch']):<40} "
                 f"{'tokens/s':>12} {'ratio':>8} {'randint tokens/s':>17} {'make alone':>11}")
    lines += [f"{'task ' + name + ' (vocab %d)' % t['vocab_size']:<40} {t['stream_tokens_per_sec']:>12,.0f} "
              f"{t['ratio']:>8.3f} {t['randint_tokens_per_sec']:>17,.0f} {t['make_ratio']:>11.3f}"
              for name, t in r["token_tasks"].items()]
    lines.append(f"token_stream_ratio={r['token_stream_ratio']:.3f} (goal >= 0.5; the lowest of the token tasks' "
                 f"stream tokens/s / torch.randint tokens/s at seq {r['token_stream_seq_len']})")
    lines.append(f"verify_data_overhead={100 * r['verify_data_overhead']:.2f}% of step time (goal < 2%; "
                 f"{r['verify_data_ms_per_step']:.3f} ms of a {r['step_ms_verify_off']:.2f} ms step; end to end "
                 f"{100 * r['verify_data_overhead_end_to_end']:+.1f}%: {r['step_ms_verify_on']:.2f} ms/step on)")
    return "\n".join(lines)
