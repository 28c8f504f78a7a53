#!/usr/bin/env bash
# The project as a user installs it: a wheel built from this checkout's files (those git tracks or
# would track), installed (not editable) into a fresh venv outside the checkout, which sees the
# project venv's packages (torch, fairscale, ...) through a .pth file instead of downloading them;
# then, from a directory outside the checkout and without PYTHONPATH: every module of the installed
# packages imports from the venv, every launcher answers --help, and a tokenizer + a random
# tiny-llama checkpoint + a 4-token infer job run. 13 s on 2 idle cores (26 s on busy ones).
# Settings (environment): PY (the project venv's python, default .venv/bin/python), KEEP=1 keeps
# the working folder.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wheel_check.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "wheel check: working folder $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
SECONDS=0
mkdir -p "$WORK/src" "$WORK/run"

# 1. the sources, without this checkout's build/, *.egg-info or caches (setuptools would reuse a stale build/)
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -cf - -T - 2>/dev/null) | tar -xf - -C "$WORK/src"
else
    tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ -cf - . \
        | tar -xf - -C "$WORK/src"
fi

# 2. the wheel (setuptools and wheel of the project venv: nothing downloaded)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/cot_distill_engine-*.whl)

# 3. a fresh venv; the project venv's site-packages appended to its path, after its own
"$PY" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -c "import site; print('\n'.join(site.getsitepackages()))" > "$SITE/project_venv.pth"
"$PY" -m pip --python "$VPY" install -q --no-deps --no-index "$WHEEL"
"$PY" -m pip --python "$VPY" check

# 4. from outside the checkout
cd "$WORK/run"
export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
unset PYTHONPATH
"$VPY" - "$SITE" "$ROOT" <<'EOF'
import importlib, os, pkgutil, sys

site, root = (os.path.realpath(p) for p in sys.argv[1:])
names = ["checkpoint_split", "train", "train_mcc", "train_implicit", "infer"]
for pkg in ("engine", "models", "data"):
    names.append(pkg)
    names += [m.name for m in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + ".")]
for name in names:
    module = importlib.import_module(name)
    for path in [module.__file__] if module.__file__ else list(module.__path__):  # data/: a namespace package
        path = os.path.realpath(path)
        assert path.startswith(site + os.sep) and not path.startswith(root + os.sep), (name, path)
print(f"wheel check: {len(names)} modules import from the installed wheel")
EOF
# fire prints help on stderr; each text must hold one of its launcher's flags or commands
for pair in train:--train_file train_mcc:--alpha train_implicit:mind_read infer:--max_new_tokens checkpoint_split:from_hf; do
    launcher=${pair%%:*} word=${pair#*:}
    "$VPY" -m "$launcher" --help > "help-$launcher.txt" 2>&1
    grep -q -- "$word" "help-$launcher.txt" || { echo "wheel check: $launcher --help lacks $word" >&2; exit 1; }
done
"$VPY" -m data.make_tokenizer --output tok.model
"$VPY" -m checkpoint_split init --model_type tiny-llama --save_dir ckpt --n 1 --tokenizer tok.model --seed 0
printf '%s\n' '{"instruction": "12 + 34 =", "label": "46"}' '{"instruction": "5 + 7 =", "label": "12"}' > data.jsonl
"$VPY" -m infer --ckpt_dir ckpt --data_file data.jsonl --output_file preds.jsonl --max_new_tokens 4 --task ARITH \
    --device cpu --progress False
"$VPY" - <<'EOF'
import json

lines = [json.loads(line) for line in open("preds.jsonl")]
assert [r["index"] for r in lines] == [0, 1] and all(isinstance(r["output"], str) for r in lines), lines
meta = json.load(open("preds.jsonl.meta.json"))
assert meta["complete"] and meta["summary"]["total"] == 2 and meta["summary"]["new_tokens"] <= 8, meta
EOF
echo "wheel check passed in ${SECONDS}s ($(basename "$WHEEL"))"
