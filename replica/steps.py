"""A training step as the loop calls it: eagerly (:func:`replica.train.train_step`), or replayed
from a captured CUDA graph, which queues the whole step (forward, loss, backward, the paper's
update) with one call instead of hundreds of launches.

The graph path (``graph=true``; never run on a GPU yet, so off unless asked for):

- the first ``WARMUP`` steps run eagerly: they are real steps, and they create what a capture
  must find in place (momentum buffers, cuDNN's chosen algorithms, the compiled norms);
- the batch is copied into static input buffers; ε goes into the optimizer's tensors
  (``PaperSGD(lr_tensors=True)``: :meth:`~replica.optim.PaperSGD.set_lrs`, outside the graph);
- one graph per set of learning groups (conv1 frozen from epoch 72 is a second graph, captured
  once into the same memory pool);
- the gradients are set to None once before a capture and never between replays: each replay
  writes them again where the capture put them;
- a batch of another size (bad inputs left out) runs eagerly, the same math;
- the loss is the graph's static output, copied before the next replay overwrites it.

What a GPU does is behind :class:`CudaGraphs` (capture, replay); a CPU test hands the runner a
stand-in that records the calls and replays the body eagerly (tests/test_train.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime import autocast

WARMUP = 3  # eager steps before the first capture (PyTorch's whole-network capture recipe)


class CudaGraphs:
    """Capture and replay on CUDA, every graph of a run in one memory pool."""

    def __init__(self):
        self.pool = None

    def warm(self, step):
        """An eager step on a side stream, as PyTorch's capture recipe warms up: lazy
        initializations happen there, not in the capture."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            out = step()
        torch.cuda.current_stream().wait_stream(s)
        return out

    def capture(self, body):
        """(graph, the body's outputs): the body recorded, not run."""
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = body()
        self.pool = g.pool()
        return g, out

    def replay(self, graph) -> None:
        graph.replay()


class EagerGraphs:
    """:class:`CudaGraphs`' semantics run eagerly, with each call recorded (``calls``): a
    capture runs nothing, a replay writes the gradients anew and its loss into the captured
    output. What the CPU tests and ``tools/gpu_perf.py --dry-run`` hand the runner."""

    def __init__(self, optimizer=None):
        self.opt, self.calls = optimizer, []

    def warm(self, step):
        self.calls.append("warm")
        return step()

    def capture(self, body):
        self.calls.append("capture")
        out = torch.full((), float("nan"))
        return (body, out), out

    def replay(self, graph) -> None:
        body, out = graph
        self.calls.append("replay")
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        r = body()
        out.resize_(r.shape).copy_(r)


class StepRunner:
    """``runner(images, labels, lrs) -> loss`` (detached, on the device): the step, eager or graphed."""

    def __init__(self, net, optimizer, *, devices, bf16: bool, graph: bool, eager, graphs=None):
        self.net, self.opt, self.devices, self.bf16 = net, optimizer, tuple(devices), bf16
        self.eager = eager  # the eager step: train_step's signature
        self.graphs_api = (graphs or CudaGraphs()) if graph else None
        self.graphs: dict = {}  # frozenset of learning groups → (graph, its loss output)
        self.x = self.y = None  # the static input, made at the first capture
        self.steps = 0
        self.replays = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, lrs: dict) -> torch.Tensor:
        self.steps += 1
        def eager():
            return self.eager(self.net, self.opt, images, labels, lrs, devices=self.devices, bf16=self.bf16)

        if self.graphs_api is None or (self.x is not None and images.shape != self.x.shape):
            return eager()
        if self.steps <= WARMUP:
            return self.graphs_api.warm(eager)
        self.opt.set_lrs(lrs)  # outside the graph: ε into its tensors, b rescaled where ε changed
        key = frozenset(g["name"] for g in self.opt.param_groups if g["lr"] != 0)
        if self.x is None:
            self.x, self.y = torch.empty_like(images), torch.empty_like(labels)
        self.x.copy_(images, non_blocking=True)
        self.y.copy_(labels, non_blocking=True)
        if key not in self.graphs:
            self.opt.zero_grad(set_to_none=True)  # the capture allocates the gradients; replays refill them
            self.graphs[key] = self.graphs_api.capture(self._body)
        graph, loss = self.graphs[key]
        self.graphs_api.replay(graph)
        self.replays += 1
        return loss.clone()  # the next replay overwrites the static loss

    def _body(self) -> torch.Tensor:
        """Forward, loss, backward and update on the static input: what a graph records."""
        with autocast(self.devices, self.bf16, cache=False):
            logits = self.net(self.x)
        loss = F.cross_entropy(logits.float(), self.y)
        loss.backward()
        self.opt.step()
        return loss.detach()


class ForwardRunner:
    """``runner(x) -> probabilities`` for evaluation: the forward and the softmax, eagerly, or on
    CUDA replayed from a graph captured for each input shape (``graph=true``; never run on a GPU
    yet). A shape's first batch runs eagerly on a side stream (cuDNN's choices and lazy
    initializations happen there), its second is captured and every later one replayed; a shape
    seen once (the last, short batch) never gets a graph. The input is copied into the graph's
    static buffer, the probabilities copied out."""

    def __init__(self, model, *, bf16: bool, graph: bool, graphs=None):
        self.model, self.bf16 = model, bf16
        self.api = (graphs or CudaGraphs()) if graph else None
        self.graphs: dict = {}  # input shape → (graph, static input, static probabilities)
        self.seen: dict = {}
        self.replays = 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.model.devices, self.bf16, cache=False):
            logits = self.model(x)
        return torch.softmax(logits.float(), 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.api is None:
            return self.forward(x)
        key = (tuple(x.shape), tuple(x.stride()))
        self.seen[key] = self.seen.get(key, 0) + 1
        if key not in self.graphs:
            if self.seen[key] == 1:
                return self.api.warm(lambda: self.forward(x))
            static = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
            graph, out = self.api.capture(lambda: self.forward(static))
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        static.copy_(x)
        self.api.replay(graph)
        self.replays += 1
        return out.clone()  # the next replay overwrites the static output
