"""`SplitModel`: a model cut in two, trained across the cut like a Keras model."""

from __future__ import annotations

import keras
import numpy as np

from keras_split import trainer
from keras_split.partition import CutSpec, build_halves, io_structure, spec_of
from keras_split.roles import ClientRole, ServerRole
from keras_split.transport import InProcessTransport, Transport
from keras_split_wire import codecs


def split(model: keras.Model, cut) -> SplitModel:
    """Cut an existing functional or Sequential Keras model in two.

    The client half computes the cut tensors from the model's inputs; the server
    half computes the model's outputs from the cut tensors. Both halves share the
    original layer objects, so training either half trains `model` too.

    Args:
        model: a functional `keras.Model` or a built `keras.Sequential`.
        cut: a layer name, or a list of layer names whose outputs together form
            the cut (when a skip connection crosses it, or when the model has
            several input branches). Use `cut_candidates(model)` to choose.

    Returns:
        A `SplitModel`.

    Example:

    ```python
    split = keras_split.split(model, cut="pool1")
    split.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    split.fit(x_train, y_train, epochs=3, batch_size=64)
    ```
    """
    client, server, specs = build_halves(model, cut)
    return SplitModel(client=client, server=server, cut_specs=specs, source=model)


def _describe(model: keras.Model, inputs: bool) -> str:
    return "→".join(
        layer.name
        for layer in model.layers
        if inputs or not isinstance(layer, keras.layers.InputLayer)
    )


class SplitModel(trainer.LoopOwner):
    """A Keras model cut in two halves, trained with the split-learning protocol.

    Build one with `keras_split.split(model, cut)`, or from two halves you wrote
    yourself: `SplitModel(client=..., server=...)`, where the client's outputs
    are the server's inputs.

    Args:
        client: the `keras.Model` run by the data holder, up to the cut.
        server: the `keras.Model` run by the server, from the cut to the outputs.
        cut_specs: the tensors crossing the cut; derived from `client` when omitted.
        source: the model the halves were cut from, if any (used by `merge`).

    Example:

    ```python
    client = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(8, 3)])
    server = keras.Sequential([keras.Input((26, 26, 8)), keras.layers.Flatten(),
                               keras.layers.Dense(10)])
    split = keras_split.SplitModel(client=client, server=server)
    ```
    """

    def __init__(self, client: keras.Model, server: keras.Model, cut_specs=None, source=None):
        for role, model in (("client", client), ("server", server)):
            if not isinstance(model, keras.Model):
                raise TypeError(
                    f"`{role}` must be a keras.Model, received {type(model).__name__}."
                )
            if not model.built or not getattr(model, "outputs", None):
                raise ValueError(
                    f"The {role} model '{model.name}' has no known input shape. Build it "
                    "with keras.Input(...) so the cut can be checked."
                )
        super().__init__()
        self.client = client
        self.server = server
        self.cut_specs: tuple[CutSpec, ...] = tuple(cut_specs or self._specs_from_halves())
        self._source = source
        self.server_role: ServerRole | None = None

    def _specs_from_halves(self) -> list[CutSpec]:
        sent = self.client.outputs
        expected = self.server.inputs
        if len(sent) != len(expected):
            raise ValueError(
                f"The client sends {len(sent)} tensor(s) but the server takes "
                f"{len(expected)} input(s) (got {len(sent)} vs. {len(expected)}). The client's "
                "outputs must be the server's inputs, in order."
            )
        specs = []
        for i, (out, inp) in enumerate(zip(sent, expected, strict=True)):
            same_dtype = keras.backend.standardize_dtype(out.dtype) == (
                keras.backend.standardize_dtype(inp.dtype)
            )
            if tuple(out.shape[1:]) != tuple(inp.shape[1:]) or not same_dtype:
                raise ValueError(
                    f"Cut tensor {i} does not fit: the client sends shape {tuple(out.shape)} "
                    f"{out.dtype}, the server expects {tuple(inp.shape)} {inp.dtype}. Make the "
                    "client's outputs match the server's inputs."
                )
            specs.append(spec_of(inp.name, out))
        return specs

    # -- structure -----------------------------------------------------------

    @property
    def layers(self) -> list:
        return list(self.client.layers) + list(self.server.layers)

    @property
    def bytes_per_sample(self) -> int | None:
        """Cut-activation bytes one sample sends from client to server."""
        sizes = [s.bytes_per_sample for s in self.cut_specs]
        return None if None in sizes else sum(sizes)

    def merge(self) -> keras.Model:
        """One `keras.Model` computing the whole function with the current weights.

        For a split made by `split()`, the layers are the original ones, in the
        original graph; otherwise the server is applied to the client's outputs.
        """
        if self._source is not None:
            inputs, outputs = io_structure(self._source)
            return keras.Model(inputs, outputs, name=self._source.name)
        inputs, _ = io_structure(self.client)
        return keras.Model(inputs, self.server(self.client(inputs)), name="merged")

    @property
    def built(self):
        # Keras utilities that take one model start by reading `model.built`
        # (keras.utils.plot_model does); a SplitModel is two models, so this
        # says where to go instead of "object has no attribute 'built'".
        # An AttributeError keeps `hasattr(split, "built")` False, as before.
        raise AttributeError(
            "A SplitModel is two keras.Models (`split.client` and `split.server`), not one, so "
            "Keras utilities that take a single model, such as keras.utils.plot_model, cannot "
            "take it. Call `split.plot_model(...)` to draw both halves and the cut, or pass "
            "`split.client`, `split.server` or `split.merge()`."
        )

    def plot_model(self, to_file="split.png", show_shapes=True, show_layer_names=True,
                   **kwargs):
        """Draw both halves and the cut with `keras.utils.plot_model`.

        The client half and the server half are drawn as two boxes of layers
        (named after `split.client.name` and `split.server.name`); the edges
        between them are the tensors crossing the cut, whose shapes the
        server's input boxes show. It needs pydot and graphviz, as
        `keras.utils.plot_model` does.

        Args:
            to_file: the image file to write (its extension sets the format).
            show_shapes, show_layer_names: on by default, unlike Keras,
                because the cut (the server's inputs, named after the cut
                layers, and their shapes) is what a split adds to the picture.
            **kwargs: any other argument of `keras.utils.plot_model`
                (`show_dtype`, `rankdir`, `dpi`, ...).

        Returns:
            What `keras.utils.plot_model` returns (an image in a notebook).

        Example:

        ```python
        split.plot_model("split.png")
        ```
        """
        if "expand_nested" in kwargs:
            raise ValueError(
                "`SplitModel.plot_model` always draws the two halves expanded; remove "
                "`expand_nested`, or plot one half with keras.utils.plot_model(split.client)."
            )
        return keras.utils.plot_model(self.plot_view(), to_file=to_file,
                                      show_shapes=show_shapes,
                                      show_layer_names=show_layer_names, expand_nested=True,
                                      **kwargs)

    def plot_view(self) -> keras.Model:
        """A `keras.Model` holding the client half then the server half, as two nested
        models: what `plot_model` draws (`keras.utils.model_to_dot(view,
        expand_nested=True)` gives the graph itself)."""
        # Fresh inputs: calling the client on its own input tensors would draw
        # its input box with an edge to itself.
        inputs = keras.tree.map_structure(
            lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype,
                                  name=t._keras_history.operation.name),
            io_structure(self.client)[0])
        return keras.Model(inputs, self.server(self.client(inputs)), name="split")

    def __repr__(self) -> str:
        cut = ", ".join(f"{s.name!r} {s.shape}" for s in self.cut_specs)
        return (
            f"SplitModel(client=[{_describe(self.client, True)}], "
            f"server=[{_describe(self.server, False)}], "
            f"cut={cut})"
        )

    def summary(self, print_fn=None) -> None:
        """Print both halves and the tensors crossing the cut."""
        print_fn = print_fn or print
        print_fn("Client half:")
        self.client.summary(print_fn=print_fn)
        print_fn("Cut (sent from client to server, per sample):")
        for s in self.cut_specs:
            size = "unknown" if s.bytes_per_sample is None else f"{s.bytes_per_sample:,} bytes"
            print_fn(f"  {s.name}: shape {s.shape}, {s.dtype}, {size}")
        print_fn("Server half:")
        self.server.summary(print_fn=print_fn)

    # -- training ------------------------------------------------------------

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, loss_weights=None,
                client_optimizer=None, server_optimizer=None, transport=None,
                compression=None, nopeek=None):
        """Configure both parties for training.

        Args:
            optimizer: the optimizer of both sides unless overridden; each side
                gets its own copy (its own state).
            loss, metrics, loss_weights: as in `keras.Model.compile`; the server
                computes them. With your own `transport`, the server at its other
                end has them, and these are not used.
            client_optimizer, server_optimizer: per-side optimizers.
            transport: a `Transport` to the server; by default an in-process one.
            compression: codec for the cut tensors of the in-process transport
                (None, "float16", "bfloat16", "int8", "topk", "topk:0.05", see
                `keras_split_wire.codecs`): the same encoding as on the network, to
                measure its effect on accuracy and bytes.
            nopeek: a `keras_split.privacy.NoPeek(alpha)`: the client also
                minimises `alpha * dCor(x, cut)`, the distance correlation
                between its raw batch and the activations it sends. The server
                is unaware of it; `fit` reports the batches' dCor as
                `nopeek_dcor` (not in `loss`). More generally any client
                objective `f(inputs, activations) -> scalar` (see `ClientRole`).
        """
        trainer.check_single_device(self, "compile")
        codec = codecs.get(compression)
        if loss is None and transport is None:
            raise ValueError(
                "`compile` needs a `loss`: the server computes it on its half's outputs, "
                "e.g. loss='sparse_categorical_crossentropy'."
            )
        if transport is not None and not isinstance(transport, Transport):
            raise TypeError(
                f"`transport` must be a keras_split.Transport, received {type(transport).__name__}."
            )
        if transport is not None and compression is not None:
            raise ValueError(
                "`compression` applies to the default in-process transport; with your own "
                "`transport`, give the codec to the transport instead."
            )
        if client_optimizer is not None and client_optimizer is server_optimizer:
            raise ValueError(
                "`client_optimizer` and `server_optimizer` are the same object; each side "
                "needs its own optimizer state. Pass two instances, or one `optimizer`."
            )
        self.client_role = ClientRole(self.client, client_optimizer or optimizer,
                                      objective=nopeek)
        self.client_role.build()
        if transport is None:
            self.server_role = ServerRole(
                self.server, server_optimizer or optimizer, loss, metrics, loss_weights
            )
            transport = InProcessTransport(self.server_role, compression=codec)
        self.transport = transport

    # -- weights and saving --------------------------------------------------

    def get_weights(self) -> list[np.ndarray]:
        return self.client.get_weights() + self.server.get_weights()

    def set_weights(self, weights) -> None:
        n = len(self.client.weights)
        expected = n + len(self.server.weights)
        if len(weights) != expected:
            raise ValueError(
                f"Expected {expected} arrays ({n} client + {expected - n} server), received "
                f"{len(weights)}."
            )
        self.client.set_weights(weights[:n])
        self.server.set_weights(weights[n:])

    @staticmethod
    def _paths(filepath: str, suffix: str) -> tuple[str, str]:
        filepath = str(filepath)
        if not filepath.endswith(suffix):
            raise ValueError(
                f"The filepath must end in '{suffix}', received {filepath!r}. Both halves are "
                f"written beside it as '<name>_client{suffix}' and '<name>_server{suffix}'."
            )
        stem = filepath[: -len(suffix)]
        return f"{stem}_client{suffix}", f"{stem}_server{suffix}"

    def save(self, filepath, overwrite=True) -> None:
        """Save both halves: `x.keras` writes `x_client.keras` and `x_server.keras`."""
        client_path, server_path = self._paths(filepath, ".keras")
        self.client.save(client_path, overwrite=overwrite)
        self.server.save(server_path, overwrite=overwrite)

    def save_weights(self, filepath, overwrite=True) -> None:
        """Save both halves' weights: `x.weights.h5` writes `x_client.weights.h5` and
        `x_server.weights.h5`."""
        client_path, server_path = self._paths(filepath, ".weights.h5")
        self.client.save_weights(client_path, overwrite=overwrite)
        self.server.save_weights(server_path, overwrite=overwrite)

    def load_weights(self, filepath) -> None:
        """Load weights written by `save_weights(filepath)`."""
        client_path, server_path = self._paths(filepath, ".weights.h5")
        self.client.load_weights(client_path)
        self.server.load_weights(server_path)

    @classmethod
    def load(cls, filepath) -> SplitModel:
        """Load a SplitModel written by `save(filepath)` (your own files only)."""
        client_path, server_path = cls._paths(filepath, ".keras")
        return cls(client=keras.models.load_model(client_path),
                   server=keras.models.load_model(server_path))
