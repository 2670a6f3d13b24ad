"""Calibration: run the FP pipeline (or a bare module) and record per-layer, per-step statistics,
the traced data flow and the verified prompt-invariant text positions."""

from diffkiln.calibrate.config import STATS_VERSION, CalibrationConfig
from diffkiln.calibrate.dataflow import AttentionFlow, DataflowGraph, LayerFlow, trace_dataflow
from diffkiln.calibrate.run import ModuleInputs, calibrate, pipeline_call_kwargs
from diffkiln.calibrate.sources import (
    CallSource,
    ClassLabelSource,
    FileImageSource,
    FileVideoSource,
    ImageSource,
    InputFiles,
    PromptSource,
    UnconditionalSource,
    VideoSource,
    batch_kwargs,
    image_size,
    source_for,
    source_from_description,
    takes_images,
    takes_video,
)
from diffkiln.calibrate.stats import CalibrationStats, LayerStats

__all__ = [
    "STATS_VERSION",
    "AttentionFlow",
    "CalibrationConfig",
    "CalibrationStats",
    "CallSource",
    "ClassLabelSource",
    "DataflowGraph",
    "FileImageSource",
    "FileVideoSource",
    "ImageSource",
    "InputFiles",
    "LayerFlow",
    "LayerStats",
    "ModuleInputs",
    "PromptSource",
    "UnconditionalSource",
    "VideoSource",
    "batch_kwargs",
    "calibrate",
    "image_size",
    "pipeline_call_kwargs",
    "source_for",
    "source_from_description",
    "takes_images",
    "takes_video",
    "trace_dataflow",
]
