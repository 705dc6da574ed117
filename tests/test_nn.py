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


def test_linear_on_meta_device_infers_shapes_like_torch():
    """Deferred initialisation: built on meta, run on meta for shapes, then materialised."""
    ref = torch.nn.Linear(12, 5, device="meta")
    ours = bnn.Linear(12, 5, device="meta", activation="silu")
    x = torch.empty(3, 4, 12, device="meta", requires_grad=True)
    out = ours(x)
    assert out.device.type == "meta" and out.shape == ref(x).shape == (3, 4, 5)
    out.sum().backward()
    assert ours.weight.grad.shape == (5, 12) and ours.bias.grad.shape == (5,)
    assert x.grad.shape == x.shape
    ours.to_empty(device="cpu")
    ours.reset_parameters()
    y = torch.randn(2, 12)
    assert_close(ours(y), torch.nn.functional.silu(
        torch.nn.functional.linear(y.double(), ours.weight.double(), ours.bias.double())))


# CSR tensors are 2-D: a 1-D bias has only the COO layout.
@pytest.mark.parametrize("which, layout", [("input", "coo"), ("input", "csr"), ("weight", "coo"),
                                           ("weight", "csr"), ("bias", "coo")])
def test_linear_rejects_sparse_tensors(which, layout):
    """A kernel cannot read sparse storage: the error names the argument and its layout."""
    args = {"input": torch.randn(4, 6), "weight": torch.randn(3, 6), "bias": torch.randn(3)}
    dense = args[which]
    args[which] = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    expected = f"{which}: expected a dense \\(strided\\) tensor, got layout torch.sparse_{layout}"
    for backend in brainkern.available_backends():
        with brainkern.use_backend(backend), pytest.raises(TypeError, match=expected):
            brainkern.functional.linear(args["input"], args["weight"], args["bias"])
    if which == "input":
        with pytest.raises(TypeError, match=expected):
            bnn.Linear(6, 3)(args["input"])
