#!/usr/bin/env bash
# The fast part of the suite under every vector-kernel path torch offers on this CPU (ATEN_CPU_CAPABILITY
# unset, default, avx2, avx512; another CPU rounds like one of them) and with 1 and 2 torch threads: a
# verdict that depends on the machine's rounding fails here. Needs COMFY_PYTHON (make test-matrix sets it).
set -euo pipefail
py=${COMFY_PYTHON:?run through make test-matrix}
fast=(tests/ops tests/test_device_guard.py tests/test_exact_nodes.py -k "not test_exact_nodes or shooting or bit_for_bit or composes")
capabilities=(unset)
for capability in default avx2 avx512; do
  # torch falls back to a lower path where the CPU lacks one: run only the paths this CPU really has
  got=$(ATEN_CPU_CAPABILITY=$capability "$py" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
  if [ "${got,,}" = "$capability" ]; then
    capabilities+=("$capability")
  else
    echo "[test-matrix] ATEN_CPU_CAPABILITY=$capability: this CPU runs $got instead, skipped"
  fi
done
failed=()
for capability in "${capabilities[@]}"; do
  for threads in 1 2; do
    label="ATEN_CPU_CAPABILITY=$capability, $threads thread(s)"
    echo "[test-matrix] $label"
    env_args=(OMP_NUM_THREADS="$threads")
    [ "$capability" != unset ] && env_args+=(ATEN_CPU_CAPABILITY="$capability")
    if ! env "${env_args[@]}" "$py" -m pytest -q -p no:cacheprovider "${fast[@]}" ${PYTEST_ARGS:-}; then
      failed+=("$label")
    fi
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  printf '[test-matrix] failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "[test-matrix] passed under ${#capabilities[@]} kernel paths x 2 thread counts"
