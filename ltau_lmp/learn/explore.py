"""The explore stage of the active-learning loop: one LAMMPS run of one protocol with ``fix ltau``.

``run_protocol(protocol, model, estimator, workdir)`` runs a protocol's LAMMPS input template
under a launcher (``mpirun -np {ranks}``, ``srun -n {ranks}``, ...) as ``ltau-lmp run`` in a
subprocess with a timeout, and returns an ``ExploreResult``: whether the run completed, halted
(``fix ltau ... halt``) or failed (with the LAMMPS error text and the tail of its log), the
frames ``fix ltau`` dumped with their provenance, and the restart file the next round resumes
from (the latest one written before the halt step).

The protocol
------------
Any object (``ltau_lmp.learn.config.Protocol``) or dict with

* ``name``: letters, digits, ``-`` and ``_``; recorded with every frame;
* ``template``: the LAMMPS input, a file (relative paths: to ``root``) or the text itself (a
  ``str`` holding a newline);
* ``variables``: ``{name: value}``, the template's own variables (temperature, pressure, ...) and
  ``data``, the LAMMPS data file of the starting structure (relative: to ``root``), needed unless
  the run resumes from a restart file;
* ``steps``: the step the trajectory runs to (LAMMPS's step counter); ``ranks``: MPI ranks;
* ``replicas`` (optional, 1): how many runs of it the loop starts (``${replica}`` below).

The template contract
---------------------
The template is a plain LAMMPS input whose inputs are LAMMPS *index* variables, ``${name}``: it
gives each a default with ``variable NAME index DEFAULT`` and runs by hand with
``ltau-lmp run in.template -var NAME VALUE ...`` (or ``lmp -in ... -var ...``). The explore stage
defines every variable before the template's first line (an index variable keeps its first
definition, exactly as ``-var`` does; this also passes values that start with ``-``, which
``-var`` cannot; values are written in double quotes, triple quotes when they hold a ``"``), so the
template's defaults only serve a run by hand. Variables the stage sets:

====================  =========================================================================
``model``             the model file, for ``pair_coeff * * ${model} Si``
``estimator``         the estimator directory, for ``fix ID all ltau ${estimator} ...``
``start``             one whole command: ``read_data DATA`` for a fresh start or
                      ``read_restart FILE`` to resume; the template has a line ``${start}``
``resumed``           ``0`` (fresh) or ``1`` (resumed): ``if "${resumed} == 0" then "velocity ..."``
``steps``             the protocol's steps: the run must end at this step, ``run ${steps} upto``
                      (a resumed run then runs the remaining steps; a ramp keeps its course with
                      ``run ${steps} upto start 0 stop ${steps}``)
``frames``            fix ltau's dump file: ``dump ${frames} ${dump}``
``ltau_log``          fix ltau's log file: ``log ${ltau_log}``
``restart_file``      ``restart.*``: ``restart ${restart_every} ${restart_file}``
``replica``           ``0``, ``1``, ...: replica 0 continues the protocol's trajectory; a replica
                      ``k > 0`` starts from the same state with velocities drawn afresh,
                      ``if "${resumed} == 0 || ${replica} > 0" then "velocity all create ..."``,
                      with a seed that depends on ``${replica}`` (optional when one replica runs)
``trajectory``        ``trajectory.lammpstrj``: the whole trajectory, for a baseline drawn at
                      random from it, ``dump traj all custom N ${trajectory} id element x y z``
                      (optional)
====================  =========================================================================

and defaults the protocol's ``variables`` may replace: ``halt`` (``auto``) and ``dump``
(``auto``), the thresholds of ``halt ${halt}`` and ``dump ${frames} ${dump}`` (a value takes
fix ltau's options too: ``"1.0 over 3"``), ``every`` (10) and ``restart_every``
(``max(1, steps // 20)``). The protocol's variables may not set the names of the table. The
template must mention ``${model}``, ``${estimator}``, ``${start}``, ``${steps}``, ``${frames}``,
``${ltau_log}`` and ``${restart_file}`` and define a ``fix ... ltau``; the loop's rule is

    fix u all ltau ${estimator} every ${every} metric ood halt ${halt} error soft &
        dump ${frames} ${dump} log ${ltau_log}

(``error soft``: the run ends cleanly at the halt, ``error hard`` is recognised too; do not give
``message no``, the halt message is how the stage sees the halt). Restart files are written
periodically (LAMMPS stores no ``pair_style ltau`` or ``fix ltau`` in them, so the template defines
them after ``${start}`` in either case; ``fix nvt`` and the like restore their state when
defined again with the same ID). ``SI_NVT_TEMPLATE`` below is a complete example.

The run and its folder
----------------------
``workdir`` is written as one output (``ltau_lmp.outputs``): the run happens in a temporary
sibling that is renamed to ``workdir`` when the result is known, so ``workdir`` exists only
complete (a killed process leaves its ``.NAME.XXXXXX`` sibling behind, never a half ``workdir``);
an earlier result is replaced only with ``overwrite=True``. Its files:

=================  ==========================================================================
``in.lmp``         the input that ran: the ``variable`` lines, the template, an end marker
                   (``print``); ``ltau-lmp run in.lmp`` in this folder repeats the run
``log.lammps``     LAMMPS's log; ``stdout.txt``, ``stderr.txt``: the launcher's output
``ltau.log``       fix ltau's log (one line per evaluation)
``frames.xyz``     fix ltau's dump: the flagged frames (``ltau_lmp.evaluation.select.read_dumps``)
``restart.STEP``   LAMMPS restart files
``trajectory.lammpstrj``  the template's trajectory dump, where it writes one
``explore.json``   the result (paths relative to the folder): ``load_result(workdir)``
=================  ==========================================================================

Status: ``halted`` when fix ltau's halt message is found (soft: the run ended cleanly at the halt
step; hard: the LAMMPS error names it); ``completed`` when the run exited cleanly at step
``steps``; ``failed`` otherwise (an error, a crash, the timeout, or a run that ended at another
step), with the LAMMPS ``ERROR`` lines in ``error`` and the tail of the log in ``log_tail``.

The restart to resume from (``ExploreResult.restart``): for a halted run the latest restart file
written *before* the halt step (the one at the halt step holds the alarming state itself); else
the latest one written; without any, ``resume_from`` (the state this run started from), or
``None`` (start again from ``data``). Every dumped frame is an ``ExploreFrame`` (protocol, LAMMPS
step, dump file and index; ``source`` = ``PATH:INDEX`` as ``read_dumps`` tags it).
``check_template(text)`` checks a template without running it; ``load_result(workdir)`` reads a
finished folder back (what a resumed loop does instead of running it again).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ltau_lmp.data.config import resolve
from ltau_lmp.errors import ConfigError, FileFormatError
from ltau_lmp.outputs import output_dir

KIND = "explore"
RESULT_FILE = "explore.json"
INPUT, LAMMPS_LOG, STDOUT, STDERR = "in.lmp", "log.lammps", "stdout.txt", "stderr.txt"
LTAU_LOG, FRAMES, RESTART, TRAJECTORY = "ltau.log", "frames.xyz", "restart.*", "trajectory.lammpstrj"
STATUSES = ("completed", "halted", "failed")

# Variables the stage sets and the template must use; the protocol cannot set them.
REQUIRED = ("model", "estimator", "start", "steps", "frames", "ltau_log", "restart_file")
RESERVED = REQUIRED + ("resumed", "replica", "trajectory")
END_MARKER = "LTAU_EXPLORE_END step"
_END = re.compile(rf"^{END_MARKER} (-?\d+)\s*$", re.M)
_HALT = re.compile(r"Fix ltau (\S+) condition met on step (\d+)[^\n]*")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIX_LTAU = re.compile(r"^\s*fix\s+\S+\s+\S+\s+ltau\s", re.M)

# A complete template: NVT of a data file's structure, watched by fix ltau (metric ood, halt and
# dump at the estimator's auto thresholds), restart files every ${restart_every} steps.
SI_NVT_TEMPLATE = """\
# NVT exploration with fix ltau (ltau_lmp.learn.explore template contract).
#   ltau-lmp run in.explore -var model MODEL -var estimator EST -var start "read_data si.data"
variable        model         index model.pt
variable        estimator     index estimator
variable        start         index "read_data si.data"
variable        resumed       index 0
variable        steps         index 1000
variable        every         index 10
variable        halt          index auto
variable        dump          index auto
variable        frames        index frames.xyz
variable        ltau_log      index ltau.log
variable        restart_every index 100
variable        restart_file  index restart.*
variable        replica       index 0
variable        trajectory    index trajectory.lammpstrj
variable        temp          index 1200
variable        seed          index 4928459
variable        element       index Si
variable        mass          index 28.0855

units           metal
atom_style      atomic
boundary        p p p
${start}
mass            1 ${mass}
pair_style      ltau
pair_coeff      * * ${model} ${element}
if "${resumed} == 0 || ${replica} > 0" then "velocity all create ${temp} $(v_seed+v_replica) mom yes rot yes dist gaussian"
timestep        0.001
fix             md all nvt temp ${temp} ${temp} 0.1
dump            traj all custom ${restart_every} ${trajectory} id element x y z
dump_modify     traj element ${element} sort id
fix             u all ltau ${estimator} every ${every} metric ood halt ${halt} error soft &
                dump ${frames} ${dump} log ${ltau_log}
thermo          ${every}
thermo_style    custom step temp pe press f_u f_u[2]
restart         ${restart_every} ${restart_file}
run             ${steps} upto
"""


@dataclass(frozen=True)
class ExploreFrame:
    """One frame fix ltau dumped, and where it came from."""

    protocol: str
    step: int              # LAMMPS timestep of the frame (its ``timestep`` header)
    path: Path             # the dump file
    index: int             # position of the frame in it
    worst: float | None    # the fix's worst metric value over the group at that step

    @property
    def source(self) -> str:
        """``PATH:INDEX``, as ``read_dumps`` tags ``atoms.info["source"]``."""
        return f"{self.path}:{self.index}"


@dataclass
class ExploreResult:
    """What one exploration run did (``run_protocol``; ``load_result`` reads it back)."""

    protocol: str
    status: str                          # "completed" | "halted" | "failed"
    workdir: Path
    start_step: int | None               # the step the run started at (first fix ltau evaluation)
    final_step: int | None               # the step it ended at
    steps_run: int                       # final_step - start_step (0 when unknown)
    halt_step: int | None = None
    halt_message: str | None = None
    error: str | None = None             # the LAMMPS ERROR lines (failed), or why it failed
    log_tail: str = ""                   # last lines of log.lammps and stderr (always kept)
    frames: list[ExploreFrame] = field(default_factory=list)
    dumps: list[Path] = field(default_factory=list)          # dump files holding frames
    restart: Path | None = None          # resume from here: latest restart before the halt step
    restart_step: int | None = None
    restarts: dict[int, Path] = field(default_factory=dict)  # every restart file, by step
    ltau_log: Path | None = None
    trajectory: Path | None = None       # the template's trajectory dump, if it writes one
    replica: int = 0
    lammps_log: Path | None = None
    stdout: Path | None = None
    stderr: Path | None = None
    input: Path | None = None
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    command: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)   # every variable the run was given
    resume_from: Path | None = None
    provenance: dict = field(default_factory=dict)  # protocol (template, steps, ranks), model, estimator, version

    @property
    def halted(self) -> bool:
        return self.status == "halted"

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def describe(self) -> str:
        """One line for a summary."""
        what = {"completed": f"completed at step {self.final_step}",
                "halted": f"halted at step {self.halt_step}",
                "failed": f"FAILED: {(self.error or '').splitlines()[0] if self.error else 'see log'}"}[self.status]
        return (f"{self.protocol}: {what}, {self.steps_run} steps in {self.seconds:.1f} s, "
                f"{len(self.frames)} frames dumped, resume from {self.restart.name if self.restart else 'the start'}")


# ------------------------------------------------------------------------------------------------
# the protocol
# ------------------------------------------------------------------------------------------------

def _field(protocol, name: str, default=None):
    if isinstance(protocol, dict):
        return protocol.get(name, default)
    return getattr(protocol, name, default)


def _template(protocol, root: Path) -> tuple[str, str]:
    """(text, where it came from) of the protocol's template."""
    template = _field(protocol, "template")
    if template is None or (isinstance(template, str) and not template.strip()):
        raise ConfigError(f"protocol {_field(protocol, 'name')!r}: no template")
    if isinstance(template, str) and "\n" in template:
        return template, "text"
    path = resolve(template, root)
    if not path.is_file():
        raise ConfigError(f"protocol {_field(protocol, 'name')!r}: template {path} not found")
    return path.read_text(), str(path.resolve())


def check_template(text: str, name: str = "template", replicas: int = 1) -> None:
    """Raise ``ConfigError`` naming what ``text`` lacks of the template contract (module docstring)."""
    if replicas > 1 and "${replica}" not in text and "v_replica" not in text:
        raise ConfigError(f"{name}: {replicas} replicas would all run the same trajectory: draw velocities with a "
                          f"seed that depends on ${{replica}} (ltau_lmp.learn.explore contract)")
    missing = [v for v in REQUIRED if "${" + v + "}" not in text]
    if missing:
        raise ConfigError(f"{name}: the template must use the variable(s) "
                          f"{', '.join('${' + v + '}' for v in missing)} (ltau_lmp.learn.explore contract)")
    if not _FIX_LTAU.search(text):
        raise ConfigError(f"{name}: the template defines no `fix ID group ltau ${{estimator}} ...`")
    if re.search(r"\bmessage\s+no\b", text):
        raise ConfigError(f"{name}: `message no` hides fix ltau's halt from the explore stage; remove it")


def _quote(name: str, value: str) -> str:
    if "\n" in value or '"""' in value:
        raise ConfigError(f"variable {name}: a value may not hold a newline or '\"\"\"', got {value!r}")
    return f'"""{value}"""' if '"' in value else f'"{value}"'


def _restart_step(path: Path) -> int | None:
    m = re.search(r"\.(\d+)$", Path(path).name)
    return int(m.group(1)) if m else None


def _variables(protocol, model: Path, estimator: Path, resume_from: Path | None, root: Path,
               replica: int = 0) -> dict[str, str]:
    name = _field(protocol, "name")
    steps = int(_field(protocol, "steps"))
    given = {str(k): v for k, v in dict(_field(protocol, "variables") or {}).items()}
    for key in given:
        if not _NAME.match(key):
            raise ConfigError(f"protocol {name!r}: {key!r} is not a LAMMPS variable name")
    taken = sorted(set(given) & set(RESERVED))
    if taken:
        raise ConfigError(f"protocol {name!r}: variable(s) {', '.join(taken)} are set by the explore stage")
    data = given.get("data")
    if data is not None:
        given["data"] = data = resolve(str(data), root).resolve()
    if resume_from is not None:
        start = f"read_restart {resume_from}"
    elif data is not None:
        if not data.is_file():
            raise ConfigError(f"protocol {name!r}: data file {data} not found")
        start = f"read_data {data}"
    else:
        raise ConfigError(f"protocol {name!r}: give the starting structure (variable data: a LAMMPS data "
                          f"file) or a restart file to resume from")
    values = {"every": 10, "halt": "auto", "dump": "auto", "restart_every": max(1, steps // 20)}
    values.update(given)
    values.update({"model": model, "estimator": estimator, "start": start,
                   "resumed": int(resume_from is not None), "steps": steps, "frames": FRAMES,
                   "ltau_log": LTAU_LOG, "restart_file": RESTART, "replica": replica, "trajectory": TRAJECTORY})
    out = {}
    for key, value in values.items():
        out[key] = str(int(value)) if isinstance(value, bool) else str(value)
        _quote(key, out[key])
    return out


def _input_text(variables: dict[str, str], template: str, protocol: str) -> str:
    head = [f"# ltau_lmp.learn.explore: protocol {protocol}; the template follows these definitions"]
    head += [f"variable        {k} index {_quote(k, v)}" for k, v in variables.items()]
    tail = ["", "# ltau_lmp.learn.explore: the run reached the end of the input",
            f'print           "{END_MARKER} $(step)"', ""]
    return "\n".join(head) + "\n\n" + template.rstrip("\n") + "\n" + "\n".join(tail)


def _ltau_lmp() -> str:
    here = Path(sys.executable).parent / "ltau-lmp"
    found = str(here) if here.is_file() else shutil.which("ltau-lmp")
    if not found:
        raise ConfigError("the `ltau-lmp` command is not installed next to this Python nor on PATH")
    return found


def _launcher(launcher: str | None, ranks: int) -> list[str]:
    if not launcher:
        if ranks != 1:
            raise ConfigError(f"{ranks} ranks need a launcher (e.g. 'mpirun -np {{ranks}}')")
        return []
    try:
        return shlex.split(launcher.format(ranks=ranks))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"launcher {launcher!r}: a command with {{ranks}} only, e.g. 'mpirun -np {{ranks}}' "
                          f"or 'srun -n {{ranks}}' ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------

def run_protocol(protocol, model, estimator, workdir, resume_from=None, launcher: str | None = "mpirun -np {ranks}",
                 ranks: int | None = None, timeout: float | None = None, *, root=None,
                 overwrite: bool = False, replica: int = 0) -> ExploreResult:
    """Run ``protocol`` once with ``model`` and ``estimator``; its files go to ``workdir``.

    ``resume_from``: a LAMMPS restart file (an earlier result's ``restart``) to start from instead
    of the protocol's ``data``. ``launcher``: the command in front of ``ltau-lmp run``, with
    ``{ranks}`` (``"mpirun -np {ranks}"``, ``"srun -n {ranks}"``; ``None``: no launcher, one rank);
    ``ranks``: replaces the protocol's. ``timeout``: seconds, after which the launcher's process
    group is stopped (SIGTERM, then SIGKILL) and the run is ``failed``. ``root``: the folder
    relative template and data paths refer to (default: the working folder). ``replica``: the
    template's ``${replica}`` (0: the protocol's own trajectory). The subprocess gets
    this Python's ``bin`` first on ``PATH`` (the virtual environment's ``mpirun``).

    Raises ``ConfigError`` for a protocol or template that breaks the contract (module
    docstring) and ``OutputExistsError`` when ``workdir`` is taken; a run that goes wrong is a
    result with status ``failed``, never an exception.
    """
    root = Path(root) if root is not None else Path.cwd()
    name = str(_field(protocol, "name") or "")
    if not name or not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise ConfigError(f"protocol name: letters, digits, '-' and '_', got {name!r}")
    steps = _field(protocol, "steps")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"protocol {name!r}: steps must be an integer >= 1, got {steps!r}")
    ranks = int(ranks if ranks is not None else (_field(protocol, "ranks") or 1))
    if ranks < 1:
        raise ConfigError(f"protocol {name!r}: ranks must be >= 1, got {ranks}")
    text, source = _template(protocol, root)
    check_template(text, f"protocol {name!r} template {source}", int(_field(protocol, "replicas", 1) or 1))
    model, estimator = Path(model).resolve(), Path(estimator).resolve()
    if not model.exists():
        raise ConfigError(f"model {model} not found")
    if not estimator.is_dir():
        raise ConfigError(f"estimator {estimator}: not a folder")
    if resume_from is not None:
        resume_from = Path(resume_from).resolve()
        if not resume_from.is_file():
            raise ConfigError(f"restart file {resume_from} not found")
        at = _restart_step(resume_from)
        if at is not None and at >= steps:
            raise ConfigError(f"protocol {name!r}: restart file {resume_from.name} is at step {at}, "
                              f"at or beyond the protocol's {steps} steps: nothing left to run")
    variables = _variables(protocol, model, estimator, resume_from, root, replica)
    command = _launcher(launcher, ranks) + [_ltau_lmp(), "run", INPUT, "-log", LAMMPS_LOG]
    provenance = {"protocol": {"name": name, "template": source, "steps": steps, "ranks": ranks,
                               "variables": {str(k): str(v) for k, v in
                                             dict(_field(protocol, "variables") or {}).items()}},
                  "model": str(model), "estimator": str(estimator), "launcher": launcher,
                  "timeout": timeout}
    workdir = Path(workdir)
    with output_dir(workdir, KIND, overwrite=overwrite) as tmp:
        (tmp / INPUT).write_text(_input_text(variables, text, name))
        started = time.time()
        returncode, timed_out = _execute(command, tmp, timeout)
        seconds = time.time() - started
        provenance.update(started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                          ltau_lmp_version=_version())
        record = _collect(tmp, name, steps, returncode, timed_out, timeout, seconds, command, variables,
                          resume_from, provenance)
        record["replica"] = replica
        (tmp / RESULT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return load_result(workdir)


def _version() -> str:
    from ltau_lmp import __version__
    return __version__


def _execute(command: list[str], cwd: Path, timeout: float | None) -> tuple[int | None, bool]:
    """Run ``command`` in ``cwd`` in its own process group; (exit status, timed out)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with open(cwd / STDOUT, "wb") as out, open(cwd / STDERR, "wb") as err:
        try:
            proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:  # the launcher itself is missing
            err.write(f"cannot start {command[0]}: {exc}\n".encode())
            return None, False
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            _stop(proc)
            return proc.returncode, True
        except BaseException:
            _stop(proc)
            raise


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this stage started, SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------------------------
# reading what the run left
# ------------------------------------------------------------------------------------------------

def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(text: str, n: int) -> list[str]:
    return text.rstrip("\n").splitlines()[-n:] if text.strip() else []


def _ltau_steps(path: Path) -> list[int]:
    steps = []
    for line in _read(path).splitlines():
        if line and not line.startswith("#"):
            try:
                steps.append(int(float(line.split()[0])))
            except (ValueError, IndexError):
                continue
    return steps


def _error_lines(*texts: str) -> list[str]:
    """LAMMPS's ERROR lines and the input line they name, once each."""
    seen: list[str] = []
    for text in texts:
        for line in text.splitlines():
            line = line.strip().removeprefix("ltau-lmp run: error: ")
            if ("ERROR" in line or line.startswith("Last input line:")) and line not in seen:
                seen.append(line)
    return seen


def _frames(directory: Path, protocol: str) -> list[dict]:
    path = directory / FRAMES
    if not path.is_file() or path.stat().st_size == 0:
        return []
    from ltau_lmp.data.datasets import read_extxyz

    frames = []
    for i, atoms in enumerate(read_extxyz(path, "fix ltau dump")):
        worst = atoms.info.get("ltau_worst")
        frames.append({"protocol": protocol, "step": int(atoms.info["timestep"]), "file": FRAMES, "index": i,
                       "worst": None if worst is None else float(worst)})
    return frames


def _collect(directory: Path, protocol: str, steps: int, returncode, timed_out: bool, timeout,
             seconds: float, command, variables, resume_from, provenance) -> dict:
    log, out, err = (_read(directory / f) for f in (LAMMPS_LOG, STDOUT, STDERR))
    ltau_steps = _ltau_steps(directory / LTAU_LOG)
    start_step = ltau_steps[0] if ltau_steps else None
    end = _END.findall(log) or _END.findall(out)
    final_step = int(end[-1]) if end else None
    halt = _HALT.search(log) or _HALT.search(out) or _HALT.search(err)
    errors = _error_lines(log, out, err)
    halt_step = int(halt.group(2)) if halt else None
    hard_halt = halt is not None and any("condition met on step" in e for e in errors)

    reason = None
    if timed_out:
        status, reason = "failed", f"timed out after {timeout:g} s (the launcher's process group was stopped)"
    elif halt is not None and (returncode == 0 or hard_halt):
        status = "halted"
        if hard_halt:
            final_step = halt_step
    elif returncode is None:
        status, reason = "failed", "the launcher could not be started (see stderr.txt)"
    elif returncode != 0:
        status = "failed"
        if not errors:
            reason = f"exit status {returncode}, no LAMMPS ERROR line (see log_tail, stderr.txt)"
    elif final_step is None:
        status, reason = "failed", "the input did not reach its end (no end marker in the LAMMPS log)"
    elif final_step != steps:
        status = "failed"
        reason = (f"the run ended at step {final_step}, not at step {steps} (steps): the template must run "
                  f"`run ${{steps}} upto`")
    else:
        status = "completed"
    error = "\n".join(([reason] if reason else []) + errors) if status == "failed" else None
    if final_step is None and ltau_steps:
        final_step = ltau_steps[-1]

    restarts = {}
    for path in directory.glob(RESTART):
        step = _restart_step(path)
        if step is not None and path.is_file():
            restarts[step] = path.name
    usable = [s for s in restarts if halt_step is None or s < halt_step]
    if usable:
        restart, restart_step = restarts[max(usable)], max(usable)
    elif resume_from is not None:
        restart, restart_step = str(resume_from), start_step
    else:
        restart, restart_step = None, None

    tail = _tail(log, 40) or _tail(out, 40)
    if err.strip():
        tail += ["--- stderr ---"] + _tail(err, 20)
    frames = _frames(directory, protocol)
    return {
        "format": "ltau-explore", "version": 1, "protocol": protocol, "status": status,
        "start_step": start_step, "final_step": final_step,
        "steps_run": final_step - start_step if final_step is not None and start_step is not None else 0,
        "halt_step": halt_step, "halt_message": halt.group(0).strip() if halt else None,
        "error": error, "log_tail": "\n".join(tail), "frames": frames,
        "dumps": [FRAMES] if frames else [], "restart": restart, "restart_step": restart_step,
        "restarts": {str(k): v for k, v in sorted(restarts.items())},
        "ltau_log": LTAU_LOG if (directory / LTAU_LOG).is_file() else None,
        "trajectory": TRAJECTORY if (directory / TRAJECTORY).is_file() else None,
        "lammps_log": LAMMPS_LOG if (directory / LAMMPS_LOG).is_file() else None,
        "stdout": STDOUT, "stderr": STDERR, "input": INPUT, "seconds": seconds, "returncode": returncode,
        "timed_out": timed_out, "command": command, "variables": variables,
        "resume_from": str(resume_from) if resume_from is not None else None, "provenance": provenance,
    }


def load_result(workdir) -> ExploreResult:
    """The ``ExploreResult`` of a finished explore folder (its ``explore.json``), paths made absolute."""
    workdir = Path(workdir).resolve()
    path = workdir / RESULT_FILE
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: not a readable explore result ({exc})") from None
    if d.get("format") != "ltau-explore" or d.get("version") != 1 or d.get("status") not in STATUSES:
        raise FileFormatError(f"{path}: not an explore result of this version")

    def at(rel):
        return None if rel is None else workdir / rel

    frames = [ExploreFrame(f["protocol"], f["step"], workdir / f["file"], f["index"], f["worst"])
              for f in d["frames"]]
    return ExploreResult(
        protocol=d["protocol"], status=d["status"], workdir=workdir, start_step=d["start_step"],
        final_step=d["final_step"], steps_run=d["steps_run"], halt_step=d["halt_step"],
        halt_message=d["halt_message"], error=d["error"], log_tail=d["log_tail"], frames=frames,
        dumps=[workdir / p for p in d["dumps"]], restart=at(d["restart"]), restart_step=d["restart_step"],
        restarts={int(k): workdir / v for k, v in d["restarts"].items()}, ltau_log=at(d["ltau_log"]),
        trajectory=at(d.get("trajectory")), replica=d.get("replica", 0),
        lammps_log=at(d["lammps_log"]), stdout=at(d["stdout"]), stderr=at(d["stderr"]), input=at(d["input"]),
        seconds=d["seconds"], returncode=d["returncode"], timed_out=d["timed_out"], command=d["command"],
        variables=d["variables"], resume_from=at(d["resume_from"]), provenance=d["provenance"])
