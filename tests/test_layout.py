"""The package's layout: no import circle, and no module imports one above it.

The layers, lowest first: a module may import only from layers below its own. A new module is
placed here, which is where its place in the data flow (files → store → batches → model →
metrics → run folder → reports) is decided.
"""
import imports  # tools/imports.py (conftest puts tools/ on the path)

LAYERS = [
    ["replica", "replica.errors", "replica.runtime", "replica.augment", "replica.colour", "replica.layers",
     "replica.optim", "replica.data"],
    ["replica.fileio", "replica.config", "replica.devices", "replica.steps"],
    ["replica.data.imageio", "replica.data.jpeg", "replica.data.synth", "replica.data.ring", "replica.pictures"],
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


# What a module never reaches, through any chain of imports (at module level or inside a function):
# training never reaches the reports (it draws with replica.pictures, which both share), and the
# launcher never reaches the net (devices are resolved in replica.devices, below both).
NEVER = {
    "replica.train": {"replica.report", "replica.filters", "replica.neighbors"},
    "replica.live": {"replica.report", "replica.filters"},
    "replica.dist": {"replica.model"},
}


def reach(g, start):
    seen, todo = set(), [start]
    while todo:
        for d in g.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_what_a_module_never_reaches():
    g = imports.graph()
    found = {m: sorted(reach(g, m) & never) for m, never in NEVER.items()}
    assert found == {m: [] for m in NEVER}


def test_never_can_fail():
    """The reach is transitive: a → b → c reaches c."""
    assert reach({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}


def test_importing_the_loop_loads_no_report_and_the_launcher_no_net():
    """What Python really loads (the graph above also counts imports inside functions)."""
    import subprocess
    import sys

    code = ("import sys, replica.train, replica.dist; "
            "print(sorted(m for m in ('replica.report', 'replica.filters', 'replica.model') if m in sys.modules))")
    train_loads = subprocess.run([sys.executable, "-c", code.replace(", replica.dist", "")], capture_output=True,
                                 text=True, check=True).stdout.split("\n")[0]
    assert train_loads == "['replica.model']"  # the loop builds the net; nothing of the reports
    code = "import sys, replica.dist; print('replica.model' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == \
        "False"
