import pytest
import torch

from fastgrpo_kernels import group_advantages
from fastgrpo_kernels.advantages import group_advantages_reference


def rewards_with_edge_cases(G=8, groups=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(groups * G, generator=g)
    r[0:G] = 1.0  # all equal: zero std
    r[G + 3] = float("nan")  # one failed reward
    r[2 * G:3 * G] = float("nan")  # every reward failed
    r[3 * G:4 * G] = torch.tensor([0.3] * (G - 1) + [float("nan")])  # equal apart from a failure
    r[4 * G:5 * G] = float("nan")
    r[4 * G] = 2.0  # a single valid reward
    r[5 * G:6 * G] = (torch.rand(G, generator=g) > 0.5).float()  # 0/1 accuracy rewards
    return r


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [8, 5, 1])
def test_matches_reference(backend, scale, G):
    r = rewards_with_edge_cases(G)
    adv = group_advantages(r, G, scale, backend=backend)
    torch.testing.assert_close(adv, group_advantages_reference(r, G, scale), atol=1e-6, rtol=1e-5)
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    groups = adv.view(-1, G)
    if G > 1:
        assert (groups[0] == 0).all() and (groups[2] == 0).all() and (groups[3] == 0).all() and (groups[4] == 0).all()
        assert adv[G + 3] == 0 and groups[1].abs().sum() > 0
        if scale == "group":  # a normalized group has unit (unbiased) std
            torch.testing.assert_close(groups[6].std(), torch.tensor(1.0), atol=1e-3, rtol=0)
    else:
        assert (adv == 0).all()


def test_matches_trl_formula():
    """TRL: (r - group mean) / (group std + 1e-4), std unbiased."""
    r = torch.randn(6 * 4)
    grouped = r.view(6, 4)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(r, 4), expected.view(-1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rewards=torch.zeros(7), group_size=2), "multiple of group_size"),
    (dict(rewards=torch.zeros(2, 4), group_size=2), "1-D"),
    (dict(rewards=torch.zeros(4), group_size=2, scale="std"), "scale"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)
