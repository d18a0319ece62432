#!/usr/bin/env bash
# GPU checks and benchmarks: the CUDA tests (bf16 autocast, fused SDPA kernels, torch.compile with
# fullgraph=True in eval and training, `sret train` on the GPU), then `sret bench` of sret_t,
# sret_t_noslice and sret_s against timm's deit_tiny and pit_ti. Logs go to $OUT (default gpu-logs/).
#
#   bash benchmarks/gpu.sh [tests|eager|compile|all]      (default all)
set -euo pipefail
what=${1:-all}
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c 'import torch, timm, sret; print("torch", torch.__version__, "timm", timm.__version__, torch.cuda.get_device_name())'

bench() {  # bench LOGNAME ARGS...: one `sret bench` run, table to the terminal and the log
    local log=$1
    shift
    python3 -m sret bench sret_t sret_t_noslice sret_s --device cuda --batch 256 --warmup 5 --repeats 30 "$@" \
        2>&1 | tee "$out/$log.log"
}

if [[ $what == tests || $what == all ]]; then
    python3 -m pytest -q -rs tests/test_cuda.py 2>&1 | tee "$out/tests.log"
fi
if [[ $what == eager || $what == all ]]; then
    bench infer-fp32
    bench infer-bf16 --amp bf16
    bench train-bf16 --amp bf16 --train
fi
if [[ $what == compile || $what == all ]]; then
    bench infer-bf16-compile --amp bf16 --compile
    bench train-bf16-compile --amp bf16 --train --compile
fi
