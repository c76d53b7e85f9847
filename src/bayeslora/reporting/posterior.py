"""``bayeslora posterior``: how wide a Bayesian adapter's posterior is, layer by layer, measured on the weight
update ΔW itself (so that no rescaling between the adapter's factors changes the figures)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from torch import nn

from .structure import short_name

#: The per-layer figures summarised per module kind (median over the blocks): see
#: :func:`bayeslora.tuners.base.gaussian_factor_width`.
WIDTH_KEYS = ("noise_to_mean", "noise_to_base", "sigma_to_mean", "sigma_mean", "mean_norm", "noise_norm")

WIDTH_COLUMNS = (
    ("run", "run", "{}"),
    ("module", "module", "{}"),
    ("layers", "layers", "{}"),
    ("noise / mean update", "noise_to_mean", "{:.3g}"),
    ("noise / W0", "noise_to_base", "{:.3g}"),
    ("median σ / |M|", "sigma_to_mean", "{:.3g}"),
    ("mean σ", "sigma_mean", "{:.3g}"),
    ("‖E ΔW‖", "mean_norm", "{:.3g}"),
)


def posterior_widths(model: nn.Module) -> list[dict[str, Any]]:
    """One record per Bayesian layer (and active adapter) of ``model``: its name, module kind (the last part of the
    name), block index (None outside the blocks) and :meth:`~bayeslora.tuners.base.BayesianLowRankLayer.
    posterior_width`. Deterministic adapters (e.g. below ``--bayesian-layers last:K``) are left out."""
    from ..tuners.base import BayesianLowRankLayer
    from ..tuners.blocks import block_index, block_stack

    stack = block_stack(model)  # the same blocks as --bayesian-layers counts
    records = []
    for name, module in model.named_modules():
        if not isinstance(module, BayesianLowRankLayer):
            continue
        for adapter in module.active_adapters:
            width = module.posterior_width(adapter)
            if width is None:
                continue
            records.append(
                {
                    "layer": short_name(name),
                    "module": name.rsplit(".", 1)[-1],
                    "block": block_index(name, stack[0]) if stack else None,
                    "adapter": adapter,
                    **width,
                }
            )
    return records


def summarize_widths(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per module kind (q_proj, v_proj, lm_head, ...): the number of layers and the median of each figure."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        kinds.setdefault(record["module"], []).append(record)

    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    return [
        {"module": kind, "layers": len(rows), **{key: median([r[key] for r in rows]) for key in WIDTH_KEYS}}
        for kind, rows in kinds.items()
    ]
