"""litft.data.LengthGroupedSampler (train.group_by_length, the default): which samples share a batch, and that a
length-grouped batch trains exactly what its samples train alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from litft.data import LengthGroupedSampler, collate, sample_length


def make_samples(n: int, seed: int = 0, lo: int = 3, hi: int = 60, vocab: int = 300) -> list[dict[str, torch.Tensor]]:
    """Samples of long-tailed random lengths, the first third of each masked as its prompt."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.empty(n).uniform_(0, 1, generator=g) ** 2 * torch.log(torch.tensor(hi / lo))) * lo
    out = []
    for length in lengths.long().tolist():
        ids = torch.randint(0, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def steps_of(dataset, micro: int, accum: int, world: int, seed: int = 0, epoch: int = 0) -> list[set[int]]:
    """The samples of each optimizer step, gathered from every rank's stream as the training loop consumes it."""
    streams = []
    for rank in range(world):
        s = LengthGroupedSampler(dataset, micro, accum, num_replicas=world, rank=rank, seed=seed)
        s.set_epoch(epoch)
        streams.append(list(s))
    per_step = micro * accum
    n_steps = len(streams[0]) // per_step
    return [set().union(*(st[i * per_step:(i + 1) * per_step] for st in streams)) for i in range(n_steps)]


def padding_fraction(dataset, batches: list[list[int]]) -> float:
    lengths = [[sample_length(dataset[i]) for i in b] for b in batches]
    return 1 - sum(map(sum, lengths)) / sum(max(b) * len(b) for b in lengths)


def test_an_epoch_is_whole_global_batches_without_repeats():
    data = make_samples(103)
    micro, accum, world = 4, 2, 3  # global batch 24: 4 steps, 96 samples, 7 left out
    seen: list[int] = []
    for rank in range(world):
        s = LengthGroupedSampler(data, micro, accum, num_replicas=world, rank=rank, seed=1)
        loader = DataLoader(data, batch_size=micro, sampler=s, collate_fn=collate, drop_last=True)
        assert len(s) == 4 * accum * micro and len(loader) == 4 * accum
        # the same number of micro-batches per rank as DistributedSampler gave: steps_per_epoch is unchanged
        assert len(loader) == len(DataLoader(data, batch_size=micro, drop_last=True,
                                             sampler=DistributedSampler(data, world, rank, drop_last=True)))
        seen += list(s)
    assert len(seen) == 96 and len(set(seen)) == 96


@pytest.mark.parametrize("micro,accum,world", [(4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4), (2, 1, 4)])
def test_every_step_holds_the_same_samples_for_any_device_split(micro, accum, world):
    """DDP trains what one process trains: the samples of each optimizer step do not depend on how the global
    batch (8) is split into devices x accumulation x micro-batches."""
    data = make_samples(70)
    assert steps_of(data, micro, accum, world) == steps_of(data, 8, 1, 1)


def test_batches_are_grouped_by_length_and_the_longest_comes_first():
    data = make_samples(64)
    s = LengthGroupedSampler(data, micro_batch_size=4, seed=3)
    order = list(s)
    batches = [order[i:i + 4] for i in range(0, len(order), 4)]
    ranges = [(min(sample_length(data[i]) for i in b), max(sample_length(data[i]) for i in b)) for b in batches]
    # one mega-batch (64 < 50 x 4): the batches are disjoint length ranges (up to ties)
    for a in ranges:
        for b in ranges:
            assert a == b or a[1] <= b[0] or b[1] <= a[0], (a, b)
    for seed in range(5):  # the step with the longest sample comes first, whatever the shuffle
        first = LengthGroupedSampler(data, micro_batch_size=4, seed=seed).global_batches()[0]
        assert max(sample_length(data[i]) for i in first) == max(sample_length(x) for x in data)
    random_order = torch.randperm(64, generator=torch.Generator().manual_seed(3)).tolist()
    random_batches = [random_order[i:i + 4] for i in range(0, 64, 4)]
    assert padding_fraction(data, batches) < 0.5 * padding_fraction(data, random_batches)
    assert [b for b in batches[1:]] != sorted(batches[1:], key=lambda b: -sample_length(data[b[0]]))  # steps shuffled


def test_mega_batches_bound_the_sorting():
    """With mega-batches of 2 steps, each pair of steps comes from its own 16 shuffled samples: lengths are sorted
    within those, not across the whole set."""
    data = make_samples(64)
    s = LengthGroupedSampler(data, micro_batch_size=8, seed=5, mega_batch_steps=2)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(5)).tolist()
    megas = [set(perm[i:i + 16]) for i in range(0, 64, 16)]
    for step in s.global_batches():
        assert any(set(step) <= m for m in megas)


def test_order_is_deterministic_per_seed_and_epoch():
    data = make_samples(80)
    a, b = LengthGroupedSampler(data, 4, seed=7), LengthGroupedSampler(data, 4, seed=7)
    assert list(a) == list(b) == list(a)  # iterating again (a resumed run) gives the same order
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(LengthGroupedSampler(data, 4, seed=8)) != list(LengthGroupedSampler(data, 4, seed=7))


def test_preference_pairs_are_grouped_by_their_longer_sequence():
    pair = {"input_ids": torch.zeros(5), "rejected_input_ids": torch.zeros(9), "pair_index": torch.tensor(0)}
    assert sample_length(pair) == 9


def test_bad_batch_shape_is_one_clear_error():
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        LengthGroupedSampler(make_samples(8), 2, num_replicas=2, rank=2)


def test_grouped_batch_losses_equal_each_sample_alone(ckpt):
    """Right padding with no attention mask is exact for a causal model: every sample's per-token losses in a
    length-grouped (padded) batch equal its losses run alone, and the method's summed loss and its target-token
    count are the sums over the samples alone."""
    from litft.methods.lora import LoRA

    method = LoRA(checkpoint_dir=ckpt, r=4, alpha=8, dropout=0.0)
    method.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in method.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # the adapters contribute
    method.eval()
    data = make_samples(24, seed=11)
    s = LengthGroupedSampler(data, micro_batch_size=6, seed=2)
    order = list(s)
    batches = [order[i:i + 6] for i in range(0, len(order), 6)]
    batch_ids = max(batches, key=lambda b: len({sample_length(data[i]) for i in b}))  # the most lengths mixed
    batch = collate([data[i] for i in batch_ids])
    assert (batch["labels"] == -100).sum() > sum((data[i]["labels"] == -100).sum() for i in batch_ids)  # padded
    with torch.no_grad():
        logits = method.model(batch["input_ids"])
        token_losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
        total, count = method.training_step(batch), method.loss_count(batch)
        alone_total, alone_count = 0.0, 0
        for row, i in enumerate(batch_ids):
            one = collate([data[i]])
            n = len(data[i]["input_ids"])
            alone = F.cross_entropy(method.model(one["input_ids"])[:, :-1].transpose(1, 2), one["labels"][:, 1:],
                                    reduction="none")[0]
            torch.testing.assert_close(token_losses[row, : n - 1], alone, atol=1e-5, rtol=1e-5)
            assert (token_losses[row, n - 1:] == 0).all()  # padding positions carry no loss
            alone_total += method.training_step(one)
            alone_count += method.loss_count(one)
    assert count == alone_count
    torch.testing.assert_close(total, alone_total, atol=1e-4, rtol=1e-5)
