#!/usr/bin/env bash
# The per-CPU speed tables of benchmarks/README.md: fp32 and bf16, inference and training, and the same
# CPU held to AVX2 (torch's, oneDNN's and MKL's kernels alike), each one interleaved `sret bench` run
# saved as JSON; the AVX2 runs also time SReT on torch's kernels alone (--compare-plain), so that a
# fast path slower than torch's shows. Resumable: a configuration whose JSON exists is not run again.
# Tabulate with benchmarks/cpu_tables.py.
#
#   benchmarks/cpu_suite.sh OUT_DIR [PATH/TO/SReT.py]
#
# With the authors' model file (github.com/szq0214/SReT, SReT.py; it needs `pip install einops`), its
# SReT_T is timed in the same runs as sret_t.
set -euo pipefail
out=$1
official=${2:-}
sret=${SRET:-sret}
mkdir -p "$out"
lscpu > "$out/lscpu.txt"
models=(sret_t sret_t_noslice)
extra=()
if [[ -n $official ]]; then
    models+=(SReT_T)
    extra=(--model-file "$official")
fi

run() {
    local name=$1
    shift
    [[ -s $out/$name.json ]] && return 0
    echo "$(date +%T) $name" >&2
    "$sret" bench "${models[@]}" "${extra[@]}" --batch 32 --no-memory --repeats 7 --warmup 2 --json "$@" \
        > "$out/$name.json.tmp"
    mv "$out/$name.json.tmp" "$out/$name.json"
}

run fp32_infer
run fp32_train --train
run bf16_infer --amp bf16
run bf16_train --train --amp bf16
avx2() { ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 run "$@" --compare-plain; }
avx2 avx2_fp32_infer
avx2 avx2_fp32_train --train
avx2 avx2_bf16_infer --amp bf16
