#!/usr/bin/env bash
# Install what the `ssh` tests need on a Debian/Ubuntu machine (CI or a developer box):
# the OpenSSH server (started by the tests themselves, on 127.0.0.1, with throw-away keys),
# the OpenSSH client and rsync (the benchmark's baseline). Needs root or sudo; does nothing
# when everything is already there. It starts no service: the test fixture runs its own sshd.
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || command -v sshd >/dev/null || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v rsync >/dev/null || need+=(rsync)
if [ ${#need[@]} -eq 0 ]; then
  echo "ensure_sshd: openssh-server, openssh-client and rsync are installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# policy-rc.d in containers may refuse to start the system sshd; that is fine (and wanted)
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
echo "ensure_sshd: installed ${need[*]}"
