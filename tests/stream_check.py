"""Run by tests/test_multiprocess.py under torchrun: every rank consumes the trainer's stream exactly as
the trainer does (train_loader + micro_batches) for several worker counts and dataset sizes, and, given
data files (argv[1], comma-separated), over their index; the ranks gather what they consumed over gloo
and rank 0 checks it. Prints one JSON line per case; exit 1 on a violation."""

import json
import sys

import torch
import torch.distributed as dist

from distseq.data.index import FileSource, open_index
from distseq.data.stream import Layout, SampleSource, micro_batches, train_loader
from distseq.registry import TASKS
from distseq.tasks import TaskSpec

MICRO_BATCH, ACCUM, STEPS, FIRST_STEP = 8, 2, 13, 3


def file_source(files):
    """The files' index, built by whichever rank comes first (the others wait on its lock)."""
    index = open_index(files.split(","), TASKS["sum-sign"], TaskSpec(6, 6), "sequence", "label", None,
                       lambda line: None, progress=False)
    return FileSource(index, seed=5, variable=False)


def consume(world, rank, workers, source):
    layout = Layout(MICRO_BATCH, world, ACCUM)
    loader = train_loader(source, layout, rank, FIRST_STEP, STEPS, samples_per_example=40, num_workers=workers)
    batches = list(micro_batches(loader, MICRO_BATCH))  # run the loader to exhaustion
    index = torch.cat([b["index"] for b in batches])
    labels_ok = all(torch.equal(b["y"], (b["x"].sum(dim=(1, 2)) > 0).float()) for b in batches)
    return {"micro_batches": len(batches), "index": index.tolist(),
            "data_ids": (source.row_ids(index) if isinstance(source, FileSource) else source.data_ids(index)).tolist(),
            "labels_ok": labels_ok}


def check(world, parts, dataset_size):
    global_batch = MICRO_BATCH * ACCUM * world
    start, stop = FIRST_STEP * global_batch, (FIRST_STEP + STEPS) * global_batch
    union = sorted(i for p in parts for i in p["index"])
    failures = []
    if union != list(range(start, stop)):
        failures.append("union of consumed positions is not exactly [start, stop)")
    if {p["micro_batches"] for p in parts} != {STEPS * ACCUM}:
        failures.append(f"micro-batches per rank {[p['micro_batches'] for p in parts]} != {STEPS * ACCUM}")
    if not all(p["labels_ok"] for p in parts):
        failures.append("labels do not follow the task")
    # each optimizer step's global batch is positions [s*G, (s+1)*G), whatever the world size
    for s in range(STEPS):
        step_set = sorted(i for p in parts for i in p["index"][s * MICRO_BATCH * ACCUM:(s + 1) * MICRO_BATCH * ACCUM])
        if step_set != list(range((FIRST_STEP + s) * global_batch, (FIRST_STEP + s + 1) * global_batch)):
            failures.append(f"step {FIRST_STEP + s} holds the wrong samples")
            break
    if dataset_size:  # every complete epoch inside [start, stop) holds each sample exactly once
        ids = {}
        for p in parts:
            ids.update(zip(p["index"], p["data_ids"]))
        for epoch in range(-(-start // dataset_size), stop // dataset_size):
            seen = sorted(ids[i] for i in range(epoch * dataset_size, (epoch + 1) * dataset_size))
            if seen != list(range(dataset_size)):
                failures.append(f"epoch {epoch} is not a permutation of the dataset")
    return failures


def main():
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    ok = True
    sources = {None: lambda: SampleSource("sum-sign", TaskSpec(6, 6), seed=5, block_size=32),
               100: lambda: SampleSource("sum-sign", TaskSpec(6, 6), seed=5, block_size=32, dataset_size=100)}
    if len(sys.argv) > 1:
        sources["files"] = lambda: file_source(sys.argv[1])
    for workers in (0, 1, 3):
        for kind, make in sources.items():  # 100 samples or rows: global batches straddle epochs
            source = make()
            size = kind if kind != "files" else source.index.rows
            mine = consume(world, rank, workers, source)
            parts = [None] * world
            dist.all_gather_object(parts, mine)
            if rank == 0:
                failures = check(world, parts, size)
                ok &= not failures
                print(json.dumps({"world_size": world, "workers": workers, "dataset_size": size, "source": kind,
                                  "samples": sum(len(p["index"]) for p in parts), "failures": failures}), flush=True)
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
