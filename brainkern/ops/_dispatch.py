"""What every op needs, once: choosing the backend, the eager fast path, the registered ops.

Every op runs one of two ways, and both call the same forward and backward implementation:

- Eager (the common case): the backend's kernel module comes from :func:`kernels_for` on every
  call (use_backend and BRAINKERN_BACKEND are followed live), and the op's own
  torch.autograd.Function runs through its C++ apply (:func:`c_apply`). The dispatcher that a
  ``torch.library`` op goes through costs ~13 us per forward and ~130 us per forward+backward
  (64x128 -> 10 layer, measured), about twice that layer's whole work: eager mode skips it.
- In a graph (torch.compile, torch.export; :func:`in_graph` tells): the op is the registered
  ``torch.library`` custom op ``brainkern::<name>``, one opaque node per layer with a fake
  (shape-only) implementation and registered autograd, so that Dynamo traces it without a graph
  break and export writes it down. The backend is decided when the graph is traced
  (:func:`graph_backend`, a constant in the graph: a traced graph keeps its backend) and passed
  to the op as its first argument, a string. Meta tensors also take this path, eagerly: the fake
  implementation is the op's shape inference (``bnn.Linear(..., device="meta")`` works as
  torch.nn.Linear's does).
  On CUDA the registered op calls the Triton launchers as an opaque kernel: Inductor does not
  see into them (``torch.library.triton_op`` would need the launchers written with
  ``wrap_triton``, which cannot be checked on a machine without a GPU).

Recipe for a new op family (conv and pool follow linear, brainkern/ops/linear.py):

1. In ``ops/<family>.py`` write the shared implementation as plain functions of the kernel
   module: ``_forward(kern, x, weight, bias, <params>, act) -> (out, saved...)`` allocating the
   outputs and calling the kernels, and ``_backward(kern, grad_out, <saved>, <params>, act,
   needs) -> grads`` (``needs``: which inputs want a gradient).
2. The eager torch.autograd.Function: its forward calls ``_forward`` and saves what backward
   needs, its backward calls ``_backward`` (or, when ``torch.is_grad_enabled()``, i.e.
   create_graph=True, recomputes with torch's ops so higher derivatives exist). Bind
   ``_apply = c_apply(TheFunction)`` once at import.
3. Register the two graph ops with :func:`define`, the backend first and the non-tensor
   parameters after the tensors, in schema types (conv: ``int[] stride, int[] padding,
   int[] dilation, int groups, int act_code, float act_param``; pool: ``int[] kernel_size, ...,
   bool ceil_mode``)::

       _op = define("conv2d", "(str backend, Tensor x, Tensor weight, Tensor? bias, "
                    "int[] stride, ..., int act_code, float act_param) -> (Tensor, Tensor)",
                    family="conv", impl=_op_forward, fake=_fake_forward)
       _backward_op = define("conv2d_backward", "(str backend, Tensor grad_out, ..., "
                             "bool[] needs) -> Tensor[]", family="conv", impl=..., fake=...)

   ``impl(kern, *args)`` gets the kernel module of the backend named in the graph and calls
   ``_forward`` / ``_backward``; ``fake(*args)`` returns empty tensors of the outputs' shapes.
   Outputs must not alias each other or an input: where the eager path saves the output itself
   as its "saved" tensor, the op returns an empty placeholder and setup_context uses the output.
   A backward op returns only the gradients asked for in ``needs``.
4. ``torch.library.register_autograd(_op, backward, setup_context=...)``: setup_context saves
   the inputs and outputs and keeps the non-tensor arguments on ctx, backward calls
   ``_backward_op`` (or the torch recomputation when grad mode is on).
5. The public function: under :func:`any_autocast` cast with :func:`autocast`; check arguments
   (ops/_checks.py, sparse layouts included); if :func:`transforms_active` compute with
   torch's ops (first: the op has no vmap rule, and a torch.compile'd torch.func transform is
   in a graph too); else if :func:`in_graph`, call ``_op`` with ``graph_backend(family,
   device, dtype)``; else ``kern = kernels_for(family, device, dtype)`` (a RuntimeError there
   for a meta device means: call ``_op`` with ``graph_backend``) and run ``_apply`` when a
   gradient is wanted or ``_forward`` alone when not; on a RuntimeError retry once with
   :func:`unwrap_dead` tensors if any was a dead functorch wrapper.
"""

from __future__ import annotations

import torch

from brainkern import backends

NAMESPACE = "brainkern"


def _private(get, fallback):
    """A private torch API, ``get()``, or ``fallback`` where this torch has none."""
    try:
        return get()
    except (AttributeError, KeyError):
        return fallback


# Bound once: attribute lookups through torch's modules cost ~50 ns each, per op call.
in_graph = torch.compiler.is_compiling  # True under Dynamo and torch.export alike
grad_enabled = torch.is_grad_enabled
kernels_for = backends.kernels_for
# One C call telling whether any autocast region is active (private, present since torch 2.0);
# without it the public per-device test in autocast() runs on every call.
any_autocast = _private(lambda: torch._C._is_any_autocast_enabled, lambda: True)
# Whether a torch.func transform is running; without the private test, ops run their kernels,
# which fail on transformed tensors (no data pointers) with the kernel's own error.
transforms_active = _private(lambda: torch._C._are_functorch_transforms_active, lambda: False)
_unwrap_if_dead = _private(lambda: torch._C._functorch.unwrap_if_dead, lambda t: t)


def c_apply(function_class):
    """``function_class.apply`` without its Python layer: the C++ apply it wraps.

    Function.apply is a classmethod that checks for setup_context and functorch transforms and
    unwraps dead functorch wrappers: ~3 us per call standalone and ~10 in a training step
    (measured; a small layer's whole GEMM is a few us). The ops call this only where none of
    that applies (not in a graph, no transform active) and unwrap dead wrappers themselves.
    Falls back to ``function_class.apply`` where torch has no C++ apply to reach.
    """
    return _private(lambda: torch._C._FunctionBase.__dict__["apply"].__get__(None, function_class),
                    function_class.apply)


def autocast(*tensors):
    """Under torch.autocast, cast floating tensors to the autocast dtype, as F.linear does."""
    device_type = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in tensors)


def unwrap_dead(*tensors):
    """``tensors`` with dead functorch wrappers unwrapped, or None if none was one.

    A tensor kept from inside a torch.func transform is a dead wrapper without storage: the
    kernels' data_ptr() fails on it (before any kernel runs). Function.apply would unwrap it;
    the ops do so only after that failure, which keeps three calls per op off the common path.
    """
    unwrapped = tuple(None if t is None else _unwrap_if_dead(t) for t in tensors)
    return None if all(u is t for u, t in zip(unwrapped, tensors)) else unwrapped


def empty_contiguous(t):
    """An uninitialised contiguous tensor like ``t`` (empty_like is torch's cheapest allocator
    call, and keeps t's strides when t is contiguous already)."""
    if t.is_contiguous():
        return torch.empty_like(t)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.compiler.assume_constant_result
def graph_backend(family: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a graph's op runs on, chosen once while the graph is traced.

    Dynamo calls this at trace time and puts the string into the graph as a constant (it cannot
    trace the ContextVar that use_backend sets). Meta tensors get ``"meta"``: no kernel runs
    on them, the op's fake implementation gives the shapes.
    """
    if device.type == "meta":
        return "meta"
    return backends.select(family, device, dtype)


def define(name: str, schema: str, *, family: str, impl, fake):
    """Register the custom op ``brainkern::<name>`` and return it.

    ``schema``'s first argument is ``str backend``. ``impl(kern, *args)`` runs on real tensors
    of any device with ``kern`` the kernel module of that backend for ``family``;
    ``fake(*args)`` returns the outputs' shapes, for tracing and for meta tensors. Both get the
    arguments after the backend.
    """
    def run(backend, *args):
        return impl(backends.kernels(backend, family), *args)

    def run_fake(backend, *args):
        return fake(*args)

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", run, mutates_args=(), schema=schema)
    op.register_fake(run_fake)
    return op
