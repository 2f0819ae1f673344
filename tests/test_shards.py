"""The shard reader: manifest validation, rank slicing, exact resume across world sizes."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from vqgpt.shards import (CHANNEL_ORDERS, ShardError, ShardLoader, ShardSplit, ShardWriter, build_manifest,
                          read_manifest, write_manifest)


def token_folder(root, counts=(5, 5, 3), dtype=np.uint16, length=6):
    """A token shard folder with item i == [i, i, ...] so samples are identifiable."""
    root.mkdir(parents=True, exist_ok=True)
    records, start = [], 0
    for index, count in enumerate(counts):
        items = (np.arange(start, start + count)[:, None] * np.ones((1, length))).astype(dtype)
        records.append(ShardWriter.write_shard(root, f"train_{index:05d}", items, (np.arange(count) % 3).astype(np.int16)))
        start += count
    write_manifest(root, build_manifest("tokens", (length,), dtype, {"train": records}, ["a", "b", "c"]))
    return root


def ids(batch) -> list[int]:
    return batch.items[:, 0].tolist()


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_rank_slices_cover_one_epoch_permutation(tmp_path):
    split = ShardSplit(token_folder(tmp_path, counts=(4, 4, 4)), "train")
    world = 3
    loaders = [ShardLoader(split, 2, rank=r, world_size=world, seed=7) for r in range(world)]
    assert all(l.batches_per_epoch == 2 for l in loaders)
    seen = [sample for loader in loaders for batch in take(loader, 2) for sample in ids(batch)]
    assert sorted(seen) == list(range(12))
    order = loaders[0].epoch_plan(0).order
    step0 = [ids(ShardLoader(split, 2, rank=r, world_size=world, seed=7).__next__()) for r in range(world)]
    assert sum(step0, []) == order[:6].tolist()
    for loader in loaders:
        loader.close()


def test_epochs_differ_and_are_deterministic(tmp_path):
    split = ShardSplit(token_folder(tmp_path), "train")
    first = [ids(b) for b in take(ShardLoader(split, 4, seed=1), 6)]
    again = [ids(b) for b in take(ShardLoader(split, 4, seed=1), 6)]
    assert first == again
    assert first[:3] != first[3:6]   # 13 samples, 3 batches per epoch: epoch 1 reshuffles


@pytest.mark.parametrize("resume_world", [1, 2, 4])
def test_resume_with_another_world_size_sees_the_same_samples(tmp_path, resume_world):
    split = ShardSplit(token_folder(tmp_path, counts=(16, 16, 16)), "train")
    global_batch = 8
    reference = ShardLoader(split, global_batch, seed=3)
    uninterrupted = [ids(b) for b in take(reference, 14)]   # 6 steps per epoch: crosses two epoch ends
    saver = [ShardLoader(split, global_batch // 2, rank=r, world_size=2, seed=3) for r in range(2)]
    before = [sum((ids(next(l)) for l in saver), []) for _ in range(5)]
    assert before == uninterrupted[:5]
    state = saver[0].state_dict()
    assert state == saver[1].state_dict() == {"epoch": 0, "cursor": 40, "seed": 3, "num_samples": 48,
                                               "shards_sha256": split.fingerprint, "channel_draw": 2}
    resumed = []
    for r in range(resume_world):
        loader = ShardLoader(split, global_batch // resume_world, rank=r, world_size=resume_world, seed=99)
        loader.load_state_dict(json.loads(json.dumps(state)))
        resumed.append([ids(b) for b in take(loader, 9)])
    after = [sum((resumed[r][k] for r in range(resume_world)), []) for k in range(9)]
    assert after == uninterrupted[5:14]


def test_state_counts_consumed_not_prefetched_batches(tmp_path):
    split = ShardSplit(token_folder(tmp_path), "train")
    loader = ShardLoader(split, 2, seed=0, prefetch=4)
    next(loader)
    import time
    time.sleep(0.1)   # let the prefetch thread run ahead
    assert loader.state_dict()["cursor"] == 2
    loader.close()


def test_labels_flip_and_token_dtype(tmp_path, shapes_shards):
    split = ShardSplit(token_folder(tmp_path), "train")
    batch = next(ShardLoader(split, 4, seed=0))
    assert batch.items.dtype == torch.int32 and batch.labels.dtype == torch.int64
    assert batch.labels.tolist() == [i % 5 % 3 if i < 10 else (i - 10) % 3 for i in ids(batch)]
    images = ShardSplit(shapes_shards, "train")
    plain = ShardLoader(images, 16, seed=5)
    flipped = ShardLoader(images, 16, seed=5, flip=True)
    a, b = next(plain), next(flipped)
    assert a.items.dtype == torch.uint8 and a.items.shape == (16, 32, 32, 3)
    flips = flipped.epoch_plan(0).flips
    for k in range(16):
        expected = a.items[k].flip(1) if flips[k] else a.items[k]
        assert torch.equal(b.items[k], expected)
    assert 0 < flips[:16].sum() < 16
    plain.close()
    flipped.close()


def test_permuted_channels_follow_the_plan_on_every_rank_and_after_resume(shapes_shards):
    images = ShardSplit(shapes_shards, "train")
    plain = ShardLoader(images, 16, seed=5, flip=True)
    permuted = ShardLoader(images, 16, seed=5, flip=True, permute_channels=True)
    plan = permuted.epoch_plan(0)
    assert np.array_equal(plan.flips, plain.epoch_plan(0).flips)   # the option leaves order and flips alone
    a, b = next(plain), next(permuted)
    for k in range(16):
        assert torch.equal(b.items[k], a.items[k][..., list(CHANNEL_ORDERS[plan.channel_orders[k]])])
    assert len(set(plan.channel_orders[:16].tolist())) > 2
    assert not torch.equal(a.items, b.items)
    # two ranks take the two halves of the same global batch, and a resumed loader goes on where it was
    halves = [next(ShardLoader(images, 8, rank=r, world_size=2, seed=5, flip=True, permute_channels=True))
              for r in range(2)]
    assert torch.equal(torch.cat([h.items for h in halves]), b.items)
    second = next(permuted).items
    resumed = ShardLoader(images, 16, seed=5, flip=True, permute_channels=True)
    resumed.load_state_dict({**permuted.state_dict(), "cursor": 16})
    assert torch.equal(next(resumed).items, second)
    for loader in (plain, permuted, resumed):
        loader.close()


def test_permuted_share_sets_how_many_images_leave_rgb_order(shapes_shards):
    images = ShardSplit(shapes_shards, "train")
    count = len(images)

    def orders(share=None, **kw):
        loader = ShardLoader(images, 16, seed=3, flip=True, permute_channels=True,
                             **({} if share is None else {"permuted_share": share}), **kw)
        return loader.epoch_plan(1).channel_orders

    alike = orders()   # the default 5/6: all six orders alike
    assert np.allclose(np.bincount(alike, minlength=6) / count, 1 / 6, atol=0.05)   # 700 images: 3.5 sigma
    assert not orders(0.0).any()                       # none permuted
    assert orders(1.0).all()                           # every image in one of the five other orders
    half = orders(0.5)
    assert 0.4 < (half != 0).mean() < 0.6 and len(set(half.tolist())) == 6
    # the same plan on every rank, and a resumed loader replays it
    halves = [next(ShardLoader(images, 8, rank=r, world_size=2, seed=3, flip=True, permute_channels=True,
                               permuted_share=0.5)) for r in range(2)]
    whole = ShardLoader(images, 16, seed=3, flip=True, permute_channels=True, permuted_share=0.5)
    assert torch.equal(torch.cat([h.items for h in halves]), next(whole).items)
    second = next(whole).items
    resumed = ShardLoader(images, 16, seed=3, flip=True, permute_channels=True, permuted_share=0.5)
    resumed.load_state_dict({**whole.state_dict(), "cursor": 16})
    assert torch.equal(next(resumed).items, second)
    for loader in (whole, resumed):
        loader.close()
    older = {key: value for key, value in whole.state_dict().items() if key != "channel_draw"}
    with pytest.raises(ShardError, match="channel orders"):   # a run that drew its orders another way
        ShardLoader(images, 16, seed=3, permute_channels=True).load_state_dict(older)
    ShardLoader(images, 16, seed=3).load_state_dict(older)    # no orders drawn: nothing to replay
    with pytest.raises(ValueError, match="permuted_share"):
        ShardLoader(images, 16, permute_channels=True, permuted_share=1.5)


def test_sha_verification_and_missing_manifest(tmp_path, shapes_shards):
    copy = tmp_path / "copy"
    shutil.copytree(shapes_shards, copy)
    ShardSplit(copy, "val", verify_hashes=True)
    data = np.load(copy / "val_00000.npy")
    data[0, 0, 0, 0] ^= 1
    np.save(copy / "val_00000.npy", data)
    with pytest.raises(ShardError, match="val_00000.npy: sha256"):
        ShardSplit(copy, "val", verify_hashes=True)
    with pytest.raises(ShardError, match="no such shard folder"):
        ShardSplit(tmp_path / "nothing", "train")


def edit_manifest(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name,change,message", [
    ("absolute", lambda m: m["splits"]["train"]["shards"][0].update(file="/etc/passwd"), "not a plain"),
    ("dotdot", lambda m: m["splits"]["train"]["shards"][0].update(file="../train_00000.npy"), "not a plain"),
    ("count", lambda m: m["splits"]["train"]["shards"][0].update(count=4), "train_00000.npy: holds"),
    ("total", lambda m: m["splits"]["train"].update(count=99), "sum of shard counts"),
    ("dtype", lambda m: m.update(dtype="uint8"), "train_00000.npy: holds"),
    ("shape", lambda m: m.update(item_shape=[7]), "train_00000.npy: holds"),
    ("missing", lambda m: m["splits"]["train"]["shards"][0].update(file="train_00042.npy"), "missing"),
    ("version", lambda m: m.update(version=9), "format version"),
    ("nosplit", lambda m: m["splits"].pop("train"), "no 'train' split"),
])
def test_untrusted_manifest_is_refused_with_the_file_named(tmp_path, name, change, message):
    folder = token_folder(tmp_path / "t")
    edit_manifest(folder, change)
    with pytest.raises(ShardError, match=message) as err:
        ShardSplit(folder, "train")
    assert str(folder) in str(err.value)


def test_link_pointing_outside_is_refused(tmp_path):
    folder = token_folder(tmp_path / "t")
    outside = tmp_path / "outside.npy"
    shutil.move(folder / "train_00001.npy", outside)
    os.symlink(outside, folder / "train_00001.npy")
    with pytest.raises(ShardError, match="link pointing outside"):
        ShardSplit(folder, "train")


def test_labels_out_of_range_and_bad_json(tmp_path):
    folder = token_folder(tmp_path / "t")
    edit_manifest(folder, lambda m: m.update(classes=["only"]))
    with pytest.raises(ShardError, match="labels outside"):
        ShardSplit(folder, "train")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        read_manifest(folder)


def test_memory_mapped_not_loaded(shapes_shards):
    split = ShardSplit(shapes_shards, "train")
    items, _ = split.shard_arrays(0)
    assert isinstance(items, np.memmap)
    assert len(split) == 700 and split.num_classes == 6


def test_too_small_for_one_global_batch(tmp_path):
    split = ShardSplit(token_folder(tmp_path), "train")
    with pytest.raises(ShardError, match="fewer than one global batch"):
        ShardLoader(split, 7, world_size=2)
    with pytest.raises(ShardError, match=r"global batch \(2 x 2 ranks x 1000 micro-steps\)"):   # not a hang
        ShardLoader(split, 2, world_size=2, grad_accum=1000)


def stored_images(root, count=16, stored=12, size=8):
    """Image shards stored at `stored` px and read at `size`: pixel (y, x) of image i holds (y, x, i), so a crop's
    first pixel names its corner and its image."""
    root.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:stored, 0:stored]
    items = np.stack([np.stack([y, x, np.full_like(y, i)], axis=-1) for i in range(count)]).astype(np.uint8)
    half = count // 2
    records = [ShardWriter.write_shard(root, f"train_{k:05d}", items[k * half:(k + 1) * half], None) for k in range(2)]
    write_manifest(root, build_manifest("images", (stored, stored, 3), np.uint8, {"train": records}, [],
                                        image_size=size, stored_size=stored))
    return root, items


def crops_seen(batch) -> list[tuple[int, int, int]]:
    """(image, top, left) of each crop in a batch (a mirrored crop's left column is its last)."""
    corners, ends = batch.items[:, 0, 0].tolist(), batch.items[:, 0, -1, 1].tolist()
    return [(i, top, min(left, end)) for (top, left, i), end in zip(corners, ends)]


def test_random_crops_follow_the_epoch_plan_on_every_rank_and_after_a_resume(tmp_path):
    root, stored = stored_images(tmp_path)
    split = ShardSplit(root, "train")
    assert split.item_shape == (8, 8, 3) and split.crop_room == 4
    single = [crop for batch in take(ShardLoader(split, 4, seed=3, flip=True), 8) for crop in crops_seen(batch)]
    ranks = [take(ShardLoader(split, 2, rank=r, world_size=2, seed=3, flip=True), 8) for r in range(2)]
    both = [crop for step in zip(*ranks) for batch in step for crop in crops_seen(batch)]
    assert both == single   # each position's crop follows from (seed, epoch, position), whatever the rank
    plans = [ShardLoader(split, 4, seed=3, flip=True).epoch_plan(e) for e in (0, 1)]
    assert single == [(int(i), int(t), int(l)) for plan in plans for i, (t, l) in zip(plan.order, plan.corners)]
    assert len({(t, l) for _, t, l in single}) > 5 and all(0 <= t <= 4 and 0 <= l <= 4 for _, t, l in single)
    for batch in ranks[0]:   # a crop is the stored image's window at its corner (mirrored when flipped)
        for item, (i, top, left) in zip(batch.items.numpy(), crops_seen(batch)):
            window = stored[i, top:top + 8, left:left + 8]
            assert np.array_equal(item, window) or np.array_equal(item, window[:, ::-1])

    uninterrupted = take(ShardLoader(split, 2, rank=1, world_size=2, seed=3, flip=True), 7)
    first = ShardLoader(split, 2, rank=1, world_size=2, seed=3, flip=True)
    take(first, 3)
    resumed = ShardLoader(split, 2, rank=1, world_size=2, seed=3, flip=True)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(uninterrupted[3:], take(resumed, 4)):
        assert torch.equal(a.items, b.items)
    for loader in (first, resumed):
        loader.close()


def test_a_set_stored_at_its_image_size_reads_as_before(tmp_path):
    root, stored = stored_images(tmp_path / "plain", stored=8, size=8)
    larger, _ = stored_images(tmp_path / "larger", stored=12, size=8)
    plain = ShardSplit(root, "train")
    assert plain.item_shape == plain.stored_shape == (8, 8, 3) and plain.crop_room == 0
    assert np.array_equal(plain.read(np.arange(16))[0], stored)
    loader = ShardLoader(plain, 4, seed=5, flip=True, permute_channels=True)
    rng = np.random.default_rng([5, 1])   # the draws of the code before crops existed
    order, flips = rng.permutation(16), rng.random(16) < 0.5
    channel_orders = np.where(rng.random(16) < 5 / 6, rng.integers(1, len(CHANNEL_ORDERS), 16), 0)
    plan = loader.epoch_plan(1)
    assert plan.corners is None and np.array_equal(plan.order, order) and np.array_equal(plan.flips, flips)
    assert np.array_equal(plan.channel_orders, channel_orders)
    cropped = ShardLoader(ShardSplit(larger, "train"), 4, seed=5, flip=True, permute_channels=True).epoch_plan(1)
    assert all(np.array_equal(a, b) for a, b in zip(cropped[:3], plan[:3]))   # crops drawn last: the rest unchanged


def test_evaluation_reads_the_centre_crop(tmp_path):
    root, stored = stored_images(tmp_path, stored=13, size=8)
    split = ShardSplit(root, "train")
    items, _ = split.read(np.arange(16))
    assert np.array_equal(items, stored[:, 2:10, 2:10])
    assert np.array_equal(np.concatenate([batch for batch, _ in split.iter_batches(5)]), items)


def test_an_image_size_larger_than_stored_is_refused(tmp_path):
    root, _ = stored_images(tmp_path, stored=8, size=8)
    edit_manifest(root, lambda m: m.update(image_size=9))
    with pytest.raises(ShardError, match="image_size 9"):
        ShardSplit(root, "train")
