"""The lm_head's own weight gradient, also when the head shares its matrix with the input embedding.

Shapes: V vocabulary, H hidden size; W the output projection [V, H]; L the loss of one
optimizer mini-batch (the sum of its micro-batch losses).

DGG (arXiv 2605.19425) gates on g = ‖∂L/∂W_head‖², the output projection's gradient only:
the paper's bound ties the policy's divergence to the head, not to the input lookup.

- Untied head: ``W.grad`` after backward *is* that gradient. Under DDP it is already the
  all-reduced one; under FSDP2 it is a DTensor shard, so the shards' squared norms are
  summed over ranks (a scalar all-reduce instead of gathering [V, H]).
- Tied head (Qwen3 ≤ 4B, the demo model, ...): the one Parameter's ``.grad`` is
  ∂L/∂W via the head + ∂L/∂W via the embedding lookup. The lookup's part is sparse (rows
  of the tokens present) and large for frequent tokens, so the mixed norm is a different
  signal. We isolate the head part *exactly*: before each backward, walk the loss's
  autograd graph, find the node the embedding lookup (``EmbeddingBackward0``) sends the
  matrix's gradient to (its ``AccumulateGrad``), and hook every *other* node that feeds it
  — the output projection's uses: the fused ``_TokenStatsFn`` on ``model_token_stats``'s
  fast path, the transpose of ``F.linear`` on the logits path (DDP, ``fast=False``). A
  node hook reads the gradient a node sends along an edge without changing it, so the
  update stays bit-identical; the hooked gradients of all micro-batches add up in a
  buffer [V, H] (fp32, or fp64 for an fp64 model).
  Under DDP / FSDP2 each rank's buffer holds its local part, scaled by the world size
  like the loss in ``update_policy``; all-reducing it and dividing by the world size
  gives the head's share of the global gradient, as DDP's average does for ``.grad``.
  Cost: one [V, H] buffer and, under DDP / FSDP2, one [V, H] all-reduce per optimizer
  step — only when a gate is on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import unwrap

_LOOKUP = "EmbeddingBackward0"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _head_weight(model) -> torch.nn.Parameter:
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (lm_head) to gate on")
    return head.weight


def head_trainable(model) -> bool:
    return _head_weight(model).requires_grad


def is_tied(model) -> bool:
    """True when the output projection is the input embedding matrix (one Parameter)."""
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    return embed is not None and _head_weight(model) is embed.weight


def graph_nodes(root) -> list:
    """Every node of the autograd graph reachable from ``root`` (a ``grad_fn``), each once."""
    seen, stack, out = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        out.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return out


def head_edges(loss: torch.Tensor, shape: tuple[int, ...]) -> list[tuple[object, int]]:
    """(node, edge index) of every use of a tied [V, H] matrix in ``loss``'s graph except the lookup.

    The tied matrix is identified through the embedding lookup: the target of the weight
    edge (index 0) of the ``EmbeddingBackward0`` node whose matrix has ``shape``.
    """
    nodes = graph_nodes(loss.grad_fn)
    sinks = set()
    for node in nodes:
        if node.name() == _LOOKUP:
            sink = node.next_functions[0][0]
            variable = getattr(sink, "variable", None)
            if sink is not None and (variable is None or tuple(variable.shape) == tuple(shape)):
                sinks.add(sink)
    if len(sinks) != 1:
        raise RuntimeError(
            f"found {len(sinks)} embedding lookups of a {tuple(shape)} matrix in the loss's autograd graph; "
            "the lm_head gradient of a tied model cannot be isolated (expected exactly one)"
        )
    (sink,) = sinks
    return [(node, i) for node in nodes if node.name() != _LOOKUP
            for i, (nxt, _) in enumerate(node.next_functions) if nxt is sink]


class HeadGradProbe:
    """g = ‖∂L/∂W_head‖² of one optimizer step: ``track(loss)`` before each micro-batch's
    backward, then ``squared_norm()`` once after the last backward and before clipping.
    Every rank calls both (they hold collectives under DDP / FSDP2)."""

    def __init__(self, model):
        weight = _head_weight(model)
        if not weight.requires_grad:
            raise ValueError("the lm_head is frozen (e.g. LoRA without the head in target_modules); "
                             "its gradient cannot gate reuse")
        self.model = model
        self.tied = is_tied(model)
        self.shape = tuple(weight.shape)  # the global [V, H], also for an FSDP2 DTensor
        self.dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self._buffer: torch.Tensor | None = None  # [V, H] summed head gradient of this step (tied)
        self._handles: list = []

    def track(self, loss: torch.Tensor) -> None:
        """Hook the head's uses of a tied matrix in ``loss``'s graph (untied: nothing to do)."""
        if not self.tied or loss.grad_fn is None:
            return
        for node, index in head_edges(loss, self.shape):
            self._handles.append(node.register_hook(self._capture(index)))

    def _capture(self, index: int):
        def hook(grad_inputs, grad_outputs):
            grad = grad_inputs[index]  # what this node sends to the matrix: [V, H]
            if grad is not None:
                grad = grad.detach().to(self.dtype)
                self._buffer = grad.clone() if self._buffer is None else self._buffer.add_(grad)
        return hook

    def squared_norm(self) -> float:
        """The global pre-clip ‖∂L/∂W_head‖² of this step, identical on every rank; resets the buffer."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.tied:
            buf, self._buffer = self._buffer, None
            if _distributed():
                if buf is None:  # no head use on this rank: it still joins the all-reduce
                    buf = torch.zeros(self.shape, dtype=self.dtype, device=_local(_head_weight(self.model)).device)
                dist.all_reduce(buf)
                buf /= dist.get_world_size()
            if buf is None:
                return 0.0
            return float(torch.linalg.vector_norm(buf, dtype=torch.float64) ** 2)
        weight = _head_weight(self.model)
        if weight.grad is None:
            local = torch.zeros((), dtype=torch.float64, device=_local(weight).device)
        else:
            local = torch.linalg.vector_norm(_local(weight.grad), dtype=torch.float64) ** 2
        if hasattr(weight, "to_local") and _distributed():  # FSDP2 shard: sum the shards' squares
            dist.all_reduce(local)
        return float(local)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
