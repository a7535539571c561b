"""Grader of the MATLAB track's ex04. Run it with `make grade EX=matlab-ex04`, not with pytest.

Every check runs GNU Octave (octave-cli) on `task_kit_file`: a copy of the kit matlab/ with
only the files of the checked task taken from the learner's folder (scripts/grading.py
writes it), so a mistake in one task never costs the points of another. The checks of one
task are Octave functions ("probes", in OCTAVE_PROBES) that run together in one octave-cli.
The checkpoints are written with the kit's ckpt_save, then damaged the way real jobs damage
them: cut short, emptied, one byte changed, deleted, overwritten, file times that lie.
Task 3 also restarts the real example_simulation.m on the learner's code.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from grading import REPO, content_key, reference_run_folder

OCTAVE_PROBES: dict[int, dict[str, str]] = {}


def probe(task: int, name: str, code: str) -> str:
    """Declare the Octave code (a function body that sets `value`) of one check."""
    OCTAVE_PROBES.setdefault(task, {})[name] = code
    return name


OCTAVE_HELPERS = r"""
function folder = grader_checkpoints(folder, plan)
  % saves small real checkpoints in the order of plan, e.g. {'step:100', 'time:250'}
  for entry = plan
    parts = strsplit(entry{1}, ':');
    step = str2double(parts{2});
    ckpt_save(folder, struct('step', step, 'values', (1:300) + step), step, parts{1});
  end
end
function path = grader_path(folder, name)
  path = fullfile(folder, name);
end
function grader_flip_byte(path)
  % one byte changed in the middle: the size stays
  fid = fopen(path, 'r+'); middle = floor(dir(path).bytes / 2);
  fseek(fid, middle, 'bof'); byte = fread(fid, 1, 'uint8');
  fseek(fid, middle, 'bof'); fwrite(fid, bitxor(byte, 64), 'uint8'); fclose(fid);
end
function grader_cut_in_half(path)
  fid = fopen(path, 'r'); bytes = fread(fid, Inf, 'uint8=>uint8'); fclose(fid);
  fid = fopen(path, 'w'); fwrite(fid, bytes(1:floor(end / 2))); fclose(fid);
end
function grader_set_age(path, seconds)
  % the file's modification time, `seconds` ago (negative: in the future)
  system(sprintf('touch -d @%d "%s"', round(time() - seconds), path));
end
function outcome = grader_verify(path)
  % what ckpt_verify says, or the error it stopped with
  outcome = struct('ok', false, 'reason', '', 'error', '');
  try
    [outcome.ok, outcome.reason] = ckpt_verify(path);
    outcome.ok = isequal(outcome.ok, true);
  catch failure
    if strcmp(failure.identifier, 'ckpt:todo')
      rethrow(failure);
    end
    outcome.error = failure.message;
  end
end
function message = grader_try(action)
  message = '';
  try
    action();
  catch failure
    if strcmp(failure.identifier, 'ckpt:todo')
      rethrow(failure);
    end
    message = failure.message;
  end
end
function names = grader_names(infos)
  names = {};
  if ~isempty(infos)
    names = {infos.name};
  end
end
"""


def as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, (str, bool, int, float, dict)) else list(value)


# ----------------------------------------------------------------------------- task 1
DAMAGES = {
    "intact": "",
    "cut in half": "grader_cut_in_half(path);",
    "emptied": "fclose(fopen(path, 'w'));",
    "deleted behind its marker": "delete(path);",
    "one byte changed, same size": "grader_flip_byte(path);",
    "one byte changed, file time older than its marker":
        "grader_flip_byte(path); grader_set_age(path, 3600);",
    "without its marker": "delete([path '.json']);",
}
VERIFY = {what: probe(1, f"verify {what}", f"""
    folder = grader_checkpoints(tempname(), {{'step:100'}});
    path = grader_path(folder, 'step_00000100.mat');
    {damage}
    value = grader_verify(path);
""") for what, damage in DAMAGES.items()}


@pytest.mark.task(1)
def test_intact_checkpoint_passes(octave_task):
    """an intact checkpoint passes, with an empty reason"""
    got = octave_task[VERIFY["intact"]].value
    assert not got["error"], f"ckpt_verify(<an intact checkpoint>) stopped with an error: {got['error']}"
    assert got["ok"] and got["reason"] == "", (
        f"ckpt_verify(<an intact checkpoint>) gave ok = {got['ok']}, reason {got['reason']!r}; "
        "expected true and ''")


@pytest.mark.parametrize("what", [w for w in DAMAGES if w != "intact"])
@pytest.mark.task(1)
def test_damage_is_detected(octave_task, what):
    """ckpt_verify() rejects a damaged checkpoint, with a reason that names the file"""
    got = octave_task[VERIFY[what]].value
    assert not got["error"], (
        f"a checkpoint {what}: ckpt_verify() stopped with an error ({got['error']}); it must "
        "return ok = false and a reason, never raise: a resume calls it on whatever the "
        "last job left. Check that the file exists before reading its size")
    assert not got["ok"], (
        f"a checkpoint {what}: ckpt_verify() said ok. Compare the file's size (dir) and its "
        "sha256 (ckpt_sha256_file) with the marker's: a changed byte keeps the size"
        + ("; and hash it every time, whatever the file times say: bytes damaged on disk "
           "or by a power cut keep the old time, and cp -p or a restore from backup set "
           "any time they like" if "file time" in what else ""))
    assert "step_00000100.mat" in got["reason"], (
        f"a checkpoint {what}: the reason {got['reason']!r} does not name the file")


# ----------------------------------------------------------------------------- task 2
LIST_BY_STEP = probe(2, "list by step", """
    folder = grader_checkpoints(tempname(), {'step:100', 'step:200', 'preempt:250', 'time:300'});
    infos = ckpt_list(folder);
    value.fields = isstruct(infos) && all(isfield(infos, {'name', 'path', 'step', 'kind', 'size', 'sha256', 'saved_at'}));
    value.steps = [];
    if isstruct(infos) && isfield(infos, 'step')
      value.steps = [infos.step];
    end
""")
LIST_FILE_TIMES = probe(2, "list file times", """
    folder = grader_checkpoints(tempname(), {'step:100', 'step:200', 'step:300'});
    grader_set_age(grader_path(folder, 'step_00000300.mat'), 7200);
    grader_set_age(grader_path(folder, 'step_00000100.mat'), -7200);
    value.steps = [ckpt_list(folder).step];
""")
LIST_CLOCK_SKEW = probe(2, "list clock skew", """
    folder = grader_checkpoints(tempname(), {'step:100', 'step:200', 'step:300'});
    % step 300 was saved on a node whose clock is a day behind: its saved_at is the oldest
    marker_path = [grader_path(folder, 'step_00000300.mat') '.json'];
    marker = jsondecode(fileread(marker_path));
    marker.saved_at = datestr(now() - 1, 'yyyy-mm-ddTHH:MM:SS.FFF');
    fid = fopen(marker_path, 'w'); fwrite(fid, jsonencode(marker), 'char'); fclose(fid);
    infos = ckpt_list(folder);
    value.steps = [infos.step];
""")
LIST_DEBRIS = probe(2, "list debris", """
    folder = grader_checkpoints(tempname(), {'step:100', 'step:200', 'step:300'});
    delete(grader_path(folder, 'step_00000300.mat.json'));
    fid = fopen(grader_path(folder, 'step_00000200.mat.json'), 'w'); fprintf(fid, '{"step": 200, "ki'); fclose(fid);
    fclose(fopen(grader_path(folder, '.tmp-step_00000400.mat'), 'w'));
    save(grader_path(folder, 'results.mat'), 'folder');
    value.error = '';
    value.steps = [];
    try
      infos = ckpt_list(folder);
      value.steps = [infos.step];
    catch failure
      if strcmp(failure.identifier, 'ckpt:todo')
        rethrow(failure);
      end
      value.error = failure.message;
    end
    value.missing = numel(ckpt_list(tempname()));
""")


@pytest.mark.task(2)
def test_listed_by_step_not_by_name(octave_task):
    """checkpoints of several kinds are listed by step, not by name"""
    got = octave_task[LIST_BY_STEP].value
    assert got["fields"], ("ckpt_list() must return a struct array with the fields of "
                           "ckpt_read_marker (name, path, step, kind, size, sha256, saved_at)")
    assert as_list(got["steps"]) == [100, 200, 250, 300], (
        f"steps in the order listed: {got['steps']}; expected [100, 200, 250, 300], oldest "
        "first by the step in the marker (preempt_00000250.mat sorts before step_* by name)")


@pytest.mark.task(2)
def test_listed_by_step_not_by_file_time(octave_task):
    """file times that run backwards change nothing"""
    got = octave_task[LIST_FILE_TIMES].value
    assert as_list(got["steps"]) == [100, 200, 300], (
        f"with file times that run backwards (a copy, a restore), the order is {got['steps']}; "
        "expected [100, 200, 300]: sort by the marker's step, never by dir()'s date")


@pytest.mark.task(2)
def test_listed_by_step_not_by_save_time(octave_task):
    """save times from clocks that disagree change nothing"""
    got = octave_task[LIST_CLOCK_SKEW].value
    assert as_list(got["steps"]) == [100, 200, 300], (
        "step_00000300.mat was saved on a node whose clock is a day behind (its marker's "
        f"saved_at is the oldest); ckpt_list() gave the order {got['steps']}, expected "
        "[100, 200, 300]: the step decides, saved_at only breaks ties between checkpoints "
        "of the same step. Nodes' clocks differ, and a resume that trusts them starts from "
        "an older checkpoint")


@pytest.mark.task(2)
def test_debris_is_not_listed(octave_task):
    """a checkpoint without marker, a half-written marker, a .tmp- file are not listed"""
    got = octave_task[LIST_DEBRIS].value
    assert not got["error"], (
        f"ckpt_list() failed on a folder with a half-written marker: {got['error']}; a "
        "marker that cannot be read means an unfinished save: skip it (ckpt_read_marker "
        "returns [] for it, and never raises)")
    assert as_list(got["steps"]) == [100], (
        f"listed steps: {got['steps']}; expected only 100 (300 has no marker, 200 a broken "
        "one, and .tmp- files and other .mat files are not checkpoints: ckpt_checkpoint_names)")
    assert got["missing"] == 0, "ckpt_list(<a folder that does not exist>) must list nothing"


# ----------------------------------------------------------------------------- task 3
FIND_SKIPS = probe(3, "find skips damaged", """
    folder = grader_checkpoints(tempname(), {'step:100', 'step:200', 'step:300'});
    grader_flip_byte(grader_path(folder, 'step_00000300.mat'));
    [path, info] = ckpt_find_latest_valid(folder);
    value.path = path;
    value.step = [];
    if ~isempty(info)
      value.step = info.step;
    end
""")
FIND_POINTER_LAGS = probe(3, "find pointer lags", """
    folder = grader_checkpoints(tempname(), {'step:100', 'step:200', 'step:300'});
    % the job was killed after step 300's marker, before last.txt moved on
    ckpt_write_text_atomic(grader_path(folder, 'last.txt'), sprintf('step_00000200.mat\\n'));
    [path, info] = ckpt_find_latest_valid(folder);
    value.path = path;
    value.step = [];
    if ~isempty(info)
      value.step = info.step;
    end
    [checkpoint, info] = ckpt_load_latest(folder);
    value.loaded = checkpoint.step;
""")
FIND_BY_STEP = probe(3, "find by step", """
    folder = grader_checkpoints(tempname(), {'step:100', 'step:200', 'preempt:250'});
    grader_set_age(grader_path(folder, 'step_00000100.mat'), -7200);
    [path, info] = ckpt_find_latest_valid(folder);
    value.step = info.step;
    value.path = path;
""")
FIND_NOTHING = probe(3, "find nothing", """
    [value.empty_path, value.empty_info] = ckpt_find_latest_valid(tempname());
    folder = grader_checkpoints(tempname(), {'step:100'});
    grader_cut_in_half(grader_path(folder, 'step_00000100.mat'));
    [value.damaged_path, value.damaged_info] = ckpt_find_latest_valid(folder);
    [value.checkpoint, value.info] = ckpt_load_latest(folder);
""")
LOAD_OVERWRITTEN = probe(3, "load overwritten", """
    folder = grader_checkpoints(tempname(), {'step:100', 'step:200', 'step:300'});
    checkpoint = struct('step', 999);   % another valid MAT file under the newest name
    save(grader_path(folder, 'step_00000300.mat'), 'checkpoint', '-v6');
    [checkpoint, info] = ckpt_load_latest(folder);
    value.step = checkpoint.step;
    value.values = isequal(checkpoint.values, (1:300) + 200);
    value.name = info.name;
""")


@pytest.mark.task(3)
def test_damaged_newest_is_skipped_with_a_message(octave_task):
    """ckpt_find_latest_valid() skips a damaged newest checkpoint and says why"""
    result = octave_task[FIND_SKIPS]
    got = result.value
    assert got["step"] == 200, (
        f"with step 300 damaged (one byte changed), ckpt_find_latest_valid() gave step "
        f"{got['step']}; expected 200: walk ckpt_list() from the newest and return the first "
        "that ckpt_verify() accepts")
    assert got["path"].endswith("step_00000200.mat"), f"the path returned is {got['path']!r}"
    assert "step_00000300.mat" in result.printed, (
        "nothing printed names the skipped step_00000300.mat: print the reason "
        "ckpt_verify() gives (ckpt_print), the person reading the job's output needs it")


@pytest.mark.task(3)
def test_newest_by_step_not_by_name_or_file_time(octave_task):
    """the newest is the highest step, whatever the names and file times say"""
    got = octave_task[FIND_BY_STEP].value
    assert got["step"] == 250, (
        f"of step_00000100.mat (the newest file time), step_00000200.mat and "
        f"preempt_00000250.mat, ckpt_find_latest_valid() chose step {got['step']}; expected "
        "250: the newest by the step in the marker (ckpt_list's order), never by name or date")


@pytest.mark.task(3)
def test_newest_even_when_last_txt_lags(octave_task):
    """a valid checkpoint newer than the one last.txt names is the one resumed from"""
    got = octave_task[FIND_POINTER_LAGS].value
    assert got["step"] == 300 and got["loaded"] == 300, (
        "steps 100, 200 and 300 are all valid, but last.txt still names step_00000200.mat "
        "(the job was killed between writing step 300's marker and moving last.txt): "
        f"ckpt_find_latest_valid() gave step {got['step']} and ckpt_load_latest() step "
        f"{got['loaded']}; expected 300 for both. last.txt is for people and rotation; a "
        "resume walks ckpt_list() from the newest, or it redoes work that was saved")


@pytest.mark.task(3)
def test_nothing_valid_gives_empty(octave_task):
    """no valid checkpoint, or no folder: '' and [], no error"""
    got = octave_task[FIND_NOTHING].value
    assert got["empty_path"] in ("", []) and got["empty_info"] in ([], None), (
        "ckpt_find_latest_valid(<a folder that does not exist>) must return '' and []")
    assert got["damaged_path"] in ("", []) and got["damaged_info"] in ([], None), (
        "with its only checkpoint cut in half, ckpt_find_latest_valid() must return '' and "
        f"[] (a fresh start); it returned {got['damaged_path']!r}")
    assert got["checkpoint"] in ([], None) and got["info"] in ([], None), (
        "ckpt_load_latest() must return [] and [] when no checkpoint is valid")


@pytest.mark.task(3)
def test_load_latest_verifies_before_loading(octave_task):
    """ckpt_load_latest() loads the newest checkpoint whose bytes match its marker"""
    got = octave_task[LOAD_OVERWRITTEN].value
    assert got["step"] == 200 and got["values"], (
        "step_00000300.mat was overwritten by another MAT file (it loads fine, but its bytes "
        f"do not match its marker); ckpt_load_latest() returned step {got['step']}; expected "
        "the checkpoint of step 200: load only what ckpt_find_latest_valid() accepts")
    assert got["name"] == "step_00000200.mat", (
        f"ckpt_load_latest() returned info.name {got['name']!r}, expected step_00000200.mat")


RUN_ARGS = "'steps', 300, 'walkers', 50, 'save_every_steps', 50, 'keep', 100, 'log_every', 1000"


def run_example(kit: Path, folder: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CKPT_"))}
    code = f"exit(example_simulation('{folder}', {RUN_ARGS}))"
    return subprocess.run(["octave-cli", "--no-history", "--eval", code], cwd=kit,
                          capture_output=True, text=True, timeout=120, env=env)


def uninterrupted_run() -> Path:
    """The checkpoints and result of the reference kit's uninterrupted run (made once per
    grading session when GRADER_CACHE_DIR is set)."""
    sources = sorted((REPO / "matlab").glob("*.m"))

    def produce(folder: Path) -> None:
        run = run_example(REPO / "matlab", folder / "checkpoints")
        assert run.returncode == 0, "grader: the reference run failed:\n" + run.stderr

    return reference_run_folder(content_key(*sources, RUN_ARGS), produce) / "checkpoints"


@pytest.mark.task(3)
def test_real_job_resumes_from_the_newest_valid_checkpoint(task_kit_file, tmp_path):
    """the real example job, restarted after damage, resumes from the newest valid
    checkpoint and ends with the identical result"""
    reference = uninterrupted_run()
    job = tmp_path / "checkpoints"
    shutil.copytree(reference, job)
    # The previous job was killed after step 200; then its newest checkpoints were damaged.
    for path in job.iterdir():
        step = path.name.split("_")[-1].split(".")[0]
        if path.name.startswith("result") or (step.isdigit() and int(step) > 200):
            path.unlink()
    (job / "last.txt").write_text("step_00000200.mat\n")
    data = bytearray((job / "step_00000200.mat").read_bytes())
    data[len(data) // 2] ^= 0x40
    (job / "step_00000200.mat").write_bytes(bytes(data))
    (job / "step_00000150.mat").write_bytes((job / "step_00000150.mat").read_bytes()[:300])
    future = time.time() + 3600
    os.utime(job / "step_00000050.mat", (future, future))

    run = run_example(task_kit_file, job)
    output = run.stdout + run.stderr
    if run.returncode != 0 and "TODO: Task" in output:
        raise NotImplementedError(output[output.index("TODO: ") + 6:].splitlines()[0])
    assert run.returncode == 0, f"the job, run on your code, failed (exit {run.returncode}):\n{output[-2000:]}"
    assert "resumed from step_00000100.mat" in output, (
        "step_00000200.mat had one byte changed, step_00000150.mat was cut short and "
        "step_00000050.mat had the newest file time: the job should resume from "
        f"step_00000100.mat. Its output:\n{output[-2000:]}")
    assert (job / "result.txt").read_bytes() == (reference / "result.txt").read_bytes(), (
        "the resumed job's result differs from the uninterrupted run's")


# ----------------------------------------------------------------------------- task 4
def rotation(plan: str, rotate: str, before: str = "") -> str:
    return f"""
    folder = grader_checkpoints(tempname(), {{{plan}}});
    {before}
    deleted = {rotate};
    value.deleted = sort(deleted);
    value.names = grader_names(ckpt_list(folder));
    markers = dir(fullfile(folder, '*.json'));
    value.orphans = {{}};
    for marker = reshape({{markers.name}}, 1, [])
      if ~isfile(fullfile(folder, marker{{1}}(1:end - 5)))
        value.orphans{{end + 1}} = marker{{1}};
      end
    end
"""


ROTATE_BY_STEP = probe(4, "rotate by step", rotation(
    "'step:100', 'step:200', 'preempt:250', 'step:300', 'step:400'",
    "ckpt_rotate(folder, 2, 0)",
    before="grader_set_age(grader_path(folder, 'step_00000100.mat'), -7200);"))
ROTATE_PROTECTED = probe(4, "rotate protected", rotation(
    "'step:100', 'step:200', 'step:300', 'step:400'",
    "ckpt_rotate(folder, 1, 0, {'step_00000200.mat'})",
    before="ckpt_write_text_atomic(grader_path(folder, 'last.txt'), sprintf('step_00000100.mat\\n'));"))
ROTATE_TIMED = probe(4, "rotate timed", rotation(
    "'step:100', 'step:200', 'time:250', 'time:260', 'time:270'", "ckpt_rotate(folder, 2, 1)"))
ROTATE_DEFAULTS = probe(4, "rotate defaults", """
    folder = grader_checkpoints(tempname(), {'step:100', 'step:200', 'time:250', 'step:300'});
    value.error = grader_try(@() ckpt_rotate(folder, 2));
    value.names = grader_names(ckpt_list(folder));
""")
ROTATE_PREEMPT = probe(4, "rotate preempt", rotation(
    "'step:100', 'step:200', 'preempt:250', 'step:300'", "ckpt_rotate(folder, 3, 0)"))
ROTATE_KEEP_ZERO = probe(4, "rotate keep zero", """
    folder = grader_checkpoints(tempname(), {'step:100'});
    value.error = grader_try(@() ckpt_rotate(folder, 0));
    value.left = numel(ckpt_list(folder));
""")


@pytest.mark.task(4)
def test_keeps_the_newest_by_step(octave_task):
    """rotation keeps the newest `keep` by step, deletes the rest with their markers"""
    got = octave_task[ROTATE_BY_STEP].value
    assert as_list(got["names"]) == ["step_00000300.mat", "step_00000400.mat"], (
        f"after ckpt_rotate(folder, 2, 0) of steps 100, 200, 250 (preempt), 300, 400 (with "
        f"step 100 given the newest file time) these remain: {got['names']}; expected steps "
        "300 and 400: the newest by step (ckpt_list's order), never by file time")
    assert not as_list(got["orphans"]), (
        f"markers left without their checkpoint: {got['orphans']}; delete the marker first, "
        "then the file")
    assert as_list(got["deleted"]) == ["preempt_00000250.mat", "step_00000100.mat",
                                       "step_00000200.mat"], (
        f"ckpt_rotate() returned {got['deleted']}; expected the names it deleted")


@pytest.mark.task(4)
def test_never_deletes_last_or_protected(octave_task):
    """what last.txt names and what `protect` lists are never deleted"""
    got = octave_task[ROTATE_PROTECTED].value
    assert as_list(got["names"]) == ["step_00000100.mat", "step_00000200.mat",
                                     "step_00000400.mat"], (
        f"with last.txt naming step 100 and protect = {{'step_00000200.mat'}}, keep = 1 left "
        f"{got['names']}; expected steps 100, 200 and 400: never delete the checkpoint "
        "ckpt_read_last_pointer() names, nor anything in protect")


@pytest.mark.task(4)
def test_timer_checkpoints_rotate_on_their_own(octave_task):
    """timer checkpoints (kind 'time') are kept by keep_time, apart from the others"""
    got = octave_task[ROTATE_TIMED].value
    assert as_list(got["names"]) == ["step_00000100.mat", "step_00000200.mat",
                                     "time_00000270.mat"], (
        f"ckpt_rotate(folder, 2, 1) left {got['names']}; expected both step checkpoints and "
        "the newest timer one: frequent timer saves must not push out the step checkpoints")


@pytest.mark.task(4)
def test_keep_time_defaults_to_zero(octave_task):
    """ckpt_rotate(folder, keep): keep_time and protect are optional"""
    got = octave_task[ROTATE_DEFAULTS].value
    assert not got["error"], (
        "ckpt_rotate(folder, 2), without keep_time and protect, stopped with an error: "
        f"{got['error']}. Give the optional arguments their defaults (if nargin < 3, "
        "keep_time = 0; if nargin < 4, protect = {}), or the job dies right after its "
        "first save")
    assert as_list(got["names"]) == ["step_00000200.mat", "step_00000300.mat"], (
        f"ckpt_rotate(folder, 2) of steps 100, 200, 250 (time), 300 left {got['names']}; "
        "expected steps 200 and 300: keep_time defaults to 0")


@pytest.mark.task(4)
def test_preempt_checkpoints_rotate_with_the_step_ones(octave_task):
    """only kind 'time' rotates apart; preempt checkpoints count toward keep"""
    got = octave_task[ROTATE_PREEMPT].value
    assert as_list(got["names"]) == ["step_00000200.mat", "preempt_00000250.mat",
                                     "step_00000300.mat"], (
        f"ckpt_rotate(folder, 3, 0) of steps 100, 200, 250 (preempt), 300 left "
        f"{got['names']}; expected the newest three by step: 200, 250 and 300. A preempt "
        "checkpoint is a full step checkpoint saved at SIGTERM; only timer checkpoints "
        "(kind 'time') rotate by keep_time")


@pytest.mark.task(4)
def test_keep_below_one_is_refused(octave_task):
    """keep < 1 is refused: rotation must never delete everything"""
    got = octave_task[ROTATE_KEEP_ZERO].value
    assert got["error"] and got["left"] == 1, (
        "ckpt_rotate(folder, 0) must stop with an error and delete nothing")
