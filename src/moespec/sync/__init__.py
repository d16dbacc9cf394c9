"""Results sync over SSH: ``moespec sync --from-hpc`` / ``--to-hpc``.

How the pieces fit (each module's docstring says more):

- ``remotes``: ``sync/remotes.yaml`` (hosts, roots, default filters), checked by a small schema;
- ``filters``, ``paths``, ``listing``, ``plan``: pure parts. Two listings plus the filters go in,
  a list of actions comes out; remote names are checked before they are used;
- ``transport`` (interface), ``transport_paramiko``, ``transport_openssh``: one connection that
  runs commands and opens SFTP channels; ``sshconfig`` and ``hostkeys`` serve the paramiko one;
- ``engine``: pipelined SFTP transfers over several channels, ``*.part`` files, resume, verify;
- ``session``: one run (connect, list, plan, transfer, retry, report); ``cli``: the command.

The throw-away sshd of the tests and the benchmark is ``tests/sync/loopback.py``; design notes
and measurements are in ``docs/sync.md``.

Nothing here imports torch; paramiko is imported only when a connection is made.
"""
