# Sourced by the one-call GPU scripts (gpu_all.sh, gpu_tests.sh):
#   step NAME SECONDS COMMAND...
# runs COMMAND under a time limit, announces it, and on a failure or a timeout adds
# NAME to the array ``failed``, so that the remaining steps still run.
failed=()

step() {
  local name=$1 limit=$2
  shift 2
  echo
  echo "== $name (at ${SECONDS}s, limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "!! $name: exit $rc"
    failed+=("$name")
  fi
}
