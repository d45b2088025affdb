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
    expected_triplet = module.loss(emb, y, module.miner(emb, y))
    assert not torch.allclose(expected_ce, expected_triplet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        assert torch.allclose(module.training_step(batch, 0), expected_ce)  # epoch 0 < warmup_epochs
        module.warmup_epochs = 0
        assert torch.allclose(module.training_step(batch, 0), expected_triplet)
