#!/usr/bin/env bash
# Download CIFAR-100, CIFAR-10 (the python versions) and/or Tiny-ImageNet, verify each
# archive's md5 and extract it under DATA_ROOT (default ./datasets, where main.py looks).
#
#   bash download_data.sh [cifar100|cifar10|tiny-imagenet|all]...   (default: cifar100)
#
# A dataset this script has downloaded and verified is not fetched again. Offline, copy
# the archive (cifar-100-python.tar.gz, cifar-10-python.tar.gz, tiny-imagenet-200.zip)
# into DATA_ROOT by hand: the script verifies and extracts that instead. Nothing
# partial is ever left under its real name: the archive is downloaded and extracted
# under hidden temporary names in DATA_ROOT, which are removed on failure or
# interruption, and the dataset folder is renamed into place only when complete.
# Tiny-ImageNet's val/ is sorted into class folders (val/<wnid>/images/, from
# val/val_annotations.txt) before that, so the visible dataset is always the sorted one.
#
# Environment: DATA_ROOT; CIFAR100_URL, CIFAR100_MD5, CIFAR10_URL, CIFAR10_MD5,
# TINY_IMAGENET_URL, TINY_IMAGENET_MD5 (another mirror, or a test archive);
# DOWNLOADER=curl|wget|python (default: curl if it exists, else wget, else Python);
# UNZIPPER=unzip|python (default: unzip if it exists, else Python's zipfile).
set -euo pipefail

DATA_ROOT=${DATA_ROOT:-./datasets}
CIFAR100_URL=${CIFAR100_URL:-https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz}
CIFAR100_MD5=${CIFAR100_MD5:-eb9058c3a382ffc7106e4002c42a8d85}
CIFAR10_URL=${CIFAR10_URL:-https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz}
CIFAR10_MD5=${CIFAR10_MD5:-c58f30108f718f92721af3b95e74349a}
TINY_IMAGENET_URL=${TINY_IMAGENET_URL:-http://cs231n.stanford.edu/tiny-imagenet-200.zip}
TINY_IMAGENET_MD5=${TINY_IMAGENET_MD5:-90528d7ca1a48142e341f4ef8d21d0de}
MARKER=.verified-md5   # written into a dataset folder by this script: the archive's md5

fail() {
    echo "error: $*" >&2
    exit 1
}

# ---- temporary files: removed whatever happens --------------------------------------------
TEMPS=()
CHILD=
CREATED_ROOT=  # DATA_ROOT, if this script created it: removed again if it ends empty
cleanup() {
    if [[ -n $CHILD ]]; then
        kill "$CHILD" 2>/dev/null || true
        wait "$CHILD" 2>/dev/null || true  # it writes nothing more into what is removed next
    fi
    rm -rf "${TEMPS[@]}"
    if [[ -n $CREATED_ROOT ]]; then rmdir "$CREATED_ROOT" 2>/dev/null || true; fi
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
if [[ -z ${UNZIPPER:-} ]]; then
    if command -v unzip >/dev/null; then UNZIPPER=unzip; else UNZIPPER=python; fi
fi

# in_background ERRORS COMMAND...: run COMMAND as a child in the background, its error
# output to the file ERRORS, and wait for it, so that a signal reaches the trap at once,
# not when the command ends (and the trap's message reaches the terminal, not ERRORS).
in_background() {
    local errors=$1
    shift
    "$@" 2>"$errors" &
    CHILD=$!
    local status=0
    wait "$CHILD" || status=$?
    CHILD=
    return "$status"
}

# download URL FILE: the downloader runs in the background so that a signal reaches the
# trap at once, not after the download. On a terminal it shows its progress; otherwise
# its error output goes to FILE.err, for the one line that reports a failure.
download() {
    local url=$1 file=$2 errors=$2.err progress=()
    if [[ -t 2 ]]; then errors=/dev/stderr; fi
    case $DOWNLOADER in
        curl) [[ -t 2 ]] && progress=(--progress-bar) || progress=(--silent --show-error)
              in_background "$errors" curl --fail --location --connect-timeout 30 "${progress[@]}" -o "$file" "$url" ;;
        wget) [[ -t 2 ]] && progress=(--show-progress) || progress=()
              in_background "$errors" wget --no-verbose "${progress[@]}" --tries=1 --timeout=60 -O "$file" "$url" ;;
        python) in_background "$errors" python3 -c '
import sys, urllib.request
try:
    urllib.request.urlretrieve(sys.argv[1], sys.argv[2])
except Exception as error:
    sys.exit(f"python: {error}")' "$url" "$file" ;;
        *) echo "DOWNLOADER must be curl, wget or python, not $DOWNLOADER" >"$errors"; return 2 ;;
    esac
}

# extract ARCHIVE FOLDER: unpack a .tar.gz or .zip ARCHIVE (by the name of its temporary
# file) into FOLDER; error output to ARCHIVE.err.
extract() {
    local archive=$1 into=$2
    case $archive in
        *.tar.gz.*) in_background "$archive.err" tar -xzf "$archive" -C "$into" ;;
        *.zip.*)
            case $UNZIPPER in
                unzip) in_background "$archive.err" unzip -q "$archive" -d "$into" ;;
                python) in_background "$archive.err" python3 -c '
import sys, zipfile
try:
    with zipfile.ZipFile(sys.argv[1]) as archive:
        archive.extractall(sys.argv[2])
except Exception as error:
    sys.exit(f"python: {error}")' "$archive" "$into" ;;
                *) echo "UNZIPPER must be unzip or python, not $UNZIPPER" >"$archive.err"; return 2 ;;
            esac ;;
    esac
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
# fetch NAME URL MD5 FOLDER FORMAT PREPARE FILE... : make DATA_ROOT/FOLDER hold FILE... from
# the FORMAT (tar.gz or zip) archive at URL; PREPARE (a function, or -) is run on the
# extracted folder, still under its temporary name, before it is moved into place.
fetch() {
    local name=$1 url=$2 md5=$3 folder=$4 format=$5 prepare=$6
    shift 6
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
    if [[ ! -d $DATA_ROOT ]]; then
        mkdir -p "$DATA_ROOT" || fail "cannot create $DATA_ROOT"
        CREATED_ROOT=$DATA_ROOT
    fi
    rm -rf "$DATA_ROOT/.$folder".*  # left behind by a download that was killed outright
    local archive staging actual copied="$DATA_ROOT/${url##*/}"
    archive=$(mktemp "$DATA_ROOT/.$folder.$format.XXXXXX") || fail "cannot write to $DATA_ROOT"
    TEMPS+=("$archive" "$archive.err")
    local status=0
    if [[ -f $copied ]]; then  # copied here by hand (offline): verified and extracted, and kept
        echo "$name: using the archive $copied"
        ln -f "$copied" "$archive" 2>/dev/null || cp "$copied" "$archive" || fail "cannot read $copied"
        url=$copied
    else
        echo "$name: downloading $url with $DOWNLOADER"
        download "$url" "$archive" || status=$?
    fi
    if (( status )); then
        fail "$name: downloading $url failed ($(reason "$archive.err" "$DOWNLOADER exit status $status")); nothing was kept. Without a network, copy ${url##*/} (md5 $md5) into $DATA_ROOT by hand and run this script again"
    fi
    actual=$(md5_of "$archive")
    if [[ $actual != "$md5" ]]; then
        fail "$name: checksum mismatch for $url: md5 $actual, expected $md5 (a damaged download or another file); nothing was kept"
    fi
    staging=$(mktemp -d "$DATA_ROOT/.$folder.XXXXXX")
    TEMPS+=("$staging")
    extract "$archive" "$staging" || status=$?
    if (( status )); then
        fail "$name: cannot extract the archive from $url ($(reason "$archive.err" "exit status $status")); nothing was kept"
    fi
    rm -f "$archive"  # not needed any more: free the space before the dataset is prepared
    for file in "$@"; do
        [[ -f $staging/$folder/$file ]] || fail "$name: the archive from $url has no $folder/$file; nothing was kept"
    done
    if [[ $prepare != - ]]; then
        "$prepare" "$staging/$folder" "$archive.err" || status=$?
        if (( status )); then
            fail "$name: cannot prepare the extracted archive from $url ($(reason "$archive.err" "exit status $status")); nothing was kept"
        fi
    fi
    echo "$md5" > "$staging/$folder/$MARKER"
    mv "$staging/$folder" "$target"
    rm -rf "$archive" "$archive.err" "$staging"
    echo "$name: verified (md5 $md5) and extracted to $target"
}

cifar100() {
    fetch cifar100 "$CIFAR100_URL" "$CIFAR100_MD5" cifar-100-python tar.gz - train test meta
}

cifar10() {
    fetch cifar10 "$CIFAR10_URL" "$CIFAR10_MD5" cifar-10-batches-py tar.gz - \
        data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch batches.meta
}

# sort_tiny_imagenet_val FOLDER ERRORS: move every val/images/<file> to
# val/<wnid>/images/<file> as val/val_annotations.txt says (tab-separated: file, wnid,
# box), then remove the emptied val/images - the layout ImageFolder reads.
sort_tiny_imagenet_val() {
    in_background "$2" python3 -c '
import os, sys
val = sys.argv[1]
images = os.path.join(val, "images")
try:
    with open(os.path.join(val, "val_annotations.txt")) as f:
        lines = [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
    for number, fields in enumerate(lines, 1):
        if len(fields) < 2:
            sys.exit(f"val_annotations.txt line {number} has no wnid")
        name, wnid = fields[:2]
        os.makedirs(os.path.join(val, wnid, "images"), exist_ok=True)
        os.rename(os.path.join(images, name), os.path.join(val, wnid, "images", name))
    left = os.listdir(images)
    if left:
        sys.exit(f"{len(left)} images of val/images are not in val_annotations.txt, e.g. {left[0]}")
    os.rmdir(images)
except OSError as error:
    sys.exit(f"sorting val/: {error}")' "$1/val"
}

tiny_imagenet() {
    fetch tiny-imagenet "$TINY_IMAGENET_URL" "$TINY_IMAGENET_MD5" tiny-imagenet-200 zip sort_tiny_imagenet_val \
        wnids.txt words.txt val/val_annotations.txt
}

USAGE="usage: bash download_data.sh [cifar100|cifar10|tiny-imagenet|all]..."
names=()
for name in "${@:-cifar100}"; do
    case $name in
        cifar100|cifar10|tiny-imagenet) names+=("$name") ;;
        all) names+=(cifar100 cifar10 tiny-imagenet) ;;
        *) echo "$USAGE" >&2; exit 2 ;;
    esac
done
for name in "${names[@]}"; do
    case $name in
        cifar100) cifar100 ;;
        cifar10) cifar10 ;;
        tiny-imagenet) tiny_imagenet ;;
    esac
done
