"""dask arrays through the linear layer: one task per row chunk, gradients by tree reduction.

``linear_forward`` and ``linear_backward`` route here when the batch operand (``X``, ``dY``) is a
dask array. Nothing here imports dask until such a call comes, so fastlinear runs without it.

Graph shape
-----------
* ``W`` and ``b`` are copied once in the client and enter the graph as one key each
  (``dask.delayed``), which every chunk task references: the distributed scheduler ships them
  to each worker once, not once per task. A copy, so that updating ``W`` in place before the
  graph is computed cannot change its result.
* Inputs are checked, and the result dtype found (NumPy's promotion, ``casting=``), in the
  client when the graph is built: a cast of a dask operand is a lazy ``astype``.
* The feature axis (the last one) is rechunked to one chunk: a task needs its rows' whole
  feature vectors to multiply by the whole ``W`` it holds anyway, and row chunks are the
  unit that the products split along. Row chunks are kept as they come.
* forward: one task per row chunk plans and runs the forward on the worker (``_plan``'s
  general branch: at a chunk's size its few microseconds do not count); ``Y`` has
  ``X``'s row chunks. With ``return_saved`` and a GELU (which saves the pre-activation ``Z``)
  the task returns ``(Y, Z)`` and two cheap tasks per chunk pick them apart.
* backward: one task per row chunk plans and runs the backward and returns
  ``(dX_i, dW_i, db_i)``; ``dX`` is the row-blockwise pick of ``dX_i``, ``dW`` and ``db`` are
  dask's tree reduction (``sum`` with ``split_every``) of the partial products ``dW_i`` and
  ``db_i``, so ``dask.compute(dX, dW, db)`` runs every chunk task once.

The backend
-----------
Workers are other processes, often on other machines: the client's ``use_backend`` context,
``set_backend`` and ``FASTLINEAR_BACKEND`` do not reach them. The client resolves the backend to
a concrete name (argument > context > default > ``auto``; ``auto`` picks what it would pick here
for the chunks' array library) and passes that name to every task as an argument. A worker
that cannot run it raises ``BackendUnavailableError`` naming the worker and its reason.
"""

import contextlib
import math
import uuid

import numpy as np

from fastlinear import _arrays, _dispatch, _plan, activations

__all__ = ["is_dask", "linear_forward", "linear_backward"]

# Partial gradients summed per task of the reduction tree (dask's split_every).
SPLIT_EVERY = 8


# blockwise index letters of X's leading axes: all but "d" (features) and "m" (columns)
_LEAD_INDICES = "abcefghijklnopqrstuvwxyz"


def is_dask(x):
    """Whether ``x`` is a dask object, tested without importing dask."""
    return _arrays.library(x) == "dask"


def _import_dask():
    try:
        import dask
        import dask.array as da
    except ImportError as exc:  # a dask object came, so this is a broken installation
        raise ImportError(f'dask arrays need dask: pip install "fastlinear[dask]" ({exc})') from exc
    return dask, da


def _native(x, name, scalar_ok=False):
    """``W`` or ``b`` as a NumPy or CuPy array (``b`` may be a number): each worker holds it
    whole, so a dask array is refused."""
    if is_dask(x):
        raise TypeError(f"{name} must be a NumPy or CuPy array (each worker holds it whole), got "
                        f"{_arrays.type_name(x)}; pass {name}.compute()")
    native, _ = _arrays.to_native(x, name, scalar_ok=scalar_ok)
    return native


def _check_batch(x, name, width, what, da):
    """Check a batch operand: a dask array ``(*, width)`` of NumPy or CuPy chunks of known size."""
    if not isinstance(x, da.Array):
        raise TypeError(f"{name} must be a dask.array.Array like the other batch operands, got "
                        f"{_arrays.type_name(x)}"
                        + ("; convert with dask.array.from_delayed(...)" if is_dask(x) else ""))
    if x.ndim < 2:
        raise ValueError(f"{name} must be (N, {width}) or (*, {width}) as a dask array (its rows "
                         f"are split into tasks), got shape {x.shape}; for one sample pass "
                         f"{name}.compute()")
    if x.shape[-1] != width:
        raise ValueError(f"{name} has {_arrays.count(x.shape[-1], what)} but "
                         f"{_arrays.count(width, 'were')} expected (shape {x.shape})")
    chunk_library = _arrays.library(x._meta)
    if chunk_library not in ("numpy", "cupy"):
        raise TypeError(f"{name} has chunks of {_arrays.type_name(x._meta)}; fastlinear "
                        f"computes on NumPy or CuPy chunks")
    if any(math.isnan(c) for chunks in x.chunks for c in chunks):
        raise ValueError(f"{name} has chunks of unknown size {x.chunks}; call "
                         f"{name}.compute_chunk_sizes() first")
    return x


def _in_dtype(arrays, dtype, casting):
    """The dask batch operands cast (lazily) to ``dtype`` as ``casting`` allows, each with its
    feature axis in one chunk."""
    cast = [_arrays.cast(x, name, dtype, casting) for name, x in arrays]
    return [x.rechunk({x.ndim - 1: -1}) if x.numblocks[-1] > 1 else x for x in cast]


def _concrete_backend(backend, chunk_library, dtype):
    """The backend name every task gets: argument > context > default > auto, as here.

    ``auto`` picks what the next call in this process would use for ``chunk_library``, asked
    without counting a call (``Registry.current``: building a graph does not advance ``auto``'s
    interim calls or start a load); if nothing can run
    here for it (CuPy chunks on a client without a GPU), the first choice of ``auto``, which the
    workers may have. Array library and dtype are checked against the backend's declarations,
    which need no import of its optional library.
    """
    registry = _dispatch.registry
    name = registry.requested(backend)
    if name == _dispatch.AUTO:
        try:
            name = registry.current(chunk_library)
        except _dispatch.BackendUnavailableError:
            name = registry.auto_order.get(chunk_library, ("numpy",))[0]
    module = registry.declared(name)
    _plan.check_backend(module, [(chunk_library, f"dask chunks of {chunk_library} arrays")],
                        dtype)
    return name


def _graph_constant(dask, array, what):
    """One graph key holding a private copy of ``array``: named by its content for a NumPy
    array, by a fresh unique name otherwise (dask's ``tokenize`` has no CuPy handler: it would
    pickle the array, copying it from the device to the host, more than once per graph)."""
    token = dask.base.tokenize(array) if isinstance(array, np.ndarray) else uuid.uuid4().hex
    return dask.delayed(array.copy(), name=f"fastlinear-{what}-{token}")


def _refuse_buffers(**given):
    for name, value in given.items():
        if value is not None and value is not False:
            raise TypeError(f"{name}= is not supported with dask arrays: the results are new lazy "
                            f"dask arrays; compute them (dask.compute) and add or copy them where "
                            f"they should go")


def _worker_name():
    try:
        from distributed import get_worker

        return f"dask worker {get_worker().address}"
    except (ImportError, ValueError):
        import os
        import socket

        return f"process {os.getpid()} on {socket.gethostname()}"


@contextlib.contextmanager
def _naming_the_worker():
    """Re-raise BackendUnavailableError with the worker that could not run the backend."""
    try:
        yield
    except _dispatch.BackendUnavailableError as exc:
        raise _dispatch.BackendUnavailableError(f"on {_worker_name()}: {exc}") from None


def _forward_chunk(X, W, b, *, backend, activation, return_saved):
    """Run on a worker: the planned forward of one row chunk (``(Y, Z)`` with return_saved)."""
    with _naming_the_worker():
        return _plan.forward(X, W, b, activation, backend, None, return_saved, "safe")


def _backward_chunk(dY, X, saved, W, *, backend, activation, has_bias, need_dX):
    """Run on a worker: ``(dX_i, dW_i, db_i)`` of one row chunk, planned there."""
    with _naming_the_worker():
        return _plan.backward(dY, X, W, activation, saved, has_bias, need_dX, backend, False,
                              None, None, None, "safe")


def _pick(results, index, lead_ndim=0):
    """``results[index]`` of a chunk task, with ``lead_ndim`` leading axes of length 1 added.

    ``results`` comes as a one-element list where the pick drops one of the chunk task's
    one-chunk axes (blockwise with ``concatenate=False``)."""
    if isinstance(results, list):
        (results,) = results
    picked = results[index]
    return picked.reshape((1,) * lead_ndim + picked.shape) if lead_ndim else picked


def linear_forward(X, W, b=None, *, activation=None, backend=None, out=None, return_saved=False,
                   casting="safe"):
    """``fastlinear.linear_forward`` for a dask array ``X``: a dask array ``Y`` with X's row
    chunks (and ``saved``, a dask array or ``None``, with ``return_saved``)."""
    dask, da = _import_dask()
    _refuse_buffers(out=out)
    activation = activations.check_activation(activation)
    _arrays.check_casting(casting)
    W = _native(W, "W")
    _arrays.check_weight(W)
    D, M = W.shape
    X = _check_batch(X, "X", D, "features", da)
    operands = [("X", X), ("W", W)]
    if b is not None:
        b = _native(b, "b", scalar_ok=True)
        operands.append(("b", b))
    dtype = _arrays.result_dtype(operands)
    name = _concrete_backend(backend, _arrays.library(X._meta), dtype)
    (X,) = _in_dtype([("X", X)], dtype, casting)
    W = _arrays.cast(W, "W", dtype, casting)
    if b is not None:
        if hasattr(b, "dtype") and not isinstance(b, np.generic):
            b = _arrays.cast(b, "b", dtype, casting)
        b = _arrays.as_bias(b, M, dtype)
    W_key = _graph_constant(dask, W, "W")
    b_key = None if b is None else _graph_constant(dask, b, "b")
    chunks = X.chunks[:-1] + ((M,),)
    meta = da.utils.meta_from_array(X._meta, ndim=X.ndim, dtype=dtype)
    saves_z = return_saved and activations.saved_for_backward(activation) == "preactivation"
    task = dict(backend=name, activation=activation, return_saved=saves_z)
    if not saves_z:
        Y = da.map_blocks(_forward_chunk, X, W_key, b_key, chunks=chunks, dtype=dtype,
                          meta=meta, token="fastlinear-forward", **task)
        if not return_saved:
            return Y
        return Y, (None if activation is None else Y)
    pairs = da.map_blocks(_forward_chunk, X, W_key, b_key, chunks=chunks, dtype=object,
                          meta=np.empty((0,) * X.ndim, dtype=object), token="fastlinear-forward",
                          **task)
    Y, Z = (pairs.map_blocks(_pick, i, chunks=chunks, dtype=dtype, meta=meta, token=token)
            for i, token in ((0, "fastlinear-Y"), (1, "fastlinear-Z")))
    return Y, Z


def _backward_operands(da, dY, X, W, activation, saved, backend, casting):
    """Check and promote the backward's operands in the client: ``(dY, X, saved, W, backend
    name, dtype)``, with dY and saved rechunked to follow X's row chunks."""
    activations.check_saved(activation, saved)
    _arrays.check_casting(casting)
    W = _native(W, "W")
    _arrays.check_weight(W)
    D, M = W.shape
    X = _check_batch(X, "X", D, "features", da)
    dY = _check_batch(dY, "dY", M, "columns", da)
    _plan.check_upstream(dY, X, M, "dY")
    batch = [("dY", dY), ("X", X)]
    if activation is not None:
        saved = _check_batch(saved, "saved", M, "columns", da)
        _plan.check_upstream(saved, X, M, "saved")
        batch.append(("saved", saved))
    libraries = {_arrays.library(x._meta) for _, x in batch}
    if len(libraries) > 1:
        raise TypeError(f"dY, X (and saved) must have chunks of one array library, got "
                        f"{', '.join(sorted(libraries))}")
    dtype = _arrays.result_dtype([*batch, ("W", W)])
    name = _concrete_backend(backend, _arrays.library(X._meta), dtype)
    W = _arrays.cast(W, "W", dtype, casting)
    arrays = _in_dtype(batch, dtype, casting)
    # the row chunks of X rule: dY and saved follow them
    rows = arrays[1].chunks[:-1]
    arrays = [a if a.chunks[:-1] == rows else a.rechunk(rows + (a.chunks[-1],)) for a in arrays]
    dY, X = arrays[:2]
    saved = arrays[2] if activation is not None else None
    return dY, X, saved, W, name, dtype


def linear_backward(dY, X, W, *, activation=None, saved=None, has_bias=True, need_dX=True,
                    backend=None, accumulate=False, dX=None, dW=None, db=None, casting="safe"):
    """``fastlinear.linear_backward`` for dask arrays ``dY`` and ``X`` (and ``saved``): ``dX`` a
    dask array with X's chunks (or ``None``), ``dW`` and ``db`` one-chunk dask arrays summed by a
    tree reduction over the row chunks (``db`` ``None`` without a bias)."""
    dask, da = _import_dask()
    _refuse_buffers(accumulate=accumulate, dX=dX, dW=dW, db=db)
    activation = activations.check_activation(activation)
    dY, X, saved, W, name, dtype = _backward_operands(da, dY, X, W, activation, saved, backend,
                                                      casting)
    W_key = _graph_constant(dask, W, "W")
    lead = _LEAD_INDICES[:X.ndim - 1]
    if len(lead) < X.ndim - 1:
        raise ValueError(f"X has {X.ndim} dimensions; fastlinear's dask path takes at most "
                         f"{len(_LEAD_INDICES) + 1}")
    # index: leading axes, then dY's columns (m) and X's features (d), each one chunk
    task = dict(backend=name, activation=activation, has_bias=bool(has_bias),
                need_dX=bool(need_dX))
    parts = da.blockwise(
        _backward_chunk, lead + "md", dY, lead + "m", X, lead + "d",
        saved, None if saved is None else lead + "m", W_key, None,
        dtype=object, meta=np.empty((0,) * (X.ndim + 1), dtype=object),
        token="fastlinear-backward", **task)
    # picks: output index lead + "d" (dX), lead + "dm" (dW_i), lead + "m" (db_i); a partial
    # is one element along each leading axis (adjust_chunks), summed over them by dask's tree
    picks = dict(concatenate=False, dtype=dtype)
    dX_out = None
    if need_dX:
        dX_out = da.blockwise(_pick, lead + "d", parts, lead + "md", index=0, lead_ndim=0,
                              token="fastlinear-dX",
                              meta=da.utils.meta_from_array(X._meta, dtype=dtype), **picks)
    one_per_chunk = dict.fromkeys(lead, 1)
    w_meta = W[:0, :0]
    dW_parts = da.blockwise(_pick, lead + "dm", parts, lead + "md", index=1, lead_ndim=len(lead),
                            adjust_chunks=one_per_chunk, token="fastlinear-dW-partial",
                            meta=w_meta.reshape((0,) * (X.ndim + 1)), **picks)
    dW_out = dW_parts.sum(axis=tuple(range(len(lead))), split_every=SPLIT_EVERY)
    db_out = None
    if has_bias:
        db_parts = da.blockwise(_pick, lead + "m", parts, lead + "md", index=2,
                                lead_ndim=len(lead), adjust_chunks=one_per_chunk,
                                token="fastlinear-db-partial",
                                meta=w_meta.reshape((0,) * X.ndim), **picks)
        db_out = db_parts.sum(axis=tuple(range(len(lead))), split_every=SPLIT_EVERY)
    return dX_out, dW_out, db_out
