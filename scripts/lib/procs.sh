# Leftover-process check for scripts/test.
# shellcheck shell=bash
#
# `procs_tag` puts VFMAP_TEST_RUN=<fresh random tag> into the environment; every process
# started afterwards inherits it, down to QEMU and the daemons the tests start. `procs_check`
# then finds, by /proc/*/environ, every process still alive with that tag: it lists them
# (pid and command line), kills them and returns 1. The scan runs bash builtins only, in a
# subshell it skips, so it never finds itself. A process that clears its environment escapes.

procs_tag() {
    VFMAP_TEST_RUN=vfmap-test-$$-$SRANDOM
    export VFMAP_TEST_RUN
}

# Prints "pid<TAB>command line" for each live process carrying VFMAP_TEST_RUN=$1.
procs_tagged() {
    local want="VFMAP_TEST_RUN=$1" d var
    local -a argv
    for d in /proc/[0-9]*; do
        case ${d#/proc/} in "$$" | "$BASHPID") continue ;; esac
        { while IFS= read -r -d '' var; do
            if [ "$var" = "$want" ]; then
                mapfile -d '' -t argv < "$d/cmdline" && printf '%s\t%s\n' "${d#/proc/}" "${argv[*]}"
                break
            fi
        done < "$d/environ"; } 2>/dev/null
    done
}

# Fails (1) when any process tagged ${1:-$VFMAP_TEST_RUN} is still alive after a grace period
# of PROCS_GRACE tenths of a second (default 30: processes already dying because their parent
# died get that long); kills them all first.
procs_check() {
    local tag=${1:-${VFMAP_TEST_RUN:?procs_tag was not called}} left i pid cmd
    for ((i = 0; ; i++)); do
        left=$(procs_tagged "$tag")
        [ -z "$left" ] && return 0
        ((i < ${PROCS_GRACE:-30})) || break
        sleep 0.1
    done
    echo "error: processes started by this test run are still running (killed now):" >&2
    while IFS=$'\t' read -r pid cmd; do
        printf '  pid %s: %s\n' "$pid" "$cmd" >&2
        kill -KILL "$pid" 2>/dev/null || true
    done <<< "$left"
    return 1
}
