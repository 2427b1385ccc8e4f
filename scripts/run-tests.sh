#!/usr/bin/env bash
# npm test: type check, schema integrity, mocha units, iotests; the last line is "N passed, N failed".
#
# Every stage runs even if an earlier one failed, and counts toward the sum. Each stage runs in
# its own process group, which is killed afterwards, so no test process outlives this script.
# Environment: IOTESTS_ARGS (extra ./check arguments, e.g. "-g quick"), QSD (daemon under test),
# QSD_TESTS_UNMOUNT_LEFTOVERS=1 (CI: lazily unmount FUSE mounts that appeared during the run).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
repo=$(pwd)
tmp=$(mktemp -d /tmp/qsd-run-tests.XXXXXX)
passed=0
failed=0

fuse_mounts() { awk '$3 ~ /^fuse/ { print $2 }' /proc/self/mounts | sort; }
fuse_mounts > "$tmp/mounts.before"

# Counts as one failure if FUSE mounts appeared during the run and are still there.
check_leftovers() {
    fuse_mounts > "$tmp/mounts.after"
    local new
    new=$(comm -13 "$tmp/mounts.before" "$tmp/mounts.after")
    if [ -n "$new" ]; then
        echo "FUSE mounts left behind:"; echo "$new" | sed 's/^/    /'
        if [ "${QSD_TESTS_UNMOUNT_LEFTOVERS:-0}" = 1 ]; then
            echo "$new" | while read -r mp; do fusermount3 -u -z "$mp" 2>/dev/null || umount -l "$mp"; done
        fi
        count "no FUSE mount left behind" 1
    fi
}
finish() { rm -rf "$tmp"; }
trap finish EXIT

# run_stage NAME CMD...: runs CMD in a new process group and kills whatever of it is left.
run_stage() {
    local name=$1; shift
    echo
    echo "==== $name ===="
    setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$tmp/pgid" "$@"
    local rc=$?
    kill -KILL -- "-$(cat "$tmp/pgid")" 2>/dev/null
    return $rc
}

count() {   # count NAME RC: one check that passed or failed
    if [ "$2" -eq 0 ]; then passed=$((passed + 1)); echo "---- $1: ok"
    else failed=$((failed + 1)); echo "---- $1: FAILED"; fi
}

# 1. Type check: the sources, and the iotests library.
run_stage "tsc --noEmit" node_modules/.bin/tsc -p tsconfig.json --noEmit
count "tsc (src)" $?
run_stage "tsc --noEmit (iotests)" node_modules/.bin/tsc -p tests/iotests/tsconfig.json
count "tsc (iotests)" $?

# 2. Schema integrity: regenerating from schema/ must reproduce src/qapi/generated exactly.
if [ -f scripts/qapi-gen.ts ] && [ -d src/qapi/generated ]; then
    run_stage "schema integrity (qapi-gen)" bash -c '
        node_modules/.bin/tsx scripts/qapi-gen.ts schema "$0/generated" >/dev/null &&
        diff -r -u src/qapi/generated "$0/generated"' "$tmp"
    count "generated code matches schema/" $?
else
    echo; echo "==== schema integrity: skipped (no scripts/qapi-gen.ts or src/qapi/generated yet) ===="
fi

# 3. Unit tests: the JSON reporter gives exact counts; failures are printed readably from it.
# mocha runs without --exit, so a test that leaves a handle open (a timer, a socket) keeps it
# alive after its report: the watchdog turns that into a failed check instead of a hung run.
run_stage "mocha" timeout --signal=KILL "${MOCHA_WATCHDOG_SECONDS:-900}" \
    node_modules/.bin/mocha --reporter json --reporter-option "output=$tmp/mocha.json"
mocha_rc=$?
if [ "$mocha_rc" -eq 137 ]; then
    echo "  mocha did not exit within ${MOCHA_WATCHDOG_SECONDS:-900} s: a test left a handle open (or hung)" >&2
fi
if [ -s "$tmp/mocha.json" ]; then
    read -r mp mf < <(node -e '
        const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
        for (const f of r.failures) {
            console.error(`  FAIL ${f.fullTitle}\n    ${(f.err.stack || f.err.message || "").split("\n").slice(0, 8).join("\n    ")}`);
        }
        console.error(`  mocha: ${r.stats.passes} passing, ${r.stats.failures} failing, ${r.stats.pending} pending`);
        console.log(r.stats.passes, r.stats.failures);' "$tmp/mocha.json")
    passed=$((passed + ${mp:-0}))
    failed=$((failed + ${mf:-1}))
    if [ "$mocha_rc" -ne 0 ] && [ "${mf:-0}" -eq 0 ]; then count "mocha exit status" "$mocha_rc"; fi
else
    count "mocha (no report: it did not run to completion)" 1
fi

# 4. iotests.
# shellcheck disable=SC2086
IOTESTS_SUMMARY_FILE=$tmp/iotests.summary run_stage "iotests" tests/iotests/check ${IOTESTS_ARGS:-}
iot_rc=$?
if [ -s "$tmp/iotests.summary" ]; then
    ip=$(sed -n 's/.*passed=\([0-9]*\).*/\1/p' "$tmp/iotests.summary")
    if_=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' "$tmp/iotests.summary")
    passed=$((passed + ip))
    failed=$((failed + if_))
    if [ "$iot_rc" -ne 0 ] && [ "$if_" -eq 0 ]; then count "iotests exit status" "$iot_rc"; fi
else
    count "iotests (no summary: check did not run to completion)" 1
fi

check_leftovers
echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
