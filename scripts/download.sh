#!/usr/bin/env bash
# Fetch the original server's BM1684X model: Qwen-7B-Chat int4 compiled for one chip, and its
# tokenizer folder, from Sophgo's public file server with `dfss` (as sophon-demo's Qwen sample does).
#
#   scripts/download.sh [DEST]
#
# DEST defaults to the repository root and receives what configs/bm1684x.yaml expects there:
#   DEST/models/BM1684X/qwen-7b_int4_1dev.bmodel
#   DEST/token_config/            (qwen.tiktoken, tokenizer_config.json)
# Idempotent: whatever is already in place is kept (delete it to fetch it again). Downloads go to a
# temporary folder first, so an interrupted run never leaves a partial file under the final name.
# Needs: python3 (or $PYTHON; the repo's .venv is used when present) with pip, unzip, and access to
# the Sophgo file server. The bmodel runs only on a BM1684X with its SDK (sophon-sail) installed.
set -euo pipefail

readonly BMODEL_URL="open@sophgo.com:sophon-demo/Qwen/qwen-7b_int4_1dev.bmodel"
readonly TOKEN_CONFIG_URL="open@sophgo.com:sophon-demo/Qwen/token_config.zip"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo_root}"
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x "$repo_root/.venv/bin/python" ]]; then
    python="$repo_root/.venv/bin/python"
else
    python="python3"
fi

info() { echo "download.sh: $*"; }
die() {
    echo "download.sh: error: $*" >&2
    exit 1
}

scratch=""
cleanup() { [[ -z "$scratch" ]] || rm -rf "$scratch"; }
trap cleanup EXIT

# Tools and the scratch folder are set up on the first download only: a complete DEST needs neither.
prepare() {
    [[ -z "$scratch" ]] || return 0
    require_tools
    mkdir -p "$dest"
    scratch="$(mktemp -d "$dest/.download.XXXXXX")" # same file system as DEST: the final mv is atomic
}

require_tools() {
    command -v "$python" >/dev/null 2>&1 || die "$python not found (set PYTHON to a Python 3 interpreter)"
    command -v unzip >/dev/null 2>&1 || die "unzip not found; install it first (e.g. apt-get install unzip)"
    if ! "$python" -c "import dfss" >/dev/null 2>&1; then
        info "installing dfss (Sophgo's download client) into $python"
        "$python" -m pip install --quiet dfss || die "pip could not install dfss; install it by hand: $python -m pip install dfss"
    fi
}

# fetch URL: download one file with dfss into the scratch folder, under its own name.
fetch() {
    local url="$1"
    local name="${url##*/}"
    prepare
    info "fetching ${url#*:} (this can take a while)"
    (cd "$scratch" && "$python" -m dfss --url="$url") || die "dfss failed to fetch $url (network? file server?)"
    [[ -s "$scratch/$name" ]] || die "dfss finished but $name is missing or empty: the file may have moved on the server"
}

get_bmodel() {
    local target="$dest/models/BM1684X/${BMODEL_URL##*/}"
    if [[ -s "$target" ]]; then
        info "$target exists, kept"
        return
    fi
    fetch "$BMODEL_URL"
    mkdir -p "$(dirname "$target")"
    mv "$scratch/${BMODEL_URL##*/}" "$target"
    info "saved $target"
}

get_token_config() {
    local target="$dest/token_config"
    if [[ -d "$target" ]]; then
        info "$target exists, kept"
        return
    fi
    local archive="${TOKEN_CONFIG_URL##*/}"
    fetch "$TOKEN_CONFIG_URL"
    unzip -q "$scratch/$archive" -d "$scratch/unpacked" || die "cannot unpack $archive"
    [[ -d "$scratch/unpacked/token_config" ]] || die "$archive holds no token_config folder"
    mv "$scratch/unpacked/token_config" "$target"
    info "saved $target"
}

main() {
    get_bmodel
    get_token_config
    info "done; serve it with: make run CONFIG=configs/bm1684x.yaml"
}

main
