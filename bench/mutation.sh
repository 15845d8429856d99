#!/usr/bin/env bash
# Mutation testing with mutmut (issue 21): bench/mutation.sh MODULE...
#
# MODULE: a path (ncfast/stats.py) or a dotted name (ncfast.stats, ncfast.paper.rundir). For each,
# in a scratch copy of the working tree (build/mutation/<module>: mutmut writes mutants/ there,
# the checkout stays untouched), mutmut mutates only that module and runs only the test files
# that [tool.mutmut.module_tests] of pyproject.toml lists for it (per mutant, only those of them
# that reach the mutated function). Prints per module: mutants, killed, survived, equivalent
# (the mutants bench/results/mutation.md names as equivalent, with the reason), the score
# killed / (mutants − equivalent), and the surviving mutants' names (`cd build/mutation/<module>
# && mutmut show NAME` shows the diff). Not part of `python -m pytest`.
#
# Environment: MUTATION_JOBS (parallel mutants, default 2; 1 on a shared box), MUTATION_KEEP=1
# (reuse the scratch copy and mutmut's cache: rerun only the mutants whose code changed),
# MUTATION_RECHECK=0 (skip the recheck below), MUTATION_RECHECK_ONLY=1 (with MUTATION_KEEP=1: no
# mutmut run, only the recheck of the last run's survivors against the checkout's current tests:
# for tests written after the run), MUTATION_RECHECK_TESTS="FILE..." (the recheck runs these test
# files instead of the module's whole selection: a faster recheck against the guards alone).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
jobs=${MUTATION_JOBS:-2}
results_md="$root/bench/results/mutation.md"
[ $# -ge 1 ] || { echo "usage: bench/mutation.sh MODULE... (e.g. ncfast/stats.py ncfast.metrics)" >&2; exit 2; }
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install -e '.[dev]'" >&2; exit 2; }

for module in "$@"; do
    path=$module
    [[ $path == *.py ]] || path="${path//.//}.py"
    [ -f "$root/$path" ] || { echo "$module: no file $path" >&2; exit 2; }
    tests=$(cd "$root" && python - "$path" <<'EOF'
import sys, tomllib
table = tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"].get("module_tests", {})
files = table.get(sys.argv[1])
if not files:
    sys.exit(f"{sys.argv[1]}: no entry in [tool.mutmut.module_tests] of pyproject.toml")
print(" ".join(files))
EOF
)
    name=${path%.py}
    name=${name//\//.}
    work="$root/build/mutation/$name"
    if [ "${MUTATION_KEEP:-0}" != 1 ]; then
        rm -rf "$work"
    fi
    mkdir -p "$work"
    # The working tree as git sees it (tracked and untracked, not ignored) and the extension.
    (cd "$root" && { git ls-files -co --exclude-standard; ls ncfast/_C*.so 2>/dev/null || true; } \
        | grep -v '^build/' | tar -cf - -T - | tar -xf - -C "$work")
    # This module only, these tests only.
    python - "$work/pyproject.toml" "$path" $tests <<'EOF'
import sys
toml, path, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(toml).read()
extra = f"only_mutate = [{path!r}]\npytest_add_cli_args_test_selection = {tests!r}\n"
text = text.replace("[tool.mutmut]\n", "[tool.mutmut]\n" + extra.replace("'", '"'), 1)
open(toml, "w").write(text)
EOF
    echo "== $name: mutating $path, tests: $tests"
    start=$(date +%s)
    # PYTHONPATH: processes the tests spawn (gloo groups) import the mutated copy too (mutmut
    # passes the mutant under test to them in MUTANT_UNDER_TEST). The folder must exist before
    # Python starts, or its import system caches it as missing.
    mkdir -p "$work/mutants"
    if [ "${MUTATION_RECHECK_ONLY:-0}" != 1 ]; then
        (cd "$work" && PYTHONPATH="$work/mutants" mutmut run --max-children "$jobs" >mutmut-run.log 2>&1) || {
            tail -30 "$work/mutmut-run.log"; echo "$name: mutmut run failed (log: $work/mutmut-run.log)" >&2; exit 1; }
        (cd "$work" && mutmut results --all true >mutmut-results.txt 2>&1 || true)
    fi
    # mutmut links a test to a function only through calls in its own process: a test that
    # reaches the function only in the processes it spawns (the gloo tests) is never run on its
    # mutants. Survivors are rerun against the module's tests that spawn gloo processes (only
    # modules that have such tests: the recheck costs a test run per survivor), and, with
    # MUTATION_RECHECK_ONLY=1, against its guard files (tests/*/test_mutation_guards_*.py) as
    # the checkout has them now (tests written after the run).
    selection="gloo"
    [ "${MUTATION_RECHECK_ONLY:-0}" = 1 ] && selection="gloo or mutation_guards"
    tests=${MUTATION_RECHECK_TESTS:-$tests}
    if [ "${MUTATION_RECHECK:-1}" = 1 ] && { [ "${MUTATION_RECHECK_ONLY:-0}" = 1 ] ||
        (cd "$root" && grep -lq "gloo" $tests); }; then
        # The selected test files and what they import (tests/helpers), as the checkout has them.
        (cd "$root" && tar -cf - $tests tests/conftest.py tests/helpers) | tar -xf - -C "$work/mutants"
        # A mutant of code that runs at import (ncfast.backend.ops picks its backend then) can
        # break the import itself: pytest exits 2 (a test file's import), 3 or 4 (conftest's
        # import), which count as killed only when the same selection passes on the unmutated
        # code.
        killing="1"
        if (cd "$work/mutants" && env -u MUTANT_UNDER_TEST PYTHONPATH="$work/mutants" \
            timeout 600 python -m pytest -x -q -p no:cacheprovider -k "$selection" $tests \
            >/dev/null 2>&1); then
            killing="1 2 3 4"
        fi
        grep -E ': (survived|no tests)$' "$work/mutmut-results.txt" | sed 's/: [a-z ]*$//; s/^ *//' | while read -r mutant; do
            if (cd "$work/mutants" && MUTANT_UNDER_TEST="$mutant" PYTHONPATH="$work/mutants" \
                timeout 600 python -m pytest -x -q -p no:cacheprovider -k "$selection" $tests \
                >/dev/null 2>&1); then
                :
            elif [[ " $killing " == *" $? "* ]]; then
                sed -i "s/^\( *\)$mutant: [a-z ]*$/\1$mutant: killed/" "$work/mutmut-results.txt"
                echo "  killed on recheck: $mutant"
            fi
        done
    fi
    python - "$work/mutmut-results.txt" "$results_md" "$name" "$(( $(date +%s) - start ))" <<'EOF'
import re, sys
results, md, module, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
status = {}
for line in open(results):
    m = re.match(r"\s*([\w.]+__mutmut_\d+): (.+)", line)
    if m:
        status[m.group(1)] = m.group(2).strip()
try:
    # Equivalent: a list line "- `NAME`: why" (other mentions, e.g. open lists, do not count).
    listed = set(re.findall(r"^- `([\w.]+__mutmut_\d+)`:", open(md).read(), re.MULTILINE))
except FileNotFoundError:
    listed = set()
killed = [k for k, v in status.items() if v == "killed"]
survived = sorted(k for k, v in status.items() if v != "killed")
equivalent = [k for k in survived if k in listed]
open_ = [k for k in survived if k not in listed]
scored = len(status) - len(equivalent)
score = 100.0 * len(killed) / scored if scored else float("nan")
print(f"{module}: mutants {len(status)}, killed {len(killed)}, survived {len(survived)}, "
      f"equivalent {len(equivalent)}, score {score:.1f} % ({seconds} s)")
for k in open_:
    print(f"  not killed: {k} ({status[k]})")
EOF
done
