"""Newton–Schulz as an optimizer of orthogonality (arXiv Eqs. 42–44; nested-learning-math.md §2.6,
§7.12): one GD step with lr ½ on ¼‖XᵀX − I‖²_F is the cubic Newton–Schulz step 1.5X − 0.5 X Xᵀ X."""

import torch
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close

from nlgraph.levels import newton_schulz


@given(SEEDS, st.integers(1, 6), st.integers(1, 6), st.integers(1, 3))
def test_newton_schulz_step_is_gd_on_orthogonality_loss(seed, m, n, batch):
    d = Draw(seed)
    x = d.normal(batch, m, n)
    got = newton_schulz(x, (1.5, -0.5, 0.0), steps=1, eps=1e-12, dtype=None)
    # newton_schulz first scales every matrix to unit Frobenius norm; GD acts on that matrix
    xn = (x / x.flatten(1).norm(dim=1)[:, None, None]).requires_grad_()
    eye = torch.eye(n)
    loss = 0.25 * (xn.transpose(-1, -2) @ xn - eye).square().sum()
    (grad,) = torch.autograd.grad(loss, xn)
    assert_close(got, xn.detach() - 0.5 * grad, "one step")
    assert_close(got, 1.5 * xn.detach() - 0.5 * xn.detach() @ xn.detach().transpose(-1, -2) @ xn.detach(), "cubic form")


@given(SEEDS, st.integers(2, 6), st.integers(2, 6))
def test_newton_schulz_matches_torch_muon_iteration(seed, m, n):
    """The quintic iteration in bfloat16 is torch.optim.Muon's, bit for bit."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    d = Draw(seed)
    x = d.normal(m, n)
    coefficients = (3.4445, -4.7750, 2.0315)
    ours = newton_schulz(x[None], coefficients, 5, 1e-7)[0]
    assert torch.equal(ours, _zeropower_via_newtonschulz(x, coefficients, 5, 1e-7))
