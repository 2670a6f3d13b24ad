"""Dynamic axes that hold at other shapes: the export's fixes for what torch.export and torchlib
get wrong on the patterns diffusers denoisers use, on small modules written as those models write them.

Each graph is exported from a batch-1 call with every axis dynamic, then run in onnxruntime at
shapes the export never saw, against the module in torch.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import diffkiln.api as dk
from diffkiln.core.metrics import sqnr_db
from diffkiln.core.plan import ActMode, ActSpec, LayerPlan, WeightSpec
from diffkiln.export.onnx import OnnxCompute, OnnxExportConfig, export_module_onnx
from diffkiln.nn import QLinear
from diffkiln.nn.freeze import freeze_layer, layer_meta


def _run(path: Path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def _export(module: nn.Module, call: dict[str, Any], tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "m.onnx"
    entry = export_module_onnx(module, call, path, OnnxExportConfig(tmp_path, progress=False), float16=False)
    return path, entry


class _TextPerFrame(nn.Module):
    """A video UNet's text conditioning: the text states repeated once per frame
    (``repeat_interleave(num_frames, dim=0)``), the frame count read from the latents
    (``return_dict`` as a diffusers model takes it)."""

    def __init__(self, dim: int | None):
        super().__init__()
        self.dim = dim

    def forward(
        self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor, return_dict: bool = True
    ) -> torch.Tensor:
        frames = sample.shape[1]
        text = encoder_hidden_states.repeat_interleave(frames, dim=self.dim)
        return text * 2.0 + sample.mean()


@pytest.mark.parametrize("dim", [0, 1, -1, None])
def test_repeat_interleave_by_a_dynamic_count_runs_at_other_shapes(dim: int | None, tmp_path: Path) -> None:
    module = _TextPerFrame(dim).eval()
    call = {"sample": torch.randn(1, 2, 4), "encoder_hidden_states": torch.randn(1, 5, 3)}
    path, entry = _export(module, call, tmp_path)
    assert entry["dynamic_axes"]["sample"] == [0, 1, 2]
    # torchlib puts the count on the wrong axis: right only where the batch equals the frame count
    # (or is 1), so batch 2 with 3 frames fails in onnxruntime without the fix.
    for batch, frames in [(1, 2), (2, 3), (3, 4)]:
        feeds = {"sample": torch.randn(batch, frames, 4), "encoder_hidden_states": torch.randn(batch, 5, 3)}
        with torch.no_grad():
            ref = module(**feeds).numpy()
        np.testing.assert_allclose(_run(path, feeds), ref, rtol=1e-6, atol=1e-6)


class _MaskedAttention(nn.Module):
    """Cross-attention with a key mask, as diffusers' Attention prepares it: a ``(batch, keys)`` mask
    repeated per head, then viewed by the text states' batch (``attention_mask.view(batch, heads,
    -1, keys)``), and a pooled vector added per sample."""

    heads = 2

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.kv = nn.Linear(6, 16)

    def forward(
        self,
        hidden: torch.Tensor,
        text: torch.Tensor,
        mask: torch.Tensor,
        pooled: torch.Tensor,
        return_dict: bool = True,
    ) -> torch.Tensor:
        batch, queries, _ = hidden.shape
        bias = ((1 - mask) * -10000.0).unsqueeze(1)
        bias = bias.repeat_interleave(self.heads, dim=0, output_size=bias.shape[0] * self.heads)
        bias = bias.view(text.shape[0], self.heads, -1, bias.shape[-1])
        q = self.q(hidden).view(batch, queries, self.heads, 4).transpose(1, 2)
        k, v = self.kv(text).view(text.shape[0], -1, 2 * self.heads, 4).transpose(1, 2).chunk(2, dim=1)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(1, 2).reshape(batch, queries, 8) + pooled[:, None, :]


def test_inputs_that_share_the_batch_export_with_one_dynamic_batch(tmp_path: Path) -> None:
    module = _MaskedAttention().eval()
    torch.manual_seed(0)
    call = {"hidden": torch.randn(1, 6, 8), "text": torch.randn(1, 5, 6), "mask": torch.ones(1, 5),
            "pooled": torch.randn(1, 8)}  # fmt: skip
    path, entry = _export(module, call, tmp_path)
    # Each input's batch its own symbol left ``mask batch // text batch`` for the mask's query axis,
    # which torch.export could not prove to be 1: the export failed. A batch-1 trace specialized it.
    assert "static_reason" not in entry, entry.get("static_reason")
    assert all(0 in axes for axes in entry["dynamic_axes"].values()), entry["dynamic_axes"]
    for batch in (1, 2, 4):
        mask = (torch.rand(batch, 5) > 0.3).float()
        mask[:, 0] = 1.0
        feeds = {"hidden": torch.randn(batch, 6, 8), "text": torch.randn(batch, 5, 6), "mask": mask,
                 "pooled": torch.randn(batch, 8)}  # fmt: skip
        with torch.no_grad():
            ref = module(**feeds).numpy()
        np.testing.assert_allclose(_run(path, feeds), ref, rtol=1e-4, atol=1e-5)


class _PositionTable(nn.Module):
    """CogVideoX's patch embedding away from its configured size: a table of text slots then one
    row per token, built as zeros and filled through ``.data`` by a rank-2 ``copy_`` that broadcasts
    into the rank-3 slice."""

    text_len = 3

    def forward(self, hidden: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        tokens = hidden.shape[1]
        rows = torch.sin(torch.arange(tokens, dtype=torch.float32)[:, None] * torch.arange(1, 9)[None, :] * 0.1)
        table = hidden.new_zeros(1, self.text_len + tokens, 8)
        table.data[:, self.text_len :].copy_(rows)
        return hidden + table[:, self.text_len :]


def test_a_table_written_through_data_is_computed_in_the_graph(tmp_path: Path) -> None:
    module = _PositionTable().eval()
    path, entry = _export(module, {"hidden": torch.randn(1, 5, 8)}, tmp_path)
    # Without DataAsDetach, torch.export lifted the written table as a constant (a fake tensor) and
    # failed; without the copy translation, torchlib's CastLike kept the rank-2 shape and the graph
    # failed ONNX shape inference.
    assert "static_reason" not in entry and entry["dynamic_axes"] == {"hidden": [0, 1]}, entry
    for batch, tokens in [(1, 5), (2, 7), (3, 12)]:
        feeds = {"hidden": torch.randn(batch, tokens, 8)}
        with torch.no_grad():
            ref = module(**feeds).numpy()
        np.testing.assert_allclose(_run(path, feeds), ref, rtol=1e-6, atol=1e-6)


class _ProjectOut(nn.Module):
    """PixArt's last step: the output projection, then ``squeeze(1)`` of the token axis (a no-op
    unless there is one token), and a ``squeeze`` of a size-1 axis that does go."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, hidden: torch.Tensor, scale: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        return self.proj(hidden).squeeze(1) * scale.squeeze(1)[:, None]


def test_squeeze_of_a_dynamic_axis_keeps_it(tmp_path: Path) -> None:
    module = _ProjectOut().eval()
    call = {"hidden": torch.randn(1, 6, 8), "scale": torch.randn(1, 1, 4)}
    path, entry = _export(module, call, tmp_path)
    # Declared Dim.AUTO, the size-1 axis of ``scale`` made the export fail (``True != False``).
    assert entry["dynamic_axes"] == {"hidden": [0, 1], "scale": [0]}, entry  # the Linear fixes the features
    # torchlib's Squeeze of the symbolic token axis fails in onnxruntime at every size but 1.
    for batch, tokens in [(1, 6), (2, 9), (3, 16)]:
        feeds = {"hidden": torch.randn(batch, tokens, 8), "scale": torch.randn(batch, 1, 4)}
        with torch.no_grad():
            ref = module(**feeds).numpy()
        got = _run(path, feeds)
        assert got.shape == ref.shape == (batch, tokens, 4)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


class _LatentConv(nn.Module):
    """A VAE's first step on the latents: a convolution whose weight fixes the channel axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, latents: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        return self.conv(latents / 0.18)


def test_an_axis_the_model_fixes_is_written_into_the_graph(tmp_path: Path) -> None:
    module = _LatentConv().eval()
    path, entry = _export(module, {"latents": torch.randn(1, 4, 8, 8)}, tmp_path)
    # torch.export leaves the channels a symbol of range [4, 4]; declared dynamic, they were listed
    # among the dynamic axes and 3 channels failed inside onnxruntime.
    assert entry["dynamic_axes"] == {"latents": [0, 2, 3]}, entry
    assert entry["inputs"][0]["shape"][1] == 4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1] == 4
    feeds = {"latents": torch.randn(2, 4, 6, 10)}
    with torch.no_grad():
        ref = module(**feeds).numpy()
    np.testing.assert_allclose(_run(path, feeds), ref, rtol=1e-5, atol=1e-5)


class _Mlp(nn.Module):
    """A transformer's feed-forward block on the token states, every Linear quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, hidden: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(hidden)))


@pytest.mark.parametrize("compute", [OnnxCompute.QDQ, OnnxCompute.INTEGER])
def test_a_quantized_linear_fixes_its_input_features(compute: OnnxCompute, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Mlp().eval()
    stats = dk.calibrate(model, inputs=[{"hidden": torch.randn(2, 6, 8)} for _ in range(3)])
    quantized = dk.quantize_(model, dk.make_plan(model, stats, dk.W8A8Config(include=("up", "down"))), stats)
    assert isinstance(quantized.up, QLinear) and isinstance(quantized.down, QLinear)
    path = tmp_path / "m.onnx"
    config = OnnxExportConfig(tmp_path, progress=False, compute=compute)
    entry = export_module_onnx(quantized, {"hidden": torch.randn(1, 6, 8)}, path, config, float16=False)
    # The custom ops' fake kernels check the features against the weight, as matmul does: without
    # that, torch.export left the feature axis a free symbol, listed as dynamic.
    assert entry["dynamic_axes"] == {"hidden": [0, 1]}, entry
    feeds = {"hidden": torch.randn(3, 11, 8)}
    with torch.no_grad():
        ref = quantized(**feeds).numpy()
    assert sqnr_db(ref, _run(path, feeds)) >= 30.0


class _TextProjection(nn.Module):
    """A cross-attention key projection on the text states: a runtime QLinear with BOS rows."""

    def __init__(self, q: QLinear) -> None:
        super().__init__()
        self.to_k = q

    def forward(self, text: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        return self.to_k(text)


@pytest.mark.parametrize("positions", [(0,), (0, 1), (2,)], ids=["bos", "prefix", "elsewhere"])
def test_bos_rows_apply_at_the_text_length_and_only_there_at_any_length(
    positions: tuple[int, ...], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    text_len, linear = 5, nn.Linear(8, 6)
    act = ActSpec(bits=8, mode=ActMode.STATIC, scale=6.0 / 255, zero_point=0)
    lp = LayerPlan("to_k", "linear", WeightSpec(8), act, bos_positions=positions)
    text_rows = torch.randn(text_len, 8)
    text_rows[list(positions)] *= 40.0  # the BOS outlier a static grid clips
    q = QLinear(freeze_layer(linear, lp, SimpleNamespace(text_rows=text_rows)), layer_meta(linear, lp))  # type: ignore[arg-type]
    module = _TextProjection(q).eval()
    path, entry = _export(module, {"text": torch.randn(1, text_len, 8)}, tmp_path)
    # Comparing the symbolic length with text_len in Python made torch.export pin it to text_len.
    assert entry["dynamic_axes"] == {"text": [0, 1]}, entry
    for batch, tokens in [(1, text_len), (3, text_len), (2, 3), (2, 9)]:
        feeds = {"text": torch.randn(batch, tokens, 8)}
        if tokens == text_len:
            feeds["text"][:, list(positions)] = text_rows[list(positions)]
        with torch.no_grad():
            ref = module(**feeds)
        got = torch.from_numpy(_run(path, feeds))
        assert sqnr_db(ref, got) >= 40.0, (batch, tokens)
        rows = got[:, list(positions)]
        bos = q.bos_rows.float().expand(batch, -1, -1)
        # The rows the runtime substitutes at the text length (the FP outputs of the outlier), and
        # the quantized layer's own outputs at any other length.
        assert torch.allclose(rows, bos, atol=1e-5) == (tokens == text_len), (batch, tokens)


class _ComplexRotary(nn.Module):
    """A rotary table kept as complex numbers, as QwenImage and Lumina2 keep theirs: split per axis
    (``split_with_sizes``), one row per token picked, the parts joined, broadcast over the batch
    (``unsqueeze``, ``expand``), multiplied into the states viewed as complex pairs. torch.onnx has
    no complex translation for the layout ops among these: the export failed."""

    def __init__(self) -> None:
        super().__init__()
        angles = torch.arange(64, dtype=torch.float32)[:, None] * torch.linspace(0.01, 1.0, 6)[None, :]
        self.freqs = torch.polar(torch.ones_like(angles), angles)  # a plain attribute, as theirs

    def forward(self, hidden: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        batch, tokens, width = hidden.shape
        first, second = self.freqs.split([4, 2], dim=1)
        table = torch.cat([first[:tokens], second[1 : tokens + 1]], dim=-1)
        table = table.unsqueeze(0).expand(batch, -1, -1)
        pairs = torch.view_as_complex(hidden.reshape(batch, tokens, width // 2, 2))
        return torch.view_as_real(pairs * table).flatten(2)


def test_a_complex_rotary_table_exports_and_runs_at_other_shapes(tmp_path: Path) -> None:
    module = _ComplexRotary().eval()
    path, entry = _export(module, {"hidden": torch.randn(1, 5, 12)}, tmp_path)
    assert {0, 1} <= set(entry["dynamic_axes"]["hidden"]), entry["dynamic_axes"]
    for batch, tokens in [(1, 5), (2, 9), (3, 17)]:
        feeds = {"hidden": torch.randn(batch, tokens, 12)}
        with torch.no_grad():
            ref = module(**feeds).numpy()
        np.testing.assert_allclose(_run(path, feeds), ref, rtol=1e-5, atol=1e-5)


class _PaddedComplexRotary(nn.Module):
    """Z-Image's rotary tables: complex rows picked per sample by int32 ids (each sample its own
    length), batched with ``pad_sequence`` (zero padding), padded again with ``F.pad``, and masked
    with ``where``. torch.onnx has no complex translation for any of these, and ONNX's ``GatherND``
    takes int64 indices only."""

    def __init__(self) -> None:
        super().__init__()
        angles = torch.arange(64, dtype=torch.float32)[:, None] * torch.linspace(0.01, 1.0, 3)[None, :]
        self.freqs = torch.polar(torch.ones_like(angles), angles)

    def forward(self, hidden: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        batch, tokens, width = hidden.shape
        ids = torch.arange(tokens, dtype=torch.int32)  # int32 position ids, as Z-Image's
        tables = [self.freqs[ids[i:]] for i in range(batch)]  # sample i: tokens - i rows
        table = nn.utils.rnn.pad_sequence(tables, batch_first=True, padding_value=0.0)
        table = nn.functional.pad(table, (0, 0, 0, 1))[:, :tokens]
        keep = torch.arange(tokens)[None, :, None] < (tokens - torch.arange(batch))[:, None, None]
        table = torch.where(keep, table, torch.zeros_like(table))
        pairs = torch.view_as_complex(hidden.reshape(batch, tokens, width // 2, 2))
        return torch.view_as_real(pairs * table).flatten(2)


def test_padded_and_masked_complex_tables_export_and_run(tmp_path: Path) -> None:
    module = _PaddedComplexRotary().eval()
    path, entry = _export(module, {"hidden": torch.randn(2, 5, 6)}, tmp_path)
    # A table per sample: the trace fixes the batch, and the graph and its record say so (the
    # retry's program named the fixed axis "2", a symbol the record took for a dynamic axis).
    assert entry["inputs"][0]["shape"][0] == 2 and entry["dynamic_axes"]["hidden"][:1] == [1], entry
    for tokens in (5, 9, 17):
        feeds = {"hidden": torch.randn(2, tokens, 6)}
        with torch.no_grad():
            ref = module(**feeds).numpy()
        np.testing.assert_allclose(_run(path, feeds), ref, rtol=1e-5, atol=1e-5)


class _TextLengthMask(nn.Module):
    """HunyuanVideo's key mask: all False, then True up to each sample's text length
    (``masked_fill`` on a boolean tensor), chosen between two masks by ``torch.where``.
    onnxruntime has no boolean ``Where``: the graph did not load."""

    def forward(self, text: torch.Tensor, lengths: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        batch, tokens, _ = text.shape
        mask = torch.zeros(batch, tokens, dtype=torch.bool)
        positions = torch.arange(tokens)[None, :]
        mask = mask.masked_fill(positions < lengths[:, None], True)
        mask = torch.where(lengths[:, None] > 0, mask, torch.ones_like(mask))
        return (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def test_boolean_masks_run_in_onnxruntime(tmp_path: Path) -> None:
    module = _TextLengthMask().eval()
    path, _ = _export(module, {"text": torch.randn(1, 6, 4), "lengths": torch.tensor([3])}, tmp_path)
    for lengths in ([3], [1, 6], [0, 2, 5]):
        feeds = {"text": torch.randn(len(lengths), 6, 4), "lengths": torch.tensor(lengths)}
        with torch.no_grad():
            ref = module(**feeds).numpy()
        np.testing.assert_allclose(_run(path, feeds), ref, rtol=1e-6, atol=1e-6)


class _PatchBounds(nn.Module):
    """LTX-2's rotary positions: patch coordinates as ``[start, end)`` pairs in a last axis of 2,
    halved by ``chunk(2)`` and squeezed to their midpoints, then transposed against the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor, coords: torch.Tensor, return_dict: bool = True) -> torch.Tensor:
        start, end = coords.chunk(2, dim=-1)
        mid = ((start + end) / 2.0).squeeze(-1)  # (batch, 3, tokens)
        freqs = (mid.transpose(1, 2).unsqueeze(-1) * torch.arange(1, 3).float()).flatten(2)[..., :4]
        h = self.proj(hidden).unflatten(2, (2, -1)) * freqs.cos().unsqueeze(2)
        return h.transpose(1, 2).flatten(1, 2)


def test_only_the_varied_axes_dynamic_keeps_a_fixed_axis_the_model_splits(tmp_path: Path) -> None:
    # With every axis dynamic, the pair axis became a symbol: the chunk's halves a computed size
    # and their squeeze a no-op in the graph (the traced program squeezed), so a Transpose met a
    # tensor of another rank in onnxruntime. The checked export's third attempt makes dynamic only
    # the axes its second call varied (here the tokens) and the batch.
    from diffkiln.export.onnx.components import Component, ComponentKind, batch_inputs, flatten_kwargs
    from diffkiln.export.onnx.exporter import _Denoiser
    from diffkiln.export.onnx.program import export_component

    module = _PatchBounds().eval()
    tensors, options = flatten_kwargs({"hidden": torch.randn(1, 6, 8), "coords": torch.rand(1, 3, 6, 2)})
    component = Component("m", ComponentKind.DENOISER, _Denoiser(module, list(tensors), options,
                                                                 batch_inputs(tensors)), tensors, options)  # fmt: skip
    entry = export_component(component, tmp_path / "m.onnx", OnnxExportConfig(tmp_path, progress=False), set(),
                             float16=False, varied={"hidden": [1], "coords": [2]})  # fmt: skip
    assert entry["dynamic_axes"] == {"hidden": [0, 1], "coords": [0, 2]}, entry
    for batch, tokens in [(1, 6), (2, 10)]:
        feeds = {"hidden": torch.randn(batch, tokens, 8), "coords": torch.rand(batch, 3, tokens, 2)}
        with torch.no_grad():
            ref = module(**feeds).numpy()
        np.testing.assert_allclose(_run(tmp_path / "m.onnx", feeds), ref, rtol=1e-5, atol=1e-5)
