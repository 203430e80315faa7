"""Compute backends for fastlinear: one module per backend, all with the same interface.

The registry that maps backend names to these modules is ``fastlinear._dispatch.BACKENDS``.
A backend module is imported only when it is chosen (or when availability is asked for),
so a missing optional library costs nothing until then.

Interface every backend module provides
---------------------------------------
``NAME: str``
    The registry name (``"numpy"``, ``"numba"``, ``"cupy"``).
``DTYPES: tuple[numpy.dtype, ...]``
    The floating dtypes the backend computes in. Inputs of any other dtype are refused by the
    dispatcher before the backend is called.
``ARRAY_LIBRARIES: tuple[str, ...]``
    Array libraries (``type(x).__module__`` root: ``"numpy"``, ``"cupy"``) whose arrays the
    backend accepts. The first one is the library it computes on; the result has the array type
    of the inputs.
``unavailable_reason() -> str | None``
    ``None`` when the backend can run here, else a one-line reason that names what is missing and
    how to get it (e.g. ``pip install "fastlinear[numba]"``). Cheap after the first call.
``forward(X, W, b, out) -> Y``
    ``Y = X @ W + b``. ``X`` is ``(N, D)``, ``W`` is ``(D, M)``, ``b`` is ``(M,)`` or ``None``;
    all of one dtype from ``DTYPES``, any memory layout (C, F or strided). ``out`` is ``None`` or a
    writable C-contiguous ``(N, M)`` array of that dtype that overlaps no input. Returns ``Y``
    (``out`` itself when given).
``backward(dY, X, W, *, has_bias, need_dX, accumulate, dX, dW, db) -> (dX, dW, db)``
    ``dX = dY @ W.T`` (only when ``need_dX``, else ``None``), ``dW = X.T @ dY``,
    ``db = dY.sum(0)`` (only when ``has_bias``, else ``None``). ``dY`` is ``(N, M)``, ``X`` is
    ``(N, D)``, ``W`` is ``(D, M)``, any layout. ``dX``/``dW``/``db`` are ``None`` (allocate) or
    writable C-contiguous buffers of the right shape and dtype that overlap no input. With
    ``accumulate=True`` the ``dW`` (and ``db`` when ``has_bias``) buffers are given and the
    gradients are added into them; ``dX`` is always overwritten.

The dispatcher (``fastlinear.functional``) validates shapes, dtypes, array types, buffers and
flattens leading batch dimensions before calling a backend, so backends contain no checks.
"""
