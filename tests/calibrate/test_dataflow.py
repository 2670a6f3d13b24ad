"""The data-flow trace on toy denoisers: which inputs it finds and what the tags carry."""

from __future__ import annotations

import torch
from torch import nn

from diffkiln.calibrate.dataflow import sequence_tensor, trace_dataflow
from diffkiln.optimizer.roles import StructuralRole, structural_roles


class _Modulated(nn.Module):
    """A latent projected in, a timestep embedding cast to the latent's dtype (``type_as``), a
    zero tensor shaped like the latent, and a modulation layer reading the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(4, 4)
        self.time = nn.Linear(1, 4)
        self.modulation = nn.Linear(4, 4)
        self.bias_of_zeros = nn.Linear(4, 4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep[:, None]).type_as(sample)
        zeros = torch.zeros_like(sample)
        return self.proj_in(sample) * self.modulation(emb)[:, None] + self.bias_of_zeros(zeros)


def test_arguments_lending_only_a_dtype_or_shape_carry_no_data() -> None:
    graph = trace_dataflow(_Modulated(), (torch.randn(2, 3, 4), torch.tensor([1.0, 2.0])), {})
    assert graph.main_input == "sample" and graph.timestep_input == "timestep"
    assert graph.layers["proj_in"].sources == ("input:sample",)
    # The cast takes its dtype from the latent, not its values: the modulation reads the timestep only.
    assert graph.layers["modulation"].deps == ("timestep",), graph.layers["modulation"]
    # A zero tensor shaped like the latent holds none of it.
    assert graph.layers["bias_of_zeros"].deps == (), graph.layers["bias_of_zeros"]


class _PerSample(nn.Module):
    """Latents and text as lists, one tensor per sample (Z-Image's form); text of per-sample length."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(4, 4)
        self.text = nn.Linear(3, 4)

    def forward(self, x: list[torch.Tensor], t: torch.Tensor, cap: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.proj_in(xi) + self.text(ci).mean(0) * t[i] for i, (xi, ci) in enumerate(zip(x, cap, strict=True))]


def test_a_list_of_per_sample_tensors_is_one_input() -> None:
    x, cap = [torch.randn(5, 4), torch.randn(5, 4)], [torch.randn(6, 3), torch.randn(2, 3)]
    graph = trace_dataflow(_PerSample(), (x, torch.tensor([0.5, 0.5]), cap), {})
    # Counted as inputs, the lists make the latent the main input (it was the timestep, the first
    # plain tensor); shapes are [samples, *first sample's].
    assert graph.main_input == "x" and graph.timestep_input == "t"
    assert graph.inputs == {"x": [2, 5, 4], "t": [2], "cap": [2, 6, 3]}
    assert graph.sequence_inputs == ["cap"]
    assert graph.layers["proj_in"].sources == ("input:x",) and graph.layers["text"].deps == ("cap",)


def test_sequence_forms_stack_to_batch_length_width() -> None:
    plain = torch.randn(2, 5, 8)
    assert sequence_tensor(plain) is plain
    # Encoder layers stacked in front of the batch: each position's rows of all layers side by side.
    stacked = torch.randn(3, 2, 5, 8)
    joined = sequence_tensor(stacked, batch=2)
    assert joined is not None and joined.shape == (2, 5, 24)
    assert torch.equal(joined[1, 4, 8:16], stacked[1, 1, 4])
    assert sequence_tensor(stacked, batch=3) is None  # the batch is not the second axis
    # Per-sample lengths: NaN where a sample has no position.
    ragged = sequence_tensor([torch.randn(4, 8), torch.randn(1, 8)])
    assert ragged is not None and ragged.shape == (2, 4, 8)
    assert torch.isnan(ragged[1, 1:]).all() and not torch.isnan(ragged[0]).any()


class _TokenTimesteps(nn.Module):
    """A 2-D mask and a per-token timestep (Wan 2.2 TI2V's), both (batch, tokens): only the
    timestep goes through a sinusoidal embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in = nn.Linear(4, 4)
        self.time = nn.Linear(2, 4)

    def forward(self, sample: torch.Tensor, mask: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if timestep.dim() == 1:  # one per sample: the same for each token
            timestep = timestep[:, None].expand(-1, sample.shape[1])
        angles = timestep[..., None] * torch.tensor([1.0, 0.5])
        emb = self.time(torch.cat([torch.sin(angles), torch.cos(angles)], -1)[..., :2])
        return self.proj_in(sample) * mask[..., None] + emb


def test_a_per_token_timestep_is_the_2d_input_reaching_a_sinusoid() -> None:
    sample, mask = torch.randn(2, 3, 4), torch.ones(2, 3)
    timestep = torch.tensor([[0.0, 700.0, 700.0], [0.0, 700.0, 700.0]])  # the clean first frame at 0
    graph = trace_dataflow(_TokenTimesteps(), (sample, mask, timestep), {})
    assert graph.timestep_input == "timestep"
    # A 1-D timestep is still taken first: no 2-D input stands in for it.
    graph = trace_dataflow(_TokenTimesteps(), (sample, mask, torch.tensor([700.0, 700.0])), {})
    assert graph.timestep_input == "timestep"


class _JointLatents(nn.Module):
    """Two latents denoised together (LTX-2's video and audio): each projected in, attending itself,
    cross-attending the other stream after a text cross-attention, projected out; a prediction for
    each, of that latent's shape. The text is as wide and as long as the audio latent's width would
    allow a mix-up: only the outputs tell which is denoised."""

    def __init__(self) -> None:
        super().__init__()
        self.video_in, self.audio_in = nn.Linear(4, 8), nn.Linear(6, 8)
        self.audio_q, self.audio_k, self.audio_v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.text_embed, self.text_kv = nn.Linear(6, 8), nn.Linear(8, 8)
        self.video_out, self.audio_out = nn.Linear(8, 4), nn.Linear(8, 6)

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v, a, c = self.video_in(video), self.audio_in(audio), self.text_embed(text)
        q, k, val = self.audio_q(a), self.audio_k(a), self.audio_v(a)
        a = a + torch.nn.functional.scaled_dot_product_attention(q, k, val)
        a = a + torch.nn.functional.scaled_dot_product_attention(a, self.text_kv(c), self.text_kv(c))
        v = v + torch.nn.functional.scaled_dot_product_attention(v, a, a) * t[:, None, None]
        return self.video_out(v), self.audio_out(a)


def test_every_latent_with_a_prediction_of_its_shape_is_denoised() -> None:
    graph = trace_dataflow(_JointLatents(), (torch.randn(2, 5, 4), torch.randn(2, 3, 6), torch.randn(2, 3, 6),
                                             torch.tensor([0.5, 0.5])), {})  # fmt: skip
    assert graph.main_input == "video" and graph.latents == ("video", "audio")
    # The audio latent is no token sequence (no BOS handling); the text is.
    assert graph.sequence_inputs == ["text"]
    roles = {n: f.role for n, f in structural_roles(_JointLatents(), graph).items()}
    assert roles == {
        "video_in": StructuralRole.INPUT_PROJECTION,
        "audio_in": StructuralRole.INPUT_PROJECTION,
        "text_embed": StructuralRole.CONDITIONING,
        "video_out": StructuralRole.OUTPUT_PROJECTION,
        "audio_out": StructuralRole.OUTPUT_PROJECTION,
    }, roles  # the audio stream's own attention is quantized like the video stream's
    # The text's key/value projection reads the text alone and meets the audio latent's data at once.
    assert graph.layers["text_kv"].deps == ("text",) and graph.layers["text_kv"].meets_latent
