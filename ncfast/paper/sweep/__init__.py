"""HPD22's whole grid of training runs in one resumable command (``ncfast sweep``).

HPD22 (Appendix A.3, as PHD20) trained every (dataset, network) pair of Table A.2 with MSE and
with cross-entropy at 25 learning rates log-spaced in [1e-4, 0.25] and kept, per (dataset,
network, loss), the one with the best final test error. A :class:`Sweep` does that:

- the grid (:class:`Grid`): datasets × networks (a family resolves to Table A.2's depth per
  dataset) × losses × learning rates × seeds, plus options of ``ncfast train`` given to every run.
  It is checked (one resolved :class:`ncfast.paper.train.TrainConfig` per value), with every
  option of the sweep (:class:`SweepOptions`), and written to ``DIR/sweep.json`` before anything
  starts; another grid in the same DIR is an error naming the difference; a ``sweep.json`` is
  checked field by field when it is read;
- each run lives in ``DIR/runs/<dataset>-<net>-<loss>-lr<lr>-seed<seed>`` and is trained in a
  child process (:mod:`ncfast.paper.run_one`; :class:`TrainingRun`, the one run function of
  every executor), resumed when the run has a checkpoint and started over when it was killed
  before its first one. Its outcome (done, or failed with the reason)
  goes to ``sweep_status.json`` there (written atomically), the child's output to ``sweep.log``;
  a failed run (also one whose checkpoint cannot be used) does not stop the sweep. The status is
  checked against the run's files: a run it calls done without its final test error logged is
  reported and run again;
- executors: ``local`` runs in parallel over this machine's GPUs (one run per GPU, or
  ``runs_per_gpu``) or over ``jobs`` CPU slots; children die with the sweep (Linux:
  ``PR_SET_PDEATHSIG``), so a rerun never races orphans. ``slurm`` submits one array job through
  submitit; a job that reaches its time limit is requeued (the run function is checkpointable)
  and resumes the run from its last checkpoint (``checkpoint_every`` bounds what is lost with
  ``--stop-after`` segments); ``submitit-local`` is the same path with local processes;
- rerunning is idempotent: finished runs are skipped, killed ones resumed, the rest started;
  failed ones stay failed unless ``retry_failed``. A run is *running* while its run directory's
  lock (:class:`ncfast.paper.rundir.RunDirectory`) is held by a live process;
- :meth:`Sweep.select` picks per (dataset, network, loss) the learning rate of lowest final test
  error (mean over the seeds that finished; ties: the smaller learning rate) into
  ``DIR/selected.json``; :meth:`Sweep.report` writes Table 1, the Figs. 2–12 grid over the selected
  runs (MSE beside CE) and the sweep's own figure (final test error against learning rate) to
  ``DIR/report/`` (the figure: :func:`ncfast.report.sweep_figures.lr_sweep_figure`).

The parts: :mod:`~ncfast.paper.sweep.grid` (the grid and the runs' options),
:mod:`~ncfast.paper.sweep.status` (what is known of a run), :mod:`~ncfast.paper.sweep.run`
(the run function), :mod:`~ncfast.paper.sweep.executors` (local and submitit),
:mod:`~ncfast.paper.sweep.sweep` (:class:`Sweep`), :mod:`~ncfast.paper.sweep.layout` (file
names, :class:`SweepError`).
"""

# The names of the sweep, imported from the modules that define them (each is documented
# there; `X as X` re-exports it).
from ncfast.paper.sweep.executors import (
    SlurmOptions as SlurmOptions,
)
from ncfast.paper.sweep.executors import (
    SweepOptions as SweepOptions,
)
from ncfast.paper.sweep.executors import (
    submitit_parameters as submitit_parameters,
)
from ncfast.paper.sweep.grid import (
    PAPER_GRID as PAPER_GRID,
)
from ncfast.paper.sweep.grid import (
    Grid as Grid,
)
from ncfast.paper.sweep.grid import (
    RunSpec as RunSpec,
)
from ncfast.paper.sweep.grid import (
    check_train_options as check_train_options,
)
from ncfast.paper.sweep.grid import (
    parse_lrs as parse_lrs,
)
from ncfast.paper.sweep.grid import (
    parse_names as parse_names,
)
from ncfast.paper.sweep.grid import (
    parse_seeds as parse_seeds,
)
from ncfast.paper.sweep.layout import (
    LOG_FILE as LOG_FILE,
)
from ncfast.paper.sweep.layout import (
    STATUS_FILE as STATUS_FILE,
)
from ncfast.paper.sweep.layout import (
    SWEEP_FILE as SWEEP_FILE,
)
from ncfast.paper.sweep.layout import (
    SweepError as SweepError,
)
from ncfast.paper.sweep.run import TrainingRun as TrainingRun
from ncfast.paper.sweep.status import (
    failure_reason as failure_reason,
)
from ncfast.paper.sweep.status import (
    in_use as in_use,
)
from ncfast.paper.sweep.status import (
    read_status as read_status,
)
from ncfast.paper.sweep.sweep import Sweep as Sweep
