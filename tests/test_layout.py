"""The package's layout: no import circle, and no module imports one above it.

The layers, lowest first: a module may import only from layers below its own. A new module is
placed here, which is where its place in the data flow (files → store → batches → model →
metrics → run folder → reports) is decided.
"""
import imports  # tools/imports.py (conftest puts tools/ on the path)

LAYERS = [
    ["replica", "replica.errors", "replica.runtime", "replica.augment", "replica.colour", "replica.layers",
     "replica.optim", "replica.data"],
    ["replica.fileio", "replica.config"],
    ["replica.data.imageio", "replica.data.jpeg", "replica.data.synth"],
    ["replica.data.tars", "replica.data.store"],
    ["replica.data.imagenet", "replica.data.chunks"],
    ["replica.data.sources"],
    ["replica.data.writer", "replica.data.loaders"],
    ["replica.model", "replica.evaluate", "replica.runs"],
    ["replica.summary", "replica.inference", "replica.dist", "replica.filters", "replica.weights",
     "replica.export"],
    ["replica.report", "replica.neighbors"],
    ["replica.live"],
    ["replica.train"],
    ["replica.demo"],
    ["replica.cli"],
    ["replica.__main__"],
]


def test_no_import_circle():
    assert imports.circles(imports.graph()) == []


def test_circles_are_found():
    """The check can fail: a made-up graph with a circle through three modules."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert imports.circles(g) == [["a", "b", "c"]]


def test_every_module_has_a_layer_and_imports_only_below_it():
    g = imports.graph()
    layer = {m: i for i, names in enumerate(LAYERS) for m in names}
    assert sorted(g) == sorted(layer), "place each new module in LAYERS (and remove the gone ones)"
    upward = [f"{m} (layer {layer[m]}) imports {d} (layer {layer[d]})" for m in g for d in g[m]
              if layer[d] >= layer[m]]
    assert upward == []
