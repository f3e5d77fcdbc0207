# Outer guest of the nested benchmark: like nested.sh, then scripts/vm/nested/bench.sh.
. /lib/vfmap/lib.sh
NESTED_SCRIPT=bench.sh . /lib/vfmap/nested.sh
