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
