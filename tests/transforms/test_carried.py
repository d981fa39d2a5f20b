"""Features a vision state carries (DeepStack's earlier block outputs) are merged, selected and pooled by every
vision transform exactly as the hidden states are, and never change which tokens merge."""

from __future__ import annotations

import pytest
import torch

from luvc.state import VisionState
from luvc.transforms.orthogonal_merge import OIMParams, orthogonal_merge
from luvc.transforms.tome import ToMeParams, tome
from luvc.transforms.uniform_pool import PoolParams, uniform_pool
from luvc.transforms.visionzip import VisionZipParams, visionzip

STEPS = {
    "oim-width": lambda s: orthogonal_merge(s, OIMParams(ratio=0.5, axis="width")),
    "oim-height-hidden": lambda s: orthogonal_merge(s, OIMParams(ratio=0.3, axis="height", metric="hidden")),
    "tome": lambda s: tome(s, ToMeParams(ratio=0.4)),
    "uniform_pool": lambda s: uniform_pool(s, PoolParams(stride=(2, 3))),
    "visionzip": lambda s: visionzip(s, VisionZipParams(keep=0.5, contextual=0.3)),
}


def _state(carried: bool) -> VisionState:
    torch.manual_seed(0)
    unit, dim, grids = 4, 8, ((2, 3, 5), (1, 4, 4))
    n = sum(t * h * w for t, h, w in grids) * unit
    hidden = torch.randn(n, dim)
    return VisionState(hidden=hidden, sizes=torch.rand(n) + 0.5, positions=torch.rand(n, 2), grids=grids,
                       unit=unit, keys=torch.randn(n, 6), attention=torch.rand(n), log=[],
                       carried=torch.cat([hidden, 2 * hidden], dim=-1) if carried else None)


@pytest.mark.parametrize("step", STEPS)
def test_carried_features_follow_their_tokens(step):
    plain, out = STEPS[step](_state(False)), STEPS[step](_state(True))
    assert out.grids == plain.grids and torch.equal(out.sizes, plain.sizes)
    assert torch.equal(out.hidden, plain.hidden)  # carried channels never enter the similarity metric
    assert out.hidden.shape[0] < _state(False).hidden.shape[0]
    torch.testing.assert_close(out.carried, torch.cat([out.hidden, 2 * out.hidden], dim=-1))
