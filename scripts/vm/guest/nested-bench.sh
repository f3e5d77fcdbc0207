# Outer guest of the nested benchmark: like nested.sh, then scripts/vm/nested/bench.sh.
set -eu
set -o pipefail
. /lib/vfmap/lib.sh
NESTED_SCRIPT=bench.sh . /lib/vfmap/nested.sh
