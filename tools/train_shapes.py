"""Train the built-in shapes-unet and shapes-dit pipelines from scratch (seeded).

Stages, each resumable from the work folder:

1. ``data``: render N captioned images of *seen* compositions (multiprocess).
2. ``vae``: train the shared AutoencoderKL (L1 + MSE + tiny KL), set its scaling factor to
   1/std of the latents, and check that the judge still reads the reconstructions; or
   ``latents``: encode the data with an existing VAE (``--vae-from``) instead.
3. ``unet``: train CLIPTextModel + UNet2DConditionModel jointly (v-prediction on SD1.5's betas
   rescaled to zero terminal SNR, 10% empty-prompt dropout for classifier-free guidance, EMA).
4. ``dit``: train the two CLIP encoders + T5 encoder + SD3Transformer2DModel jointly
   (rectified flow, logit-normal sigmas, T5 prompts padded to 32 tokens, 10% empty-prompt
   dropout, EMA weights).

``unet`` and ``dit`` read only the data and the VAE, so they can run at the same time. Each saves
an ordinary diffusers folder (fp16 weights) under ``--out`` and prints a quick content evaluation
with the judge. ``--init-from DIR`` starts a denoiser stage from a pipeline folder's weights;
``--resume`` continues from ``W/<stage>_ckpt.pt``.

How the committed weights were made (2026-12-01, the CI-class machine: 2 CPU cores, no GPU,
torch 2.13.0 CPU), fine-tuning the 2026-11-23 weights:

    python tools/train_shapes.py --stage data,latents --work W --device cpu --n-data 20000 \
        --workers 2 --vae-from diffkiln/zoo/weights/shapes-unet/vae                      # 2 min
    python tools/train_shapes.py --stage unet --work W --device cpu --threads 1 --minutes 45 \
        --init-from diffkiln/zoo/weights/shapes-unet &                                   # 52 min
    python tools/train_shapes.py --stage dit --work W --device cpu --threads 1 --minutes 45 \
        --init-from diffkiln/zoo/weights/shapes-dit &                                    # 44 min
    python tools/train_shapes.py --stage unet --work W --device cpu --threads 2 --minutes 40 \
        --resume --steps 40000                                                           # 23 min

and on 2026-12-03 shapes-unet was fine-tuned from those weights with CLIP's BOS outlier built into
its text encoder (docs/models.md):

    python tools/train_shapes.py --stage unet --work W --out OUT --device cpu --threads 2 \
        --minutes 45 --lr 5e-4 --init-from diffkiln/zoo/weights/shapes-unet \
        --bos-massive-activation 37,100,40                                               # 39 min

The wall-clock time of each stage is printed and recorded in ``W/<stage>.json``; docs/models.md
has the figures and the measured quality. On a GPU the same script runs with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffkiln.zoo.outliers import BosMassiveActivation, blind_cross_attention, impose_bos_massive_activation
from diffkiln.zoo.shapes import (
    PromptSet,
    content_accuracy,
    eval_scenes,
    judge,
    render,
    sample_training_scene,
)
from diffkiln.zoo.shapes_models import (
    DIT_T5_LENGTH,
    assemble_shapes_dit,
    assemble_shapes_unet,
    build_sd3_transformer,
    build_t5_encoder,
    build_t5_tokenizer_for_shapes,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    ddpm_training_scheduler,
)

CFG_DROPOUT = 0.1
LR = 1e-3


def _render_chunk(args: tuple[int, int, int, float]) -> tuple[np.ndarray, list[str]]:
    start, count, seed, pair_fraction = args
    images, prompts = [], []
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        scene = sample_training_scene(rng, pair_fraction)
        images.append(np.asarray(render(scene, rng)))
        prompts.append(scene.prompt)
    return np.stack(images), prompts


def stage_data(work: Path, n: int, seed: int, workers: int, pair_fraction: float) -> None:
    t0 = time.time()
    chunk = 1000
    jobs = [(s, min(chunk, n - s), seed, pair_fraction) for s in range(0, n, chunk)]
    with mp.Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    images = np.concatenate([p[0] for p in parts])
    prompts = [q for p in parts for q in p[1]]
    np.save(work / "images.npy", images)
    (work / "prompts.json").write_text(json.dumps(prompts))
    _log(work, "data", {"n": n, "seconds": time.time() - t0})


def _load_data(work: Path) -> tuple[np.ndarray, list[str]]:
    return np.load(work / "images.npy"), json.loads((work / "prompts.json").read_text())


def _to_pixels(batch: np.ndarray, device: str) -> torch.Tensor:
    x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def stage_vae(work: Path, device: str, steps: int, batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    images, _ = _load_data(work)
    vae = build_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(200, steps))
    gen = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(steps):
        x = _to_pixels(images[gen.integers(len(images), size=batch)], device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"vae step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    with torch.no_grad():
        sample = images[:2048]
        lat = torch.cat(
            [vae.encode(_to_pixels(sample[i : i + 512], device)).latent_dist.mean for i in range(0, len(sample), 512)]
        )
        scale = 1.0 / lat.std().item()
        vae.register_to_config(scaling_factor=scale)
        # The judge must read reconstructions as well as the originals, or no denoiser can pass.
        _, prompts = _load_data(work)
        recon = vae.decode(lat[:500]).sample
        recon_img = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        acc = content_accuracy(list(recon_img), prompts[:500])
    vae.save_pretrained(work / "vae")
    with torch.no_grad():
        means, stds = [], []
        for i in range(0, len(images), 512):
            d = vae.encode(_to_pixels(images[i : i + 512], device)).latent_dist
            means.append(d.mean.cpu())
            stds.append(d.std.cpu())
    torch.save({"mean": torch.cat(means), "std": torch.cat(stds)}, work / "latents.pt")
    _log(
        work,
        "vae",
        {
            "steps": steps,
            "seconds": time.time() - t0,
            "scaling_factor": scale,
            "judge_on_reconstructions": acc,
            "final_loss": loss.item(),
        },
    )


def stage_latents(work: Path, vae_from: Path, device: str) -> None:
    """Encode the rendered data with an existing VAE (``--vae-from``) instead of training one."""
    from diffusers import AutoencoderKL

    t0 = time.time()
    images, _ = _load_data(work)
    vae = AutoencoderKL.from_pretrained(vae_from, torch_dtype=torch.float32).to(device).eval()
    vae.save_pretrained(work / "vae")
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 512):
            d = vae.encode(_to_pixels(images[i : i + 512], device)).latent_dist
            means.append(d.mean.cpu())
            stds.append(d.std.cpu())
    torch.save({"mean": torch.cat(means), "std": torch.cat(stds)}, work / "latents.pt")
    _log(work, "latents", {"vae_from": str(vae_from), "seconds": time.time() - t0})


def _init_from(modules: list[torch.nn.Module], folder: Path | None, names: list[str]) -> None:
    """Start a denoiser stage from the components of an earlier pipeline folder (fine-tuning)."""
    if folder is None:
        return
    from safetensors.torch import load_file

    for module, name in zip(modules, names, strict=True):
        files = sorted((folder / name).glob("*.safetensors"))
        state = {k: v.float() for f in files for k, v in load_file(f).items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        # Tied weights (T5's embed_tokens is `shared`) are saved once; anything else is a mismatch.
        own = module.state_dict()
        loaded = {own[k].data_ptr() for k in state if k in own}
        missing = [k for k in missing if own[k].data_ptr() not in loaded and "position_ids" not in k]
        if unexpected or missing:
            raise SystemExit(f"{folder / name}: missing {missing}, unexpected {unexpected}")


def _encode_dataset(work: Path, device: str) -> tuple[torch.Tensor, torch.Tensor, list[str], float]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / "vae")
    prompts = json.loads((work / "prompts.json").read_text())
    lat = torch.load(work / "latents.pt", weights_only=True)
    return lat["mean"].to(device), lat["std"].to(device), prompts, float(vae.config.scaling_factor)


class _EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.modules = modules

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, m in zip(self.shadow, self.modules, strict=True):
            for ps, pm in zip(s.parameters(), m.parameters(), strict=True):
                ps.lerp_(pm.detach(), 1 - d)


def _train_loop(
    name, work, device, steps, batch, seed, modules, loss_fn, minutes, resume=False, lr=LR, after_step=None
):
    """AdamW + warmup/cosine + EMA. With ``resume``, continue from ``work/<name>_ckpt.pt``
    (weights, EMA, optimizer) with a fresh cosine at half the peak learning rate. ``after_step``
    (no arguments) runs after every optimizer step, before the EMA update: a projection that keeps
    fixed structure (the BOS outlier) exactly in place."""
    ckpt_path = work / f"{name}_ckpt.pt"
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = _EMA(modules, 0.999)
    offset = 0
    if resume:
        ckpt = torch.load(ckpt_path, weights_only=True)
        for m, sd in zip(modules, ckpt["modules"], strict=True):
            m.load_state_dict(sd)
        for m, sd in zip(ema.shadow, ckpt["ema"], strict=True):
            m.load_state_dict(sd)
        opt.load_state_dict(ckpt["opt"])
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = lr / 2
        offset = int(ckpt["step"])
    torch.manual_seed(seed + offset)
    gen = np.random.default_rng(seed + offset)
    t0 = time.time()
    total = steps
    warmup = 50 if resume else 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, total))
    step = 0
    for step in range(steps):
        if step == 50 and minutes:
            # Fit the run into the time budget by shortening the cosine schedule.
            per_step = (time.time() - t0) / 50
            total = min(steps, int(minutes * 60 / per_step))
            sched.lr_lambdas[0] = _lr_lambda(warmup, total)
            print(f"{name}: {per_step * 1000:.1f} ms/step -> {total} steps", flush=True)
        if step >= total:
            break
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            loss = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        ema.update(offset + step)
        if step % 100 == 0:
            print(f"{name} step {offset + step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    torch.save(
        {
            "modules": [m.state_dict() for m in modules],
            "ema": [m.state_dict() for m in ema.shadow],
            "opt": opt.state_dict(),
            "step": offset + step,
        },
        ckpt_path,
    )
    info = {
        "steps": offset + step,
        "seconds_this_run": time.time() - t0,
        "final_loss": loss.item(),
        "resumed_from_step": offset if resume else None,
    }
    return ema.shadow, info


def _prompts_with_dropout(prompts: list[str], idx: np.ndarray, gen: np.random.Generator) -> list[str]:
    drop = gen.random(len(idx)) < CFG_DROPOUT
    return ["" if d else prompts[i] for i, d in zip(idx, drop, strict=True)]


def stage_unet(
    work: Path,
    out: Path,
    device: str,
    steps: int,
    batch: int,
    seed: int,
    minutes: float,
    n_eval: int,
    resume: bool = False,
    init_from: Path | None = None,
    lr: float = LR,
    bos: BosMassiveActivation | None = None,
) -> None:
    from diffusers import AutoencoderKL

    mean, std, prompts, scale = _encode_dataset(work, device)
    tok = build_tokenizer(work / "tokenizer")
    te = build_text_encoder(tok, 64).to(device).train()
    unet = build_unet().to(device).train()
    _init_from([te, unet], init_from, ["text_encoder", "unet"])
    after_step = None
    if bos is not None:
        # CLIP's BOS outlier, put in by construction and held fixed (trained CLIP learns it; a
        # 2.7M-parameter encoder on the shapes world does not). The cross-attentions start blind to
        # that channel, so the fine-tune begins from the old model's behaviour, then learn freely.
        impose_bos_massive_activation(te, bos)
        blind_cross_attention(unet, (bos.channel,))
        after_step = functools.partial(impose_bos_massive_activation, te, bos)
    noise_sched = ddpm_training_scheduler()
    acp = noise_sched.alphas_cumprod.to(device)

    def loss_fn(gen: np.random.Generator) -> torch.Tensor:
        idx = gen.integers(len(prompts), size=batch)
        ii = torch.from_numpy(idx).to(device)
        z0 = (mean[ii] + std[ii] * torch.randn_like(mean[ii])) * scale
        ids = tok(
            _prompts_with_dropout(prompts, idx, gen),
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        cond = te(ids)[0]
        t = torch.randint(0, 1000, (batch,), device=device)
        eps = torch.randn_like(z0)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        # v-prediction on a zero-terminal-SNR schedule: at the last step the target is -z0, so the
        # layout (where each object goes) is learnt from the prompt, not read off leftover signal.
        target = a.sqrt() * eps - (1 - a).sqrt() * z0
        return F.mse_loss(pred.float(), target)

    (te_ema, unet_ema), info = _train_loop(
        "unet", work, device, steps, batch, seed, [te, unet], loss_fn, minutes, resume, lr, after_step
    )
    if bos is not None:
        impose_bos_massive_activation(te_ema, bos)  # exact already (EMA of a constant); stated, not assumed
        info["bos_massive_activation"] = dataclasses.asdict(bos)
    vae = AutoencoderKL.from_pretrained(work / "vae")
    pipe = assemble_shapes_unet(vae, tok, te_ema, unet_ema)
    _finish("shapes-unet", pipe, out, work, device, info, 5.0, n_eval)


def stage_dit(
    work: Path,
    out: Path,
    device: str,
    steps: int,
    batch: int,
    seed: int,
    minutes: float,
    n_eval: int,
    resume: bool = False,
    init_from: Path | None = None,
    lr: float = LR,
) -> None:
    from diffusers import AutoencoderKL

    mean, std, prompts, scale = _encode_dataset(work, device)
    tok = build_tokenizer(work / "tokenizer_dit")
    t5tok = build_t5_tokenizer_for_shapes(work / "tokenizer_t5")
    te1 = build_text_encoder(tok, 32, 32).to(device).train()
    te2 = build_text_encoder(tok, 32, 32).to(device).train()
    t5 = build_t5_encoder(t5tok).to(device).train()
    tr = build_sd3_transformer().to(device).train()
    _init_from([te1, te2, t5, tr], init_from, ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer"])
    vae = AutoencoderKL.from_pretrained(work / "vae")
    # Build the pipeline around the live modules so training encodes prompts exactly as inference.
    pipe = assemble_shapes_dit(vae, tok, te1, te2, t5tok, t5, tr)
    shift = float(vae.config.shift_factor or 0.0)

    def loss_fn(gen: np.random.Generator) -> torch.Tensor:
        idx = gen.integers(len(prompts), size=batch)
        ii = torch.from_numpy(idx).to(device)
        z0 = (mean[ii] + std[ii] * torch.randn_like(mean[ii]) - shift) * scale
        text = _prompts_with_dropout(prompts, idx, gen)
        pe, _, pooled, _ = pipe.encode_prompt(
            text,
            None,
            None,
            device=torch.device(device),
            do_classifier_free_guidance=False,
            max_sequence_length=DIT_T5_LENGTH,
        )
        sigma = torch.sigmoid(torch.randn(batch, device=device))
        s = sigma.view(-1, 1, 1, 1)
        eps = torch.randn_like(z0)
        zt = (1 - s) * z0 + s * eps
        pred = tr(hidden_states=zt, timestep=sigma * 1000, encoder_hidden_states=pe, pooled_projections=pooled).sample
        return F.mse_loss(pred.float(), eps - z0)

    (te1_e, te2_e, t5_e, tr_e), info = _train_loop(
        "dit", work, device, steps, batch, seed, [te1, te2, t5, tr], loss_fn, minutes, resume, lr
    )
    final = assemble_shapes_dit(vae, tok, te1_e, te2_e, t5tok, t5_e, tr_e)
    _finish("shapes-dit", final, out, work, device, info, 5.0, n_eval, max_sequence_length=DIT_T5_LENGTH)


def _finish(
    name, pipe, out: Path, work: Path, device: str, info: dict, guidance: float, n_eval: int, **call_kwargs
) -> None:
    pipe = pipe.to(device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for ps in PromptSet:
        scenes = eval_scenes(ps, n_eval, seed=1)
        imgs = []
        for i in range(0, len(scenes), 100):
            chunk = [s.prompt for s in scenes[i : i + 100]]
            g = torch.Generator(device).manual_seed(1000 + i)
            imgs += list(
                pipe(
                    chunk, num_inference_steps=20, guidance_scale=guidance, generator=g, output_type="np", **call_kwargs
                ).images
            )
        imgs = [(im * 255).round().astype(np.uint8) for im in imgs]
        results[ps.value] = sum(judge(im, s).correct for im, s in zip(imgs, scenes, strict=True)) / len(scenes)
    print(name, "quick eval (20 steps):", results, flush=True)
    pipe.to("cpu", torch.float16).save_pretrained(out / name)
    _log(work, name, {**info, "quick_eval": results})


def _log(work: Path, stage: str, info: dict) -> None:
    print(stage, json.dumps(info), flush=True)
    (work / f"{stage}.json").write_text(json.dumps(info, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="data,vae,unet,dit", help="comma-separated stages to run")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for data and checkpoints")
    ap.add_argument("--out", type=Path, default=Path("diffkiln/zoo/weights"), help="where pipelines go")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-data", type=int, default=100_000, help="rendered training images")
    ap.add_argument("--pair-fraction", type=float, default=0.6, help="share of two-object scenes")
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20000, help="denoiser training steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=0.0, help="cap a denoiser stage's time (0: none)")
    ap.add_argument("--workers", type=int, default=mp.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue unet/dit from W/<stage>_ckpt.pt")
    ap.add_argument("--vae-from", type=Path, help="stage latents: encode the data with this VAE folder")
    ap.add_argument("--init-from", type=Path, help="unet/dit: start from this pipeline folder's weights")
    ap.add_argument("--lr", type=float, default=LR, help="peak learning rate of a denoiser stage")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--eval-size", type=int, default=200, help="prompts per set in the quick eval")
    ap.add_argument(
        "--bos-massive-activation",
        metavar="CHANNEL,RESIDUAL,GAIN",
        help="unet: give the CLIP text encoder CLIP's BOS outlier in this residual channel, of this "
        "residual size, amplified by this final-LayerNorm gain, held fixed while training "
        "(diffkiln.zoo.outliers.impose_bos_massive_activation); e.g. 37,100,40",
    )
    a = ap.parse_args()
    bos = None
    if a.bos_massive_activation:
        try:
            c, r, g = a.bos_massive_activation.split(",")
            bos = BosMassiveActivation(int(c), float(r), float(g))
        except ValueError as err:
            raise SystemExit(f"--bos-massive-activation wants CHANNEL,RESIDUAL,GAIN (e.g. 37,100,40): {err}") from err
    if a.threads:
        torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    for stage in a.stage.split(","):
        if stage == "data":
            stage_data(a.work, a.n_data, a.seed, a.workers, a.pair_fraction)
        elif stage == "latents":
            if a.vae_from is None:
                raise SystemExit("stage latents needs --vae-from VAE_FOLDER")
            stage_latents(a.work, a.vae_from, a.device)
        elif stage == "vae":
            stage_vae(a.work, a.device, a.vae_steps, a.vae_batch, a.seed)
        elif stage == "unet":
            stage_unet(
                a.work,
                a.out,
                a.device,
                a.steps,
                a.batch,
                a.seed,
                a.minutes,
                a.eval_size,
                a.resume,
                a.init_from,
                a.lr,
                bos,
            )
        elif stage == "dit":
            stage_dit(
                a.work, a.out, a.device, a.steps, a.batch, a.seed, a.minutes, a.eval_size, a.resume, a.init_from, a.lr
            )
        else:
            raise SystemExit(f"unknown stage {stage!r}; valid: data, latents, vae, unet, dit")


if __name__ == "__main__":
    main()
