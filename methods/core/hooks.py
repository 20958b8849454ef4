"""Forward hooks on a frozen teacher: the DeepInversion BN-statistics loss (spec §2.5).

Hooks live only inside :meth:`BNStatisticsLoss.capture`: they are registered on entry and removed
on exit, so forwards outside a generator (or synthesis) step cost nothing and record nothing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def batchnorm_layers(net: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d modules of ``net``: its ``bn_layers()`` when it has one (the zoo), else a scan."""
    lister = getattr(net, "bn_layers", None)
    if callable(lister):
        return list(lister())
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def bn_statistics_distance(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """r_l = ‖μ_b − μ_run‖₂ + ‖σ²_b − σ²_run‖₂ on the BN layer's *input* (norms, not squared; spec §2.5).

    μ_b is the per-channel mean over (N, H, W) and σ²_b the biased variance; computed in fp32.
    """
    x = x.float()
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    assert bn.running_mean is not None and bn.running_var is not None
    return torch.linalg.vector_norm(mean - bn.running_mean.float()) + torch.linalg.vector_norm(
        var - bn.running_var.float()
    )


class BNLayerHooks:
    """Forward hooks on a network's BatchNorm2d layers that exist only inside :meth:`capture` (spec §2.5).

    Subclasses say what each layer's hook records (:meth:`_layer_hook`) and clear their record in
    :meth:`_reset`; registering, removing and the re-entrancy check live here once.
    """

    def __init__(self, net: nn.Module) -> None:
        self.layers = batchnorm_layers(net)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def active(self) -> bool:
        """True only inside :meth:`capture` (hooks registered)."""
        return bool(self._handles)

    def _reset(self) -> None:
        raise NotImplementedError

    def _layer_hook(self, index: int):  # noqa: ANN202 - a torch hook
        raise NotImplementedError

    @contextlib.contextmanager
    def capture(self) -> Iterator[BNLayerHooks]:
        """Register the hooks for the forwards inside this block, then remove them."""
        if self._handles:
            raise RuntimeError(f"{type(self).__name__}.capture() is not re-entrant")
        self._reset()
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._layer_hook(index)))
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()


class BNStatisticsLoss(BNLayerHooks):
    """L_BN = Σ_l w_l·r_l over the teacher's BatchNorm2d layers (spec §2.5).

    Usage, in a generator step only::

        bn = BNStatisticsLoss(ctx.teacher.net)
        with bn.capture():
            t = ctx.teacher.features(x)
        loss = loss + beta * bn.loss()

    ``first_layer_weight`` is ImageNet DeepInversion's optional ×10 on the first layer (off: 1).
    A teacher without BatchNorm (LeNet-5) has ``available`` False and ``loss()`` is 0: the caller
    should flag the run (spec §2.1).
    """

    def __init__(self, net: nn.Module, first_layer_weight: float = 1.0) -> None:
        super().__init__(net)
        self.first_layer_weight = first_layer_weight
        self._terms: list[Tensor] = []

    @property
    def available(self) -> bool:
        return bool(self.layers)

    def _reset(self) -> None:
        self._terms.clear()

    def _layer_hook(self, index: int):  # noqa: ANN202 - a torch hook signature
        weight = self.first_layer_weight if index == 0 else 1.0

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            r = bn_statistics_distance(inputs[0], module)  # type: ignore[arg-type]
            self._terms.append(r * weight if weight != 1.0 else r)

        return hook

    def loss(self) -> Tensor:
        """Σ r_l recorded since the last call (0 when nothing was recorded); clears the record."""
        if not self._terms:
            return torch.zeros(())
        total = torch.stack(self._terms).sum()
        self._terms.clear()
        return total


class BNInputMeans(BNLayerHooks):
    """Per-instance, per-channel spatial means of the inputs of the teacher's BatchNorm2d layers (CMI, spec §4.6).

    Inside :meth:`capture`, every forward appends one (B, Σ_l C_l) feature: the inputs of all BN
    layers averaged over (H, W) and concatenated in layer order (CMI's instance feature).  Like
    :class:`BNStatisticsLoss`, the hooks exist only inside the block.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self._means: list[Tensor] = []

    def _reset(self) -> None:
        self._means.clear()

    def _layer_hook(self, index: int):  # noqa: ANN202 - a torch hook signature
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            self._means.append(inputs[0].float().mean(dim=(2, 3)))

        return hook

    def features(self) -> Tensor:
        """The (B, Σ_l C_l) instance features of the one forward recorded since the last call; clears the record."""
        if len(self._means) != len(self.layers):
            raise RuntimeError(f"expected one forward through {len(self.layers)} BN layers, recorded {len(self._means)}")
        out = torch.cat(self._means, dim=1)
        self._means.clear()
        return out
