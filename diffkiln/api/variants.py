"""Rebuilding a bundle's W8A8 plan with some settings changed, in memory: the counterfactuals a
report measures against the bundle (BOS-awareness off, smoothing off).

The variant is built from the bundle's recorded calibration settings and recipe config on the FP
pipeline (the calibration cache makes this cheap), with the same integer modules as the bundle.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from diffkiln.calibrate import CalibrationConfig, CalibrationStats, calibrate, source_from_description
from diffkiln.core.configs import config_from_dict
from diffkiln.core.plan import calibration_record
from diffkiln.nn import apply_plan
from diffkiln.optimizer import SearchContext, W8A8Config, make_plan
from diffkiln.zoo.registry import default_cache_dir

__all__ = ["VariantBuilder", "w8a8_variants"]


class VariantBuilder:
    """Builds variants of one bundle's W8A8 plan on its FP pipeline.

    Attributes:
        recorded: the bundle's recipe config.
    """

    def __init__(self, base: Any, stats: CalibrationStats, recorded: W8A8Config, source_id: str):
        self._base, self._stats, self._source_id = base, stats, source_id
        self.recorded = recorded

    def build(self, **changes: Any) -> Any:
        """The FP pipeline quantized in memory by the recorded config with ``changes`` applied
        (e.g. ``bos_aware=False``); the FP pipeline itself is left unchanged."""
        plan = make_plan(self._base, self._stats, replace(self.recorded, **changes), SearchContext(self._source_id))
        return apply_plan(self._base, plan, self._stats)


def w8a8_variants(base: Any, manifest: dict[str, Any], source_id: str) -> VariantBuilder:
    """A builder of variants of the W8A8 bundle described by ``manifest``, on the FP pipeline ``base``.

    Raises:
        ValueError: the bundle is not W8A8, records no settings of this version, or quantizes
            experts beside its denoiser (the message says so, for the report to show).
    """
    notes = manifest["plan"].get("notes", {})
    calibration = calibration_record(manifest)
    if "recipe_config" not in notes or "source" not in calibration or manifest["quant"]["recipe"] != "w8a8":
        raise ValueError("the bundle records no W8A8 settings of this version; rebuild it to compare")
    if manifest.get("experts"):  # a variant quantizes one denoiser: beside the bundle's experts it would not compare
        raise ValueError("the bundle quantizes experts beside its denoiser; the variants rebuild the denoiser alone")
    source = source_from_description(calibration.pop("source"))
    cal = CalibrationConfig.from_key_fields(calibration, cache_dir=default_cache_dir())
    stats = calibrate(base, cal, source=source)
    return VariantBuilder(base, stats, config_from_dict(W8A8Config, notes["recipe_config"]), source_id)
