import pickle

import numpy as np
import pytest
import torch

from src.data.cifar10 import DataError, extract_verified_archive, load_cifar10
from src.data.cifar10_datamodule import CIFAR10DataModule, stratified_split
from src.data.fake_datamodule import FakeDataModule, make_fake_cifar
from src.data.loaders import RandomBatchSampler
from src.data.transforms import BatchTransform


def write_fake_cifar_folder(root, per_class_train=20, per_class_test=5):
    """The official pickle layout, written from synthetic images."""
    raw = make_fake_cifar(per_class_train, per_class_test, seed=3)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x, y = raw["train_x"].numpy().reshape(-1, 3072), raw["train_y"].numpy()
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    for i, chunk in enumerate(np.array_split(np.arange(len(y)), 5)):
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({b"data": x[chunk], b"labels": y[chunk].tolist()}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": raw["test_x"].numpy().reshape(-1, 3072), b"labels": raw["test_y"].tolist()}, f)
    return raw, folder


def test_reads_official_layout(tmp_path):
    raw, _ = write_fake_cifar_folder(tmp_path)
    data = load_cifar10(tmp_path)
    assert data["train_x"].shape == (200, 3, 32, 32) and data["train_x"].dtype == torch.uint8
    assert torch.equal(data["test_x"], raw["test_x"]) and torch.equal(data["test_y"], raw["test_y"])
    assert torch.bincount(data["train_y"]).tolist() == [20] * 10


def test_missing_folder_names_path_and_fix(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path / "nowhere")
    msg = str(e.value)
    assert "nowhere/cifar-10-batches-py" in msg and "build_cifar10.py" in msg and "download=true" in msg
    assert "\n" not in msg


def test_truncated_batch_gives_clear_error(tmp_path):
    _, folder = write_fake_cifar_folder(tmp_path)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3 is corrupt or truncated"):
        load_cifar10(tmp_path)


def test_missing_batch_file_gives_clear_error(tmp_path):
    _, folder = write_fake_cifar_folder(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch is missing"):
        load_cifar10(tmp_path)


def test_archive_md5_is_checked(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"not really a tarball")
    with pytest.raises(DataError, match="md5"):
        extract_verified_archive(archive, tmp_path)


def test_archive_extracts_when_md5_matches(tmp_path):
    import hashlib
    import tarfile

    write_fake_cifar_folder(tmp_path / "src")
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    extract_verified_archive(archive, tmp_path / "dest", hashlib.md5(archive.read_bytes()).hexdigest())
    assert len(load_cifar10(tmp_path / "dest")["train_y"]) == 200


def make_dm(**kw):
    dm = FakeDataModule(train_per_class=60, test_per_class=10, **kw)
    dm.setup()
    return dm


def test_subset_is_stratified_seeded_and_disjoint_from_val():
    dm = make_dm(subset_size=200, val_size=100, seed=1)
    raw = dm.load_raw()
    assert torch.bincount(raw["train_y"][dm.train_pool]).tolist() == [20] * 10
    assert torch.bincount(raw["train_y"][dm.val_pool]).tolist() == [10] * 10
    assert not set(dm.train_pool.tolist()) & set(dm.val_pool.tolist())
    again = make_dm(subset_size=200, val_size=100, seed=1)
    other = make_dm(subset_size=200, val_size=100, seed=2)
    assert torch.equal(dm.train_pool, again.train_pool) and torch.equal(dm.val_pool, again.val_pool)
    assert not torch.equal(dm.train_pool, other.train_pool)


def test_subset_null_takes_everything_outside_val():
    dm = make_dm(subset_size=None, val_size=50)
    assert len(dm.train_pool) == 600 - 50


def test_stratified_split_against_slow_reference():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0, 1, 1])
    a, b = stratified_split(labels, [(1, 2), (2, None)], seed=0)
    assert torch.bincount(labels[a], minlength=2).tolist() == [1, 2]
    assert torch.bincount(labels[b], minlength=2).tolist() == [2, 3]
    assert not set(a.tolist()) & set(b.tolist())


def test_increments_disjoint_cover_all_and_test_holds_seen_classes():
    dm = make_dm(subset_size=None, val_size=50, class_order=[3, 1, 4, 0, 5, 9, 2, 6, 8, 7])
    seen, covered = [], []
    for t in range(dm.num_increments):
        dm.increment = t
        classes = dm.increment_classes
        assert len(classes) == 2 and not set(classes) & set(covered)
        covered += classes
        seen += classes
        assert dm.seen_classes == seen
        assert set(dm.train_arrays()[1].unique().tolist()) == set(classes)
        assert set(dm.val_arrays()[1].unique().tolist()) == set(classes)
        assert set(dm.test_arrays()[1].unique().tolist()) == set(seen)
        assert len(dm.test_arrays()[1]) == 10 * len(seen)
    assert sorted(covered) == list(range(10))


def test_cumulative_trains_on_all_seen_classes():
    dm = make_dm(subset_size=None, val_size=50, increment=2, cumulative=True)
    assert set(dm.train_arrays()[1].unique().tolist()) == {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_order": [0, 1, 2]}, "class_order must be a permutation"),
        ({"classes_per_increment": 3}, "classes_per_increment must divide"),
        ({"increment": 5}, "increment must be null or in 0..4"),
        ({"subset_size": 3}, "subset_size must be null or >= 10"),
        ({"val_size": -1}, "val_size must be >= 0"),
    ],
)
def test_invalid_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FakeDataModule(**kwargs)


def test_subset_larger_than_data_is_rejected():
    with pytest.raises(DataError, match="lower data.subset_size"):
        make_dm(subset_size=600, val_size=100)


def test_random_batch_sampler_covers_each_index_once_and_shards_by_rank():
    full = torch.cat(list(RandomBatchSampler(103, 10, seed=5)))
    assert sorted(full.tolist()) == list(range(103))
    ranks = [torch.cat(list(RandomBatchSampler(103, 10, seed=5, rank=r, world_size=2))) for r in range(2)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())
    assert sorted(torch.cat(ranks).tolist()) == list(range(103))
    s = RandomBatchSampler(103, 10, seed=5)
    first = torch.cat(list(s))
    s.set_epoch(1)
    assert not torch.equal(first, torch.cat(list(s)))
    assert len(RandomBatchSampler(103, 10, drop_last=True)) == 10


def test_batch_crop_and_flip_match_per_image_reference():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    t = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_padding=2)
    torch.manual_seed(1)
    out = t.random_crop(x, 2)
    torch.manual_seed(1)
    dy, dx = torch.randint(0, 5, (6,)), torch.randint(0, 5, (6,))
    for i in range(6):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        assert torch.equal(out[i], padded[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])
    torch.manual_seed(2)
    flipped = t.random_flip(x)
    torch.manual_seed(2)
    mask = torch.rand(6) < 0.5
    for i in range(6):
        assert torch.equal(flipped[i], x[i].flip(2) if mask[i] else x[i])


def test_transform_normalizes_with_official_statistics():
    from src.data.cifar10 import MEAN, STD

    t = BatchTransform(MEAN, STD)
    x = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    out = t(x, train=False)
    expected = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-5)
    assert BatchTransform(MEAN, STD, input_size=64)(x, train=False).shape == (1, 3, 64, 64)


def test_loader_yields_positions_and_datamodule_applies_transform():
    dm = make_dm(subset_size=100, val_size=20, batch_size=16)
    loader = dm.train_dataloader()
    x, y, pos = next(iter(loader))
    assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32)
    tx, ty = dm.train_arrays()
    assert torch.equal(tx[pos], x) and torch.equal(ty[pos], y)
    xf, _, _ = dm.on_after_batch_transfer((x, y, pos), 0)
    assert xf.dtype == torch.float32 and abs(float(xf.mean())) < 3


def test_memory_indices_join_training_set():
    dm = make_dm(subset_size=None, val_size=50, increment=1)  # trains on classes 2 and 3
    labels = dm.load_raw()["train_y"]
    old = dm.train_pool[labels[dm.train_pool] == 0][:5]
    dm.memory_indices = old
    idx = dm.train_indices
    assert set(old.tolist()) <= set(idx.tolist())
    assert len(idx) == 2 * 55 + 5
    assert torch.bincount(labels[idx], minlength=4).tolist() == [5, 0, 55, 55]
    # exemplars are interleaved in dataset order, not appended as a block of old classes at the end,
    # so a batch of the BN re-estimation pass is not all old classes
    assert torch.equal(idx, idx.sort().values)
    assert torch.isin(idx[:len(idx) // 2], old).any()


def test_real_cifar_layout_if_built():
    from tests.conftest import HAVE_REAL_DATA, REAL_DATA_DIR

    if not HAVE_REAL_DATA:
        pytest.skip(f"built CIFAR-10 not found at {REAL_DATA_DIR} (run `make data`)")
    data = load_cifar10(REAL_DATA_DIR)
    assert data["train_x"].shape == (50000, 3, 32, 32) and data["test_x"].shape == (10000, 3, 32, 32)
    assert torch.bincount(data["test_y"]).tolist() == [1000] * 10
    dm = CIFAR10DataModule(data_dir=str(REAL_DATA_DIR), subset_size=5000, val_size=1000)
    dm.setup()
    assert torch.bincount(dm.load_raw()["train_y"][dm.train_pool]).tolist() == [500] * 10


def test_augmentation_makes_no_host_sync():
    from src.utils.host_sync import HostSyncError, forbid_host_syncs

    t = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_padding=4)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with forbid_host_syncs():
        out = t(x, train=True)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    # the guard does catch what the previous crop did (one nonzero per offset), and value reads
    for syncing in (lambda: (x[:, 0, 0, 0] == 3).nonzero(), lambda: x.float().mean().item(),
                    lambda: x[x[:, 0, 0, 0] > 3], lambda: bool((x > 3).any())):
        with pytest.raises(HostSyncError), forbid_host_syncs():
            syncing()
