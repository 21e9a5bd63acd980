import pytest
import torch

from fastgrpo_kernels import group_advantages, process_advantages
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


def process_reference(steps, lengths, G, scale):
    """DeepSeekMath's process advantages written out: steps[s] = [(end, reward), ...] per completion."""
    out = []
    for g in range(0, len(steps), G):
        rewards = torch.tensor([r for s in steps[g:g + G] for _, r in s], dtype=torch.float64)
        valid = rewards[~rewards.isnan()]
        mean = valid.mean() if valid.numel() else 0.0
        spread = valid.numel() > 1 and valid.max() > valid.min()
        div = {"group": (valid.std() if valid.numel() > 1 else 0.0) + 1e-4, "none": 1.0}[scale]
        for s, n in zip(steps[g:g + G], lengths[g:g + G]):
            tokens = torch.zeros(n, dtype=torch.float64)
            for end, r in s:
                if spread and r == r:
                    tokens[: end + 1] += (r - mean) / div  # every token at or before the step's end
            out.append(tokens)
    return torch.cat(out).float()


def _flat(steps, lengths):
    return (torch.tensor([r for s in steps for _, r in s], dtype=torch.float32),
            torch.tensor([e for s in steps for e, _ in s], dtype=torch.long),
            torch.tensor([len(s) for s in steps]), torch.tensor(lengths))


@pytest.mark.parametrize("scale", ["group", "none"])
def test_process_advantages_match_the_written_out_definition(scale):
    nan = float("nan")
    steps = [[(1, 1.0), (4, 0.0), (5, 1.0)],  # three steps
             [],  # no step: every token 0, and nothing in the group's statistics
             [(2, nan), (3, 0.5)],  # a step not scored
             [(0, 0.2)],  # one step at the first token: only that token gets it
             [(3, 1.0), (3, 0.5)],  # group 2: two steps ending on the same token
             [(6, 1.0)],
             [(2, 0.7)], [(1, 0.7)],  # group 3: constant: zero everywhere
             [(0, nan)], [(4, nan)]]  # group 4: all NaN: zero everywhere
    lengths = [6, 3, 5, 2, 4, 7, 3, 2, 1, 5]
    G = 2
    got = process_advantages(*_flat(steps, lengths), group_size=G, scale=scale)
    torch.testing.assert_close(got, process_reference(steps, lengths, G, scale), rtol=1e-5, atol=1e-6)


def test_outcome_supervision_is_one_step_at_the_last_token():
    rewards = torch.tensor([1.0, 0.0, 0.5, float("nan"), 2.0, 2.0, 0.3, 0.9])
    lengths = [3, 1, 4, 2, 5, 2, 3, 1]
    steps = [[(n - 1, float(r))] for n, r in zip(lengths, rewards)]
    for scale in ("group", "batch", "none"):
        got = process_advantages(*_flat(steps, lengths), group_size=4, scale=scale)
        expected = group_advantages(rewards, 4, scale=scale, backend="torch").repeat_interleave(torch.tensor(lengths))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps, lengths, match", [
    ([[(3, 1.0)], [(0, 0.0)]], [3, 1], "outside its completion"),
    ([[(0, 1.0)], [(0, 0.0)], [(0, 1.0)]], [1, 1, 1], "groups of 2"),
])
def test_process_advantages_bad_input(steps, lengths, match):
    with pytest.raises(ValueError, match=match):
        process_advantages(*_flat(steps, lengths), group_size=2)
