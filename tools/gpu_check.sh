#!/usr/bin/env bash
# The CUDA check of issue 28, prepared for a lent GPU machine (device tool), in two calls that fit
# its 10-minute limit and 15 minutes of device time. Results land in $OUT (the device tool brings
# them back); each step has its own timeout, so one that hangs cannot take the rest with it.
#
#   tools/gpu_check.sh wheels        # here, on the CPU: download what the device image lacks into .whl
#   tools/gpu_check.sh prepare       # here, on the CPU: build the three shapes bundles into out/gpu-bundles
#   tools/gpu_check.sh correctness   # pytest -m gpu; the three bundles on cuda against the CPU
#   tools/gpu_check.sh bench         # tools/bench_gpu.py: SD1.5 at batches 2 and 16, then PixArt-alpha
#
# The device image has torch, triton, onnx and onnxruntime but neither diffusers nor our versions of
# transformers and huggingface_hub: they travel as wheels in .whl/ (the wheels stage; carry .whl and
# out/gpu-bundles, about 34 MB with the repository's 11). diffkiln itself runs from the tree.
# Dry run on a CPU machine: PY=.venv/bin/python NO_INSTALL=1 DEVICE=cpu tools/gpu_check.sh correctness
set -u
stage=${1:?usage: tools/gpu_check.sh wheels|prepare|correctness|bench}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -z "${NO_INSTALL:-}" ] && [ "$stage" != prepare ] && [ "$stage" != wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
"$PY" - <<'EOF' | tee "$OUT/env.txt"
import torch, diffusers, transformers
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "missing"
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda"
print(f"torch {torch.__version__}, {dev}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, triton {tv}")
EOF

B=out/gpu-bundles
BUNDLES=(shapes-unet-w8a8 shapes-unet-mixed shapes-dit-w8a8)
case "$stage" in
wheels)
  # On the CPU machine: what the device image lacks, for its Python 3.12 (carry .whl; it is ignored
  # through .git/info/exclude). pulp is left out: the bundles are searched here, not there.
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 transformers==5.25.0 huggingface_hub==2.4.0 httpx2==2.17.0 httpcore2==2.17.0 truststore \
    tomlkit kernels==0.19.1
  du -sh .whl
  ;;
prepare)
  # On the CPU machine, before the device call: the three bundles (carry out/gpu-bundles).
  for spec in "shapes-unet w8a8" "shapes-unet mixed --avg-weight-bits 4" "shapes-dit w8a8"; do
    set -- $spec
    model=$1; recipe=$2; shift 2
    "$PY" -m diffkiln.cli optimize "$model" --recipe "$recipe" "$@" --out "$B/$model-$recipe" --overwrite --no-progress
  done
  du -sh "$B"
  ;;
correctness)
  # 1. The gpu-marked tests: the int8 GEMM shape sweep (bit-exact), the fused static linear, the
  #    packed low-bit kernels, a move to cuda after a CPU run.
  timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/runtime -x 2>&1 \
    | tail -40 > "$OUT/pytest_gpu.txt"
  echo "pytest -m gpu: $(tail -1 "$OUT/pytest_gpu.txt")"
  # 2. Three bundles (built by the prepare stage, carried), each reported on cuda and on the CPU
  #    (content accuracy and latent SQNR against FP on the same device).
  for name in "${BUNDLES[@]}"; do
    [ -f "$B/$name/manifest.json" ] || { echo "no bundle $B/$name: run the prepare stage and carry $B"; continue; }
    for dev in "$DEVICE" cpu; do
      timeout 150 "$PY" -m diffkiln.cli report "$B/$name" --device "$dev" --eval-size "${EVAL_SIZE:-20}" --no-bos-comparison \
        --no-progress --out "$B/report-$name-$dev" > "$OUT/report-$name-$dev.log" 2>&1 \
        || { echo "report $name on $dev failed"; tail -5 "$OUT/report-$name-$dev.log"; continue; }
      cp "$B/report-$name-$dev/report.json" "$OUT/report-$name-$dev.json"
    done
  done
  "$PY" - "$OUT" <<'EOF' | tee "$OUT/bundles.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| bundle on device | content accuracy single / held-out / pairs | latent SQNR vs FP (dB) |")
print("|---|---|---|")
for f in sorted(out.glob("report-*.json")):
    r = json.loads(f.read_text())
    q = r.get("quality") or {}
    acc = " / ".join(str(q.get(k)) for k in ("content_accuracy", "content_accuracy_heldout", "content_accuracy_pairs"))
    print(f"| {f.stem[len('report-'):]} | {acc} | {(r.get('fidelity') or {}).get('latent_sqnr_db')} |")
EOF
  ;;
bench)
  timeout 330 "$PY" tools/bench_gpu.py --model sd15-unet --batches 2 16 --device "$DEVICE" --out "$OUT/bench.jsonl" \
    > "$OUT/bench-sd15.md" 2>"$OUT/bench-sd15.err"; tail -12 "$OUT/bench-sd15.md"
  timeout 200 "$PY" tools/bench_gpu.py --model pixart-alpha --batches 2 16 --device "$DEVICE" \
    --variants fp16 bf16 bf16-compile w8a8 w8a8-compile w4a16 --out "$OUT/bench.jsonl" \
    > "$OUT/bench-pixart.md" 2>"$OUT/bench-pixart.err"; tail -8 "$OUT/bench-pixart.md"
  ;;
*)
  echo "unknown stage $stage: correctness or bench"; exit 2 ;;
esac
