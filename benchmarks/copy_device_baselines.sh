#!/usr/bin/env bash
# Copy the project's stock GPU baselines (../shared/device: gpu_baseline.py, ar_generate_baseline.py, README.md)
# into .device/ (git-ignored), because ../shared does not travel to the GPU machine; benchmarks/gpu_all.sh runs
# them from there. Also checks that .whl/ (the wheels the GPU image lacks) is present.
#
#   bash benchmarks/copy_device_baselines.sh            # from the repository root, on this machine
#   SHARED=/path/to/shared/device bash benchmarks/copy_device_baselines.sh
#
# Then the device call carries ".whl" and ".device" (see the top of benchmarks/gpu_all.sh).
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared/device}
mkdir -p "$ROOT/.device"
for f in gpu_baseline.py ar_generate_baseline.py README.md; do
  cp "$SHARED/$f" "$ROOT/.device/$f"
  chmod u+w "$ROOT/.device/$f"
done
echo "copied into $ROOT/.device: $(ls "$ROOT/.device" | tr '\n' ' ')"
if ls "$ROOT"/.whl/*.whl > /dev/null 2>&1; then
  echo ".whl: $(ls "$ROOT"/.whl/*.whl | wc -l) wheels"
else
  echo ".whl is missing: run $SHARED/make_wheels.sh from the repository root first" >&2
  exit 1
fi
git -C "$ROOT" check-ignore -q .device/README.md || echo "warning: .device/ is not git-ignored (add /.device/ to .gitignore)" >&2
