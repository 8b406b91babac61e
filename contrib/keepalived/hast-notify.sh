#!/bin/sh
# hast-notify.sh: keepalived notify script for hast-rs failover; the Linux
# counterpart of FreeBSD's CARP + devd "carp-hast-switch" script.
#
# keepalived runs it on VRRP state changes (see keepalived.conf.example):
#
#   hast-notify.sh INSTANCE|GROUP NAME STATE [PRIORITY]   (as `notify` does)
#   hast-notify.sh STATE                                  (short form)
#   hast-notify.sh -n ...                                 (dry run)
#
# STATE is MASTER, BACKUP, FAULT or STOP (any case).
#
# MASTER: for every resource still secondary, wait until its replication
#   connection is down (the old primary has let go: it was demoted or is
#   dead; promoting while it still serves would cause a split-brain), then
#   `hastctl role primary RESOURCES`, then `hastctl wait export` (the NBD
#   exports accept connections), then import the data: attach the NBD
#   devices, `zpool import -f POOL` and/or fsck + mount MOUNTS (or run
#   HAST_IMPORT_CMD instead).
# BACKUP, FAULT, STOP: release the data first: umount MOUNTS and/or
#   `zpool export POOL`, detach the NBD devices (or run HAST_EXPORT_CMD
#   instead), then `hastctl role secondary RESOURCES`. Releasing must
#   succeed before the role changes: a mounted file system must never lose
#   its device underneath.
#
# Idempotent: running the same state twice is harmless (role changes to the
# current role are no-ops; the built-in import/export skip what is already
# imported/exported; custom HAST_IMPORT_CMD/HAST_EXPORT_CMD must be
# idempotent themselves). Concurrent runs are serialised with flock(1) on
# LOCKFILE. Every step is logged with logger(1) (tag hast-failover,
# facility daemon) and to stderr.
#
# Exit codes:
#   0  done
#   1  a role change failed
#   2  the exports did not appear within EXPORT_TIMEOUT
#   3  importing the data failed
#   4  releasing the data failed (roles left unchanged)
#   5  a resource is still connected to a primary peer after PEER_TIMEOUT
#      (not promoted)
#   6  could not take the lock
#   64 usage error
#   69 hastctl not found
#
# Configuration: edit the defaults below, or set the HAST_* variable named in
# each default (HAST_RESOURCES, HAST_POOL, HAST_MOUNTS, HASTCTL, HAST_CONF,
# ...) in the environment or in HAST_NOTIFY_CONF (default
# /etc/default/hast-notify: a shell fragment read first if it exists, e.g.
# `HAST_RESOURCES="disk1 disk2"` and `HAST_POOL=tank`; its assignments win
# over the environment).

HAST_NOTIFY_CONF=${HAST_NOTIFY_CONF:-/etc/default/hast-notify}
if [ -r "$HAST_NOTIFY_CONF" ]; then
	# shellcheck disable=SC1090 # the path is configurable
	. "$HAST_NOTIFY_CONF"
fi

# --- configuration ---------------------------------------------------------
# HAST resources to switch, space separated.
RESOURCES=${HAST_RESOURCES:-"disk1"}
# ZFS pool on the resources ("" for none).
POOL=${HAST_POOL:-""}
# File systems, "DEVICE:MOUNTPOINT ..." ("" for none), e.g.
# "/dev/nbd0:/srv/data". Checked with `fsck -p`, then mounted.
MOUNTS=${HAST_MOUNTS:-""}
# Kernel NBD devices to attach the exports to, "RESOURCE:DEVICE ..." ("" for
# none: the exports are used directly, e.g. by qemu).
NBD_DEVICES=${HAST_NBD_DEVICES:-""}
NBD_CLIENT=${HAST_NBD_CLIENT:-nbd-client}
NBD_CLIENT_OPTS=${HAST_NBD_CLIENT_OPTS:-"-connections 4 -block-size 4096"}
# hastctl and the configuration it reads.
HASTCTL=${HASTCTL:-/usr/local/sbin/hastctl}
HAST_CONF=${HAST_CONF:-/etc/hast.conf}
# Seconds to wait for the exports after the promotion.
EXPORT_TIMEOUT=${HAST_EXPORT_TIMEOUT:-30}
# Seconds to wait for a secondary's connection to the old primary to end
# (more than hast.conf's `timeout`, for a peer that vanished silently).
PEER_TIMEOUT=${HAST_PEER_TIMEOUT:-60}
# Replace the built-in import/export (run with `sh -c`; HAST_STATE and
# HAST_RESOURCES are in their environment).
HAST_IMPORT_CMD=${HAST_IMPORT_CMD:-""}
HAST_EXPORT_CMD=${HAST_EXPORT_CMD:-""}
# Serialises concurrent runs.
LOCKFILE=${HAST_LOCKFILE:-/run/hast-notify.lock}
# Logging.
LOG_TAG=${HAST_LOG_TAG:-hast-failover}
LOG_FACILITY=${HAST_LOG_FACILITY:-daemon}
LOGGER=${HAST_LOGGER:-logger}
# 1: log what would be done, change nothing (also: -n).
DRY_RUN=${HAST_DRY_RUN:-0}
# ---------------------------------------------------------------------------

usage() {
	echo "usage: $0 [-n] INSTANCE|GROUP NAME MASTER|BACKUP|FAULT|STOP [PRIORITY]"
	echo "       $0 [-n] MASTER|BACKUP|FAULT|STOP"
}

log_at() {
	prio=$1
	shift
	printf '%s[%s]: %s\n' "$LOG_TAG" "$$" "$*" >&2
	if [ -n "$LOGGER" ] && command -v "$LOGGER" >/dev/null 2>&1; then
		"$LOGGER" -t "$LOG_TAG" -p "$LOG_FACILITY.$prio" -- "$*" 2>/dev/null || true
	fi
}

log() {
	log_at notice "$@"
}

err() {
	log_at err "ERROR: $*"
}

# fail CODE MESSAGE: log and exit.
fail() {
	code=$1
	shift
	err "$*"
	exit "$code"
}

# run CMD ARGS...: log it, run it (not in a dry run), log its output.
run() {
	if [ "$DRY_RUN" = 1 ]; then
		log "dry-run: would run: $*"
		return 0
	fi
	log "running: $*"
	out=$("$@" 2>&1)
	rc=$?
	if [ -n "$out" ]; then
		printf '%s\n' "$out" | while IFS= read -r line; do
			log "  $line"
		done
	fi
	if [ "$rc" -ne 0 ]; then
		err "exit status $rc: $*"
	fi
	return "$rc"
}

hastctl() {
	run "$HASTCTL" -c "$HAST_CONF" "$@"
}

# The current role of a resource (a query: runs in a dry run too).
current_role() {
	"$HASTCTL" -c "$HAST_CONF" list "$1" 2>/dev/null | sed -n 's/^  role: //p'
}

# The NBD socket of a primary resource.
export_socket() {
	"$HASTCTL" -c "$HAST_CONF" list "$1" 2>/dev/null | sed -n 's/^  export: //p'
}

attach_nbd() {
	for map in $NBD_DEVICES; do
		res=${map%%:*}
		dev=${map#*:}
		if "$NBD_CLIENT" -c "$dev" >/dev/null 2>&1; then
			log "$dev already attached"
			continue
		fi
		sock=$(export_socket "$res")
		if [ -z "$sock" ]; then
			err "no export for $res"
			return 1
		fi
		# shellcheck disable=SC2086 # NBD_CLIENT_OPTS is a list of options
		run "$NBD_CLIENT" -unix "$sock" "$dev" -name "$(basename "$sock" .sock)" \
			$NBD_CLIENT_OPTS || return 1
	done
}

detach_nbd() {
	rc=0
	for map in $NBD_DEVICES; do
		dev=${map#*:}
		if "$NBD_CLIENT" -c "$dev" >/dev/null 2>&1; then
			run "$NBD_CLIENT" -d "$dev" || rc=1
		fi
	done
	return "$rc"
}

pool_imported() {
	zpool list -H -o name "$POOL" >/dev/null 2>&1
}

builtin_import() {
	attach_nbd || return 1
	if [ -n "$POOL" ]; then
		if pool_imported; then
			log "pool $POOL already imported"
		else
			# -f: the pool was last imported by the other node.
			run zpool import -f "$POOL" || return 1
		fi
	fi
	for m in $MOUNTS; do
		dev=${m%%:*}
		mnt=${m#*:}
		if mountpoint -q "$mnt"; then
			log "$mnt already mounted"
			continue
		fi
		run fsck -p "$dev"
		rc=$?
		# 0: clean, 1: errors corrected; anything else needs a human.
		if [ "$rc" -gt 1 ]; then
			err "fsck of $dev failed ($rc)"
			return 1
		fi
		run mount "$dev" "$mnt" || return 1
	done
}

builtin_export() {
	# Unmount in reverse order (nested mounts).
	rev=""
	for m in $MOUNTS; do
		rev="$m $rev"
	done
	for m in $rev; do
		mnt=${m#*:}
		if mountpoint -q "$mnt"; then
			run umount "$mnt" || return 1
		fi
	done
	if [ -n "$POOL" ] && pool_imported; then
		run zpool export "$POOL" || run zpool export -f "$POOL" || return 1
	fi
	detach_nbd
}

import_data() {
	if [ -n "$HAST_IMPORT_CMD" ]; then
		run sh -c "$HAST_IMPORT_CMD"
	else
		builtin_import
	fi
}

export_data() {
	if [ -n "$HAST_EXPORT_CMD" ]; then
		run sh -c "$HAST_EXPORT_CMD"
	else
		builtin_export
	fi
}

become_primary() {
	log "$STATE ($INSTANCE): switching $RESOURCES to primary"
	# A secondary still connected is connected to a live primary: wait for
	# it to let go (the original waits for the secondary worker to exit).
	for res in $RESOURCES; do
		role=$(current_role "$res")
		case $role in
		"") fail 1 "cannot query the role of $res (is hastd running?)" ;;
		secondary)
			log "waiting up to ${PEER_TIMEOUT}s for the old primary of $res to let go"
			hastctl wait disconnected --timeout "$PEER_TIMEOUT" "$res" ||
				fail 5 "$res is still connected to a primary peer; not promoting"
			;;
		esac
	done
	# shellcheck disable=SC2086 # RESOURCES is a list
	hastctl role primary $RESOURCES ||
		fail 1 "cannot switch $RESOURCES to primary"
	log "waiting up to ${EXPORT_TIMEOUT}s for the exports of $RESOURCES"
	# shellcheck disable=SC2086
	hastctl wait export --timeout "$EXPORT_TIMEOUT" $RESOURCES ||
		fail 2 "the exports of $RESOURCES did not appear"
	log "exports ready; importing the data"
	import_data || fail 3 "importing the data failed"
	log "$RESOURCES primary, data imported"
}

become_secondary() {
	log "$STATE ($INSTANCE): releasing the data, switching $RESOURCES to secondary"
	export_data || fail 4 "releasing the data failed; roles left unchanged"
	# shellcheck disable=SC2086
	hastctl role secondary $RESOURCES ||
		fail 1 "cannot switch $RESOURCES to secondary"
	log "$RESOURCES secondary"
}

while [ $# -gt 0 ]; do
	case $1 in
	-n | --dry-run)
		DRY_RUN=1
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	--)
		shift
		break
		;;
	-*)
		usage >&2
		exit 64
		;;
	*) break ;;
	esac
done

case $# in
1)
	INSTANCE=-
	STATE=$1
	;;
3 | 4)
	INSTANCE="$1 $2"
	STATE=$3
	;;
*)
	usage >&2
	exit 64
	;;
esac
STATE=$(printf '%s' "$STATE" | tr '[:lower:]' '[:upper:]')
case $STATE in
MASTER | BACKUP | FAULT | STOP) ;;
*)
	usage >&2
	exit 64
	;;
esac

if ! command -v "$HASTCTL" >/dev/null 2>&1; then
	fail 69 "hastctl not found: $HASTCTL"
fi

HAST_STATE=$STATE
HAST_RESOURCES=$RESOURCES
export HAST_STATE HAST_RESOURCES

if [ "$DRY_RUN" = 1 ]; then
	log "dry run: nothing will be changed"
elif command -v flock >/dev/null 2>&1; then
	# Probe first: a failed redirection of `exec` would end the script.
	if (: >>"$LOCKFILE") 2>/dev/null; then
		exec 9>>"$LOCKFILE"
		flock -w 600 9 || fail 6 "cannot lock $LOCKFILE"
	else
		log "cannot open $LOCKFILE; running without the lock"
	fi
fi

case $STATE in
MASTER) become_primary ;;
*) become_secondary ;;
esac
exit 0
