#!/usr/bin/env bash
# Fails (listing the files) when a C source differs from .clang-format's output.
set -euo pipefail
fmt=${1:-clang-format}
bad=()
while IFS= read -r f; do
  if ! diff -q <("$fmt" --style=file "$f") "$f" >/dev/null; then bad+=("$f"); fi
done < <(git ls-files '*.c' '*.h' 2>/dev/null || find proxy tests bench -name '*.[ch]')
if ((${#bad[@]})); then
  printf 'not clang-formatted (run: %s -i --style=file FILE):\n' "$fmt" >&2
  printf '  %s\n' "${bad[@]}" >&2
  exit 1
fi
echo "clang-format: all sources formatted"
