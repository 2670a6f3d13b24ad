"""MindIE-SD's ``quantize(model, quant_des_path, ...)``, re-implemented from its own source, to
test our export against the consumer rather than against our writer.

Source read: Ascend/MindIE-SD, ``mindiesd/quantization/quantize.py`` (``get_cfg_and_weights``,
``quantize``, ``smooth_quantize_w8a8``, ``w8a16_quantize``, ``get_key_patterns``),
``mindiesd/quantization/layer.py`` (``W8A8QuantLinear``, ``W8A8TimeStepQuantLinear``,
``WeightQuantLinear``), ``mindiesd/quantization/mode.py`` (which algorithms quantize activations),
``mindiesd/quantization/utils.py`` (``replace_rank_suffix``, ``get_quant_weight``,
``TimestepManager``), ``mindiesd/utils/file_utils.py`` (``check_file_safety``: regular file, no
symlink, permissions at most 0o640). What it reproduces, as MindIE-SD does it:

* the description is read with a permission check, ``FLOAT`` keys are excluded layers, every other
  string value that is a quantization algorithm marks a quantized key; ``model_quant_type`` names
  the weight file (``quant_model_weight_{type}[_{rank}].safetensors``), which is checked too;
* each module of the *float model built from the original pipeline* is looked up under
  ``{L}.linear.weight``, ``{L}.weight``, ``{L}``; only ``nn.Linear`` is replaced; with
  ``{L}.div.mul_scale`` present the layer's tensors are read under ``{L}.linear``;
* a missing tensor raises (``get_quant_weight``), tensors are cast as MindIE-SD casts them (input
  scale to float32 for float16 models and to bfloat16 for bfloat16 ones, input offset to int8,
  weight scale to the model dtype, ...), and ``torch_npu``'s ops run as their documented
  semantics (tests/kernels/npu_emulation.py).

Nothing here imports diffkiln's export code.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from tests.kernels.npu_emulation import make_fake_torch_npu

MODELDATA_FILE_PERMISSION = 0o640
ACT_AND_WEIGHT = {"W8A8", "W8A8_TIMESTEP", "W8A8_DYNAMIC"}
WEIGHT_ONLY = {"W8A16"}
# QuantAlgorithm's values (mindiesd/quantization/mode.py).
ALGORITHMS = {
    "W8A8", "W8A8_TIMESTEP", "W8A8_DYNAMIC", "W4A4_DYNAMIC", "W8A8_MXFP8", "W4A4_MXFP4", "W8A16", "W4A16",
    "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_PER_CHANNEL", "W8A8_PER_TENSOR",
    "W8A8_PER_CHANNEL_PER_TOKEN", "W8A8_PER_CHANNEL_PER_TENSOR", "W8A8_PER_TENSOR_PER_TOKEN", "INT8",
    "MIXED_PERCISION", "FP8_DYNAMIC", "NO_QUANT", "W4A4_MXFP4_SVD", "W4A4_MXFP4_DUALSCALE",
}  # fmt: skip
NPU = make_fake_torch_npu()


class ContractError(Exception):
    """What MindIE-SD would raise (ParametersInvalid, PermissionError, ConfigError)."""


def check_file_safety(path: Path, permission_mode: int = MODELDATA_FILE_PERMISSION) -> None:
    """``file_utils.standardize_path`` + ``check_file_safety``."""
    if os.path.islink(os.path.normpath(path)):
        raise ContractError(f"The path:{path} is a symbolic link file.")
    if not path.exists():
        raise ContractError(f"The path:{path} doesn't exist.")
    if not path.is_file():
        raise ContractError(f"The input:{path} is not a file.")
    current = stat.S_IMODE(os.stat(path).st_mode)
    for i in range(3):
        cur, allowed = (current >> (3 * i)) & 0o7, (permission_mode >> (3 * i)) & 0o7
        if (cur | allowed) != allowed:
            raise ContractError(f"The permission of {path.name} is higher than {oct(permission_mode)}.")


def replace_rank_suffix(path: Path, rank: int | None) -> tuple[Path, int]:
    """``utils.replace_rank_suffix``: a ``_<digits>`` name suffix selects the running rank's files."""
    base, _, last = path.stem.rpartition("_")
    if base and last.isdigit():
        if rank is None:
            raise ContractError(f"must init distributed env if use distributed config {path.name}")
        return path.with_name(f"{base}_{rank}{path.suffix}"), rank
    return path, -1


class TimestepManager:
    """``utils.TimestepManager``: the current step index, set by the user before each step."""

    index: int | None = None
    max_index: int | None = None

    @classmethod
    def set_timestep_idx(cls, t: int) -> None:
        if cls.max_index is not None and t > cls.max_index:
            raise ContractError(f"max timestep set in quant weight: {cls.max_index}.")
        cls.index = t


class TimestepPolicyConfig:
    """``config.TimestepPolicyConfig``: step -> "static" or "dynamic"; unregistered steps are dynamic."""

    def __init__(self) -> None:
        self._strategies: dict[int, str] = {}

    def register(self, step_range: int | range | list[int], strategy: str) -> None:
        if strategy not in ("static", "dynamic"):
            raise ContractError(f"invalid strategy {strategy!r}")
        for step in [step_range] if isinstance(step_range, int) else step_range:
            self._strategies[step] = strategy

    def get_strategy(self, step: int | None) -> str:
        return self._strategies.get(step, "dynamic") if step is not None else "dynamic"


class _Weights:
    def __init__(self, path: Path):
        self.handle = safe_open(str(path), framework="pt")
        self.keys = set(self.handle.keys())

    def get(self, key: str) -> torch.Tensor:
        """``get_quant_weight``."""
        if key not in self.keys:
            raise ContractError(f"Critical parameter missing: {key}.")
        return self.handle.get_tensor(key)


class W8A8QuantLinear(nn.Module):
    """``W8A8QuantLinear`` / ``W8A8TimeStepQuantLinear`` (``timestep=True``)."""

    def __init__(self, bias: bool, w: _Weights, prefix: str, dtype: torch.dtype, mul_scale: torch.Tensor | None,
                 is_dynamic: bool, timestep: bool = False, timestep_config: Any = None):  # fmt: skip
        super().__init__()
        self.dtype, self.timestep = dtype, timestep
        self.timestep_config = timestep_config or TimestepPolicyConfig()
        self.bias = w.get(f"{prefix}.bias") if bias else None
        self.mul_scale = None if mul_scale is None else mul_scale.to(dtype)
        self.is_dynamic = is_dynamic
        if is_dynamic or timestep:
            scale = w.get(f"{prefix}.weight_scale").squeeze().to(dtype)
            self.weight_scale = scale.to(torch.float32) if dtype == torch.float16 else scale
            if self.bias is not None:
                self.bias = self.bias.to(dtype)
            self.weight = w.get(f"{prefix}.weight").T
        if not is_dynamic or timestep:
            self.quant_bias = w.get(f"{prefix}.quant_bias")
            self.deq_scale = w.get(f"{prefix}.deq_scale")
            self.weight = w.get(f"{prefix}.weight")
            in_scale = w.get(f"{prefix}.input_scale")
            in_scale = in_scale.to(torch.float32) if dtype == torch.float16 else in_scale.to(dtype)
            k = self.weight.shape[1]
            self.input_scale = in_scale.repeat(k) if in_scale.dim() == 1 else in_scale.repeat(1, k)
            in_offset = w.get(f"{prefix}.input_offset").to(torch.int8)
            self.input_offset = in_offset.repeat(k) if in_offset.dim() == 1 else in_offset.repeat(1, k)
        if timestep:
            TimestepManager.max_index = self.input_scale.shape[0]

    def _quant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.mul_scale is not None:
            x = x * self.mul_scale
        dynamic = self.is_dynamic
        if self.timestep:
            t = TimestepManager.index
            dynamic = self.timestep_config.get_strategy(t) != "static"
        if dynamic:
            x_int8, pertoken = NPU.npu_dynamic_quant(x)
            weight = self.weight.T if self.timestep else self.weight
            return NPU.npu_quant_matmul(x_int8, weight, self.weight_scale, pertoken_scale=pertoken,
                                        output_dtype=self.dtype, bias=self.bias)  # fmt: skip
        if self.timestep:
            t = TimestepManager.index
            scale, offset, deq, qbias = self.input_scale[t], self.input_offset[t], self.deq_scale[t], self.quant_bias[t]
        else:
            scale, offset, deq, qbias = self.input_scale, self.input_offset, self.deq_scale, self.quant_bias
        x_int8 = NPU.npu_quantize(x, scale, offset, torch.qint8, -1)
        return NPU.npu_quant_matmul(x_int8, self.weight.T, deq, bias=qbias, output_dtype=self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self._quant_matmul(flat)
        return out.view(*x.shape[:-1], out.shape[-1])


class WeightQuantLinear(nn.Module):
    """``WeightQuantLinear`` (W8A16): ``mul_scale`` arrives in kwargs and is not applied."""

    def __init__(self, bias: bool, w: _Weights, prefix: str, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.weight_scale = w.get(f"{prefix}.weight_scale").T.to(dtype)
        self.weight = w.get(f"{prefix}.weight").T
        self.bias = w.get(f"{prefix}.bias") if bias else None
        if self.bias is not None and dtype == torch.bfloat16:
            self.bias = self.bias.to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.dtype)
        out = NPU.npu_weight_quant_batchmatmul(flat, self.weight, self.weight_scale, bias=self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def quantize(model: nn.Module, quant_des_path: Path, dtype: torch.dtype = torch.bfloat16, rank: int | None = None,
             timestep_config: TimestepPolicyConfig | None = None) -> tuple[nn.Module, dict[str, str]]:  # fmt: skip
    """MindIE-SD's ``quantize``: returns the model and the replaced layers (name -> algorithm).

    Raises:
        ContractError: where MindIE-SD raises.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ContractError("Dtype must be torch.float16 or torch.bfloat16")
    check_file_safety(quant_des_path)
    des_path, rank_id = replace_rank_suffix(quant_des_path, rank)
    check_file_safety(des_path)
    description = json.loads(des_path.read_text(encoding="utf-8"))
    if not description:
        raise ContractError("quant_des_dict is none!")
    excluded = {k for k, v in description.items() if v == "FLOAT"}
    quantized = {k: v.upper() for k, v in description.items() if isinstance(v, str) and v.upper() in ALGORITHMS}
    algo = description.get("model_quant_type")
    if algo is None or algo not in ALGORITHMS:
        raise ContractError("quant_algo must be the type of QuantAlgorithm.")
    suffix = f"_{rank_id}" if rank_id != -1 else ""
    weight_path = des_path.parent / f"quant_model_weight_{algo.lower()}{suffix}.safetensors"
    check_file_safety(weight_path)
    weights = _Weights(weight_path)
    replaced: dict[str, tuple[nn.Module, str]] = {}
    for name, layer in model.named_modules():
        patterns = [f"{name}.linear.weight", f"{name}.weight", name, f"{name}.fa_q.scale", f"{name}.quant_type"]
        if any(p in excluded for p in patterns):
            continue
        layer_algo = next((quantized[p] for p in patterns if p in quantized), None)
        if layer_algo is None or not isinstance(layer, nn.Linear):
            continue  # the quant map holds nn.Linear only
        has_bias = isinstance(layer.bias, nn.Parameter)
        mul_key = f"{name}.div.mul_scale"
        mul_scale = weights.get(mul_key) if mul_key in weights.keys else None
        prefix = f"{name}.linear" if mul_scale is not None else name
        if layer_algo in ACT_AND_WEIGHT:
            new: nn.Module = W8A8QuantLinear(has_bias, weights, prefix, dtype, mul_scale, layer_algo == "W8A8_DYNAMIC",
                                             layer_algo == "W8A8_TIMESTEP", timestep_config)  # fmt: skip
        elif layer_algo in WEIGHT_ONLY:
            new = WeightQuantLinear(has_bias, weights, prefix, dtype)
        else:
            continue
        replaced[name] = (new, layer_algo)
    for name, (new, _) in replaced.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model, {n: a for n, (_, a) in replaced.items()}


class DiTBlockCacheAgent:
    """``CacheAgent(CacheConfig(method="dit_block_cache", ...))`` from MindIE-SD's source
    (``cache_agent/cache_agent.py``, ``cache.py``, ``dit_block_cache.py``): ``apply(block, **kwargs)``
    wraps one block call; blocks return ``hidden_states`` or ``(hidden_states, encoder_hidden_states)``."""

    FIELDS = ("method", "blocks_count", "steps_count", "step_start", "step_interval", "step_end", "block_start",
              "block_end")  # fmt: skip

    def __init__(self, config: dict[str, Any]) -> None:
        if set(config) != set(self.FIELDS):
            raise ContractError(f"CacheConfig takes {self.FIELDS}, got {sorted(config)}")
        if config["method"] not in ("attention_cache", "dit_block_cache"):
            raise ContractError(f"Method '{config['method']}' is not supported")
        if config["blocks_count"] <= 0 or config["steps_count"] <= 0 or config["step_interval"] <= 0:
            raise ContractError("blocks_count, steps_count and step_interval must be > 0")
        if config["step_end"] < config["step_start"] or config["block_end"] < config["block_start"]:
            raise ContractError("step_end must be >= step_start and block_end >= block_start")
        if config["block_end"] > config["blocks_count"]:
            raise ContractError("block_end must be <= blocks_count")
        self.c = config
        self.step = self.block = 0
        self.cache: list[Any] = [None, None]
        self.output_count = 1

    def apply(self, func: Any, **kwargs: Any) -> Any:
        c = self.c
        if c["step_start"] >= c["steps_count"] or c["step_end"] == c["step_start"] or c["step_interval"] == 1 \
                or c["block_start"] >= c["blocks_count"] or c["block_end"] == c["block_start"]:  # fmt: skip
            return func(**kwargs)
        out = self._apply(func, kwargs)
        self.block += 1
        if self.block == c["blocks_count"]:
            self.step, self.block = self.step + 1, 0
            if self.step == c["steps_count"]:
                self.step, self.cache = 0, [None, None]
        return out

    def _computing(self) -> bool:
        c = self.c
        return self.step < c["step_start"] or (self.step - c["step_start"]) % c["step_interval"] == 0

    def _apply(self, func: Any, kwargs: dict[str, Any]) -> Any:
        c = self.c
        hidden = kwargs.pop("hidden_states")
        encoder = kwargs.pop("encoder_hidden_states", None)
        if self._computing() or not c["block_start"] <= self.block < c["block_end"]:
            res = func(hidden_states=hidden, encoder_hidden_states=encoder, **kwargs)
            if self._computing() and self.step >= c["step_start"]:
                self.output_count = len(res) if isinstance(res, (list, tuple)) else 1
                if self.block == c["block_start"]:
                    self.cache = [hidden, encoder]
                if self.block == c["block_end"] - 1:
                    if self.output_count == 2:
                        self.cache = [res[0] - self.cache[0], res[1] - self.cache[1]]
                    else:
                        self.cache[0] = res - self.cache[0]
            return res
        add = self.cache if self.block == c["block_start"] else [0, 0]
        if self.output_count == 2:
            return hidden + add[0], encoder + add[1]
        return hidden + add[0]
