"""The real LPIPS code path, offline: torchvision's AlexNet file, placed where torchvision looks for it (a randomly
initialised state dict under TORCH_HOME), is loaded safely and gives the same distances as lpips' own loader."""

import warnings

import pytest
import torch

from utils.evaluation.diversity import Diversity, DiversityError, alexnet_weights_path


@pytest.fixture()
def alexnet_file(tmp_path, monkeypatch):
    from torchvision.models import alexnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(123)
    state = alexnet().state_dict()
    path = alexnet_weights_path()
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path, state


def images(seed):
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_lpips_loads_the_alexnet_file_and_matches_lpips_own_loader(alexnet_file):
    import lpips

    _, state = alexnet_file
    diversity = Diversity("lpips")
    net = diversity.model.net
    for index, slice_name in ((0, "slice1"), (3, "slice2"), (6, "slice3"), (8, "slice4"), (10, "slice5")):
        assert torch.equal(getattr(getattr(net, slice_name), str(index)).weight, state[f"features.{index}.weight"])
    a, b = images(0), images(1)
    assert torch.equal(diversity.distance(a, a), torch.zeros(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=False, verbose=False).eval()  # torchvision's path
    with torch.no_grad():
        expected = reference(a, b, normalize=True).flatten()
    torch.testing.assert_close(diversity.distance(a, b), expected)
    stand_in = Diversity("lpips_random_backbone")
    assert diversity(torch.cat([a, b])) != pytest.approx(stand_in(torch.cat([a, b])), rel=1e-3)


def test_a_broken_alexnet_file_is_one_clear_line(alexnet_file):
    path, _ = alexnet_file
    path.write_bytes(path.read_bytes()[:1000])  # truncated download
    with pytest.raises(DiversityError, match="does not load") as info:
        Diversity("lpips")
    assert "\n" not in str(info.value)
    torch.save({"classifier.1.weight": torch.zeros(2, 2)}, path)  # some other network's weights
    with pytest.raises(DiversityError, match="feature layers"):
        Diversity("lpips")
