"""Train the built-in shapes-video pipeline (a ``WanPipeline``) from scratch, seeded and resumable.

Stages, each resumable from the work folder:

1. ``vae``: train the ``AutoencoderKLWan`` (no temporal compression) on windows of rendered clips
   of *seen* compositions (L1 + MSE weighted 10x on object pixels, tiny KL; warmup), then check
   that the video judge still reads its reconstructions of whole clips. Its causal convolutions
   drift past the window it was trained on (colours turned after frame 9 of 17 with 5-frame
   windows), so the shipped VAE continues (``--vae-init``) on whole 17-frame clips.
2. ``latents``: render ``--n-data`` clips of seen compositions and store the VAE's latent mean and
   std (float16) and the captions.
3. ``dit``: train the UMT5 encoder and the ``WanTransformer3DModel`` jointly with rectified flow
   (logit-normal sigmas, 10% empty-prompt dropout, EMA), checkpointing every ``--ckpt-every``
   steps; ``--resume`` continues from ``W/dit_ckpt.pt``; ``--minutes`` caps a run.
4. ``finish``: assemble the pipeline from the EMA weights, judge a quick evaluation with
   ``judge_video`` and save the folder in float16 under ``--out``.

``--stage snapshot`` keeps the training state in ``--snapshot`` (float16, small enough to commit:
a session's files outside the repository do not outlive it) and ``--stage restore`` makes a work
folder from it; then ``--stage latents --keep-scale`` and ``--stage dit --resume`` continue.

``--stage eval`` judges the current checkpoint the same way while training runs (``--eval-size``
scenes per set), keeps a frame strip ``W/eval_<step>.png`` and logs the result.

Usage: python tools/train_shapes_video.py --stage vae,latents,dit,finish --work W [--minutes 60]

``--vae-from DIR`` (latents) encodes with a saved VAE; ``--init-from DIR`` (dit) starts from a saved
pipeline folder; ``--save-vae DIR`` keeps the trained VAE in float16.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffkiln.zoo.shapes.dataset import Split
from diffkiln.zoo.shapes.video import VIDEO_FRAMES, all_video_scenes, render_clip, sample_training_clip
from diffkiln.zoo.shapes.video_judge import judge_video
from diffkiln.zoo.shapes_models import build_t5_encoder
from diffkiln.zoo.shapes_video_model import (
    VIDEO_TEXT_LENGTH,
    assemble_shapes_video,
    build_video_tokenizer,
    build_video_transformer,
    build_video_vae,
)


def _clip_tensor(frames: list) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(f) for f in frames]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(3, 0, 1, 2)


def _batch(rng: np.random.Generator, n: int, window: int) -> torch.Tensor:
    clips = []
    for _ in range(n):
        frames = render_clip(sample_training_clip(rng), int(rng.integers(1 << 31)))
        start = int(rng.integers(VIDEO_FRAMES - window + 1))
        clips.append(_clip_tensor(frames[start : start + window]))
    return torch.stack(clips)


def _log(work: Path, stage: str, info: dict) -> None:
    print(stage, json.dumps(info), flush=True)
    (work / f"{stage}.json").write_text(json.dumps(info, indent=2) + "\n")


def _frames_of(video: torch.Tensor) -> list[np.ndarray]:
    """(3, T, H, W) in [-1, 1] -> T uint8 frames."""
    return list(((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy())


def stage_vae(work: Path, steps: int, batch: int, seed: int, window: int, init: Path | None = None,
              lr: float = 1e-3) -> None:  # fmt: skip
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = (AutoencoderKLWan.from_pretrained(init, torch_dtype=torch.float32) if init else build_video_vae()).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    t0 = time.time()
    loss = torch.zeros(())
    for step in range(steps):
        x = _batch(rng, batch, window)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # The frames are mostly black background: weight the object pixels up, or the VAE settles
        # on drawing background only (a first run did).
        weight = 1.0 + 9.0 * (x.amax(dim=1, keepdim=True) > -0.8).float()
        err = rec - x
        loss = (weight * (err.abs() + err.square())).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / 100)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        if step % 50 == 0:
            print(f"vae step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    scenes = all_video_scenes(False, Split.SEEN)[:40]
    with torch.no_grad():
        ok = sum(judge_video(_frames_of(vae.decode(vae.encode(_clip_tensor(render_clip(s, i))[None]).latent_dist.mode()
                                                   ).sample[0]), s).correct for i, s in enumerate(scenes))  # fmt: skip
    vae.save_pretrained(work / "vae")
    _log(work, "vae", {"steps": steps, "seconds": time.time() - t0, "final_loss": loss.item(),
                       "judge_on_reconstructions": ok / len(scenes)})  # fmt: skip


def stage_latents(work: Path, n: int, seed: int, vae_from: Path | None = None, keep_scale: bool = False) -> None:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(vae_from or work / "vae", torch_dtype=torch.float32).eval()
    if vae_from is not None:
        vae.save_pretrained(work / "vae")  # the later stages read it from the work folder
    rng = np.random.default_rng(seed + 1)
    means, stds, prompts = [], [], []
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, n, 16):
            scenes = [sample_training_clip(rng) for _ in range(min(16, n - i))]
            x = torch.stack([_clip_tensor(render_clip(s, int(rng.integers(1 << 31)))) for s in scenes])
            d = vae.encode(x).latent_dist
            means.append(d.mean.half())
            stds.append(d.std.half())
            prompts += [s.prompt for s in scenes]
    mean = torch.cat(means)
    scale = 1.0 / mean.float().std().item()
    if keep_scale:  # a denoiser already trained on the old file continues on the same latent scale
        kept = work / "latent_scale.json"  # written by ``restore``
        scale = (float(json.loads(kept.read_text())["scale"]) if kept.is_file()
                 else float(torch.load(work / "latents.pt", weights_only=False)["scale"]))  # fmt: skip
    torch.save({"mean": mean, "std": torch.cat(stds), "prompts": prompts, "scale": scale}, work / "latents.pt")
    _log(work, "latents", {"clips": n, "seconds": time.time() - t0})


class _EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay, self.modules = decay, modules
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, m in zip(self.shadow, self.modules, strict=True):
            for ps, pm in zip(s.parameters(), m.parameters(), strict=True):
                ps.lerp_(pm.detach(), 1 - d)


def _modules(work: Path, arch: dict[str, int] | None = None) -> tuple[object, torch.nn.Module, torch.nn.Module]:
    """Tokenizer, text encoder and denoiser; the denoiser's size (heads, layers, ffn) is recorded
    in ``W/dit_arch.json`` the first time, so resuming and finishing build the same one."""
    tok = build_video_tokenizer(work / "tokenizer")
    encoder = build_t5_encoder(tok, 64, umt5=True)
    path = work / "dit_arch.json"
    if path.is_file():
        arch = json.loads(path.read_text())
    elif arch is not None:
        path.write_text(json.dumps(arch) + "\n")
    return tok, encoder, build_video_transformer(encoder.config.d_model, **(arch or {}))


def stage_dit(work: Path, steps: int, batch: int, seed: int, minutes: float, resume: bool, ckpt_every: int,
              lr: float, init_from: Path | None = None, bf16: bool = False,
              arch: dict[str, int] | None = None, posterior_mean: bool = False,
              sigma_shift: float | None = None, compile_step: bool = False) -> None:  # fmt: skip
    from diffusers import AutoencoderKLWan

    data = torch.load(work / "latents.pt", weights_only=False)
    mean, std, prompts, scale = data["mean"], data["std"], data["prompts"], data["scale"]
    _, encoder, transformer = _modules(work, arch)
    pipe = assemble_shapes_video(work, AutoencoderKLWan.from_pretrained(work / "vae"), transformer, encoder)
    if init_from is not None and not resume:  # continue from a saved pipeline folder's weights
        from diffusers import WanTransformer3DModel
        from transformers import UMT5EncoderModel

        encoder.load_state_dict(UMT5EncoderModel.from_pretrained(init_from / "text_encoder").float().state_dict())
        transformer.load_state_dict(
            WanTransformer3DModel.from_pretrained(init_from / "transformer").float().state_dict()
        )
    if sigma_shift is None:  # the sampler's own shift, so training covers the sigmas it visits
        sigma_shift = float(pipe.scheduler.config.shift)
    modules = [encoder.train(), transformer.train()]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = _EMA(modules, 0.999)
    ckpt_path, offset, warm_from = work / "dit_ckpt.pt", 0, 0
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=True)
        for m, sd in zip(modules, ckpt["modules"], strict=True):
            m.load_state_dict(sd)
        for m, sd in zip(ema.shadow, ckpt["ema"], strict=True):
            m.load_state_dict(sd)
        if "opt" in ckpt:
            opt.load_state_dict(ckpt["opt"])
        else:  # restored from a snapshot, which keeps no optimizer moments: warm the rate up again
            warm_from = int(ckpt["step"])
        offset = int(ckpt["step"])
    gen = np.random.default_rng(seed + offset)
    torch.manual_seed(seed + offset)
    # torch.compile of the denoiser: 1.4 s instead of 1.7 s a step (batch 16, bf16) on the 2-core
    # EPYC; the checkpoint holds the plain module's weights, which the compiled one shares
    forward = torch.compile(transformer) if compile_step else transformer
    t0 = time.time()

    def save(step: int) -> None:
        # Written whole, then renamed: a run killed mid-write (a session's end) keeps the last checkpoint.
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"modules": [m.state_dict() for m in modules], "ema": [m.state_dict() for m in ema.shadow],
                    "opt": opt.state_dict(), "step": step}, tmp)  # fmt: skip
        tmp.replace(ckpt_path)

    step = offset
    loss = torch.zeros(())
    for step in range(offset, steps):
        if minutes and time.time() - t0 > minutes * 60:
            break
        idx = gen.integers(len(prompts), size=batch)
        ii = torch.from_numpy(idx)
        # the posterior's mean alone gives sharper targets: its noise is ~30% of a latent's variance
        noise = 0.0 if posterior_mean else std[ii].float() * torch.randn(mean[ii].shape)
        z0 = (mean[ii].float() + noise) * scale
        text = ["" if gen.random() < 0.1 else prompts[i] for i in idx]
        emb, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=VIDEO_TEXT_LENGTH,
                                    device=torch.device("cpu"))  # fmt: skip
        sigma = torch.sigmoid(torch.randn(batch))
        # shifted as the sampler's schedule is (FlowMatchEulerDiscreteScheduler(shift)): with the
        # plain logit-normal, sigmas above 0.97 (where the sampler's first steps lay out the clip and
        # its motion) were almost never trained, and samples came out static
        sigma = sigma_shift * sigma / (1 + (sigma_shift - 1) * sigma)
        s = sigma.view(-1, 1, 1, 1, 1)
        eps = torch.randn_like(z0)
        # bf16 autocast (fp32 master weights) makes a step about 1.3x faster on CPUs with avx512_bf16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = forward(hidden_states=(1 - s) * z0 + s * eps, timestep=sigma * 1000,
                               encoder_hidden_states=emb, return_dict=False)[0]  # fmt: skip
        loss = F.mse_loss(pred.float(), eps - z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for group in opt.param_groups:
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))
            group["lr"] = lr * min(1.0, (step - warm_from + 1) / 200) * cosine
        ema.update(step)
        if step % 50 == 0:
            print(f"dit step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % ckpt_every == 0:
            save(step + 1)
    save(step + 1)
    _log(work, "dit", {"step": step + 1, "seconds_this_run": time.time() - t0, "final_loss": loss.item(),
                       "resumed_from_step": offset or None, "sigma_shift": sigma_shift})  # fmt: skip


def _trained_pipeline(work: Path, weights: str = "ema") -> tuple[Any, int]:
    """The pipeline assembled from W/dit_ckpt.pt's EMA (or raw: ``weights="raw"``) weights, and the
    step it was saved at."""
    from diffusers import AutoencoderKLWan

    _, encoder, transformer = _modules(work)
    ckpt = torch.load(work / "dit_ckpt.pt", weights_only=True)  # replaced whole, so safe mid-training
    states = ckpt["ema"] if weights == "ema" else ckpt["modules"]
    encoder.load_state_dict(states[0])
    transformer.load_state_dict(states[1])
    vae = AutoencoderKLWan.from_pretrained(work / "vae")
    # the denoiser learnt latents times the training scale; WanPipeline multiplies its output by the
    # VAE's latents_std before decoding, so that is where the inverse scale belongs
    scale = float(torch.load(work / "latents.pt", weights_only=False)["scale"])
    vae.register_to_config(latents_std=[1.0 / scale] * vae.config.z_dim)
    pipe = assemble_shapes_video(work, vae, transformer.eval(), encoder.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe, int(ckpt["step"])


def _quick_eval(
    pipe: Any, n_eval: int, steps: int, strip: Path | None = None, guidance: float = 5.0
) -> dict[str, float]:
    """Judged accuracy on ``n_eval`` scenes per set at ``steps`` and classifier-free ``guidance``;
    ``strip``: also save frames 0, 5, 10, 15 of each clip, one row per clip."""
    results, rows = {}, []
    for label, pairs, split in (("single", False, Split.SEEN), ("single_heldout", False, Split.HELDOUT),
                                ("pairs", True, Split.SEEN)):  # fmt: skip
        scenes = all_video_scenes(pairs, split)
        picks = [scenes[i] for i in np.random.default_rng(1).permutation(len(scenes))[:n_eval]]
        g = torch.Generator().manual_seed(1000)
        out_frames = pipe([s.prompt for s in picks], num_frames=VIDEO_FRAMES - 1, height=64, width=64,
                          num_inference_steps=steps, max_sequence_length=VIDEO_TEXT_LENGTH, guidance_scale=guidance,
                          generator=g, output_type="np").frames  # fmt: skip
        clips = [[(f * 255).round().astype(np.uint8) for f in clip] for clip in out_frames]
        verdicts = [judge_video(c, s) for c, s in zip(clips, picks, strict=True)]
        results[label] = sum(v.correct for v in verdicts) / len(picks)
        for attr in ("color", "shape", "motion"):  # which attribute the misses are
            oks = [getattr(o, f"{attr}_ok") for v in verdicts for o in v.objects]
            results[f"{label}_{attr}"] = sum(map(bool, oks)) / max(len(oks), 1)
        rows += [np.concatenate([c[i] for i in (0, 5, 10, 15)], axis=1) for c in clips]
    if strip is not None:
        from PIL import Image

        Image.fromarray(np.concatenate(rows, axis=0)).save(strip)
    return results


def stage_eval(work: Path, n_eval: int, steps: int, weights: str = "ema", guidance: float = 5.0) -> None:
    """Judge the current checkpoint's EMA or raw weights (while training runs) and keep a frame strip."""
    pipe, trained = _trained_pipeline(work, weights)
    results = _quick_eval(pipe, n_eval, steps, work / f"eval_{trained}_{weights}_g{guidance:g}.png", guidance)
    info = {"quick_eval": results, "steps": steps, "trained_steps": trained, "prompts_per_set": n_eval,
            "weights": weights, "guidance": guidance}  # fmt: skip
    with (work / "eval_history.jsonl").open("a") as history:  # one line per judged checkpoint
        history.write(json.dumps(info) + "\n")
    _log(work, "eval", info)


def stage_finish(work: Path, out: Path, n_eval: int, steps: int, weights: str = "ema", guidance: float = 5.0) -> None:
    """Judge the chosen weights and save the pipeline in float16 under ``out/shapes-video``."""
    pipe, trained = _trained_pipeline(work, weights)
    results = _quick_eval(pipe, n_eval, steps, guidance=guidance)
    print("shapes-video quick eval:", results, flush=True)
    pipe.to(torch.float16).save_pretrained(out / "shapes-video")
    _log(work, "finish", {"quick_eval": results, "steps": steps, "trained_steps": trained, "weights": weights,
                          "guidance": guidance})  # fmt: skip


def stage_snapshot(work: Path, snapshot: Path) -> None:
    """Keep the training state small enough to commit: the VAE and the raw and EMA weights of the
    text encoder and denoiser in float16 (no optimizer moments; ``restore`` warms the rate up again)
    and the latent scale. A session's files outside the repository do not outlive it."""
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file

    ckpt = torch.load(work / "dit_ckpt.pt", weights_only=True)
    tensors = {f"{kind}.{name}.{key}": value.half().contiguous()
               for kind in ("modules", "ema") for name, sd in zip(("encoder", "transformer"), ckpt[kind], strict=True)
               for key, value in sd.items()}  # fmt: skip
    snapshot.mkdir(parents=True, exist_ok=True)
    AutoencoderKLWan.from_pretrained(work / "vae").to(torch.float16).save_pretrained(snapshot / "vae")
    save_file(tensors, snapshot / "dit.safetensors")
    scale = float(torch.load(work / "latents.pt", weights_only=False)["scale"])
    state = {"step": int(ckpt["step"]), "arch": json.loads((work / "dit_arch.json").read_text()), "scale": scale}
    (snapshot / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    print(f"snapshot of step {state['step']} in {snapshot}", flush=True)


def stage_restore(work: Path, snapshot: Path) -> None:
    """A work folder from a snapshot; then run ``latents --keep-scale`` and ``dit --resume``."""
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file

    state = json.loads((snapshot / "state.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    AutoencoderKLWan.from_pretrained(snapshot / "vae", torch_dtype=torch.float32).save_pretrained(work / "vae")
    (work / "dit_arch.json").write_text(json.dumps(state["arch"]) + "\n")
    (work / "latent_scale.json").write_text(json.dumps({"scale": state["scale"]}) + "\n")
    tensors = load_file(snapshot / "dit.safetensors")
    ckpt: dict[str, Any] = {"step": state["step"]}
    for kind in ("modules", "ema"):
        ckpt[kind] = [{k.split(".", 2)[2]: v.float() for k, v in tensors.items() if k.startswith(f"{kind}.{name}.")}
                      for name in ("encoder", "transformer")]  # fmt: skip
    torch.save(ckpt, work / "dit_ckpt.pt")
    print(f"restored step {state['step']} into {work}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="vae,latents,dit,finish")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("diffkiln/zoo/weights"))
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--vae-window", type=int, default=5, help="frames per VAE training window")
    ap.add_argument("--vae-init", type=Path, help="vae: continue from this AutoencoderKLWan folder")
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--n-data", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--minutes", type=float, default=0.0, help="cap the dit stage's time (0: none)")
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="dit: bfloat16 autocast (fp32 master weights)")
    ap.add_argument("--compile", action="store_true", help="dit: torch.compile the denoiser (about 1.2x a step)")
    ap.add_argument("--heads", type=int, default=3, help="dit: attention heads of 32 (recorded in W/dit_arch.json)")
    ap.add_argument("--layers", type=int, default=4, help="dit: Wan blocks")
    ap.add_argument("--ffn", type=int, default=192, help="dit: MLP width")
    ap.add_argument("--posterior-mean", action="store_true", help="dit: train on the VAE posterior's mean")
    ap.add_argument("--sigma-shift", type=float, default=None,
                    help="dit: shift the logit-normal training sigmas as the sampler's schedule is (default: the "
                    "pipeline scheduler's own shift; 1: plain logit-normal)")  # fmt: skip
    ap.add_argument("--keep-scale", action="store_true", help="latents: keep W/latents.pt's latent scale")
    ap.add_argument("--snapshot", type=Path, default=Path("tools/checkpoints/shapes-video"),
                    help="snapshot/restore: the committed training state's folder")  # fmt: skip
    ap.add_argument("--eval-size", type=int, default=20)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--eval-weights", choices=("ema", "raw"), default="ema",
                    help="eval and finish: the EMA weights or the raw (trained) ones")  # fmt: skip
    ap.add_argument("--eval-guidance", type=float, default=5.0, help="eval and finish: classifier-free guidance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-from", type=Path, help="latents: encode with this AutoencoderKLWan folder")
    ap.add_argument("--init-from", type=Path, help="dit: start from this pipeline folder's weights")
    ap.add_argument("--save-vae", type=Path, help="vae: also save the trained VAE here in float16")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    stages = a.stage.split(",")
    if "restore" in stages:
        stage_restore(a.work, a.snapshot)
    if "vae" in stages:
        stage_vae(a.work, a.vae_steps, a.vae_batch, a.seed, a.vae_window, a.vae_init, a.vae_lr)
    if a.save_vae is not None:
        from diffusers import AutoencoderKLWan

        AutoencoderKLWan.from_pretrained(a.work / "vae").to(torch.float16).save_pretrained(a.save_vae)
    if "latents" in stages:
        stage_latents(a.work, a.n_data, a.seed, a.vae_from, a.keep_scale)
    if "dit" in stages:
        arch = {"heads": a.heads, "layers": a.layers, "ffn": a.ffn}
        stage_dit(a.work, a.steps, a.batch, a.seed, a.minutes, a.resume, a.ckpt_every, a.lr, a.init_from, a.bf16,
                  arch, a.posterior_mean, a.sigma_shift, a.compile)  # fmt: skip
    if "eval" in stages:
        stage_eval(a.work, a.eval_size, a.eval_steps, a.eval_weights, a.eval_guidance)
    if "snapshot" in stages:
        stage_snapshot(a.work, a.snapshot)
    if "finish" in stages:
        stage_finish(a.work, a.out, a.eval_size, a.eval_steps, a.eval_weights, a.eval_guidance)


if __name__ == "__main__":
    main()
