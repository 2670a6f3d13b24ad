"""Shared fixtures. Everything runs offline: no hub access is ever attempted."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests never touch the user's cache: calibration statistics and tiny models go to a temp dir,
# removed when the process ends (each xdist worker has its own).
os.environ["DIFFKILN_CACHE"] = tempfile.mkdtemp(prefix="diffkiln-test-cache-")
atexit.register(shutil.rmtree, os.environ["DIFFKILN_CACHE"], ignore_errors=True)
# Without a GPU, Triton kernels run in Triton's CPU interpreter. Triton reads this when it (and each
# @jit function) is first imported, so it is set for the whole session, before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist each worker takes one core's share of threads, so workers do not oversubscribe.
if os.environ.get("PYTEST_XDIST_WORKER"):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# The longest modules (each a minute or more of one worker, from ``--durations=0``), longest first.
# ``make test`` gives each worker a whole module (``--dist loadscope --no-loadscope-reorder``), in
# collection order: a long module taken last would leave the other worker idle until it ends.
LONG_MODULES_FIRST = (
    "tests/matrix/test_matrix.py",
    "tests/export/test_onnx_cache.py",
    "tests/test_cli_first_hour.py",
    "tests/runtime/test_sparse_bundle.py",
    "tests/export/test_onnx.py",
    "tests/optimizer/test_sparse_under_cache.py",
    "tests/test_readme_walk.py",
)

# Modules that share a costly session fixture run as one work unit, on one worker, which builds it
# once (each worker is its own session): tests/export/conftest.py's ``unet_onnx``, a whole-pipeline
# ONNX export with dynamic axes.
SHARED_WORK_UNITS = {"tests/export/test_onnx_cli.py": "tests/export/test_onnx.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under ``--dist loadscope``, a scheduler that maps each module of :data:`SHARED_WORK_UNITS`
    to its partner's work unit; other modes keep xdist's own (None)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SHARED_WORK_UNITS.get(scope, scope)

    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is present (CI never has one), and tests marked
    ``slow`` unless ``DIFFKILN_SLOW=1`` (``make test-slow``), which keeps CI's suite short; put the
    modules of :data:`LONG_MODULES_FIRST` first (a stable sort: the rest keep their order)."""
    rank = {module: i for i, module in enumerate(LONG_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
    gpu = pytest.mark.skip(reason="needs a CUDA device")
    slow = pytest.mark.skip(reason="slow: run with DIFFKILN_SLOW=1 (make test-slow)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(gpu)
        if "slow" in item.keywords and os.environ.get("DIFFKILN_SLOW") != "1":
            item.add_marker(slow)


@pytest.fixture(scope="session")
def shapes_pipelines() -> dict[str, object]:
    """Both built-in pipelines, loaded once per session (float32, CPU)."""
    from diffkiln.generation import load_pipeline

    return {name: load_pipeline(name) for name in ("shapes-unet", "shapes-dit")}


@pytest.fixture(scope="session")
def random_shapes_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Untrained pipelines of both built-in architectures (fast, independent of trained weights)."""
    from diffkiln.zoo.shapes_models import (
        assemble_shapes_dit,
        assemble_shapes_unet,
        build_sd3_transformer,
        build_t5_encoder,
        build_t5_tokenizer_for_shapes,
        build_text_encoder,
        build_tokenizer,
        build_unet,
        build_vae,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("random-pipes")
    tok = build_tokenizer(root / "tok")
    t5tok = build_t5_tokenizer_for_shapes(root / "t5")
    vae = build_vae()
    unet = assemble_shapes_unet(vae, tok, build_text_encoder(tok, 64), build_unet())
    dit = assemble_shapes_dit(
        vae,
        tok,
        build_text_encoder(tok, 32, 32),
        build_text_encoder(tok, 32, 32),
        t5tok,
        build_t5_encoder(t5tok),
        build_sd3_transformer(),
    )
    return {"unet": unet, "dit": dit}


@pytest.fixture(scope="session")
def random_unet_folder(random_shapes_pipelines, tmp_path_factory: pytest.TempPathFactory):
    """The untrained SD1.5-class pipeline saved as a local diffusers folder."""
    path = tmp_path_factory.mktemp("random-unet-folder") / "pipe"
    random_shapes_pipelines["unet"].save_pretrained(path)
    return path
