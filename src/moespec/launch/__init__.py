"""Planning and running tasks: locally, through submitit on Slurm, or as plain sbatch scripts.

How the pieces fit (each module's docstring says more):

- ``plan``: an experiment's sweep points -> unique, content-addressed stage tasks and their state
  (pure; reads only done stamps and artifacts);
- ``donecheck``: a cheap "is this task done?" (verify an artifact once, then trust its stamp);
- ``arrays``: a plan -> the job arrays of one submission (chunks, throttles, dependencies);
- ``runner``: one task in this process (``moespec run``), and every task through submitit's local executor;
- ``slurm``: a plan submitted to Slurm through submitit; ``sbatch``: the same arrays as plain scripts;
- ``profiles``: cluster profiles (``hpc/clusters/*.yaml``), kept apart from the science;
- ``records``: which job runs which task, beside the artifacts; ``status``: task states from the
  artifacts, those records and the scheduler; ``scheduler``: the few Slurm commands moespec calls itself.
"""
