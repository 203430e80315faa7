"""``fastlinear.Sequential``: the user's ``Linear`` layers as one network, trained a step at a time.

The network keeps every layer's parameters in one flat arena (and their gradients and the SGD
velocity in two more of the same layout, the three being rows of one array); each layer's ``W``,
``b``, ``dW`` and ``db`` are views into them. So the layers passed in are the layers trained:
after a step they hold the new values, in-place edits (``layer.W *= 2``) are seen by the next
step, and an assigned array (``layer.W = ...``) is copied into the arena before the next step,
after which ``layer.W`` is the arena's view again. On the numba backend a whole ``forward``,
``backward`` or ``train_step`` is one compiled call over the arenas
(``fastlinear.backends._numba_network``); the numpy backend is the reference, the math spelled
out below; the cupy backend runs layer by layer through ``fastlinear.functional``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from fastlinear import _arrays, _dispatch, _plan, activations, functional, losses
from fastlinear.layer import Linear

__all__ = ["Sequential"]

# ``auto`` counts one step of a network as this many layer calls toward its break-even rule
# (``_dispatch.AUTO_LOAD_AFTER_CALLS``): a step crosses the Python boundary once where the
# layer-by-layer path crosses it for every layer pass, ufunc and update, so one step saves what
# tens of layer calls save (issue 17's measurements: 50-100 us a step, 1-3 us a layer call).
STEP_WEIGHT_IN_CALLS = 32
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# The labels' dtype the compiled step takes (compared by identity in train_step's inline check).
_LABELS = np.dtype(np.int64)
_CROSS_ENTROPY = "softmax_cross_entropy"
_INF = math.inf  # a module constant: train_step's inline check reads it twice a call
# Why backward has nothing to differentiate (Sequential._cache holds one of these then).
_NO_FORWARD = "backward() called before forward(): call forward(X) first"
_AFTER_STEP = "train_step() keeps no activations; call forward(X) before backward(dY)"
# Backends that run a whole network call natively (one compiled call); the others run layer by
# layer through fastlinear.functional, and numpy runs the reference math.
NATIVE_STEP_BACKENDS = frozenset({"numba"})
# Columns of the layout table the compiled step walks: in/out features, offsets of W and b in
# the arenas (-1: no bias), activation code.
_D, _M, _W_AT, _B_AT, _ACT = range(5)


def _resolve(backend: str | None, library: str, check: Any) -> Any:
    """The backend module of one network call: fastlinear's usual resolution, passed to
    ``check`` (which raises for a backend the network cannot run on), with ``auto`` counting
    the call as ``STEP_WEIGHT_IN_CALLS`` layer calls (only when the call resolves through
    ``auto``: a backend named by ``backend=``, the context or the default is not ``auto``'s
    call)."""
    registry = _dispatch.registry
    module = registry.resolve(backend, library)
    check(module)
    if registry.requested(backend) == _dispatch.AUTO:
        registry.count_calls(library, STEP_WEIGHT_IN_CALLS - 1)
    return module


class _Native(NamedTuple):
    blas: Any  # fastlinear.backends._numba_blas
    network_call: Any  # fastlinear.backends._numba_network.network_call
    gemm: int = 0  # the address of the network's dtype's gemm (_numba_blas.blas_routines)
    int_bits: int = 0
    # What a step whose arguments train_step has checked calls: None until its first such call
    # (through network_call) has compiled it, then the compiled function itself, or
    # network_call where numba does not expose that (_compiled_entry).
    checked_call: Any = None


def _compiled_entry(dispatcher: Any, args: tuple) -> Any:
    """The compiled function numba's ``dispatcher`` runs for ``args``, to be called with
    arguments of exactly these types (the dispatcher's type resolution of every argument
    skipped); the dispatcher itself where numba does not expose it.

    The caller must guarantee the types: the compiled function unboxes an array of another
    layout or dimension without complaint (it refuses another dtype)."""
    try:
        key = tuple(dispatcher.typeof_pyval(arg) for arg in args)
        return dispatcher.overloads[key].entry_point
    except (AttributeError, KeyError, TypeError, ValueError):
        return dispatcher


@functools.cache
def _native_module() -> _Native:
    """The numba backend's network call, imported at its first use (Numba loads then)."""
    from fastlinear.backends import _numba_blas, _numba_network

    return _Native(_numba_blas, _numba_network.network_call)


def _check_layers(layers: tuple[Any, ...]) -> tuple[np.dtype, str]:
    """The network's dtype and array library; raise unless ``layers`` chain."""
    if not layers:
        raise ValueError("Sequential needs at least one Linear layer, got none")
    for index, layer in enumerate(layers):
        if not isinstance(layer, Linear):
            raise TypeError(f"Sequential takes fastlinear.Linear layers; layer {index} is a "
                            f"{type(layer).__name__}")
        if min(layer.W.shape) == 0:
            raise ValueError(f"layer {index} has no weights (W.shape={tuple(layer.W.shape)})")
    dtypes = [np.dtype(layer.W.dtype) for layer in layers]
    dtypes += [np.dtype(layer.b.dtype) for layer in layers if layer.b is not None]
    if len(set(dtypes)) > 1:
        raise TypeError(f"Sequential needs one dtype for every W and b, got "
                        f"{sorted({d.name for d in dtypes})}: build the layers with one dtype=")
    if dtypes[0] not in DTYPES:
        raise TypeError(f"Sequential computes in float32 or float64, got {dtypes[0]}")
    libraries = {_arrays.library(layer.W) for layer in layers}
    if len(libraries) > 1:
        raise TypeError(f"Sequential's layers must keep their parameters in one array library, "
                        f"got {sorted(libraries)}")
    for index, (first, second) in enumerate(zip(layers[:-1], layers[1:], strict=False)):
        if first.out_features != second.in_features:
            raise ValueError(
                f"layer sizes do not chain: layer {index} has {first.out_features} outputs but "
                f"layer {index + 1} expects {second.in_features} inputs")
    return dtypes[0], libraries.pop()


def _check_rate(name: str, value: object) -> float:
    """``lr`` or ``momentum`` as a float; raise unless a finite number >= 0."""
    if type(value) is float and 0.0 <= value < _INF:
        return value  # the common case, checked in a few nanoseconds (NaN fails value >= 0)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    rate = float(value)
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return rate


class Sequential:
    """A network of ``fastlinear.Linear`` layers applied in order, with a whole training step.

    Parameters
    ----------
    *layers : fastlinear.Linear
        The layers, input first; ``layers[i].out_features == layers[i + 1].in_features``, one
        dtype (float32 or float64) for all. Their activations are applied as in
        ``Linear.forward``. The network takes their parameters into its arenas: each layer's
        ``W``, ``b``, ``dW``, ``db`` become views of them (same values).
    backend : str, optional
        ``"numpy"``, ``"numba"``, ``"cupy"`` or ``"auto"``; when ``None`` the ``use_backend``
        context, then ``FASTLINEAR_BACKEND``, then ``auto`` decide at each call, as for layers.

    Notes
    -----
    One dtype per network: ``X`` is converted to the network's dtype (and so are ``dY`` and
    ``mse`` targets), unlike ``Linear``, which computes in NumPy's result dtype of its
    operands. float64 ``X`` given to a float32 network is rounded to float32 and the output is
    float32; any dtype that casts to the network's under ``same_kind`` is accepted, others
    (complex) raise ``TypeError``. A step keeps no activations: after ``train_step``,
    ``backward`` needs a fresh ``forward``. ``backward`` differentiates the last ``forward``:
    an activation changed in between raises ``RuntimeError``; a new ``W`` or ``b`` is used. A
    layer in two networks shares its parameters: each network's call takes in the values the
    layer holds then (the other network's updates included) and leaves its own in the layer;
    each network keeps its own velocity.

    Attributes
    ----------
    layers : tuple of Linear
    velocity : list of (array, array or None)
        The SGD momentum buffers, per layer ``(vW, vb)``, zeros until a step with momentum.

    Examples
    --------
    >>> import numpy as np, fastlinear
    >>> net = fastlinear.Sequential(fastlinear.Linear(4, 8, activation="relu", rng=0),
    ...                             fastlinear.Linear(8, 3, rng=1))
    >>> X, y = np.ones((5, 4)), np.array([0, 1, 2, 1, 0])
    >>> loss = net.train_step(X, y, loss="softmax_cross_entropy", lr=0.1, momentum=0.9)
    >>> net.forward(X).shape, net.layers[0].dW.shape
    ((5, 3), (4, 8))
    """

    def __init__(self, *layers: Linear, backend: str | None = None) -> None:
        self.dtype, self._library = _check_layers(layers)
        self.backend = None if backend is None else _dispatch.normalize_name(backend)
        self.layers = tuple(layers)
        xp = _arrays.namespace(layers[0].W)
        layout = np.empty((len(layers), 5), np.int64)
        # Each layer's W, then its b, right after it: the compiled step updates a layer's
        # parameters in one pass over params[W offset:end of b] (_numba_network._backward_all),
        # so anything else that builds a layout must keep W and b adjacent too.
        position = 0
        for index, layer in enumerate(layers):
            D, M = layer.in_features, layer.out_features
            layout[index, :4] = D, M, position, position + D * M if layer.b is not None else -1
            position += D * M + (M if layer.b is not None else 0)
        self._layout = layout
        # Workspace floats per batch row (see _numba_network) and multiply-adds per batch row.
        self._work_per_row = 3 * int(layout[:, _M].sum())
        self._macs_per_row = int((layout[:, _D] * layout[:, _M]).sum())
        # The three arenas are the rows of one array, so the compiled call takes one argument;
        # rows within 256 bytes of a multiple of 4 KiB apart are padded apart: the update reads
        # p[k], g[k], v[k] together, which would alias in the L1 cache's disambiguation.
        stride = position * self.dtype.itemsize % 4096
        width = position + (512 // self.dtype.itemsize if stride < 256 or stride > 3840 else 0)
        self._arenas = xp.zeros((3, width), self.dtype)
        self._params, self._grads, self._velocity = (self._arenas[row, :position]
                                                     for row in range(3))
        self._views = [self._arena_views(self._params, index) for index in range(len(layers))]
        self._grad_views = [self._arena_views(self._grads, index) for index in range(len(layers))]
        self.velocity = [self._arena_views(self._velocity, index) for index in range(len(layers))]
        for index, layer in enumerate(layers):
            self._views[index][0][...] = layer.W
            if layer.b is not None:
                self._views[index][1][...] = layer.b
            self._point_layer(index)
        self._activations = [layer.activation for layer in layers]
        self._set_activation_codes()
        # Every call's input checks compare against these (a layer's sizes cannot change: a
        # new W or b of another shape is refused, _adopt).
        self._in_width, self._out_width = layers[0].in_features, layers[-1].out_features
        self._remember_layers()
        self._work = np.empty(0, self.dtype)  # the numba step's workspace (see its module)
        self._native_call: _Native | None = None  # the compiled call, set at its first use
        # What backward needs from the last forward, (backend, X, state, the activations it
        # ran with), or the reason there is none (_NO_FORWARD, _AFTER_STEP).
        self._cache: tuple | str = _NO_FORWARD
        self._backends_checked: set[str] = set()  # backends that take the network (_module)
        # The compiled call's stand-ins for the arguments a call does not use.
        self._no_rows, self._no_labels = np.empty((0, 0), self.dtype), np.empty(0, _LABELS)

    # --- arenas and the layers' views ---------------------------------------------------------

    def _arena_views(self, arena: Any, index: int) -> tuple[Any, Any]:
        D, M, w_at, b_at = (int(v) for v in self._layout[index, :4])
        W = arena[w_at:w_at + D * M].reshape(D, M)
        return W, (arena[b_at:b_at + M] if b_at >= 0 else None)

    def _point_layer(self, index: int) -> None:
        layer = self.layers[index]
        (W, b), (dW, db) = self._views[index], self._grad_views[index]
        if layer.W is not W:
            layer.W = W
        if layer.b is not b:
            layer.b = b
        if layer.dW is not dW:
            layer.dW = dW
        if layer.db is not db:
            layer.db = db

    def _set_activation_codes(self) -> None:
        for index, name in enumerate(self._activations):
            self._layout[index, _ACT] = activations.ACTIVATION_CODES[name]

    def _adopt(self, index: int, name: str, value: Any, view: Any) -> Any:
        """``value`` checked against the arena's ``view`` it is to be copied into."""
        if value is None or view is None:
            has = "no bias" if value is None else "a bias"
            raise ValueError(f"layer {index} now has {has} but the network was built "
                             f"{'with' if value is None else 'without'} one: build a new "
                             f"Sequential for another architecture")
        xp = _arrays.namespace(view)
        array = xp.asarray(value)
        if array.shape != view.shape:
            raise ValueError(f"layer {index}'s {name} has shape {tuple(array.shape)} but the "
                             f"network was built with {tuple(view.shape)}: build a new Sequential "
                             f"for other sizes")
        if not np.can_cast(array.dtype, self.dtype, "same_kind"):
            raise TypeError(f"layer {index}'s {name} has dtype {array.dtype}; expected "
                            f"{self.dtype} (or one that casts to it)")
        return array

    def _sync_layers(self) -> None:
        """Take in what the user assigned to a layer since the last call: a new ``W`` or ``b``
        (copied into the arena, the layer pointed back at its view), a new activation. Every
        assignment is checked before any is copied."""
        adopted = []
        for index, layer in enumerate(self.layers):
            W_view, b_view = self._views[index]
            if layer.W is not W_view:
                adopted.append((self._adopt(index, "W", layer.W, W_view), W_view))
            if layer.b is not b_view:
                adopted.append((self._adopt(index, "b", layer.b, b_view), b_view))
            if layer.activation != self._activations[index]:
                activations.check_activation(layer.activation)
        for array, view in adopted:
            view[...] = array
        for index in range(len(self.layers)):
            self._point_layer(index)
        current = [layer.activation for layer in self.layers]
        if current != self._activations:
            self._activations = current
            self._set_activation_codes()
        self._remember_layers()

    def _remember_layers(self) -> None:
        """What ``_layers_changed`` compares each layer's attributes with, in one flat tuple per
        layer (checked at every call: unpacking nested tuples made it twice as slow)."""
        self._expected = [(layer, W, b, dW, db, act) for layer, (W, b), (dW, db), act
                          in zip(self.layers, self._views, self._grad_views, self._activations,
                                 strict=True)]

    def _layers_changed(self) -> bool:
        # ``_b``: what ``Linear.b``'s setter stores, read without the property's call (4 of them
        # were 0.2-0.3 us of the step's Python side).
        for layer, W, b, dW, db, act in self._expected:
            if (layer.W is not W or layer._b is not b or layer.dW is not dW or layer.db is not db
                    or layer.activation != act):
                return True
        return False

    # --- input checks ---------------------------------------------------------------------------

    def _check_rows(self, X: Any, name: str, width: int, what: str) -> Any:
        """``X`` as a C-contiguous (N, width) array of the network's dtype, N >= 1."""
        if (type(X) is np.ndarray and X.dtype == self.dtype and X.ndim == 2 and X.shape[0]
                and X.shape[1] == width and X.flags.c_contiguous):
            return X  # the common case, in a few hundred nanoseconds
        if _arrays.library(X) != self._library:
            xp = _arrays.namespace(self._params)
            if self._library == "cupy" or _arrays.library(X) == "cupy":
                raise TypeError(f"{name} must be a {self._library} array like the network's "
                                f"parameters, got {_arrays.type_name(X)}")
            X = xp.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"{name} must be 2-D (batch, {what}), got shape {tuple(X.shape)}")
        if X.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(X.shape)}): a step needs "
                             f"at least one row")
        if X.shape[1] != width:
            raise ValueError(f"{name} has {X.shape[1]} {what} but the network expects {width} "
                             f"(shape {tuple(X.shape)})")
        if X.dtype != self.dtype:
            if not np.can_cast(X.dtype, self.dtype, "same_kind"):
                raise TypeError(f"{name} has dtype {X.dtype}; expected {self.dtype} (or one "
                                f"that casts to it)")
            X = X.astype(self.dtype)
        if not X.flags.c_contiguous:
            X = _arrays.namespace(X).ascontiguousarray(X)
        return X

    def _check_labels(self, y: Any, X: Any) -> Any:
        rows = X.shape[0]
        if (type(y) is np.ndarray and y.dtype == _LABELS and y.shape == (rows,)
                and y.flags.c_contiguous):
            return y
        y = _arrays.namespace(X).asarray(y)
        if y.dtype.kind not in "iu":
            raise TypeError(f"y must hold integer class labels for softmax_cross_entropy, got "
                            f"dtype {y.dtype}")
        if y.shape != (rows,):
            raise ValueError(f"y must have shape ({rows},) (one label per row of X), got "
                             f"{tuple(y.shape)}")
        # contiguous: one compiled specialization serves every call (strided labels would
        # compile another)
        return _arrays.namespace(y).ascontiguousarray(y.astype(_LABELS, copy=False))

    def _labels_out_of_range(self, y: Any, bad_row: int | None = None) -> ValueError:
        classes = self._out_width
        if bad_row is None:
            bad = (y < 0) | (y >= classes)
            bad_row = int(bad.argmax())
        return ValueError(f"y holds label {int(y[bad_row])} at row {bad_row}, outside the "
                          f"{classes} classes [0, {classes - 1}] of the last layer")

    def _check_label_range(self, y: Any) -> None:
        if bool(((y < 0) | (y >= self._out_width)).any()):
            raise self._labels_out_of_range(y)

    def _check_step(self, X: Any, y: Any, loss: object, lr: object, momentum: object) -> tuple:
        loss_name = losses.check_loss(loss)
        rate, keep = _check_rate("lr", lr), _check_rate("momentum", momentum)
        X = self._check_rows(X, "X", self._in_width, "features")
        if loss_name == "mse":
            y = self._check_rows(y, "y", self._out_width, "columns (targets)")
            if y.shape[0] != X.shape[0]:
                raise ValueError(f"y must have shape {(X.shape[0], self._out_width)}"
                                 f" (mse targets, one row per row of X), got {tuple(y.shape)}")
        else:
            y = self._check_labels(y, X)
        return X, y, loss_name, rate, keep

    # --- the public calls -----------------------------------------------------------------------

    def _module(self) -> Any:
        """The backend of this call, as ``_resolve`` answers. For NumPy arrays the registry's
        dict of usual answers (``Registry.for_numpy``, read as ``fastlinear.functional`` reads
        it) answers a call whose backend was checked before and whose calls ``auto`` does not
        count: 0.2 us, where ``_resolve`` costs 0.4."""
        if self._library == "numpy":
            registry = _dispatch.registry
            name = self.backend
            if name is None:
                name = _dispatch.context_backend.get() or registry.default_name
            module = registry.for_numpy.get(name)  # type: ignore[arg-type]
            if (module is not None and module.NAME in self._backends_checked
                    and not (registry.renting_for_numpy and name == _dispatch.AUTO)):
                return module
        return _resolve(self.backend, self._library, self._check_backend)

    def _check_backend(self, module: Any) -> None:
        """Raise unless ``module`` takes the network's array library and dtype, as a layer's
        call checks (``_plan.check_backend``); and the network's arenas, updated in place, must
        be in the library the backend computes on. Checked once per backend."""
        if module.NAME in self._backends_checked:
            return
        what = f"the layers' parameters as {self._library} arrays"
        _plan.check_backend(module, [(self._library, what)], self.dtype)
        if module.ARRAY_LIBRARIES[0] != self._library:
            raise TypeError(f"the {module.NAME!r} backend computes on "
                            f"{module.ARRAY_LIBRARIES[0]} arrays but the network keeps its "
                            f"parameters in {self._library} arrays: build the layers on "
                            f"{module.ARRAY_LIBRARIES[0]} arrays or pick another backend")
        self._backends_checked.add(module.NAME)

    def forward(self, X: Any) -> Any:
        """The last layer's output ``(N, out_features)`` for ``X`` ``(N, in_features)``; what
        ``backward`` needs is kept until the next call."""
        X = self._check_rows(X, "X", self._in_width, "features")
        module = self._module()
        if self._layers_changed():
            self._sync_layers()
        if module.NAME in NATIVE_STEP_BACKENDS:
            out = np.empty((X.shape[0], self._out_width), self.dtype)
            self._native(0, X, out, self._no_labels, self._no_rows, 0, 0.0, 0.0)
            # The workspace holding this forward's activations: a later call (a refused step
            # with a bigger batch) may replace self._work, and backward must not read that.
            self._cache = ("native", X, self._work, self._activations)
            return out
        out, state = self._layered_forward(module.NAME, X)
        self._cache = (module.NAME, X, state, self._activations)
        return out

    def backward(self, dY: Any) -> Any:
        """From ``dY`` (the gradient with respect to the last ``forward``'s output), store every
        layer's ``dW`` and ``db`` and return ``dX`` ``(N, in_features)``.

        ``backward`` differentiates the forward that was run, from the activations it saved, on
        every backend. A layer's activation changed since that forward makes them stale: that
        is a ``RuntimeError`` (call ``forward(X)`` again), raised before anything changes. A
        ``W`` or ``b`` changed since (assigned or edited in place) is used as it is now, as
        ``Linear.backward`` uses the current ``W``: ``dX`` and the earlier layers' gradients
        flow back through the new ``W``; ``dW`` and ``db`` come from the saved activations."""
        cache = self._cache
        if isinstance(cache, str):
            raise RuntimeError(cache)
        name, X, state, forward_activations = cache
        dY = self._check_rows(dY, "dY", self._out_width, "columns")
        if dY.shape[0] != X.shape[0]:
            raise ValueError(f"dY has {dY.shape[0]} rows but the last forward had {X.shape[0]}")
        if self._layers_changed():
            self._check_activations_since(forward_activations)
            self._sync_layers()
        if name == "native":
            dX = np.empty(X.shape, self.dtype)
            self._native(1, X, dY, self._no_labels, dX, 0, 0.0, 0.0, work=state)
            return dX
        return self._layered_backward(name, X, state, dY, need_dX=True)

    def _check_activations_since(self, forward_activations: list) -> None:
        """Raise unless every layer's activation is the one the last forward ran with."""
        changed = [f"layer {index}'s activation changed from {before!r} to {layer.activation!r}"
                   for index, (layer, before) in enumerate(zip(self.layers, forward_activations,
                                                                strict=True))
                   if layer.activation != before]
        if changed:
            raise RuntimeError(f"backward() differentiates the last forward, but since it ran "
                               f"{', '.join(changed)}: the activations it saved are stale; call "
                               f"forward(X) again before backward(dY)")

    def train_step(self, X: Any, y: Any, *, loss: str, lr: float, momentum: float = 0.0) -> float:
        """One step of SGD on the batch ``(X, y)``; returns the batch's loss (before the update).

        Forward through every layer, the loss and its gradient, backward (every layer's ``dW``,
        ``db``), then ``torch.optim.SGD(lr, momentum)``'s update of every parameter:
        ``v = momentum * v + g; p -= lr * v`` (``p -= lr * g`` when ``momentum`` is 0). On the
        numba backend all of it is one compiled call, which updates each layer as soon as the
        backward pass has done with its ``W`` (the same result as one update at the end).

        Parameters
        ----------
        X : array (N, in_features)
        y : array
            ``loss="softmax_cross_entropy"``: integer class labels ``(N,)`` in
            ``[0, out_features)``; ``loss="mse"``: targets ``(N, out_features)``.
        loss : str
            ``"softmax_cross_entropy"`` (``torch.nn.CrossEntropyLoss()``, mean over the batch)
            or ``"mse"`` (``torch.nn.MSELoss()``, mean over all elements).
        lr, momentum : float
            Finite, >= 0.

        Raises
        ------
        ValueError, TypeError
            For bad input, before anything changes: parameters, velocity and gradients keep
            their values.
        """
        # The common case is checked inline: a 2-D X and labels y, aligned, writeable and
        # C-contiguous (``flags.carray``), of the network's dtype and int64 (by identity),
        # cross-entropy, float rates (X's shape read once: each read builds a tuple). It calls
        # the compiled step directly (``_native``'s ``checked``), which needs exactly these.
        common = (type(X) is np.ndarray and type(y) is np.ndarray and type(loss) is str
                  and loss == _CROSS_ENTROPY and type(lr) is float and 0.0 <= lr < _INF
                  and type(momentum) is float and 0.0 <= momentum < _INF
                  and X.dtype is self.dtype and y.dtype is _LABELS)
        if common:
            shape = X.shape
            common = (len(shape) == 2 and shape[0] > 0 and shape[1] == self._in_width
                      and y.ndim == 1 and len(y) == shape[0] and X.flags.carray
                      and y.flags.carray)
        if common:
            loss_name, rate, keep = loss, lr, momentum
        else:
            X, y, loss_name, rate, keep = self._check_step(X, y, loss, lr, momentum)
        module = self._module()
        if module.NAME in NATIVE_STEP_BACKENDS:
            code = losses.LOSS_CODES[loss_name]
            labels, targets = (y, self._no_rows) if code == 0 else (self._no_labels, y)
            if self._layers_changed():
                if code == 0:  # the compiled call checks the labels, but after this sync
                    self._check_label_range(y)
                self._sync_layers()
            value = self._native(2, X, targets, labels, self._no_rows, code, rate, keep,
                                 checked=common)
            if value <= -1.0:
                raise self._labels_out_of_range(y, int(-value - 1.0))
        else:
            if loss_name == "softmax_cross_entropy":
                self._check_label_range(y)
            if self._layers_changed():
                self._sync_layers()
            value = self._layered_step(module.NAME, X, y, loss_name, rate, keep)
        # backward needs a fresh forward (one rule on every backend and batch size: a step's
        # activations are gone or stale after its update)
        self._cache = _AFTER_STEP
        return value

    # --- numba: one compiled call ---------------------------------------------------------------

    def _native(self, mode: int, X: Any, outer: Any, labels: Any, dX: Any, loss_code: int,
                lr: float, momentum: float, work: Any = None, checked: bool = False) -> float:
        """One ``network_call``; ``work`` is the last forward's workspace for a backward (the
        network's own, grown to the batch, otherwise). ``checked``: ``train_step``'s common
        case vouches for the arguments' exact types (``X`` and ``labels`` aligned, writeable,
        C-contiguous arrays of the network's dtype and int64, ``lr`` and ``momentum`` floats),
        so the compiled function may be called directly."""
        native = self._native_call or self._find_native()
        rows = len(X)
        if work is None:
            work = self._work
            if len(work) < rows * self._work_per_row:
                work = self._work = np.empty(rows * self._work_per_row, self.dtype)
        if rows * self._macs_per_row >= native.blas.BLAS_THREADS_MIN_WORK:  # read each call:
            native.blas.match_blas_threads()  # the threshold may be changed at run time
        call = (native.checked_call or native.network_call) if checked else native.network_call
        value = call(mode, native.gemm, native.int_bits, self._layout, self._arenas, X, work,
                     outer, labels, dX, loss_code, lr, momentum)
        if checked and native.checked_call is None:  # compiled now: look its entry up once
            entry = _compiled_entry(call, (mode, native.gemm, native.int_bits, self._layout,
                                           self._arenas, X, work, outer, labels, dX, loss_code,
                                           lr, momentum))
            self._native_call = native._replace(checked_call=entry)
        return value

    def _find_native(self) -> _Native:
        """The compiled call and the BLAS routines it takes, looked up once per network."""
        native = _native_module()
        blas = native.blas.blas_routines(self.dtype)
        self._native_call = native._replace(gemm=blas.gemm, int_bits=blas.int_bits)
        return self._native_call

    # --- numpy (the reference) and cupy: layer by layer ------------------------------------------

    def _layered_forward(self, backend: str, X: Any) -> tuple[Any, list]:
        """The output, and per layer ``(input, saved)``: what its backward needs."""
        state = []
        A = X
        for (W, b), activation in zip(self._views, self._activations, strict=True):
            if backend == "numpy":
                Z = A @ W
                if b is not None:
                    Z += b
                if activation is None:
                    H = saved = Z
                elif activation in activations.SAVES_PREACTIVATION:
                    H, saved = activations.apply(activation, Z), Z
                else:
                    H = saved = activations.apply(activation, Z, out=Z)
            else:
                H, saved = functional.linear_forward(A, W, b, activation=activation,
                                                     backend=backend, return_saved=True)
            state.append((A, saved))
            A = H
        return A, state

    def _layered_backward(self, backend: str, X: Any, state: list, dY: Any,
                          need_dX: bool) -> Any:
        """Every layer's ``dW``/``db`` into the gradient arena, from the last layer back;
        returns ``dX`` (``None`` without ``need_dX``)."""
        G = dY
        for index in range(len(self.layers) - 1, -1, -1):
            (W, b), (dW, db) = self._views[index], self._grad_views[index]
            activation = self._activations[index]
            A, saved = state[index]
            wants_dX = need_dX or index > 0
            if backend == "numpy":
                G = activations.grad(activation, G, saved) if activation else G
                np.matmul(A.T, G, out=dW)
                if db is not None:
                    G.sum(axis=0, out=db)
                G = G @ W.T if wants_dX else None
            else:
                G, _, _ = functional.linear_backward(
                    G, A, W, activation=activation, saved=saved, has_bias=b is not None,
                    need_dX=wants_dX, backend=backend, dW=dW, db=db)
        return G

    def _layered_step(self, backend: str, X: Any, y: Any, loss_name: str, lr: float,
                      momentum: float) -> float:
        output, state = self._layered_forward(backend, X)
        value, dY = losses.value_and_grad(loss_name, output, y)
        self._layered_backward(backend, X, state, dY, need_dX=False)
        # torch.optim.SGD on the flat arenas: v = momentum * v + g; p -= lr * v
        real = self.dtype.type
        if momentum:
            self._velocity *= real(momentum)
            self._velocity += self._grads
            self._params -= real(lr) * self._velocity
        else:
            self._params -= real(lr) * self._grads
        return float(value)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        backend = self.backend or "default"
        return f"Sequential(\n  {inner},\n  backend={backend!r})"
