#!/usr/bin/env bash
# Download CIFAR-100 and/or CIFAR-10 (the python version), verify the archive's md5 and
# extract it under DATA_ROOT (default ./datasets, where main.py looks).
#
#   bash download_data.sh [cifar100|cifar10|all]        (default: cifar100)
#
# A dataset this script has downloaded and verified is not fetched again. Nothing
# partial is ever left under its real name: the archive is downloaded and extracted
# under hidden temporary names in DATA_ROOT, which are removed on failure or
# interruption, and the dataset folder is renamed into place only when complete.
#
# Environment: DATA_ROOT; CIFAR100_URL, CIFAR100_MD5, CIFAR10_URL, CIFAR10_MD5 (another
# mirror, or a test archive); DOWNLOADER=curl|wget|python (default: curl if it exists,
# else wget, else Python).
set -euo pipefail

DATA_ROOT=${DATA_ROOT:-./datasets}
CIFAR100_URL=${CIFAR100_URL:-https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz}
CIFAR100_MD5=${CIFAR100_MD5:-eb9058c3a382ffc7106e4002c42a8d85}
CIFAR10_URL=${CIFAR10_URL:-https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz}
CIFAR10_MD5=${CIFAR10_MD5:-c58f30108f718f92721af3b95e74349a}
MARKER=.verified-md5   # written into a dataset folder by this script: the archive's md5

fail() {
    echo "error: $*" >&2
    exit 1
}

# ---- temporary files: removed whatever happens --------------------------------------------
TEMPS=()
CHILD=
cleanup() {
    if [[ -n $CHILD ]]; then kill "$CHILD" 2>/dev/null || true; fi
    rm -rf "${TEMPS[@]}"
}
interrupted() {
    cleanup
    echo "error: interrupted by $1; nothing was kept" >&2
    exit "$2"
}
trap cleanup EXIT
trap 'interrupted SIGINT 130' INT
trap 'interrupted SIGTERM 143' TERM

# ---- tools ----------------------------------------------------------------------------------
if [[ -z ${DOWNLOADER:-} ]]; then
    if command -v curl >/dev/null; then DOWNLOADER=curl
    elif command -v wget >/dev/null; then DOWNLOADER=wget
    else DOWNLOADER=python; fi
fi

# download URL FILE: the downloader runs in the background so that a signal reaches the
# trap at once, not after the download. On a terminal it shows its progress; otherwise
# its error output goes to FILE.err, for the one line that reports a failure.
download() {
    local url=$1 file=$2 errors=$2.err progress=()
    if [[ -t 2 ]]; then errors=/dev/stderr; fi
    case $DOWNLOADER in
        curl) [[ -t 2 ]] && progress=(--progress-bar) || progress=(--silent --show-error)
              curl --fail --location --connect-timeout 30 "${progress[@]}" -o "$file" "$url" 2>"$errors" & ;;
        wget) [[ -t 2 ]] && progress=(--show-progress) || progress=()
              wget --no-verbose "${progress[@]}" --tries=1 --timeout=60 -O "$file" "$url" 2>"$errors" & ;;
        python) python3 -c '
import sys, urllib.request
try:
    urllib.request.urlretrieve(sys.argv[1], sys.argv[2])
except Exception as error:
    sys.exit(f"python: {error}")' "$url" "$file" 2>"$errors" & ;;
        *) echo "DOWNLOADER must be curl, wget or python, not $DOWNLOADER" >"$errors"; return 2 ;;
    esac
    CHILD=$!
    local status=0
    wait "$CHILD" || status=$?
    CHILD=
    return "$status"
}

# reason FILE FALLBACK: why a command failed - the last line it wrote to FILE, else FALLBACK.
reason() {
    local line
    line=$(tail -n 1 "$1" 2>/dev/null || true)
    echo "${line:-$2}"
}

md5_of() {
    if command -v md5sum >/dev/null; then
        md5sum "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib, sys; print(hashlib.md5(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
    fi
}

# ---- one dataset ----------------------------------------------------------------------------
# fetch NAME URL MD5 FOLDER FILE... : make DATA_ROOT/FOLDER hold FILE... from the archive at URL
fetch() {
    local name=$1 url=$2 md5=$3 folder=$4
    shift 4
    local target="$DATA_ROOT/$folder" file missing=()
    if [[ -d $target ]]; then
        for file in "$@"; do [[ -f $target/$file ]] || missing+=("$file"); done
        if (( ${#missing[@]} )); then
            fail "$target is incomplete (no ${missing[0]}): delete it and run this script again"
        elif [[ $(cat "$target/$MARKER" 2>/dev/null) == "$md5" ]]; then
            echo "$name: already downloaded and verified in $target"
        else
            echo "$name: $target exists but was not downloaded by this script; using it as it is (delete it to download again)"
        fi
        return
    fi
    mkdir -p "$DATA_ROOT" || fail "cannot create $DATA_ROOT"
    rm -rf "$DATA_ROOT/.$folder".*  # left behind by a download that was killed outright
    local archive staging actual
    archive=$(mktemp "$DATA_ROOT/.$folder.tar.gz.XXXXXX") || fail "cannot write to $DATA_ROOT"
    TEMPS+=("$archive" "$archive.err")
    echo "$name: downloading $url with $DOWNLOADER"
    local status=0
    download "$url" "$archive" || status=$?
    if (( status )); then
        fail "$name: downloading $url failed ($(reason "$archive.err" "$DOWNLOADER exit status $status")); nothing was kept, run this script again"
    fi
    actual=$(md5_of "$archive")
    if [[ $actual != "$md5" ]]; then
        fail "$name: checksum mismatch for $url: md5 $actual, expected $md5 (a damaged download or another file); nothing was kept"
    fi
    staging=$(mktemp -d "$DATA_ROOT/.$folder.XXXXXX")
    TEMPS+=("$staging")
    tar -xzf "$archive" -C "$staging" 2>"$archive.err" || status=$?
    if (( status )); then
        fail "$name: cannot extract the archive from $url ($(reason "$archive.err" "tar exit status $status")); nothing was kept"
    fi
    for file in "$@"; do
        [[ -f $staging/$folder/$file ]] || fail "$name: the archive from $url has no $folder/$file; nothing was kept"
    done
    echo "$md5" > "$staging/$folder/$MARKER"
    mv "$staging/$folder" "$target"
    rm -rf "$archive" "$archive.err" "$staging"
    echo "$name: verified (md5 $md5) and extracted to $target"
}

cifar100() {
    fetch cifar100 "$CIFAR100_URL" "$CIFAR100_MD5" cifar-100-python train test meta
}

cifar10() {
    fetch cifar10 "$CIFAR10_URL" "$CIFAR10_MD5" cifar-10-batches-py \
        data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch batches.meta
}

case ${1:-cifar100} in
    cifar100) cifar100 ;;
    cifar10) cifar10 ;;
    all) cifar100; cifar10 ;;
    *) echo "usage: bash download_data.sh [cifar100|cifar10|all]" >&2; exit 2 ;;
esac
