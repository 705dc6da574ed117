"""Kernels, one module per backend and op family, all offering the same plain functions.

They know nothing of autograd, modules or argument checking: the ops layer (brainkern/ops/)
validates, allocates outputs and calls them. Every backend's linear-family module offers:

``matmul_forward(a, b, bias, out, pre, act_code, act_param) -> None``
    a:    (M, K) tensor, any strides (transposed and sliced views included).
    b:    (K, N) tensor, any strides, same dtype and device as ``a``.
    bias: (N,) contiguous tensor or None.
    out:  (M, N) contiguous tensor, written with ``act(a @ b + bias)``.
    pre:  (M, N) contiguous tensor or None; when given, also written with ``a @ b + bias``
          (the pre-activation that gelu/silu's backward needs).
    act_code, act_param: the activation, as in brainkern.activations (NONE = 0 allowed).
    M, N or K may be 0 (K = 0 gives ``act(bias)``, or ``act(0)`` without bias).

``activation_backward(grad_out, saved, grad_pre, grad_bias, act_code, act_param,
                      saved_is_output) -> None``
    grad_out:  (M, N) tensor, any strides.
    saved:     (M, N) contiguous: the activation's output when ``saved_is_output``, else the
               pre-activation.
    grad_pre:  (M, N) contiguous, written with ``grad_out * act'(z)``.
    grad_bias: (N,) contiguous or None; when given, written with ``grad_pre.sum(0)``, reduced in
               at least float32 and in the same pass over the data.
    act_code != NONE.
"""
