#!/usr/bin/env bash
# On a bare GPU machine with PyTorch/transformers/peft/accelerate installed: install the
# wheels carried in WHEEL_DIR (default build/whl) whose module is not importable there,
# into /tmp/site. Usage: source bench/device_setup.sh [WHEEL_DIR]
dir=${1:-build/whl}
want=()
for w in "$dir"/*.whl; do
  [ -e "$w" ] || continue
  name=$(basename "$w" | cut -d- -f1)
  case $name in rpds_py) mod=rpds ;; liger_kernel) mod=liger_kernel ;; *) mod=$name ;; esac
  python3 -c "import $mod" 2>/dev/null || want+=("$w")
done
if [ ${#want[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${want[@]}" \
    || return 1 2>/dev/null || exit 1
  echo "installed: ${want[*]##*/}"
fi
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY'
import importlib
for m in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "liger_kernel", "bitsandbytes", "pydantic"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), end="; ")
    except Exception as exc:  # noqa: BLE001
        print(m, "MISSING", type(exc).__name__, end="; ")
print()
PY
