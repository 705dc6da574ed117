"""The linear op family through the public API, on every backend that runs here.

Oracle: torch in float64 (DESIGN.md section 4). Every test parametrized by backend makes its
tensors on that backend's device (the ``_backend_device`` fixture): Triton's is the GPU when
there is one, else the CPU through its interpreter, which is slow, so it gets smaller shapes.
The kernels themselves are checked in tests/test_kernel_contract.py.
"""

import copy

import pytest
import torch
from contract import device_of

import brainkern
import brainkern.functional as BF
from brainkern import backends
from helpers import assert_close, gemm_error_scales, gradcheck

BACKENDS = backends.available_backends()
ACTIVATIONS = [None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu",
               torch.nn.GELU(approximate="tanh"), torch.nn.LeakyReLU(-0.2)]
SHAPES = [(1, 1, 1), (7, 13, 5), (127, 33, 17), (257, 40, 129)]  # (M, K, N)
SMALL_SHAPES = SHAPES[:3]


@pytest.fixture(autouse=True)
def _backend_device(request):
    """Tensors a backend-parametrized test makes land on that backend's device: with a GPU,
    Triton gets CUDA tensors (it cannot run CPU ones without the interpreter)."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if backend is None:
        yield
        return
    with torch.device(device_of(backend)):
        yield


def shapes_for(backend):
    return SMALL_SHAPES if backend == "triton" else SHAPES


def reference(x, w, b, activation):
    """float64 torch: the oracle."""
    act = brainkern.activations.resolve(activation)
    z = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    return z if act is None else act.forward(z)


def check_linear(backend, x, w, b, activation, dtype=torch.float32):
    """Forward and every gradient against the float64 oracle."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    with backends.use_backend(backend):
        out = BF.linear(*leaves[:2], leaves[2] if b is not None else None, activation)
    ref = reference(*ref_leaves[:2], ref_leaves[2] if b is not None else None, activation)
    grad = torch.randn_like(ref)
    scales = gemm_error_scales(ref_leaves[0], ref_leaves[1], b, grad)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, what="output", scale=scales[0])
    with backends.use_backend(backend):
        out.backward(grad.to(dtype))
    ref.backward(grad)
    for name, leaf, ref_leaf, scale in zip(("input", "weight", "bias"), leaves, ref_leaves, scales[1:]):
        assert_close(leaf.grad, ref_leaf.grad, dtype, what=f"d {name}", scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
def test_linear_every_activation(backend, activation):
    for m, k, n in shapes_for(backend):
        check_linear(backend, torch.randn(m, k), torch.randn(n, k), torch.randn(n), activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_float64_and_no_bias(backend, bias):
    x, w = torch.randn(9, 21), torch.randn(11, 21)
    check_linear(backend, x, w, torch.randn(11) if bias else None, "tanh", torch.float64)


def _float64_leaves():
    return [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
            for shape in ((3, 4), (5, 4), (5,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", torch.nn.LeakyReLU(-0.3), None], ids=str)
def test_linear_gradcheck(backend, activation):
    """First derivatives: the backend's forward and backward kernels against finite differences."""
    with backends.use_backend(backend):
        assert gradcheck(lambda *t: BF.linear(*t, activation=activation), _float64_leaves(),
                         backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", torch.nn.LeakyReLU(-0.3), None], ids=str)
def test_linear_gradgradcheck_of_the_torch_recompute(backend, activation):
    """Second derivatives. backward(create_graph=True) recomputes the layer with torch's ops
    (ops/linear.py), so this checks that hand-over (the right graph, from the right saved
    tensors), not the backend's kernels: those compute only the first derivatives."""
    with backends.use_backend(backend):
        assert gradcheck(lambda *t: BF.linear(*t, activation=activation), _float64_leaves(),
                         backend, second_order=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)])
def test_linear_zero_size(backend, shape):
    m, k, n = shape
    check_linear(backend, torch.randn(m, k), torch.randn(n, k), torch.randn(n), "sigmoid")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_non_contiguous_and_leading_dims(backend):
    # input: a strided slice with two leading dims; weight: a transposed view.
    base = torch.randn(2, 6, 3 * 17)
    x = base[:, ::2, ::3].detach().requires_grad_()
    w_t = torch.randn(17, 9)
    w = w_t.t().detach().requires_grad_()
    b = torch.randn(9, requires_grad=True)
    assert not x.is_contiguous() and not w.is_contiguous()
    with backends.use_backend(backend):
        out = BF.linear(x, w, b, "silu")
        out.sum().backward()  # sum's gradient is an expanded, stride-0 tensor
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.nn.functional.silu(torch.nn.functional.linear(x64, w64, b64))
    ref.sum().backward()
    assert out.shape == (2, 3, 9)
    assert_close(out, ref, torch.float32)
    for t, r in ((x, x64), (w, w64), (b, b64)):
        assert_close(t.grad, r.grad, torch.float32, what="gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_unbatched_input(backend):
    x, w, b = torch.randn(6), torch.randn(4, 6), torch.randn(4)
    with backends.use_backend(backend):
        out = BF.linear(x, w, b, "relu")
    assert out.shape == (4,)
    assert_close(out, torch.relu(torch.nn.functional.linear(x.double(), w.double(), b.double())),
                 torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", [((5,), (5,)), ((3, 5), (5,)), ((5,), (5, 4)), ((3, 5), (5, 4)),
                                    ((2, 3, 5), (5, 4)), ((2, 3, 5), (2, 5, 4)), ((5,), (2, 5, 4)),
                                    ((3, 1, 3, 5), (2, 5, 4))], ids=str)
def test_matmul_follows_torch_matmul(backend, shapes):
    a = torch.randn(*shapes[0], dtype=torch.float64, requires_grad=True)
    b = torch.randn(*shapes[1], dtype=torch.float64, requires_grad=True)
    with backends.use_backend(backend):
        out = BF.matmul(a, b)
        out.sum().backward()
    ref_a, ref_b = (t.detach().requires_grad_() for t in (a, b))
    ref = torch.matmul(ref_a, ref_b)
    ref.sum().backward()
    assert out.shape == ref.shape
    assert_close(out, ref)
    assert_close(a.grad, ref_a.grad, what="d a")
    assert_close(b.grad, ref_b.grad, what="d b")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", ["input", "weight", "bias"])
def test_linear_frozen_tensors_get_no_gradient(backend, frozen):
    """Only what requires grad gets a gradient (a frozen layer, or data as the input)."""
    tensors = {"input": torch.randn(9, 7), "weight": torch.randn(5, 7), "bias": torch.randn(5)}
    for name, t in tensors.items():
        t.requires_grad_(name != frozen)
    with backends.use_backend(backend):
        out = BF.linear(tensors["input"], tensors["weight"], tensors["bias"], "tanh")
        grad = torch.randn_like(out)
        out.backward(grad)
    ref = {name: t.detach().double().requires_grad_() for name, t in tensors.items()}
    reference(ref["input"], ref["weight"], ref["bias"], "tanh").backward(grad.double())
    for name, t in tensors.items():
        if name == frozen:
            assert t.grad is None
        else:
            assert_close(t.grad, ref[name].grad, torch.float32, tol=1e-4, what=f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["sigmoid", "gelu", None], ids=str)
def test_linear_double_backward_recomputes_with_torch(backend, activation):
    """backward(create_graph=True), as a gradient penalty does: the first gradients are right
    and differentiable, and the second derivatives match torch's. That backward recomputes the
    layer with torch's ops, so this checks the hand-over, not the backend's kernels."""
    leaves = [torch.randn(6, 4), torch.randn(3, 4), torch.randn(3)]
    ours = [t.double().requires_grad_() for t in leaves]
    ref = [t.double().requires_grad_() for t in leaves]
    results = []
    for tensors, run in ((ours, BF.linear), (ref, reference)):
        x, w, b = tensors
        with backends.use_backend(backend):
            out = run(x, w, b, activation)
            (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
            penalty = gx.pow(2).sum()
            results.append((gx, *torch.autograd.grad(penalty, (x, w, b))))
    for name, a, b in zip(("d input", "d2 input", "d2 weight", "d2 bias"), *results):
        assert_close(a, b, torch.float64, what=name)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(3, 5), torch.randn(4, 6)), ValueError, "input: last dimension 5"),
        ((torch.randn(3, 5), torch.randn(4, 5), torch.randn(3)), ValueError, r"bias: expected shape \(4,\)"),
        ((torch.randn(3, 5), torch.randn(4, 5, 1)), ValueError, "weight: expected a 2-D"),
        ((torch.randn(3, 5), torch.randn(4, 5), torch.randn(4, 1)), ValueError, "bias: expected a 1-D"),
        ((torch.tensor(1.0), torch.randn(4, 1)), ValueError, "input: expected at least 1 dim"),
        ((torch.randn(3, 5), torch.randn(4, 5, dtype=torch.float64)), TypeError, "weight: dtype"),
        ((torch.randn(3, 5), torch.randn(4, 5), torch.randn(4, dtype=torch.float64)), TypeError,
         "bias: dtype"),
        ((torch.randn(3, 5), torch.randn(4, 5, device="meta")), ValueError, "weight: on device meta"),
        ((torch.ones(3, 5, dtype=torch.int64), torch.randn(4, 5)), TypeError, "input: expected a floating"),
        (([[1.0]], torch.randn(1, 1)), TypeError, "input: expected a torch.Tensor"),
    ],
)
def test_linear_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        BF.linear(*args)


def test_bad_activation():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="activation: unknown name 'relu6'"):
        BF.linear(x, w, activation="relu6")
    with pytest.raises(TypeError, match="activation: expected None"):
        BF.linear(x, w, activation=torch.nn.Softmax())


def test_matmul_bad_input():
    with pytest.raises(ValueError, match="b: its reduction dimension 4"):
        BF.matmul(torch.randn(3, 5), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        BF.matmul(torch.tensor(2.0), torch.randn(4, 2))
    with pytest.raises(TypeError, match="b: dtype"):
        BF.matmul(torch.randn(3, 4), torch.randn(4, 2, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", None], ids=str)
def test_linear_on_gpu(dtype, activation):
    from helpers import TF32_TOLERANCE, TOLERANCE

    m, k, n = 257, 511, 129
    x, w, b = (torch.randn(*s, device="cuda") for s in ((m, k), (n, k), (n,)))
    tol = TF32_TOLERANCE if dtype == torch.float32 else TOLERANCE[dtype]
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    out = BF.linear(*leaves, activation=activation)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*ref_leaves, activation)
    assert_close(out, ref, tol=tol)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert_close(leaf.grad, ref_leaf.grad, tol=tol * 4, what="gradient")


def test_linear_under_autocast_follows_f_linear():
    x, w, b = torch.randn(5, 12), torch.randn(7, 12), torch.randn(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = BF.linear(x, w, b, "relu")
        ref = torch.relu(torch.nn.functional.linear(x, w, b))
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close(out, ref.double(), torch.bfloat16)


def test_torch_func_transforms_match_torch_nn():
    """Inside torch.func transforms the kernels cannot run (transformed tensors have no data
    pointers), so brainkern layers compute with torch's ops there: grad, per-sample gradients
    (vmap over grad) and jacrev give what the same torch.nn model gives, frozen layers and
    inputs with extra leading dimensions included."""
    torch_model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    ours = brainkern.accelerate(copy.deepcopy(torch_model))
    assert isinstance(ours[0], brainkern.nn.Linear)
    x, target = torch.randn(6, 5), torch.randn(6, 3)

    def loss_of(model):
        def loss(params, x, target):
            return (torch.func.functional_call(model, params, (x,)) - target).pow(2).sum()
        return loss

    for transform in (
        lambda model, params: torch.func.grad(loss_of(model))(params, x, target),
        lambda model, params: torch.func.vmap(torch.func.grad(loss_of(model)),
                                              in_dims=(None, 0, 0))(params, x, target),
        lambda model, params: torch.func.jacrev(loss_of(model))(params, x, target),
    ):
        results = []
        for model in (ours, torch_model):
            params = {name: p.detach() for name, p in model.named_parameters()}
            results.append(transform(model, params))
        for name in results[1]:
            assert_close(results[0][name], results[1][name].double(), torch.float32, what=name)
    ours.requires_grad_(False)
    torch_model.requires_grad_(False)
    batched = torch.randn(2, 6, 5)
    assert_close(torch.func.vmap(ours)(batched), torch.func.vmap(torch_model)(batched).double(),
                 torch.float32)


def test_linear_on_a_tensor_that_escaped_a_transform():
    """A tensor kept from inside torch.func.grad is a dead functorch wrapper, with no storage:
    linear unwraps it, as Function.apply does (passed as is, the kernel has no data pointer)."""
    escaped = []
    torch.func.grad(lambda t: (escaped.append(t), t.sum())[1])(torch.randn(4, 3))
    assert torch._C._functorch.is_functorch_wrapped_tensor(escaped[0])
    w = torch.randn(2, 3, requires_grad=True)
    out = BF.linear(escaped[0], w, None, "tanh")
    ref = torch.tanh(torch.nn.functional.linear(escaped[0], w))
    assert_close(out, ref.double(), torch.float32)
    out.sum().backward()
    assert w.grad is not None
    with torch.no_grad():  # the inference path unwraps too
        assert_close(BF.linear(escaped[0], w, None, "tanh"), ref.double(), torch.float32)


def test_linear_under_torch_compile():
    """torch.compile traces around the kernels (they read data pointers) and runs them eagerly:
    the compiled layer gives the eager layer's values and gradients."""
    layer = brainkern.nn.Linear(5, 3, activation="relu")
    x = torch.randn(4, 5, requires_grad=True)
    out = torch.compile(layer)(x)
    ref = torch.relu(torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert_close(out, ref.double(), torch.float32)
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, grad)
    (theirs,) = torch.autograd.grad(ref, x, grad)
    assert_close(ours, theirs.double(), torch.float32)
