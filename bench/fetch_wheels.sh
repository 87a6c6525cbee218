#!/usr/bin/env bash
# Fetch the wheels the device check installs offline (the H100 box has no network) into .whl/ (git-ignored),
# and stamp .whl/COMMIT with HEAD (the tree travels without .git; the results are named after that commit).
#   bash bench/fetch_wheels.sh            run it right before the device call, after committing
# nvidia-cutlass: the CUTLASS headers the build needs (pure Python wheel; its own Requires-Dist, cuda-python,
# networkx, scipy... are only for its Python generator, which the build never imports: find_spec finds the
# headers without importing the package). liger-kernel: a bench peer, pure Python; needs torch and triton,
# both in the box's image (triton 3.6.0, seen importing it with liger-kernel 0.8.5). Pinned so runs compare.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
WHEELS=(nvidia-cutlass==4.2.0.0 liger-kernel==0.8.5)
# one version of each only: two versions of one package stop the whole offline install
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  want=${spec#*==}
  for f in .whl/"${name//-/_}"-*.whl; do
    [[ -e $f && $f != .whl/"${name//-/_}-$want-"* ]] && rm -v -- "$f"
  done
done
# both are py3-none-any; the platform flags only make pip refuse anything built for another Python or system
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
if git rev-parse HEAD >/dev/null 2>&1; then
  dirty=$([[ -n $(git status --porcelain --untracked-files=no) ]] && echo " dirty" || true)
  echo "$(git rev-parse HEAD)$dirty" >.whl/COMMIT
  echo "stamped .whl/COMMIT: $(cat .whl/COMMIT)"
  [[ -n $dirty ]] && echo "note: uncommitted changes to tracked files travel too; commit first so the stamp names them"
fi
ls -la .whl
du -sh .whl
