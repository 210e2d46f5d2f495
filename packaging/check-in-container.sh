#!/bin/bash
# Checks of the Debian package that CI cannot make: piuparts, and the package in a Debian 12
# container booted with systemd. For a person to run as root on a Debian 12 host that
# reaches a Debian mirror; docs/packaging.md shows a run and its results.
#
#   packaging/check-in-container.sh [-m MIRROR] [-d DEB] [-w DIR] [-r N] [-k] [STEP...]
#
#   STEP      piuparts | container (default: both). The .deb is built first
#             (packaging/build.sh deb) unless -d names one.
#   -m URL    Debian mirror (default: the first .../debian URL in the host's apt sources,
#             else http://deb.debian.org/debian)
#   -d DEB    check this spawnd_<version>_all.deb instead of building one
#   -w DIR    parent of the work directory (default /var/tmp; a container is ~500 MB)
#   -r N      systemctl restarts under the client loop (default 10)
#   -k        keep the work directory (logs, chroot) instead of removing it
#
# Exit status: 0 when every check passed, 1 when one failed, 2 on usage errors.
set -u
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH LC_ALL=C.UTF-8
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

SRC=$(cd "$(dirname "$0")/.." && pwd)
SUITE=bookworm
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
# Packages of the container beyond debootstrap's minimum: systemd to boot, the pool's
# program (fcgiwrap), a second FastCGI client (cgi-fcgi) and ps. spawnd's own dependencies
# are left out on purpose: apt-get must resolve them from the .deb.
CT_INCLUDE=systemd,dbus,fcgiwrap,libfcgi-bin,procps
POOL=check
SOCK=/run/spawnd/$POOL.sock
CGI=/usr/lib/cgi-bin/spawnd-hello

usage() {
    sed -n '5,16s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

MIRROR="" DEB="" PARENT=/var/tmp KEEP=0 RESTARTS=10
while getopts "m:d:w:r:kh" opt; do
    case $opt in
        m) MIRROR=$OPTARG ;;
        d) DEB=$OPTARG ;;
        w) PARENT=$OPTARG ;;
        r) RESTARTS=$OPTARG ;;
        k) KEEP=1 ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
case $RESTARTS in ''|*[!0-9]*) echo "-r wants a number, not '$RESTARTS'" >&2; usage ;; esac
STEPS=${*:-piuparts container}
for s in $STEPS; do
    case $s in piuparts|container) ;; *) echo "unknown step: $s" >&2; usage ;; esac
done
[ "$(id -u)" -eq 0 ] || { echo "check-in-container.sh: run as root" >&2; exit 2; }
if [ -n "$DEB" ]; then
    [ -f "$DEB" ] || { echo "check-in-container.sh: no such file: $DEB" >&2; exit 2; }
    DEB=$(cd "$(dirname "$DEB")" && pwd)/$(basename "$DEB")
fi

default_mirror() {
    # deb822 (URIs: ...) and one-line (deb URL suite ...) sources; the first .../debian.
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | sed -n -e 's/^URIs:[[:space:]]*//p' -e 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]*\)\{0,1\}//p' \
        | tr ' ' '\n' | grep -m1 -E '^https?://.*/debian/?$' || echo http://deb.debian.org/debian
}
[ -n "$MIRROR" ] || MIRROR=$(default_mirror)

WORK=$(mktemp -d "$PARENT/spawnd-check.XXXXXX") || exit 1
LOG=$WORK/check.log
ROOT=$WORK/rootfs
MACHINE=spawnd-check-$$
NSPAWN_PID="" LEADER="" FAILED=0
# nspawn leaves empty state directories in /run/systemd/nspawn; remove them if they are ours.
NSPAWN_RUN=/run/systemd/nspawn
[ -e "$NSPAWN_RUN" ] && NSPAWN_RUN=""

log() { echo "$*" >>"$LOG"; }
say() { echo "$*" | tee -a "$LOG"; }
# Run a command with its output in the log; its status is returned.
run() {
    log "+ $*"
    "$@" >>"$LOG" 2>&1
}

cleanup() {
    stop_container
    [ -n "$NSPAWN_RUN" ] && rmdir "$NSPAWN_RUN"/locks "$NSPAWN_RUN"/propagate "$NSPAWN_RUN" 2>/dev/null
    if [ "$KEEP" = 1 ]; then
        echo "kept $WORK (log: $LOG)"
    else
        # Never follow a mount out of the chroot: nspawn and piuparts unmount theirs, but
        # if one is left, leave the directory too rather than delete through it.
        if grep -q " $WORK/" /proc/mounts; then
            echo "mounts remain under $WORK; not removing it:" >&2
            grep " $WORK/" /proc/mounts >&2
        else
            rm -rf "$WORK"
        fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# step NAME FUNCTION: run one check, print PASS/FAIL and its duration.
step() {
    local name=$1 start end rc
    shift
    log "=== $name"
    start=$(date +%s.%N)
    "$@"
    rc=$?
    end=$(date +%s.%N)
    local took
    took=$(awk "BEGIN { printf \"%.1f\", $end - $start }")
    if [ $rc -eq 0 ]; then
        say "PASS  $name  (${took}s)"
    else
        say "FAIL  $name  (${took}s; see $LOG)"
        FAILED=1
    fi
    return $rc
}

fail() { say "      $*"; return 1; }

# ---- the package ------------------------------------------------------------------------
build_deb() {
    run "$SRC/packaging/build.sh" deps deb || return 1
    DEB=$("$SRC/packaging/build.sh" -o "$WORK" deb 2>>"$LOG") || return 1
    say "      built $DEB"
}

# ---- piuparts -----------------------------------------------------------------------------
need() {
    local missing="" p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    run env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
        -q --no-install-recommends $missing </dev/null
}

piuparts_check() {
    need piuparts || return 1
    local plog=$WORK/piuparts.log
    log "+ piuparts --tmpdir $WORK -d $SUITE -m $MIRROR --keyring $KEYRING $DEB (log: $plog)"
    piuparts --tmpdir "$WORK" -d "$SUITE" -m "$MIRROR" --keyring "$KEYRING" "$DEB" \
        >"$plog" 2>&1
    local rc=$?
    grep -E "(PASS|FAIL|ERROR):" "$plog" | sed 's/^/      /' | tee -a "$LOG"
    [ $rc -eq 0 ] && grep -q "PASS: All tests" "$plog"
}

# ---- the container --------------------------------------------------------------------------
ct() { nsenter --target "$LEADER" --all "$@"; }
ct_run() { log "+ [ct] $*"; ct "$@" >>"$LOG" 2>&1; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
wait_for() {
    local limit=$1 what=$2 deadline
    shift 2
    deadline=$(($(date +%s) + limit))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || { fail "timed out after ${limit}s waiting for $what"; return 1; }
        sleep 0.2
    done
}

make_rootfs() {
    need debootstrap systemd-container || return 1
    run debootstrap --include="$CT_INCLUDE" "$SUITE" "$ROOT" "$MIRROR" || return 1
    cp "$DEB" "$ROOT/root/" || return 1
    mkdir -p "$ROOT/usr/lib/cgi-bin"
    cat >"$ROOT$CGI" <<'EOF'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\nhello from pid %s\n' "$$"
EOF
    chmod 755 "$ROOT$CGI"
    # A FastCGI client that sends requests to the pool's socket one after another until
    # a stop file appears, then writes how many succeeded, were refused (connect failed)
    # or failed later (reset, timeout, bad answer). It uses the packaged client.
    cat >"$ROOT/root/spawnd-loop.py" <<'EOF'
import json, os, sys, time
from spawnd.fastcgi import client

address, script, stop, out = sys.argv[1:5]
result = {"ok": 0, "refused": 0, "failed": 0, "max_latency_s": 0.0, "errors": []}
while not os.path.exists(stop):
    began = time.monotonic()
    try:
        r = client.request(address, "/", params={"SCRIPT_FILENAME": script}, timeout=30)
        kind = "ok" if r.status == 200 and r.body.startswith(b"hello") else "failed"
        error = None if kind == "ok" else f"status {r.status}: {r.body[:60]!r}"
    except client.ConnectError as e:
        kind, error = "refused", str(e)
    except client.FastCGIError as e:
        kind, error = "failed", str(e)
    result[kind] += 1
    result["max_latency_s"] = max(result["max_latency_s"], round(time.monotonic() - began, 3))
    if error and len(result["errors"]) < 10:
        result["errors"].append(f"{time.strftime('%T')} {error}")
with open(out + ".tmp", "w") as f:
    json.dump(result, f)
os.rename(out + ".tmp", out)
EOF
}

leader_of() {
    # The container's PID 1 is the one child of systemd-nspawn.
    local kid
    kid=$(cat "/proc/$1/task/$1/children" 2>/dev/null) || return 1
    kid=${kid%% *}
    [ -n "$kid" ] && [ "$(cat "/proc/$kid/comm" 2>/dev/null)" = systemd ] && echo "$kid"
}

boot_container() {
    local opts=(--quiet --boot --directory="$ROOT" --machine="$MACHINE" --console=passive)
    # Without systemd on the host (a VM or container whose PID 1 is something else) nspawn
    # can neither register with systemd-machined nor ask for a scope unit: both need the
    # host's system bus. --register=no --keep-unit make it set up the cgroups itself.
    [ -d /run/systemd/system ] || opts+=(--register=no --keep-unit)
    log "+ systemd-nspawn ${opts[*]} (output: $WORK/nspawn.log)"
    systemd-nspawn "${opts[@]}" >"$WORK/nspawn.log" 2>&1 </dev/null &
    NSPAWN_PID=$!
    wait_for 30 "the container's systemd to start" leader_of "$NSPAWN_PID" \
        || { cat "$WORK/nspawn.log" >>"$LOG"; return 1; }
    LEADER=$(leader_of "$NSPAWN_PID")
    log "container leader pid $LEADER"
    # systemctl answers once the container's manager is up; then wait for the boot's end.
    wait_for 60 "systemctl in the container" manager_up || return 1
    local state
    state=$(timeout 120 nsenter --target "$LEADER" --all systemctl is-system-running --wait)
    say "      booted: system $state; $(ct systemctl --version | head -1)"
    ct_run systemctl --failed --no-pager
    [ "$state" = running ] || { ct systemctl --failed --no-pager | tee -a "$LOG"; return 1; }
}

manager_up() {
    ct systemctl is-system-running 2>/dev/null \
        | grep -qxE "initializing|starting|running|degraded|maintenance"
}

stop_container() {
    [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null || return 0
    [ -n "$LEADER" ] && ct systemctl poweroff >/dev/null 2>&1
    local deadline=$(($(date +%s) + 60))
    while kill -0 "$NSPAWN_PID" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
        sleep 0.2
    done
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
        echo "the container did not power off in 60s; killing systemd-nspawn $NSPAWN_PID" >&2
        kill -KILL "$NSPAWN_PID"
    fi
    wait "$NSPAWN_PID" 2>/dev/null
    NSPAWN_PID=""
}

poweroff_check() {
    stop_container
    [ -z "$NSPAWN_PID" ] || return 1
    grep -q " $ROOT" /proc/mounts && { fail "mounts of the container remain"; return 1; }
    return 0
}

unit_is() {   # unit_is PROPERTY VALUE
    [ "$(ct systemctl show -p "$1" --value spawnd.service)" = "$2" ]
}

install_check() {
    ct_run env DEBIAN_FRONTEND=noninteractive apt-get update -q || return 1
    ct_run env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        "/root/$(basename "$DEB")" || return 1
    wait_for 30 "spawnd.service to be active" unit_is ActiveState active || return 1
    local enabled sub status
    enabled=$(ct systemctl is-enabled spawnd.service)
    sub=$(ct systemctl show -p SubState --value spawnd.service)
    status=$(ct systemctl status spawnd.service --no-pager)
    log "$status"
    say "      $(echo "$status" | grep -m1 'Active:' | sed 's/^ *//')"
    [ "$enabled" = enabled ] || fail "spawnd.service is $enabled, not enabled"
    [ "$sub" = running ] || fail "spawnd.service is $sub, not running"
    echo "$status" | grep -q "Active: active (running)"
}

write_pool() {   # write_pool PROCESSES
    cat >"$ROOT/etc/spawnd/pools.d/$POOL.yaml" <<EOF
pools:
  $POOL:
    command: [/usr/sbin/fcgiwrap]
    listen: unix:$SOCK
    socket: {mode: "0660", owner: www-data, group: www-data}
    processes: $1
    user: www-data
EOF
}

running_children() {   # running_children N: the pool runs N children
    ct spawnctl status "$POOL" --json | python3 -c '
import json, sys
pool = json.load(sys.stdin)["pools"][0]
sys.exit(0 if pool["running"] == pool["desired"] == int(sys.argv[1]) else 1)' "$1"
}

serve_check() {
    write_pool 2
    ct_run spawnd -t || return 1
    ct_run systemctl reload spawnd.service || return 1
    wait_for 10 "2 running children" running_children 2 || return 1
    local out
    out=$(ct spawnctl request "$POOL" / -e "SCRIPT_FILENAME=$CGI" 2>&1)
    log "$out"
    echo "$out" | grep -q "^hello from pid" || { fail "spawnctl request: $out"; return 1; }
    say "      spawnctl request $POOL /: $(echo "$out" | head -1), $(echo "$out" | tail -1)"
    out=$(ct env REQUEST_METHOD=GET SCRIPT_FILENAME="$CGI" cgi-fcgi -bind -connect "$SOCK" 2>&1)
    log "$out"
    echo "$out" | grep -q "^hello from pid" || { fail "cgi-fcgi: $out"; return 1; }
    say "      cgi-fcgi -bind -connect $SOCK: $(echo "$out" | tail -1)"
}

LOOP_PID=""
start_loop() {
    rm -f "$ROOT/root/loop.stop" "$ROOT/root/loop.json"
    ct python3 /root/spawnd-loop.py "unix:$SOCK" "$CGI" /root/loop.stop /root/loop.json \
        >>"$LOG" 2>&1 &
    LOOP_PID=$!
}

# stop_loop WHAT: stop the client and judge what it saw.
stop_loop() {
    touch "$ROOT/root/loop.stop"
    wait "$LOOP_PID"
    [ -f "$ROOT/root/loop.json" ] || { fail "the client loop wrote no result"; return 1; }
    local result
    result=$(cat "$ROOT/root/loop.json")
    log "client loop during $1: $result"
    python3 - "$1" "$result" <<'EOF' | tee -a "$LOG"
import json, sys
what, r = sys.argv[1], json.loads(sys.argv[2])
print(f"      client loop during {what}: {r['ok']} ok, {r['refused']} refused, "
      f"{r['failed']} failed, slowest {r['max_latency_s']}s")
for e in r["errors"]:
    print(f"        {e}")
EOF
    python3 -c 'import json, sys; r = json.loads(sys.argv[1]); sys.exit(not (r["ok"] > 0 and r["refused"] == 0 and r["failed"] == 0))' "$result"
}

pool_answers() {   # one more request succeeds (after a reload or restart)
    ct spawnctl request "$POOL" / -e "SCRIPT_FILENAME=$CGI" 2>/dev/null | grep -q "^hello"
}

reload_check() {
    start_loop
    local n rc=0
    for n in 3 2 2; do          # grow, shrink, and a reload that changes nothing
        write_pool $n
        ct_run systemctl reload spawnd.service || rc=1
        wait_for 20 "$n running children after the reload" running_children $n || rc=1
        pool_answers || rc=1
    done
    unit_is SubState running || { fail "not running after the reloads"; rc=1; }
    stop_loop "3 reloads" || rc=1
    return $rc
}

restart_check() {
    local inode0 inode pid0 pid rc=0 i
    inode0=$(ct stat -c %i "$SOCK")
    start_loop
    # systemd refuses a sixth start within 10s (StartLimitBurst=5, StartLimitIntervalSec=10s):
    # the unit fails and its fd store is emptied. reset-failed clears that count, so that
    # many restarts in a row test the hand-over of the sockets, not the rate limit.
    for i in $(seq "$RESTARTS"); do
        ct_run systemctl reset-failed spawnd.service
        pid0=$(ct systemctl show -p MainPID --value spawnd.service)
        ct_run systemctl restart spawnd.service || rc=1
        pid=$(ct systemctl show -p MainPID --value spawnd.service)
        [ "$pid" != "$pid0" ] && [ "$pid" != 0 ] || { fail "main pid $pid0 -> $pid"; rc=1; }
        wait_for 20 "2 running children after restart $i" running_children 2 || rc=1
        pool_answers || rc=1
    done
    inode=$(ct stat -c %i "$SOCK")
    say "      socket inode before/after: $inode0/$inode (the same socket, from the fd store)"
    [ "$inode" = "$inode0" ] || { fail "the socket was re-created"; rc=1; }
    stop_loop "$RESTARTS restarts" || rc=1
    return $rc
}

# Processes of spawnd.service's cgroup(s), wherever the hierarchy is mounted.
unit_processes() {
    ct sh -c 'for f in $(find /sys/fs/cgroup -path "*/system.slice/spawnd.service/*" -name cgroup.procs 2>/dev/null); do cat "$f"; done'
}

stop_check() {
    ct_run systemd-cgls --no-pager -u spawnd.service
    ct_run systemctl stop spawnd.service || return 1
    local rc=0 left procs
    unit_is ActiveState inactive || { fail "spawnd.service is $(ct systemctl is-active spawnd.service)"; rc=1; }
    procs=$(unit_processes)
    [ -z "$procs" ] || { fail "processes left in the unit's cgroup: $procs"; rc=1; }
    left=$(ct ps -e -o pid=,user=,args= | grep -E "spawnd|fcgiwrap|spawnd-hello" | grep -v grep)
    log "$(ct ps -e -o pid=,user=,args=)"
    [ -z "$left" ] || { fail "left running: $left"; rc=1; }
    ct test -e /run/spawnd && { fail "/run/spawnd remains"; rc=1; }
    say "      after stop: no spawnd or fcgiwrap process in ps, unit cgroup empty, /run/spawnd gone"
    return $rc
}

purge_check() {
    ct_run systemctl start spawnd.service || return 1
    wait_for 20 "2 running children" running_children 2 || return 1
    ct_run env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q spawnd || return 1
    local rc=0 left
    left=$(ct ps -e -o pid=,user=,args= | grep -E "spawnd|fcgiwrap" | grep -v grep)
    [ -z "$left" ] || { fail "left running after purge: $left"; rc=1; }
    for f in /etc/spawnd/spawnd.yaml /lib/systemd/system/spawnd.service \
             /etc/systemd/system/multi-user.target.wants/spawnd.service /run/spawnd; do
        ct test -e "$f" && { fail "$f remains after purge"; rc=1; }
    done
    # The pool file the admin wrote is not the package's: dpkg keeps it (and its directory).
    ct test -e "/etc/spawnd/pools.d/$POOL.yaml" || { fail "purge removed the admin's pool file"; rc=1; }
    [ $rc -eq 0 ] && say "      purge stopped the service; conffile, unit, enablement link and" \
        "/run/spawnd are gone; the admin's pools.d/$POOL.yaml is kept"
    return $rc
}

container_checks() {
    step "container: debootstrap $SUITE" make_rootfs || return 1
    step "container: boot with systemd (systemd-nspawn --boot)" boot_container || return 1
    step "container: apt-get install spawnd, unit active (running)" install_check || return 1
    step "container: pool in pools.d, systemctl reload, FastCGI request" serve_check || return 1
    step "container: systemctl reload x3 under a client loop" reload_check
    step "container: systemctl restart x$RESTARTS under a client loop" restart_check
    step "container: systemctl stop leaves no process" stop_check
    ct_run journalctl -u spawnd.service --no-pager -o short-precise
    step "container: apt-get purge while running" purge_check
    step "container: poweroff" poweroff_check
}

say "spawnd package checks; work directory $WORK, mirror $MIRROR"
if [ -z "$DEB" ]; then
    step "build spawnd .deb" build_deb || exit 1
fi
for s in $STEPS; do
    case $s in
        piuparts) step "piuparts install/purge of $(basename "$DEB")" piuparts_check ;;
        container) container_checks ;;
    esac
done
[ $FAILED -eq 0 ] && say "all checks passed" || say "some checks FAILED"
exit $FAILED
