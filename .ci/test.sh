#!/usr/bin/env bash
# The test command (make test): in order,
#  1. notebooks and library in sync (nbdev_export changes nothing)
#  2. notebooks clean (nbdev_clean changes nothing)
#  3. README.md in sync with nbs/index.ipynb
#  4. nbdev_test (every notebook runs top to bottom)
#  5. pytest (cross-cutting tests), whose summary line closes the output
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
t0=$(date +%s)
snap() { find nbs vlm_rlaif README.md -type f \( -name '*.ipynb' -o -name '*.py' -o -name '*.md' \) -not -path '*/.ipynb_checkpoints/*' -print0 | sort -z | xargs -0 md5sum; }
check_unchanged() {  # $1 = label, rest = command
  local label=$1; shift
  local before after
  before=$(snap); "$@" >/dev/null; after=$(snap)
  if [ "$before" != "$after" ]; then
    echo "FAIL: $label changed files:"; diff <(echo "$before") <(echo "$after") || true
    echo "Run '$*' and commit the result."; exit 1
  fi
  echo "ok: $label"
}
check_unchanged "nbdev_export (notebooks and library in sync)" nbdev_export
check_unchanged "nbdev_clean (notebooks clean)" nbdev_clean
check_unchanged "README.md from nbs/index.ipynb" python .ci/make_readme.py
echo "== nbdev_test"
nbdev_test --n_workers 2 --timing
echo "== pytest"
# tests/test_smol.py writes ~1.5 GB under the temp directory (removed when its tests end): say so up front when the
# disk is short, instead of letting safetensors fail mid-save with "No space left on device"
tmp_free_mib=$(df -Pm "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')
if [ "${tmp_free_mib:-0}" -lt 3072 ]; then
  echo "WARNING: only ${tmp_free_mib} MiB free in ${TMPDIR:-/tmp}; tests/test_smol.py needs ~1.5 GB (set TMPDIR elsewhere)"
fi
set +e
python -m pytest tests -q -p no:cacheprovider --durations=12
rc=$?
set -e
[ $rc -eq 5 ] && { echo "pytest: no tests collected"; rc=0; }
echo "total test time: $(( $(date +%s) - t0 )) s"
exit $rc
