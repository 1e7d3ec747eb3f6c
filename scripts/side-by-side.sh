# Sourced by the scripts that time glimpse beside transformers: the tools they need, checked once.
# Environment: GLIMPSE (default target/release/glimpse), PYTHON (default python3). Installs nothing.
glimpse=${GLIMPSE:-target/release/glimpse}
python=${PYTHON:-python3}
if [ ! -x "$glimpse" ]; then
  echo "no glimpse binary at $glimpse: run 'cargo build --release' or set GLIMPSE" >&2
  exit 2
fi
if ! "$python" -c 'import torch, transformers' 2>/dev/null; then
  echo "torch and transformers are missing for $python: pip install -r golden/requirements.txt (or set PYTHON)" >&2
  exit 2
fi

# Runs the transformers side (`python -c CODE ARGS...`) and prints the last line it printed (its
# JSON). When it fails, what Python said goes to stderr and the calling script stops (`set -e`):
# a missing package or a checkpoint transformers cannot load is said, not hidden.
transformers_json() {
  local err out
  err=$(mktemp)
  if ! out=$("$python" -c "$@" 2>"$err"); then
    echo "transformers failed ($python):" >&2
    tail -n 20 "$err" >&2
    rm -f "$err"
    return 1
  fi
  rm -f "$err"
  printf '%s\n' "$out" | tail -n 1
}
