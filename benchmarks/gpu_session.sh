#!/usr/bin/env bash
# One time-boxed benchmark session on a lent GPU machine: every GPU figure the README and NOTES.md still lack,
# in the order they matter, each step under its own time limit so a slow step costs only itself.
#
#   Here (once):   bash benchmarks/gpu_session.sh --fetch-wheels   # diffusers wheel into .whl/ (git-ignored)
#   There:         bash benchmarks/gpu_session.sh                   # carry .whl; results land in $OUT (or ./gpu-out)
#
# $OUT gets three files, rewritten after every step so a run cut off at its limit still returns what it finished:
# summary.md (the device, each step's exit code and table), runs.tar.gz (each step's JSON, table and log) and env.txt.
#
# The GPU machine has torch, transformers, accelerate, peft and safetensors but not diffusers: the carried wheel
# is installed into /tmp/site. Budget: at most 550 s of commands (run it with timeout_s=590), which with the
# machine's start fits 15 minutes of device time. Steps, each one `python -m benchmarks` run writing its own
# JSON and markdown:
#   1. txt2img, guidance interval, TAESD, prompt cache at full size (fp16, SDPA): the 150 ms / 1.5x targets
#   2. the same txt2img row in bf16, and with channels_last (NOTES.md items 1, 2)
#   3. tiled VAE rows at 2048² (exact and streamed vs diffusers' enable_tiling) and the 4096² ultra row (6 GB target)
#   4. tiled 2048² vs the panorama pipeline (5x target), one timed run each side
#   5. torch.compile on txt2img (NOTES.md item 3), last: its first compile can take minutes
set -uo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS=diffusers==0.42.1

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # pure-Python wheel: any platform; --no-deps because the GPU machine has the rest
    exec python3 -m pip download --no-deps --only-binary=:all: -d .whl "$DIFFUSERS"
fi

out=${OUT:-gpu-out}
work=$(mktemp -d)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! python3 -c "import diffusers" 2>/dev/null; then
    ls .whl/diffusers-*.whl >/dev/null 2>&1 || { echo "no diffusers here and no .whl/diffusers-*.whl: run" \
        "'bash benchmarks/gpu_session.sh --fetch-wheels' on the dev machine and carry .whl" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
device=${DEVICE:-cuda}
model=${MODEL:-sd15-random}
extra=(${EXTRA:-})  # e.g. EXTRA="--quick --size-scale 0.25" to try the script on a CPU with MODEL=tiny

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__)"; } | tee "$out/env.txt"
cp "$out/env.txt" "$out/summary.md"

step() {  # step NAME SECONDS ARGS...: one benchmark run under a time limit, then summary.md and runs.tar.gz
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" python3 -m benchmarks --device "$device" --model "$model" "${extra[@]}" \
        --json "$work/$name.json" --markdown "$work/$name.md" "$@" >"$work/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$work/$name.log"
    echo "== $name: exit $rc"
    { printf '\n## %s: `%s`, exit %s\n\n' "$name" "$*" "$rc"
      if [[ -s "$work/$name.md" ]]; then cat "$work/$name.md"; else tail -n 20 "$work/$name.log"; fi; } >>"$out/summary.md"
    tar -czf "$out/runs.tar.gz" -C "$work" .
}

step base 120 --cases txt2img,guidance,taesd,prompt-cache
step bf16 45 --cases txt2img --dtype bf16
step channels-last 45 --cases txt2img --channels-last
step vae-ultra 120 --cases vae,ultra --repeats 2
step tiled 120 --cases tiled --warmup 0 --repeats 1
step compile 100 --cases txt2img --compile
ls -la "$out"
rm -rf "$work"
