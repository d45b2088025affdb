import pytest
import torch

from src.models.components.backbone import EmbeddingNet, build_googlenet


def test_googlenet_gives_1024_features_without_aux_heads():
    net = build_googlenet(False).eval()
    assert net.aux1 is None and net.aux2 is None
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 1024)


def test_pretrained_from_a_saved_state_dict(tmp_path):
    torch.manual_seed(0)
    source = build_googlenet(False)
    path = tmp_path / "googlenet.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    loaded = build_googlenet(str(path))
    for (k, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    fresh = build_googlenet(False)
    assert not torch.equal(fresh.conv1.conv.weight, source.conv1.conv.weight)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a file"):
        build_googlenet(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a GoogLeNet state dict"):
        build_googlenet(str(bad))


def test_embedding_net_shapes_and_normalization():
    net = EmbeddingNet(embedding_dim=16, num_classes=10, normalize=True).eval()
    emb = net(torch.randn(3, 3, 32, 32))
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert net.classifier(emb).shape == (3, 10)
    with pytest.raises(ValueError, match="embedding_dim"):
        EmbeddingNet(embedding_dim=0)


def test_triplet_warmup_trains_cross_entropy_then_the_triplet_loss():
    import functools
    import warnings

    import torch.nn.functional as F

    from src.models.components.triplet_loss import semihard_triplet_loss
    from src.models.triplet_module import TripletModule

    torch.manual_seed(0)
    net = EmbeddingNet(embedding_dim=8, num_classes=4, normalize=True).eval()  # eval: deterministic dropout/BN
    module = TripletModule(net=net, optimizer=functools.partial(torch.optim.SGD, lr=0.1), num_classes=4,
                           warmup_epochs=1, margin=0.2)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    batch = (x, y, torch.arange(8))
    with torch.no_grad():
        emb = net(x)
    expected_ce = F.cross_entropy(net.classifier(emb), y)
    expected_triplet = semihard_triplet_loss(emb, y, 0.2)
    assert not torch.allclose(expected_ce, expected_triplet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        assert torch.allclose(module.training_step(batch, 0), expected_ce)  # epoch 0 < warmup_epochs
        module.warmup_epochs = 0
        assert torch.allclose(module.training_step(batch, 0), expected_triplet)


@pytest.mark.parametrize("stem, inception3_size", [("imagenet", 4), ("cifar8", 8), ("cifar", 16), ("cifar32", 32)])
def test_stem_sets_where_inception3_runs(stem, inception3_size):
    net = build_googlenet(False, stem=stem).eval()
    seen = []
    net.inception3a.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[-1]))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 1024)
    assert seen == [inception3_size]
    assert net.conv1.conv.kernel_size == ((7, 7) if stem == "imagenet" else (3, 3))


def test_replaced_stem_keeps_every_other_pretrained_weight_and_names_the_fresh_ones(tmp_path, caplog):
    torch.manual_seed(0)
    source = build_googlenet(False)
    path = tmp_path / "googlenet.pt"
    torch.save(source.state_dict(), path)
    with caplog.at_level("WARNING"):
        loaded = build_googlenet(str(path), stem="cifar")
    assert "model.net.stem=cifar" in caplog.text and "conv1.conv.weight" in caplog.text
    kept = {k: v for k, v in loaded.state_dict().items() if not k.startswith("conv1.")}
    assert kept and all(torch.equal(v, source.state_dict()[k]) for k, v in kept.items())
    assert loaded.conv1.conv.weight.shape == (64, 3, 3, 3)
    caplog.clear()
    build_googlenet(False, stem="cifar")  # nothing pretrained, nothing to warn about
    assert "model.net.stem" not in caplog.text


def test_unknown_stem_is_a_one_line_error_naming_the_key():
    with pytest.raises(ValueError, match=r"model.net.stem must be one of imagenet, cifar8, cifar, cifar32, got 'cifar16'"):
        EmbeddingNet(stem="cifar16")


def test_torchvision_weights_load_from_the_torch_cache_without_a_download(tmp_path, monkeypatch):
    """pretrained=true takes torchvision's IMAGENET1K_V1 file from the torch cache when it is there (the real
    download path, tested offline with a file we save under torchvision's own file name)."""
    from tests.conftest import serve_torchvision_googlenet_offline

    torch.manual_seed(0)
    full = serve_torchvision_googlenet_offline(tmp_path, monkeypatch)
    net = build_googlenet(True)
    assert net.aux1 is None and net.transform_input is False
    assert torch.equal(net.inception4c.branch1.conv.weight, full.inception4c.branch1.conv.weight)


def test_pretrained_experiment_loads_a_state_dict_file_and_upsamples_with_imagenet_statistics(tmp_path):
    """experiment=magnet_cifar10_pretrained with model.net.pretrained=<file>: upsampled, ImageNet-normalised
    images, a fixed K, the pretrained trunk loaded before training."""
    import hydra

    from src.utils.compose import compose

    torch.manual_seed(0)
    source = build_googlenet(False)
    path = tmp_path / "googlenet.pt"
    torch.save(source.state_dict(), path)
    overrides = ["experiment=magnet_cifar10_pretrained", f"model.net.pretrained={path}", "data=fake",
                 "data.subset_size=null", "data.input_size=64", "debug=fdr", "callbacks.rich_progress_bar=null",
                 "model.clusters.M=4", "model.clusters.D=4", "model.clusters.K=2"]
    cfg = compose(overrides, tmp_path / "run")
    assert cfg.data.normalization == "imagenet" and cfg.model.clusters.split_fraction is None
    model = hydra.utils.instantiate(cfg.model)
    assert torch.equal(model.net.trunk.inception5b.branch1.conv.weight, source.inception5b.branch1.conv.weight)
    dm = hydra.utils.instantiate(cfg.data)
    x = dm.transform(torch.full((1, 3, 32, 32), 124, dtype=torch.uint8), train=False)
    assert x.shape == (1, 3, 64, 64) and abs(float(x[0, 0, 0, 0]) - (124 / 255 - 0.485) / 0.229) < 1e-4
    # (the experiment's training run is tests/test_train.py's fast_dev_run, with torchvision's file in the cache)


def test_unknown_normalization_is_a_one_line_error():
    from src.data.cifar10_datamodule import CIFAR10DataModule

    with pytest.raises(ValueError, match="data.normalization must be one of cifar10, imagenet, got 'imagent'"):
        CIFAR10DataModule(normalization="imagent")
