"""The static Managers' weighted layer sum: blockwise forward and backward against plain autograd."""

import pytest
import torch

from llava_manager import managers
from llava_manager.managers import StaticManager, weighted_layer_sum


def _reference(features, weights):
    return (features[..., : weights.shape[0], :] * weights).sum(-2)


@pytest.fixture(params=[1 << 20, 64], ids=["one-block", "many-blocks"])
def block_elements(request, monkeypatch):
    monkeypatch.setattr(managers, "_BLOCK_ELEMENTS", request.param)
    return request.param


@pytest.mark.parametrize(
    "shape", [(37, 5, 8), (3, 11, 5, 8)], ids=["tokens-layers-width", "crops-tokens-layers-width"]
)
@pytest.mark.parametrize("used", [5, 4], ids=["all-layers", "first-n-1"])
def test_weighted_layer_sum_matches_autograd(shape, used, block_elements):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(shape, generator=generator)
    weights = torch.randn(used, shape[-1], generator=generator)
    grad_out = torch.randn(*shape[:-2], shape[-1], generator=generator)

    ours_features, ours_weights = features.clone().requires_grad_(), weights.clone().requires_grad_()
    out = weighted_layer_sum(ours_features, ours_weights)
    out.backward(grad_out)
    ref_features, ref_weights = features.clone().requires_grad_(), weights.clone().requires_grad_()
    expected = _reference(ref_features, ref_weights)
    expected.backward(grad_out)

    assert torch.equal(out, expected)  # the same products and sums per token
    assert torch.equal(ours_features.grad, ref_features.grad)  # incl. exact zeros for the layers not read
    torch.testing.assert_close(ours_weights.grad, ref_weights.grad, rtol=1e-5, atol=1e-5)  # summed in another order
    with torch.no_grad():
        assert torch.equal(weighted_layer_sum(features, weights), expected)


def test_weighted_layer_sum_gradcheck(block_elements):
    features = torch.randn(9, 3, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(weighted_layer_sum, (features, weights))


def test_static_manager_only_weights_need_grad():
    manager = StaticManager(3, 4)
    with torch.no_grad():
        manager.layer_scores.normal_()
    features = torch.randn(10, 3, 4)  # a frozen input (e.g. a frozen tower and projector)
    manager(features).sum().backward()
    expected = features.sum(0)
    torch.testing.assert_close(manager.layer_scores.grad, expected, rtol=1e-5, atol=1e-5)


def test_weighted_layer_sum_empty_batch():
    features = torch.zeros(0, 3, 4, requires_grad=True)
    weights = torch.randn(2, 4, requires_grad=True)
    out = weighted_layer_sum(features, weights)
    out.sum().backward()
    assert out.shape == (0, 4)
    assert torch.equal(weights.grad, torch.zeros(2, 4))


@pytest.mark.parametrize("query", [None, "last", "average", "cross"])
def test_an_adaptive_manager_computes_the_released_formula_and_its_gradients(query):
    """sum_n S[:, n] * gate[n] * X[:, n], as the released code writes it with a (T, N, D) product."""
    from llava_manager.managers import AdaptiveManager, QueryContext

    torch.manual_seed(0)
    tokens, layers, width = 7, 4, 16
    manager = AdaptiveManager(layers, width, query)
    with torch.no_grad():
        for parameter in manager.parameters():
            parameter.normal_()
    features = torch.randn(tokens, layers, width, requires_grad=True)
    context = QueryContext(
        hidden=torch.randn(tokens, width),
        query_hidden=torch.randn(5, width),
        token_sample=torch.tensor([0, 0, 0, 1, 1, 1, 1]),
        query_sample=torch.tensor([0, 0, 1, 1, 1]),
        query_last=torch.tensor([1, 4]),
        query_segments=[(0, 2), (2, 5)],
    )
    output = manager(features, context)
    controller_input = context.hidden
    if query is not None:
        controller_input = torch.cat([manager._query_vectors(context), context.hidden], dim=-1)
    scores = manager.linear_controller(controller_input)  # (T, N)
    expected = ((scores[:, :, None] * manager.zero_gate[None]) * features).sum(-2)  # (T, N, D) -> (T, D)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(output)
    got = torch.autograd.grad(output, [features, manager.zero_gate], grad_out)
    want = torch.autograd.grad(expected, [features, manager.zero_gate], grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
