"""Drop-in layers and accelerate(): same API, parameters and results as torch.nn."""

import pytest
import torch

import brainkern
import brainkern.nn as bnn
from helpers import assert_close


def test_linear_is_a_drop_in_for_torch_linear():
    torch.manual_seed(3)
    ref = torch.nn.Linear(13, 7)
    torch.manual_seed(3)
    ours = bnn.Linear(13, 7)
    assert isinstance(ours, torch.nn.Linear)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), f"init differs for {key}"
    x = torch.randn(2, 5, 13)
    assert_close(ours(x), ref.double()(x.double()), torch.float32)


def test_linear_constructor_options():
    layer = bnn.Linear(4, 3, bias=False, dtype=torch.float64, activation=torch.nn.LeakyReLU(0.2))
    assert layer.bias is None and layer.weight.dtype == torch.float64
    assert "leaky_relu(negative_slope=0.2)" in repr(layer)
    x = torch.randn(6, 4, dtype=torch.float64)
    assert_close(layer(x), torch.nn.functional.leaky_relu(x @ layer.weight.t(), 0.2))
    with pytest.raises(ValueError, match="activation"):
        bnn.Linear(4, 3, activation="swish")


def test_load_state_dict_from_torch_linear():
    ref, ours = torch.nn.Linear(8, 3), bnn.Linear(8, 3, activation="tanh")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 8)
    assert_close(ours(x), torch.tanh(ref.double()(x.double())), torch.float32)


def test_accelerate_swaps_in_place_shares_parameters_and_fuses():
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.GELU(),
        torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Sigmoid()), torch.nn.Linear(4, 2),
    )
    x = torch.randn(3, 10)
    expected = model.double()(x.double())
    model.float()
    weights = [p for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert brainkern.accelerate(model) is model
    assert all(a is b for a, b in zip(model.parameters(), weights))
    assert isinstance(model[0], bnn.Linear) and model[0].activation.name == "relu"
    assert isinstance(model[1], torch.nn.Identity)
    assert model[2].activation.name == "gelu" and model[4][0].activation.name == "sigmoid"
    assert model[5].activation is None
    out = model(x)
    assert_close(out, expected, torch.float32)
    out.square().sum().backward()
    optimizer.step()  # the optimiser built before the swap still owns the live parameters
    assert all(p.grad is not None for p in model.parameters())


def test_accelerate_rejects_non_modules():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        brainkern.accelerate(lambda x: x)
