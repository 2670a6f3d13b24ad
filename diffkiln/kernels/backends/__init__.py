"""Integer kernels per backend (cpu, cuda, npu), registered by device type.

Each backend implements :class:`KernelBackend`: an exact int8 GEMM into int32, the fused
``quant_matmul`` (int8 GEMM + int32 bias + float scales, the contract of
``torch_npu.npu_quant_matmul``) and per-token dynamic quantisation. One module per backend;
torch_npu is imported lazily, only when the npu backend is first used, so CPU and CUDA
deployments never need it.
"""

from diffkiln.kernels.backends.base import (
    ActGrid,
    ConvGeometry,
    GenericStaticLinear,
    KernelBackend,
    PackedWeights,
    SlowKernelWarning,
    StaticConv,
    StaticLinear,
    available_backends,
    get_backend,
    register_backend,
    static_quant_linear,
    unpacked_quant_matmul,
    unpacked_weight_only_matmul,
)
from diffkiln.kernels.backends.cpu import (
    CpuBackend,
    OneDnnStaticConv,
    OneDnnStaticLinear,
    conv2d_on_fp32_units,
    cpu_has_vnni,
    int_mm_on_fp32_units,
    onednn_available,
    onednn_exact,
)
from diffkiln.kernels.backends.cuda import CudaBackend
from diffkiln.kernels.backends.npu import NpuBackend

__all__ = [
    "ActGrid",
    "ConvGeometry",
    "CpuBackend",
    "CudaBackend",
    "GenericStaticLinear",
    "KernelBackend",
    "NpuBackend",
    "OneDnnStaticConv",
    "OneDnnStaticLinear",
    "PackedWeights",
    "SlowKernelWarning",
    "StaticConv",
    "StaticLinear",
    "available_backends",
    "conv2d_on_fp32_units",
    "cpu_has_vnni",
    "get_backend",
    "int_mm_on_fp32_units",
    "onednn_available",
    "onednn_exact",
    "register_backend",
    "static_quant_linear",
    "unpacked_quant_matmul",
    "unpacked_weight_only_matmul",
]
