import pytest
import torch

from cifar10ds.batches import (
    MEAN,
    STD,
    Augment,
    batches_per_epoch,
    eval_shard,
    init_sample,
    last_batch_size,
    shard_indices,
)


@pytest.mark.parametrize("n, world", [(100, 2), (101, 2), (7, 3), (10, 1)])
def test_shards_cover_every_index_each_epoch(n, world):
    for epoch in range(3):
        shards = [shard_indices(n, world, r, epoch, seed=5) for r in range(world)]
        sizes = {len(s) for s in shards}
        assert sizes == {-(-n // world)}  # equal sizes: every rank runs the same number of steps
        seen = torch.cat(shards)
        assert set(seen.tolist()) == set(range(n))  # every image at least once...
        assert len(seen) - n == (-n) % world  # ...and only the wrap-around padding twice
        if n % world == 0:
            assert sorted(seen.tolist()) == list(range(n))


def test_shards_reshuffle_between_epochs_and_follow_the_seed():
    e0, e1 = shard_indices(100, 2, 0, 0, seed=1), shard_indices(100, 2, 0, 1, seed=1)
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, shard_indices(100, 2, 0, 0, seed=1))
    assert not torch.equal(e0, shard_indices(100, 2, 0, 0, seed=2))
    # The same sharding as torch's DistributedSampler (shuffle=True, drop_last=False), whose seed is ours
    # spread apart (seed x 1,000,003), so that seed s at epoch e+1 does not replay seed s+1 at epoch e.
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(101), num_replicas=2, rank=1, shuffle=True, seed=7 * 1_000_003)
    sampler.set_epoch(3)
    assert shard_indices(101, 2, 1, 3, seed=7).tolist() == list(sampler)
    assert not torch.equal(shard_indices(100, 1, 0, 1, seed=1), shard_indices(100, 1, 0, 0, seed=2))


@pytest.mark.parametrize("n, world, micro, batches, last, kept", [(100, 2, 32, 2, 18, 1), (101, 2, 10, 6, 1, 5),
                                                                (64, 1, 32, 2, 32, 2), (20, 2, 16, 1, 10, 0)])
def test_batch_counts(n, world, micro, batches, last, kept):
    assert batches_per_epoch(n, world, micro) == batches
    assert last_batch_size(n, world, micro) == last
    # drop_last: full batches only (none when a rank holds fewer images than a batch)
    assert batches_per_epoch(n, world, micro, drop_last=True) == kept
    assert last_batch_size(n, world, micro, drop_last=True) == micro


@pytest.mark.parametrize("n, world", [(71, 2), (10, 3), (5, 8), (1000, 2)])
def test_eval_shards_count_every_test_image_exactly_once(n, world):
    counted = []
    lengths = set()
    for r in range(world):
        idx, valid = eval_shard(n, world, r)
        lengths.add(len(idx))
        counted += idx[valid].tolist()
    assert sorted(counted) == list(range(n))
    assert len(lengths) == 1


def batch(n=8, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_no_augmentation_is_plain_normalization():
    x = batch()
    out = Augment(0, False, 0, seed=0, device="cpu")(x)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    assert out.dtype == torch.float32 and out.shape == x.shape


def test_augmentation_is_seeded_and_shaped():
    x = batch(64)
    a, b, c = (Augment(4, True, 8, seed=s, device="cpu") for s in (1, 1, 2))
    out_a, out_b, out_c = a(x), b(x), c(x)
    assert out_a.shape == (64, 3, 32, 32)
    assert torch.equal(out_a, out_b) and not torch.equal(out_a, out_c)
    # The generator state carries across a resume.
    state = a.state_dict()
    nxt = a(x)
    b.load_state_dict(state)
    assert torch.equal(b(x), nxt)


def test_crop_is_a_translation_within_the_padding():
    x = batch(32)
    aug = Augment(4, False, 0, seed=3, device="cpu")
    plain = aug.normalize(x)
    out = aug(x)
    # The 24x24 centre of every crop equals the original shifted by at most 4 pixels.
    for i in range(32):
        hits = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                if torch.allclose(out[i, :, 4:28, 4:28], plain[i, :, 4 + dy:28 + dy, 4 + dx:28 + dx])]
        assert len(hits) >= 1
    assert not torch.equal(out, plain)


def test_flip_mirrors_about_half_of_the_images():
    x = batch(400)
    aug = Augment(0, True, 0, seed=0, device="cpu")
    plain, out = aug.normalize(x), aug(x)
    flipped = torch.tensor([torch.equal(o, p.flip(2)) for o, p in zip(out, plain)])
    unchanged = torch.tensor([torch.equal(o, p) for o, p in zip(out, plain)])
    assert bool((flipped | unchanged).all())
    assert 150 < int(flipped.sum()) < 250


def test_cutout_zeroes_a_square_of_at_most_the_given_side():
    x = torch.full((50, 3, 32, 32), 200, dtype=torch.uint8)
    out = Augment(0, False, 8, seed=0, device="cpu")(x)
    zeros = (out == 0).all(1)  # (N, H, W) pixels zeroed in every channel
    per_image = zeros.flatten(1).sum(1)
    assert int(per_image.max()) == 64 and int(per_image.min()) >= 16  # clipped at the border
    for z in zeros:
        rows, cols = z.any(1).nonzero(), z.any(0).nonzero()
        assert int(rows.max() - rows.min()) < 8 and int(cols.max() - cols.min()) < 8


def test_init_sample_draws_from_every_class_of_class_sorted_data():
    """Archives and folders decode sorted by class: the whitening sample must not be the first 5,000 images."""
    labels = torch.arange(10).repeat_interleave(5000)  # 50,000 images, class by class
    idx = init_sample(len(labels), seed=0)
    assert len(idx) == 5000 and len(set(idx.tolist())) == 5000
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.min() > 400 and counts.max() < 600  # about 500 of each class, not 5,000 airplanes
    assert torch.equal(idx, init_sample(len(labels), seed=0))  # fixed by the seed
    assert not torch.equal(idx, init_sample(len(labels), seed=1))
    assert sorted(init_sample(200, seed=0).tolist()) == list(range(200))  # all of a smaller set


def test_augmentation_state_from_another_kind_of_device_reseeds_instead_of_failing():
    """A CUDA generator's state (16 bytes) does not fit a CPU generator: a checkpoint saved on a GPU resumed on a
    CPU goes on with draws seeded from it, and says so (the caller warns)."""
    a = Augment(4, True, 0, seed=1, device=torch.device("cpu"))
    b = Augment(4, True, 0, seed=2, device=torch.device("cpu"))
    assert b.load_state_dict(a.state_dict()) is True
    x = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(a(x), b(x))
    cuda_like = {"generator": torch.arange(16, dtype=torch.uint8)}
    assert b.load_state_dict(cuda_like) is False and a.load_state_dict(cuda_like) is False
    assert torch.equal(a(x), b(x))  # the same seed made of the state, on every rank that loads it
