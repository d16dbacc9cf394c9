#!/bin/bash
# shellcheck disable=SC2154  # the job_<array> variables are set by submit()
# Submits the moespec job arrays of experiment {{experiment}} in order, each after the arrays whose
# artifacts it reads (afterok). Rendered by `moespec submit --emit-sbatch` from jobs/submit.sh.
# Job ids are appended to job_ids.txt, where `moespec status` finds them. If sbatch refuses an
# array, the arrays this script already queued are cancelled.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
submitted=()

submit() {  # submit NAME [sbatch options...] SCRIPT
  local name="$1" out id
  shift
  if ! out="$(sbatch --parsable "$@")"; then
    echo "submit.sh: sbatch refused $name" >&2
    if [ "${#submitted[@]}" -gt 0 ]; then
      echo "submit.sh: cancelling the arrays already queued: ${submitted[*]}" >&2
      scancel "${submitted[@]}"
    fi
    exit 1
  fi
  id="${out%%;*}"    # --parsable prints "id" or "id;cluster"
  submitted+=("$id")
  echo "$name $id" >> "$here/job_ids.txt"
  printf -v "job_${name//./_}" '%s' "$id"
  echo "submitted $name as job $id"
}

{{submit_lines}}
