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
