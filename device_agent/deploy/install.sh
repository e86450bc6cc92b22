#!/bin/sh
# Install this devft-edge agent bundle on the device, offline, and (re)start the agent.
#
#   sh install.sh [--prefix DIR] [--service auto|systemd|runner|none] [--key-sha256 HEX] [--verify-only]
#
# 1. verify, before anything else, that MANIFEST.sha256 is signed (MANIFEST.sha256.sig, ed25519,
#    checked with openssl >= 3.0) by the key this device trusts: the one --key-sha256 pins (sha256
#    of the raw public key; `devft-edge flash` always pins the fleet key), else the key the installed
#    agent trusts (DIR/current/etc/public.pem), else, on a first install with no pin, the bundle's
#    own config/public.pem (trust on first use, said on stderr); then every file of the bundle
#    against MANIFEST.sha256 (and that nothing was added). --verify-only stops here;
# 2. install the agent into DIR/versions/VERSION (its own virtualenv, wheels from the bundle only:
#    pip never touches a network index);
# 3. switch DIR/current to it atomically (rename of a symlink), DIR/previous to the old one;
# 4. (re)start the agent: a systemd unit where systemd runs, else the fallback runner
#    (devft-edge-ctl: nohup + pid file). `devft-edge-ctl rollback` undoes step 3.
#
# Exit codes: 0 installed and started (or verified, with --verify-only), 2 usage, 3 the bundle
# failed verification: unsigned, signed by another key, or altered (nothing was changed), 4 the
# install failed (current still points at the previous version).
set -eu

PREFIX=/opt/devft-edge
SERVICE=auto
KEY_SHA256=
VERIFY_ONLY=no
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --service) SERVICE=$2; shift 2 ;;
        --key-sha256) KEY_SHA256=$2; shift 2 ;;
        --verify-only) VERIFY_ONLY=yes; shift ;;
        *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case "$SERVICE" in auto|systemd|runner|none) ;; *) echo "install.sh: --service auto|systemd|runner|none" >&2; exit 2 ;; esac
case "$KEY_SHA256" in
    "") ;;
    *[!0-9a-f]*) echo "install.sh: --key-sha256 takes 64 lowercase hex digits" >&2; exit 2 ;;
    *) [ ${#KEY_SHA256} = 64 ] || { echo "install.sh: --key-sha256 takes 64 lowercase hex digits" >&2; exit 2; } ;;
esac

HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"

# ---- 1. verify: the signature first, then every file against the signed manifest -------------
refuse() {
    echo "install.sh: bundle verification failed: $*" >&2
    exit 3
}
# sha256 of an Ed25519 public key's 32 raw bytes (its DER form is a 12-byte header and the key)
key_sha256() { openssl pkey -pubin -in "$1" -outform DER 2>/dev/null | tail -c 32 | sha256sum | cut -d' ' -f1; }
for file in MANIFEST.sha256 MANIFEST.sha256.sig config/public.pem; do
    [ -f "$file" ] || refuse "no $file: the bundle is not signed"
done
command -v openssl >/dev/null 2>&1 || refuse "no openssl on this device to check the bundle's signature"
case "$(openssl version 2>/dev/null)" in
    "OpenSSL "[3-9]*) ;;
    *) refuse "checking an Ed25519 signature needs OpenSSL 3.0 or later; this device has: $(openssl version 2>&1)" ;;
esac
BUNDLE_KEY=$(key_sha256 config/public.pem)
if [ -n "$KEY_SHA256" ]; then
    [ "$BUNDLE_KEY" = "$KEY_SHA256" ] ||
        refuse "its key config/public.pem (sha256 $BUNDLE_KEY) is not the key --key-sha256 pins ($KEY_SHA256)"
    TRUSTED=config/public.pem
elif [ -f "$PREFIX/current/etc/public.pem" ]; then
    TRUSTED=$PREFIX/current/etc/public.pem
else
    TRUSTED=config/public.pem
    echo "install.sh: first install, no --key-sha256: trusting the bundle's own key (sha256 $BUNDLE_KEY)" >&2
fi
if ! openssl pkeyutl -verify -pubin -inkey "$TRUSTED" -rawin -in MANIFEST.sha256 \
    -sigfile MANIFEST.sha256.sig >/dev/null 2>&1; then
    refuse "MANIFEST.sha256 is not signed by the key this device trusts ($TRUSTED, sha256 $(key_sha256 "$TRUSTED"))"
fi
if ! sha256sum --check --strict --quiet MANIFEST.sha256 >/dev/null 2>&1; then
    echo "install.sh: bundle verification failed: a file does not match MANIFEST.sha256" >&2
    sha256sum --check --strict --quiet MANIFEST.sha256 2>&1 | head -5 >&2 || true
    exit 3
fi
listed=$(sed 's/^[0-9a-f]*  //' MANIFEST.sha256 | sort)
present=$(find . -type f ! -path ./MANIFEST.sha256 ! -path ./MANIFEST.sha256.sig | sort)
if [ "$listed" != "$present" ]; then
    echo "install.sh: bundle verification failed: files not in MANIFEST.sha256:" >&2
    printf '%s\n' "$present" | grep -vxF "$listed" | head -5 >&2 || true
    exit 3
fi
if [ "$VERIFY_ONLY" = yes ]; then
    echo "verified: MANIFEST.sha256 is signed by key sha256 $(key_sha256 "$TRUSTED"); every file matches it"
    exit 0
fi

VERSION=$(sed -n 's/^version=//p' bundle.env)
PYVER=$(sed -n 's/^python=//p' bundle.env)
PYTHON=${PYTHON:-}
for candidate in "$PYTHON" "python$PYVER" python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
        [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$PYVER" ]; then
        PYTHON=$candidate
        break
    fi
    PYTHON=
done
if [ -z "$PYTHON" ]; then
    echo "install.sh: this bundle is for Python $PYVER; no python$PYVER on this device" >&2
    exit 4
fi

# ---- 2. install into its own version directory ------------------------------------------------
DEST=$PREFIX/versions/$VERSION
mkdir -p "$PREFIX/versions" "$PREFIX/var/cache" "$PREFIX/var/log" "$PREFIX/var/run" "$PREFIX/bin"
if [ ! -f "$DEST/.installed" ]; then
    rm -rf "$DEST"
    mkdir -p "$DEST/etc"
    if ! {
        "$PYTHON" -m venv "$DEST/venv" &&
            PIP_CONFIG_FILE=/dev/null "$DEST/venv/bin/pip" install --quiet --no-index --no-deps \
                --disable-pip-version-check --find-links "$HERE/wheels" -r requirements.txt &&
            PIP_CONFIG_FILE=/dev/null "$DEST/venv/bin/pip" install --quiet --no-index --no-deps \
                --disable-pip-version-check "$HERE"/wheels/devft_edge-*.whl &&
            PIP_CONFIG_FILE=/dev/null "$DEST/venv/bin/pip" check --disable-pip-version-check >/dev/null
    }; then
        echo "install.sh: installing the agent into $DEST failed" >&2
        rm -rf "$DEST"
        exit 4
    fi
    for file in config/*; do
        name=$(basename "$file")
        case "$name" in
            *.in) sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@ETC@|$DEST/etc|g" "$file" > "$DEST/etc/${name%.in}" ;;
            *) cp "$file" "$DEST/etc/$name" ;;
        esac
    done
    chmod 700 "$DEST/etc"
    for secret in password client.key identity.pem; do
        [ -f "$DEST/etc/$secret" ] && chmod 600 "$DEST/etc/$secret"
    done
    mkdir -p "$DEST/bin"
    cp devft-edge-ctl "$DEST/bin/devft-edge-ctl"
    sed -e "s|@PREFIX@|$PREFIX|g" devft-edge-agent.service > "$DEST/devft-edge-agent.service"
    cp bundle.env "$DEST/bundle.env"
    chmod 755 "$DEST/bin/devft-edge-ctl"
    touch "$DEST/.installed"
fi

# ---- 3. switch current (and previous) atomically ----------------------------------------------
OLD=$(readlink "$PREFIX/current" 2>/dev/null || true)
ln -sfn "versions/$VERSION" "$PREFIX/current.new"
mv -Tf "$PREFIX/current.new" "$PREFIX/current"
if [ -n "$OLD" ] && [ "$OLD" != "versions/$VERSION" ]; then
    ln -sfn "$OLD" "$PREFIX/previous.new"
    mv -Tf "$PREFIX/previous.new" "$PREFIX/previous"
fi
ln -sfn ../current/bin/devft-edge-ctl "$PREFIX/bin/devft-edge-ctl.new"
mv -Tf "$PREFIX/bin/devft-edge-ctl.new" "$PREFIX/bin/devft-edge-ctl"

# ---- 4. service ------------------------------------------------------------------------------
if [ "$SERVICE" = auto ]; then
    if [ -d /run/systemd/system ] && [ "$(id -u)" = 0 ]; then SERVICE=systemd; else SERVICE=runner; fi
fi
echo "$SERVICE" > "$PREFIX/service"
"$PREFIX/bin/devft-edge-ctl" install-service
"$PREFIX/bin/devft-edge-ctl" restart
echo "installed devft-edge agent $VERSION in $PREFIX (service: $SERVICE)"
