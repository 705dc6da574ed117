"""torch.compile and torch.export over brainkern layers: the registered ``brainkern::`` ops.

Eager calls run the layer's autograd.Function directly; in a graph each layer is one
``brainkern::linear`` node whose backend was fixed when the graph was traced
(brainkern/ops/_dispatch.py). Most compile tests use the ``aot_eager`` backend, which traces
forward and backward through the fake implementation and the registered autograd as Inductor
does, without minutes of C++ compilation on two cores; one test runs Inductor itself.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import brainkern
import brainkern.functional as BF
import brainkern.nn as bnn
from brainkern import backends
from brainkern.ops import _dispatch
from brainkern.ops import linear as linear_ops
from helpers import assert_close

BACKENDS = backends.available_backends()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces from scratch: Dynamo's caches would otherwise carry one test's graphs
    (and their backend constants) into the next."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(dtype=torch.float32):
    """Layers covering each kind of saved tensor: the output (relu), the pre-activation
    (gelu), nothing (no activation), and a layer without bias."""
    return torch.nn.Sequential(
        bnn.Linear(13, 17, activation="gelu"), bnn.Linear(17, 9, activation="relu"),
        bnn.Linear(9, 6, bias=False, activation=torch.nn.LeakyReLU(-0.2)), bnn.Linear(6, 5),
    ).to(dtype)


def forward_backward(model, x, grad):
    """Output and the gradients of x and every parameter, for out.backward(grad)."""
    x = x.detach().requires_grad_()
    model.zero_grad()
    out = model(x)
    out.backward(grad)
    return [out.detach(), x.grad, *(p.grad for p in model.parameters())]


def assert_same_values(got, expected):
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert_close(a, b.double(), what=f"tensor {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    model, x = make_model(), torch.randn(7, 13)
    grad = torch.randn(7, 5)
    counter = CompileCounterWithBackend("aot_eager")
    with brainkern.use_backend(backend):
        eager = forward_backward(model, x, grad)
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        first = forward_backward(compiled, x, grad)
        second = forward_backward(compiled, torch.randn(7, 13), grad)
    assert_same_values(first, eager)
    assert counter.frame_count == 1, "the second call with the same shapes recompiled"
    assert counter.op_count >= 4  # one brainkern::linear per layer, at least
    assert second[0].shape == (7, 5)


def test_compile_with_inductor_matches_eager():
    model, x = make_model(), torch.randn(6, 13)
    grad = torch.randn(6, 5)
    eager = forward_backward(model, x, grad)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    assert_same_values(forward_backward(compiled, x, grad), eager)
    forward_backward(compiled, torch.randn(6, 13), grad)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_explain_reports_no_graph_break(backend):
    model = make_model()
    with brainkern.use_backend(backend):
        explanation = torch._dynamo.explain(model)(torch.randn(3, 2, 13))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    graph = explanation.graphs[0]
    nodes = [n for n in graph.graph.nodes if n.target is torch.ops.brainkern.linear.default]
    assert len(nodes) == 4
    assert all(n.args[0] == backend for n in nodes), "the backend is a constant in the graph"


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_matches_eager(backend):
    model, x = make_model(), torch.randn(5, 13)
    grad = torch.randn(5, 5)
    with brainkern.use_backend(backend):
        eager = forward_backward(model, x, grad)
        program = torch.export.export(model, (x,))
    calls = [n for n in program.graph.nodes if n.target is torch.ops.brainkern.linear.default]
    assert len(calls) == 4 and all(n.args[0] == backend for n in calls)
    exported = program.module()
    # The exported module runs the backend fixed at export, whatever is requested later.
    assert_same_values(forward_backward(exported, x, grad), eager)


def test_backend_is_fixed_when_the_graph_is_traced(monkeypatch):
    from brainkern.kernels.numba import linear as numba_linear

    ran = []
    original = numba_linear.linear_forward

    def spy(*args):
        ran.append("numba")
        return original(*args)

    monkeypatch.setattr(numba_linear, "linear_forward", spy)
    layer, x = bnn.Linear(4, 3), torch.randn(2, 4)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with brainkern.use_backend("numba"):
        compiled(x)
    assert ran == ["numba"]
    compiled(x)  # outside use_backend: the traced graph keeps its backend
    assert ran == ["numba", "numba"]


def test_compile_follows_autocast():
    x, w, b = torch.randn(5, 12), torch.randn(7, 12), torch.randn(7)

    def f(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return BF.linear(x, w, b, "relu")

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b)
    assert out.dtype == torch.bfloat16
    assert_close(out, torch.relu(torch.nn.functional.linear(x, w, b)).double(), torch.bfloat16)


def test_eager_path_and_registered_op_agree():
    """The eager autograd.Function and the brainkern::linear op run the same implementation:
    the same kernels give identical values and gradients, for both saved-tensor kinds."""
    for activation in ("tanh", "silu"):
        x, w, b = (torch.randn(*s, requires_grad=True) for s in ((9, 11), (6, 11), (6,)))
        grad = torch.randn(9, 6)
        eager = BF.linear(x, w, b, activation)
        assert type(eager.grad_fn).__name__ == "FusedLinearBackward", "eager skips the dispatcher"
        eager_grads = torch.autograd.grad(eager, (x, w, b), grad)
        act = brainkern.activations.resolve(activation)
        backend = backends.select("linear", x.device, x.dtype)
        registered, _ = torch.ops.brainkern.linear(backend, x, w, b, act.code, act.param)
        assert "brainkern_linear" in type(registered.grad_fn).__name__
        registered_grads = torch.autograd.grad(registered, (x, w, b), grad)
        assert torch.equal(registered, eager)
        for ours, theirs in zip(registered_grads, eager_grads):
            assert torch.equal(ours, theirs)


def test_registered_op_double_backward_matches_torch():
    """create_graph=True through the registered op recomputes with torch's ops, as eager does."""
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 4), (5, 4), (5,)))
    code = brainkern.activations.resolve("gelu").code

    def layer(x, w, b):
        return torch.ops.brainkern.linear("native", x, w, b, code, 0.0)[0]

    assert torch.autograd.gradgradcheck(layer, (x, w, b))


def test_meta_tensors_get_shapes_from_the_fake_implementation():
    x = torch.empty(2, 3, 11, device="meta", requires_grad=True)
    w = torch.empty(4, 11, device="meta", requires_grad=True)
    b = torch.empty(4, device="meta", requires_grad=True)
    for activation in (None, "relu", "gelu"):
        with brainkern.use_backend("numba"):  # no backend's kernels run on meta: none needed
            out = BF.linear(x, w, b, activation)
        assert out.device.type == "meta" and out.shape == (2, 3, 4)
        gx, gw, gb = torch.autograd.grad(out, (x, w, b), torch.empty_like(out))
        assert (gx.shape, gw.shape, gb.shape) == (x.shape, w.shape, b.shape)
    assert BF.matmul(torch.empty(5, 3, device="meta"), torch.empty(3, 2, device="meta")).shape == (5, 2)


def test_private_torch_apis_fall_back():
    """Each private torch API used on the eager path has a fallback for a torch without it,
    and the fallbacks compute the same layer."""
    assert _dispatch._private(lambda: torch._C._no_such_api, "fallback") == "fallback"
    assert _dispatch.c_apply(linear_ops.FusedLinear) is not linear_ops.FusedLinear.apply
    x, w, b = (torch.randn(*s, requires_grad=True) for s in ((8, 5), (3, 5), (3,)))
    expected = BF.linear(x, w, b, "sigmoid")
    expected_grads = torch.autograd.grad(expected.sum(), (x, w, b))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(linear_ops, "_apply", linear_ops.FusedLinear.apply)
        patch.setattr(linear_ops, "_any_autocast", lambda: True)
        out = BF.linear(x, w, b, "sigmoid")
        grads = torch.autograd.grad(out.sum(), (x, w, b))
    assert torch.equal(out, expected)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))


def test_compiled_torch_func_transforms_match_eager():
    """torch.compile over torch.func.grad and vmap of a brainkern layer: inside a transform the
    layer computes with torch's ops in a graph too (the registered op has no vmap rule, and its
    kernels cannot read transformed tensors)."""
    layer = bnn.Linear(5, 3, activation="tanh")
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(4, 5)

    def loss(params, x):
        return torch.func.functional_call(layer, params, (x,)).sum()

    compiled = torch.compile(torch.func.grad(loss), fullgraph=True)(params, x)
    eager = torch.func.grad(loss)(params, x)
    for name in eager:
        assert_close(compiled[name], eager[name].double(), torch.float32, what=name)
    batched = torch.randn(2, 4, 5)
    with torch.no_grad():
        assert_close(torch.compile(torch.func.vmap(layer), fullgraph=True)(batched),
                     torch.func.vmap(layer)(batched).double(), torch.float32)


def make_cnn():
    """A small CNN of brainkern layers: the fused conv block (accelerate joins Conv2d + ReLU +
    MaxPool2d(2)), a gelu conv, average and adaptive pooling, a linear head."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, padding="same"), torch.nn.GELU(), torch.nn.AvgPool2d(2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3))
    return brainkern.accelerate(model)


def make_generator():
    """A DCGAN generator's shape in miniature: z (1 x 1) -> 4 x 4 -> 8 x 8, transposed convs."""
    return brainkern.accelerate(torch.nn.Sequential(
        torch.nn.ConvTranspose2d(5, 6, 4, 1, 0), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(6, 2, 4, 2, 1), torch.nn.Tanh()))


CONV_MODELS = {"cnn": (make_cnn, (3, 1, 8, 8)), "generator": (make_generator, (3, 5, 1, 1))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CONV_MODELS)
def test_conv_models_compile_and_export(backend, name):
    make, shape = CONV_MODELS[name]
    model, x = make(), torch.randn(shape)
    assert any(type(m).__module__ == "brainkern.nn" for m in model)
    with brainkern.use_backend(backend):
        grad = torch.randn_like(model(x))
        eager = forward_backward(model, x, grad)
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        assert_same_values(forward_backward(compiled, x, grad), eager)
        forward_backward(compiled, torch.randn(shape), grad)
        assert counter.frame_count == 1, "the second call with the same shapes recompiled"
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        exported = torch.export.export(model, (x,))
        nodes = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
        assert any(t.startswith("brainkern.") for t in nodes), nodes
        assert_close(exported.module()(x), eager[0].double())
