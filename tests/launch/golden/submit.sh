#!/bin/bash
# shellcheck disable=SC2154  # the job_<array> variables are set by submit()
# Submits the moespec job arrays of experiment sw in order, each after the arrays whose
# artifacts it reads (aftercorr where tasks correspond one to one, else afterok). Rendered by
# `moespec submit --emit-sbatch` from moespec/launch/templates/submit.sh. Jobs start in the project
# folder (../.. from here), which every path in the scripts is relative to. Job ids are
# appended to job_ids.txt, where `moespec status` finds them; a second run refuses (the tasks are
# queued already). If sbatch refuses an array, the arrays this script already queued are cancelled.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -s "$here/job_ids.txt" ]; then
  echo "submit.sh: these scripts were submitted already (job ids in $here/job_ids.txt); see \`moespec status\`," \
       "or emit new scripts with \`moespec submit --emit-sbatch\` to submit what is missing" >&2
  exit 1
fi
cd "$here/"../.. || exit 1
submitted=()

submit() {  # submit NAME [sbatch options...] SCRIPT
  local name="$1" out id
  shift
  if ! out="$(sbatch --parsable "$@")"; then
    echo "submit.sh: sbatch refused $name" >&2
    if [ "${#submitted[@]}" -gt 0 ]; then
      echo "submit.sh: cancelling the arrays already queued: ${submitted[*]}" >&2
      scancel "${submitted[@]}"
      mv "$here/job_ids.txt" "$here/job_ids.cancelled.txt"   # so that a corrected run may submit again
    fi
    exit 1
  fi
  id="${out%%;*}"    # --parsable prints "id" or "id;cluster"
  submitted+=("$id")
  echo "$name $id" >> "$here/job_ids.txt"
  printf -v "job_${name//./_}" '%s' "$id"
  echo "submitted $name as job $id"
}

submit embed.0 "$here/embed.0.sbatch"
submit reduce.0 --dependency="afterok:${job_embed_0}" "$here/reduce.0.sbatch"
submit reduce.1 --dependency="afterok:${job_embed_0}" "$here/reduce.1.sbatch"
