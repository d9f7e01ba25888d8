#!/usr/bin/env bash
# Install the zeromesh systemd units and sample configuration.
#
#   sudo scripts/install-systemd.sh              # into /
#   scripts/install-systemd.sh --prefix /tmp/x   # into /tmp/x (tests, packaging)
#   scripts/install-systemd.sh --dry-run         # print what would be done
#
# Units go to PREFIX/etc/systemd/system (always replaced: they are code);
# sample configs go to PREFIX/etc/zeromesh/manager.yaml and
# PREFIX/etc/zeromesh/executor.d/default.yaml, never overwriting existing ones.
# It creates PREFIX/etc/zeromesh/keys (0750) and PREFIX/var/lib/zeromesh (0700).
# Without --prefix it also creates the `zeromesh` system user (owning those two)
# and runs `systemctl daemon-reload` when systemd is running.  The units run
# /opt/zeromesh/venv/bin/zmesh: install zeromesh into that virtual environment.
set -euo pipefail

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "$0"
    echo "options: --prefix DIR, --dry-run, -h|--help"
}

PREFIX=""
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || { echo "error: --prefix needs a directory" >&2; exit 2; }
                  PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#--prefix=}"; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
PREFIX="${PREFIX%/}"             # "/" and "" both mean the real root

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/systemd"
UNIT_DIR="$PREFIX/etc/systemd/system"
CONF_DIR="$PREFIX/etc/zeromesh"
USER_NAME=zeromesh
STATE_DIR=/var/lib/zeromesh
VENV=/opt/zeromesh/venv
ZMESH_BIN=$VENV/bin/zmesh      # what the units run

run() {  # COMMAND...: run it, or with --dry-run only print it
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run:$(printf ' %q' "$@")"
    else
        "$@"
    fi
}
done_msg() {  # what was changed; silent with --dry-run (the "would run" lines say it)
    [ "$DRY_RUN" = 1 ] || echo "$@"
}

for f in zeromesh-manager.service zeromesh-executor@.service manager.yaml executor.yaml; do
    [ -f "$SRC/$f" ] || { echo "error: $SRC/$f is missing" >&2; exit 1; }
done

# 1. units
run install -d -m 0755 "$UNIT_DIR"
for unit in zeromesh-manager.service zeromesh-executor@.service; do
    run install -m 0644 "$SRC/$unit" "$UNIT_DIR/$unit"
    done_msg "installed $UNIT_DIR/$unit"
done

# 2. sample configs, kept if present
install_config() {  # SRC DST
    if [ -e "$2" ]; then
        echo "kept existing $2 (sample not installed)"
    else
        run install -m 0644 "$1" "$2"
        done_msg "installed $2"
    fi
}
run install -d -m 0755 "$CONF_DIR" "$CONF_DIR/executor.d"
install_config "$SRC/manager.yaml" "$CONF_DIR/manager.yaml"
install_config "$SRC/executor.yaml" "$CONF_DIR/executor.d/default.yaml"

# 3. system user (only on the real root: --prefix must not touch this machine's /etc/passwd)
if [ -n "$PREFIX" ]; then
    echo "note: --prefix given; not creating the $USER_NAME user"
elif getent passwd "$USER_NAME" >/dev/null; then
    echo "user $USER_NAME exists"
else
    nologin="$(command -v nologin || echo /usr/sbin/nologin)"
    if command -v useradd >/dev/null; then
        run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell "$nologin" --comment "zeromesh daemons" "$USER_NAME"
    elif command -v adduser >/dev/null; then   # busybox
        run adduser -S -D -H -h "$STATE_DIR" -s "$nologin" "$USER_NAME"
    else
        echo "error: neither useradd nor adduser found; create the $USER_NAME system user yourself" >&2
        exit 1
    fi
    done_msg "created system user $USER_NAME"
fi

# 4. the directories the walkthrough uses (docs/operations.md): keys readable by the daemons'
# group, the manager's state private to its user (it holds password hashes and token digests)
KEYS_DIR="$CONF_DIR/keys"
STATE="$PREFIX$STATE_DIR"
if [ -n "$PREFIX" ]; then
    run install -d -m 0750 "$KEYS_DIR"
    run install -d -m 0700 "$STATE"
else
    run install -d -m 0750 -g "$USER_NAME" "$KEYS_DIR"
    run install -d -m 0700 -o "$USER_NAME" -g "$USER_NAME" "$STATE"
fi
done_msg "created $KEYS_DIR (0750) and $STATE (0700)"

# 5. tell systemd
if [ -n "$PREFIX" ]; then
    echo "note: --prefix given; skipping systemctl daemon-reload"
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    run systemctl daemon-reload
    done_msg "systemd reloaded"
else
    echo "note: systemd is not running here; skipping systemctl daemon-reload"
fi

if [ ! -x "$ZMESH_BIN" ]; then
    echo "note: the units run $ZMESH_BIN, which does not exist yet:" \
         "python3 -m venv $VENV && $VENV/bin/pip install /opt/zeromesh-src (docs/operations.md, step 1)"
fi
echo "next: edit $CONF_DIR/manager.yaml, then: systemctl enable --now zeromesh-manager.service"
echo "      executors: $CONF_DIR/executor.d/NAME.yaml + systemctl enable --now zeromesh-executor@NAME.service"
