"""The stream's invariants (docs/design.md), checked in one process; multi-process runs are in test_multiprocess."""

import time
import tracemalloc

import pytest
import torch

from distseq.data.stream import Layout, SampleSource, eval_batches, make_shards, micro_batches, train_loader
from distseq.data.verify import Digest
from distseq.tasks import TaskSpec

T10 = TaskSpec(10, 10)


def rank_stream(layout, rank, first_step, num_steps, workers=0, samples_per_example=64, source=None):
    source = source or SampleSource("sum-sign", T10, seed=3, block_size=64)
    loader = train_loader(source, layout, rank, first_step, num_steps, samples_per_example, workers)
    return list(micro_batches(loader, layout.micro_batch))


def test_sample_is_pure_function_of_index():
    a = SampleSource("sum-sign", T10, seed=7, block_size=64)
    b = SampleSource("sum-sign", T10, seed=7, block_size=64)
    everything = a.samples(torch.arange(0, 1000))
    jumped = b.samples(torch.tensor([999, 5, 640, 63, 64]))  # fresh source, straight to scattered indices
    for key in ("x", "y"):
        assert torch.equal(jumped[key], everything[key][[999, 5, 640, 63, 64]])
    far = torch.tensor([10**12, 10**12 + 1])
    assert torch.equal(a.samples(far)["x"], b.samples(far.flip(0))["x"].flip(0))


def test_seed_split_and_block_size_change_the_data():
    idx = torch.arange(100)
    base = SampleSource("sum-sign", T10, seed=7, block_size=64).samples(idx)["x"]
    assert not torch.equal(base, SampleSource("sum-sign", T10, seed=8, block_size=64).samples(idx)["x"])
    assert not torch.equal(base, SampleSource("sum-sign", T10, seed=7, block_size=64, split="eval").samples(idx)["x"])
    assert not torch.equal(base, SampleSource("sum-sign", T10, seed=7, block_size=32).samples(idx)["x"])


def test_labels_follow_task_definition():
    batch = SampleSource("sum-sign", T10, seed=1, block_size=256).samples(torch.arange(5000))
    assert batch["x"].shape == (5000, 10, 1)
    expected = (batch["x"].sum(dim=(1, 2)) > 0).float()
    assert torch.equal(batch["y"], expected)
    assert 0.45 < batch["y"].mean().item() < 0.55  # both classes, balanced
    assert abs(batch["x"].mean().item()) < 0.02 and abs(batch["x"].std().item() - 1) < 0.02


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_do_not_change_content_or_order(workers):
    layout = Layout(micro_batch=16, world_size=2, grad_accum=2)
    for rank in range(2):
        reference = rank_stream(layout, rank, 0, 11)
        got = rank_stream(layout, rank, 0, 11, workers=workers)
        assert len(got) == len(reference) == 11 * 2
        for a, b in zip(reference, got):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def test_example_grouping_does_not_change_content():
    layout = Layout(micro_batch=8, world_size=1, grad_accum=3)
    one = rank_stream(layout, 0, 0, 10, samples_per_example=1)
    many = rank_stream(layout, 0, 0, 10, samples_per_example=100)
    assert [m["index"].tolist() for m in one] == [m["index"].tolist() for m in many]


def test_ranks_are_disjoint_and_cover_each_global_batch():
    layout = Layout(micro_batch=4, world_size=3, grad_accum=2)
    per_rank = [torch.cat([m["index"] for m in rank_stream(layout, r, 0, 5)]) for r in range(3)]
    union = torch.cat(per_rank).sort().values
    assert torch.equal(union, torch.arange(5 * layout.global_batch))
    assert all(len(p) == 5 * layout.rank_batch for p in per_rank)


def test_step_sample_set_is_world_size_invariant():
    def step_sets(layout, steps=4):
        per_rank = [rank_stream(layout, r, 0, steps) for r in range(layout.world_size)]
        per_step = layout.grad_accum
        return [
            sorted(i for r in range(layout.world_size) for m in per_rank[r][s * per_step:(s + 1) * per_step]
                   for i in m["index"].tolist())
            for s in range(steps)
        ]

    reference = step_sets(Layout(16, 1, 1))
    assert step_sets(Layout(8, 2, 1)) == reference
    assert step_sets(Layout(8, 1, 2)) == reference
    assert step_sets(Layout(4, 2, 2)) == reference


def test_resume_from_a_step_is_the_tail_of_the_full_stream():
    layout = Layout(micro_batch=8, world_size=2, grad_accum=1)
    full = rank_stream(layout, 1, 0, 9)
    tail = rank_stream(layout, 1, 4, 5)
    assert [m["index"].tolist() for m in tail] == [m["index"].tolist() for m in full[4:]]
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(tail, full[4:]))


def test_finite_dataset_cycles_a_fresh_permutation_each_epoch():
    n = 1000
    source = SampleSource("sum-sign", T10, seed=0, block_size=64, dataset_size=n)
    ids = source.data_ids(torch.arange(3 * n))
    epochs = ids.reshape(3, n)
    for epoch in epochs:
        assert torch.equal(epoch.sort().values, torch.arange(n))  # every sample exactly once per epoch
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled
    # the finite dataset is the first N samples of the infinite stream
    infinite = SampleSource("sum-sign", T10, seed=0, block_size=64)
    assert torch.equal(source.samples(torch.arange(n))["x"], infinite.samples(ids[:n])["x"])


def test_setup_is_lazy_for_huge_runs():
    layout = Layout(micro_batch=32, world_size=64, grad_accum=1)
    tracemalloc.start()
    started = time.perf_counter()
    shards = make_shards(layout, first_step=0, num_steps=10**8, steps_per_example=1, slots=1)
    loader = train_loader(SampleSource("sum-sign", T10, 0, 1024), layout, 63, 0, 10**8, 1024, 0)
    first = next(micro_batches(loader, 32))
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(shards) == 64 and seconds < 1.0 and peak < 8 * 2**20
    assert first["index"][0].item() == 63 * 32


def test_seek_to_a_trillion_samples_is_immediate():
    layout = Layout(micro_batch=256, world_size=1, grad_accum=1)
    step = 10**12 // 256
    started = time.perf_counter()
    batch = rank_stream(layout, 0, step, 1, source=SampleSource("sum-sign", T10, 0, 1024))[0]
    assert time.perf_counter() - started < 1.0
    assert batch["index"][0].item() == step * 256


def test_eval_shards_cover_held_out_set_once():
    source = SampleSource("sum-sign", T10, seed=0, block_size=64, split="eval")
    world, size = 3, 1001
    parts = [eval_batches(source, r, world, size, batch_size=100) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # same number of batches on every rank
    index = torch.cat([b["index"] for p in parts for b in p])
    assert torch.equal(index[index >= 0].sort().values, torch.arange(size))


def test_digest_detects_lost_and_repeated_samples():
    expected = Digest.of_range(0, 1000)
    whole = Digest()
    whole.add(torch.arange(0, 600))
    rest = Digest()
    rest.add(torch.arange(600, 1000))
    assert whole.merge(rest) == expected
    swapped = Digest()
    swapped.add(torch.cat([torch.arange(0, 999), torch.tensor([998])]))  # 999 lost, 998 twice
    assert swapped != expected
    compensated = Digest()  # same count and sum, different set: only the hash can tell
    compensated.add(torch.cat([torch.tensor([0]), torch.arange(2, 998), torch.tensor([999, 0, 999])]))
    assert compensated.count == 1000 and compensated.total == expected.total
    assert compensated != expected


def test_accounting_stops_on_a_lost_sample():
    from accelerate import Accelerator

    from distseq.data.verify import Accounting, DataAccountingError

    accelerator = Accelerator(cpu=True)
    accounting = Accounting(checked_until=0, world_size=1)
    accounting.window.add(torch.arange(0, 64))
    accounting.check(accelerator, 64)  # all present
    accounting.window.add(torch.cat([torch.arange(64, 100), torch.arange(101, 129)]))  # 100 lost, 128 foreign
    with pytest.raises(DataAccountingError, match=r"samples \[64, 128\)"):
        accounting.check(accelerator, 128)
