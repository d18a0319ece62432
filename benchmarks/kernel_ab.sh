#!/usr/bin/env bash
# Interleaved A/B of two checkouts: OLD (a git worktree of the old commit) against NEW, `sret bench sret_t --batch 32`,
# ROUNDS rounds, old first on odd rounds and new first on even ones, each run a separate process.
# usage: OLD=DIR NEW=DIR benchmarks/kernel_ab.sh OUTDIR ROUNDS MODE...   (MODE: inf, train, bf16inf, bf16train)
# (NEW holds the virtual environment; summarise with python benchmarks/kernel_ab.py OUTDIR)
out=$1; rounds=$2; shift 2; mkdir -p $out
for r in $(seq 1 $rounds); do
  order="old new"; [ $((r % 2)) -eq 0 ] && order="new old"
  for mode in "$@"; do
    flags=""
    case $mode in train) flags="--train";; bf16inf) flags="--amp bf16";; bf16train) flags="--train --amp bf16";; esac
    for v in $order; do
      src=$NEW/src; [ $v = old ] && src=$OLD/src
      PYTHONPATH=$src $NEW/.venv/bin/sret bench sret_t --batch 32 --no-reference --no-memory --warmup 2 --repeats 5 $flags --json > $out/$mode-$v-r$r.json 2>/dev/null
      python3 -c "import json; d=json.load(open('$out/$mode-$v-r$r.json')); r=d['rows'][0]; print('$mode', '$v', $r, round(r['latency_ms'],1), round(r['gflops'],1), round(d['matmul_peak_gflops'],1))"
    done
  done
done
