"""Grader of the MATLAB track's ex01. Run it with `make grade EX=matlab-ex01`, not with pytest.

Every check runs GNU Octave (octave-cli) on `task_kit_file`: a copy of the kit matlab/ with
only the files of the checked task taken from the learner's folder (scripts/grading.py
writes it), so a mistake in one task never costs the points of another. The checks of one
task are Octave functions ("probes", in OCTAVE_PROBES) that run together in one octave-cli,
which keeps a grading at a few seconds; each check then reads what its probe returned.

Some probes put spies in front of Octave's own functions (save, fopen, fclose): they record
which files were written and can play a full disk, then do what the real function does.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

OCTAVE_PROBES: dict[int, dict[str, str]] = {}


def probe(task: int, name: str, code: str) -> str:
    """Declare the Octave code (a function body that sets `value`) of one check."""
    OCTAVE_PROBES.setdefault(task, {})[name] = code
    return name


# The spies. GRADER_OPENED: the files opened for writing; GRADER_FULL: fclose of those
# files reports a failed write (-1), as on a full disk. GRADER_SAVED: the files save()
# wrote to; GRADER_SAVE_FAILS: save() writes 100 bytes, then fails as on a full disk.
SPIES = {
    "fopen.m": """\
function varargout = fopen(varargin)
  global GRADER_OPENED GRADER_WRITE_FIDS
  [varargout{1:max(1, nargout)}] = builtin('fopen', varargin{:});
  if nargin >= 2 && ischar(varargin{1}) && ischar(varargin{2}) && any(varargin{2}(1) == 'wa')
    GRADER_OPENED{end + 1} = varargin{1};
    GRADER_WRITE_FIDS(end + 1) = varargout{1};
  end
end
""",
    "fclose.m": """\
function status = fclose(fid)
  global GRADER_FULL GRADER_WRITE_FIDS
  status = builtin('fclose', fid);
  if isequal(GRADER_FULL, true) && isnumeric(fid) && any(GRADER_WRITE_FIDS == fid)
    status = -1;
  end
end
""",
    "save.m": """\
function save(varargin)
  global GRADER_SAVED GRADER_SAVE_FAILS
  GRADER_SAVED{end + 1} = varargin{1};
  if isequal(GRADER_SAVE_FAILS, true)
    fid = builtin('fopen', varargin{1}, 'w');
    builtin('fwrite', fid, uint8(1:100));
    builtin('fclose', fid);
    error('save: No space left on device');
  end
  assignin('caller', 'grader_save_arguments', varargin);
  evalin('caller', 'builtin(''save'', grader_save_arguments{:}); clear grader_save_arguments;');
end
""",
}
SPY_DIR = Path(tempfile.mkdtemp(prefix="grader-spies-"))
atexit.register(shutil.rmtree, SPY_DIR, True)
for _name, _code in SPIES.items():
    (SPY_DIR / _name).write_text(_code)

OCTAVE_HELPERS = f"""
function cleanup = grader_spies()
  % the spies go first on the path until the probe returns
  global GRADER_OPENED GRADER_WRITE_FIDS GRADER_FULL GRADER_SAVED GRADER_SAVE_FAILS
  GRADER_OPENED = {{}}; GRADER_WRITE_FIDS = []; GRADER_FULL = false;
  GRADER_SAVED = {{}}; GRADER_SAVE_FAILS = false;
  addpath('{SPY_DIR}');
  cleanup = onCleanup(@() rmpath('{SPY_DIR}'));
end
function message = grader_try(action)
  % '' when action() runs through, else its error message; a starter's TODO goes through
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
function names = grader_files(folder)
  listing = dir(folder);
  names = setdiff({{listing.name}}, {{'.', '..'}});
end
function draws = grader_draws()
  % the next numbers of every generator, by name
  draws = struct('rand', rand(1, 4), 'randn', randn(1, 4), 'randi', randi(100, 1, 4), ...
                 'randperm', randperm(6), 'rande', rande(1, 3), 'randg', randg(2, 1, 3), ...
                 'randp', randp(4, 1, 3));
end
function scramble()
  % move every generator on, as the rest of a run would
  rand(1, 77); randn(1, 33); rande(1, 5); randg(3, 1, 5); randp(2, 1, 5);
end
function differ = grader_differ(a, b)
  % the names of the generators whose draws differ
  names = fieldnames(a);
  differ = names(cellfun(@(n) ~isequal(a.(n), b.(n)), names))';
end
"""


def differing(got: list | str) -> str:
    names = [got] if isinstance(got, str) else list(got)
    return ", ".join(names)


# ----------------------------------------------------------------------------- task 1
CAPTURE_FIELDS = probe(1, "capture_fields", """
    rng(7); randn(1, 10); rande(1, 2);
    state = ckpt_rng_state();
    value.struct = isstruct(state) && isfield(state, 'rng') && isfield(state, 'octave_extra');
    value.rng = value.struct && isequal(state.rng, rng());
    value.extra = value.struct && isstruct(state.octave_extra) ...
        && all(isfield(state.octave_extra, {'rande', 'randg', 'randp'})) ...
        && isequal(state.octave_extra.rande, rande('state')) ...
        && isequal(state.octave_extra.randg, randg('state')) ...
        && isequal(state.octave_extra.randp, randp('state'));
""")
CAPTURE_CHANGES_NOTHING = probe(1, "capture_changes_nothing", """
    rng(4); rand(1, 3); rande(1, 3);
    before = {rng(), rande('state'), randg('state'), randp('state')};
    ckpt_rng_state();
    value.same = isequal({rng(), rande('state'), randg('state'), randp('state')}, before);
""")
CAPTURE_ROUND_TRIP = probe(1, "capture_round_trip", """
    rng(2); rand(1, 5); randg(2, 1, 3);
    state = ckpt_rng_state();
    expected = grader_draws();
    scramble();
    ckpt_restore_rng_state(state);   % the kit's restore
    value.differ = grader_differ(grader_draws(), expected);
""")
CAPTURE_IN_A_MAT_FILE = probe(1, "capture_in_a_mat_file", """
    rng(3); randn(1, 9);
    checkpoint.rng = ckpt_rng_state();
    expected = grader_draws();
    file = [tempname() '.mat'];
    save(file, 'checkpoint', '-v6');
    scramble();
    loaded = load(file);
    delete(file);
    ckpt_restore_rng_state(loaded.checkpoint.rng);
    value.differ = grader_differ(grader_draws(), expected);
""")


@pytest.mark.task(1)
def test_capture_holds_rng_and_octave_generators(octave_task):
    """ckpt_rng_state() returns rng() and the states of rande, randg and randp"""
    got = octave_task[CAPTURE_FIELDS].value
    assert got["struct"], ("ckpt_rng_state() must return a struct with the fields rng and "
                           "octave_extra (the kit's ckpt_restore_rng_state reads both)")
    assert got["rng"], ("ckpt_rng_state().rng is not what rng() returns at that moment: "
                        "store the whole struct rng() gives (Type, Seed, State), not a seed")
    assert got["extra"], (
        "under Octave, ckpt_rng_state().octave_extra must hold rande('state'), "
        "randg('state') and randp('state') (fields rande, randg, randp): these generators "
        "are not part of rng() in Octave")


@pytest.mark.task(1)
def test_capture_changes_nothing(octave_task):
    """capturing draws no number and changes no generator"""
    got = octave_task[CAPTURE_CHANGES_NOTHING].value
    assert got["same"], ("after ckpt_rng_state() the generators were in another state than "
                         "before it: capturing must only read the states (no rand(), no "
                         "rng(seed), no rng('shuffle')), or the run diverges at every save")


@pytest.mark.task(1)
def test_captured_state_restores_every_generator(octave_task):
    """the kit's restore of your capture gives back the same numbers, for every generator"""
    got = octave_task[CAPTURE_ROUND_TRIP].value
    assert not got["differ"], (
        "rng(2); ...; state = ckpt_rng_state(); then other draws and the kit's "
        "ckpt_restore_rng_state(state): these generators drew other numbers than right after "
        f"the capture: {differing(got['differ'])}. Capture rng() and, under Octave, the "
        "states of rande, randg and randp")


@pytest.mark.task(1)
def test_captured_state_survives_a_mat_file(octave_task):
    """the captured state, saved in a -v6 MAT file and loaded back, still restores"""
    got = octave_task[CAPTURE_IN_A_MAT_FILE].value
    assert not got["differ"], (
        "your capture, saved with save(file, 'checkpoint', '-v6') and loaded back, restored "
        f"other numbers for: {differing(got['differ'])}. Keep only plain values (structs, "
        "arrays) in the state, nothing a MAT file cannot hold")


# ----------------------------------------------------------------------------- task 2
RESTORE_SAME_NUMBERS = probe(2, "restore_same_numbers", """
    rng(42); rand(1, 3); randn(1, 2); rande(1, 2);
    state = ckpt_rng_state();   % the kit's capture
    expected = grader_draws();
    scramble();
    ckpt_restore_rng_state(state);
    value.differ = grader_differ(grader_draws(), expected);
""")
RESTORE_TWICE = probe(2, "restore_twice", """
    rng(5); randn(1, 4);
    state = ckpt_rng_state();
    ckpt_restore_rng_state(state);
    first = grader_draws();
    ckpt_restore_rng_state(state);
    value.differ = grader_differ(grader_draws(), first);
""")
RESTORE_MATLAB_STATE = probe(2, "restore_matlab_state", """
    rng(8); rand(1, 2);
    state = struct('rng', rng(), 'octave_extra', struct());   % as MATLAB saves it
    expected = [rand(1, 3), randn(1, 3)];
    rand(1, 10); randn(1, 10);
    value.error = grader_try(@() ckpt_restore_rng_state(state));
    value.same = isempty(value.error) && isequal([rand(1, 3), randn(1, 3)], expected);
""")


@pytest.mark.task(2)
def test_restore_draws_the_same_numbers(octave_task):
    """after ckpt_restore_rng_state() every generator draws the same numbers again"""
    got = octave_task[RESTORE_SAME_NUMBERS].value
    assert not got["differ"], (
        "rng(42); ...; state = ckpt_rng_state(); then other draws and your "
        "ckpt_restore_rng_state(state): these generators drew other numbers than right "
        f"after the capture: {differing(got['differ'])}. rng(state.rng) puts back rand and "
        "randn together (rand('state', ...) alone misses randn); under Octave set rande, "
        "randg and randp from state.octave_extra")


@pytest.mark.task(2)
def test_restore_twice_gives_the_same_numbers(octave_task):
    """restoring the same state twice gives the same numbers twice"""
    got = octave_task[RESTORE_TWICE].value
    assert not got["differ"], (
        "ckpt_restore_rng_state(state) twice in a row: the draws after the second restore "
        f"differ from those after the first for: {differing(got['differ'])}. A restore "
        "must set the states, not draw numbers or re-seed")


@pytest.mark.task(2)
def test_restore_of_a_state_saved_by_matlab(octave_task):
    """a state without Octave's extra generators (saved by MATLAB) restores rand and randn"""
    got = octave_task[RESTORE_MATLAB_STATE].value
    assert not got["error"], (
        "ckpt_restore_rng_state(struct('rng', rng(), 'octave_extra', struct())), a state "
        f"saved by MATLAB, failed: {got['error']}. Set rande, randg and randp only when "
        "state.octave_extra has those fields (isfield)")
    assert got["same"], ("after restoring a state saved by MATLAB, rand and randn drew other "
                         "numbers than right after it was taken")


# ----------------------------------------------------------------------------- task 3
WRITE_TEXT = probe(3, "write_text", """
    folder = tempname(); mkdir(folder);
    target = fullfile(folder, 'last.txt');
    ckpt_write_text_atomic(target, 'first');
    ckpt_write_text_atomic(target, sprintf('step_00000400.mat\\n'));
    value.content = fileread(target);
    value.files = grader_files(folder);
""")
WRITE_WHERE = probe(3, "write_where", """
    folder = tempname(); mkdir(folder);
    target = fullfile(folder, 'step_00000100.mat.json');
    spies = grader_spies();
    global GRADER_OPENED
    ckpt_write_text_atomic(target, '{"step": 100}');
    opened = GRADER_OPENED;
    clear spies
    value.folders = cellfun(@(p) strcmp(fileparts(p), folder), opened);
    [~, names, extensions] = cellfun(@fileparts, opened, 'UniformOutput', false);
    value.names = strcat(names, extensions);
    value.content = fileread(target);
""")
WRITE_ANY_TEXT = probe(3, "write_any_text", """
    folder = tempname(); mkdir(folder);
    target = fullfile(folder, 'step_00000300.mat.json');
    % a marker whose text holds what format strings interpret: %, a backslash, \\n
    text = ['{"note":"50% done, 100%d \\n","where":"C:\\\\runs\\\\a","s":"%s"}'];
    value.text = text;
    value.error = grader_try(@() ckpt_write_text_atomic(target, text));
    value.content = '';
    if isfile(target)
      value.content = fileread(target);
    end
""")
WRITE_DISK_FULL = probe(3, "write_disk_full", """
    folder = tempname(); mkdir(folder);
    target = fullfile(folder, 'last.txt');
    ckpt_write_text_atomic(target, 'old');
    spies = grader_spies();
    global GRADER_FULL
    GRADER_FULL = true;
    value.error = grader_try(@() ckpt_write_text_atomic(target, 'new text'));
    clear spies
    value.content = fileread(target);
    value.files = grader_files(folder);
""")


@pytest.mark.task(3)
def test_write_text_writes_the_file(octave_task):
    """ckpt_write_text_atomic() writes the text and leaves nothing else"""
    got = octave_task[WRITE_TEXT].value
    assert got["content"] == "step_00000400.mat\n", (
        f"after writing 'first', then 'step_00000400.mat\\n', the file holds {got['content']!r}")
    assert got["files"] == "last.txt" or got["files"] == ["last.txt"], (
        f"the folder holds {got['files']}, expected only last.txt: rename the temp file over "
        "the target, do not leave it behind")


@pytest.mark.task(3)
def test_write_goes_to_a_temp_file_beside_the_target(octave_task):
    """the text goes to a .tmp- file in the target's folder, never into the target"""
    got = octave_task[WRITE_WHERE].value
    names = [got["names"]] if isinstance(got["names"], str) else got["names"]
    folders = got["folders"] if isinstance(got["folders"], list) else [got["folders"]]
    assert names, "ckpt_write_text_atomic() opened no file for writing (fopen(..., 'w'))"
    assert "step_00000100.mat.json" not in names, (
        "ckpt_write_text_atomic() opened the target itself for writing: a kill during the "
        "write leaves it half-written, and a reader sees a broken marker. Write to "
        "fullfile(folder, ['.tmp-' name]) and rename that over the target (ckpt_rename)")
    assert all(folders), ("the temp file was not in the target's folder: a rename is atomic "
                          "only within one file system, so keep it beside the target")
    assert all(n.startswith(".tmp-") for n in names), (
        f"the temp file was called {names}; expected a name starting with .tmp-, which "
        "ckpt_remove_unfinished cleans up after a kill")
    assert got["content"] == '{"step": 100}', f"the target then held {got['content']!r}"


@pytest.mark.task(3)
def test_write_keeps_every_character(octave_task):
    """text with %, backslashes and \\n in it is written byte for byte"""
    got = octave_task[WRITE_ANY_TEXT].value
    assert not got["error"] and got["content"] == got["text"], (
        f"ckpt_write_text_atomic(target, {got['text']!r}) "
        + (f"failed: {got['error']}" if got["error"] else f"wrote {got['content']!r}")
        + ". The text is data, not a format: fprintf(fid, text) reads % and \\ in it as "
        "conversions and escapes, so a marker holding a path or a percentage comes out "
        "broken (or the write fails) and the checkpoint is never found. Write it with "
        "fwrite(fid, text, 'char') (or fprintf(fid, '%s', text))")


@pytest.mark.task(3)
def test_failed_write_keeps_the_old_file_and_no_debris(octave_task):
    """a write that fails (disk full) raises, keeps the old content, leaves no temp file"""
    got = octave_task[WRITE_DISK_FULL].value
    assert got["error"], ("the disk was full (fclose returned -1 for the file written): "
                          "ckpt_write_text_atomic() returned normally. Check what fwrite "
                          "and fclose return and raise an error, so the caller knows")
    assert got["content"] == "old", (
        f"after the failed write the target holds {got['content']!r}, expected its old "
        "content 'old': the target may change only by the final rename")
    files = [got["files"]] if isinstance(got["files"], str) else got["files"]
    assert files == ["last.txt"], (
        f"after the failed write the folder holds {files}: delete the temp file when the "
        "write fails (try ... catch, delete, rethrow)")


# ----------------------------------------------------------------------------- task 4
SAVE_WRITES = probe(4, "save_writes", """
    folder = tempname();
    checkpoint = struct('step', 400, 'x', magic(4), 'note', 'hello');
    info = ckpt_save(folder, checkpoint, 400);
    path = fullfile(folder, 'step_00000400.mat');
    value.files = grader_files(folder);
    value.loaded = isfile(path) && isequal(getfield(load(path), 'checkpoint'), checkpoint);
    value.marker = isfile([path '.json']);
    if value.marker
      marker = jsondecode(fileread([path '.json']));
      listing = dir(path);
      value.step = marker.step; value.kind = marker.kind;
      value.size = isequal(marker.size, listing.bytes);
      value.sha256 = strcmp(marker.sha256, ckpt_sha256_file(path));
    end
    value.last = ckpt_read_last_pointer(folder);
    value.info = isstruct(info) && isfield(info, 'name') && strcmp(info.name, 'step_00000400.mat');
    [~, found] = ckpt_find_latest_valid(folder);
    value.found = ~isempty(found) && found.step == 400;
    later = ckpt_save(folder, struct('step', 457), 457, 'time');
    value.time_files = grader_files(folder);
    value.time_last = ckpt_read_last_pointer(folder);
""")
SAVE_KINDS = probe(4, "save_kinds", """
    folder = tempname();
    % a checkpoint without a field 'step' (the step is ckpt_save's argument)
    value.plain_error = grader_try(@() ckpt_save(folder, struct('iteration', 9, 'x', 1:3), 600));
    value.plain_step = [];
    if isfile(fullfile(folder, 'step_00000600.mat.json'))
      marker = jsondecode(fileread(fullfile(folder, 'step_00000600.mat.json')));
      value.plain_step = marker.step;
    end
    % the step inside the checkpoint is the next one to run: the marker follows the argument
    ckpt_save(folder, struct('step', 701), 700);
    marker = jsondecode(fileread(fullfile(folder, 'step_00000700.mat.json')));
    value.next_step = marker.step;
    value.preempt_error = grader_try(@() ckpt_save(folder, struct('step', 800), 800, 'preempt'));
    value.preempt = isfile(fullfile(folder, 'preempt_00000800.mat.json'));
    before = grader_files(folder);
    value.typo_error = grader_try(@() ckpt_save(folder, struct('step', 900), 900, 'preemption'));
    value.typo_new = setdiff(grader_files(folder), before);
    value.last = ckpt_read_last_pointer(folder);
""")
SAVE_WHERE = probe(4, "save_where", """
    folder = tempname();
    spies = grader_spies();
    global GRADER_SAVED
    ckpt_save(folder, struct('step', 100), 100);
    saved = GRADER_SAVED;
    clear spies
    value.folders = cellfun(@(p) strcmp(fileparts(p), folder), saved);
    [~, names, extensions] = cellfun(@fileparts, saved, 'UniformOutput', false);
    value.names = strcat(names, extensions);
""")
SAVE_RENAME_FAILS = probe(4, "save_rename_fails", """
    folder = tempname();
    ckpt_save(folder, struct('step', 100), 100);
    mkdir(fullfile(folder, 'step_00000200.mat'));   % the name is taken: the rename fails
    value.error = grader_try(@() ckpt_save(folder, struct('step', 200), 200));
    value.marker = isfile(fullfile(folder, 'step_00000200.mat.json'));
    value.last = ckpt_read_last_pointer(folder);
    value.files = grader_files(folder);
""")
SAVE_DISK_FULL = probe(4, "save_disk_full", """
    folder = tempname();
    ckpt_save(folder, struct('step', 100), 100);
    spies = grader_spies();
    global GRADER_SAVE_FAILS
    GRADER_SAVE_FAILS = true;
    value.error = grader_try(@() ckpt_save(folder, struct('step', 200), 200));
    clear spies
    value.files = grader_files(folder);
    value.last = ckpt_read_last_pointer(folder);
    [~, found] = ckpt_find_latest_valid(folder);
    value.newest = found.step;
""")


def as_list(value) -> list:
    return [value] if isinstance(value, (str, bool, int, float)) else list(value)


@pytest.mark.task(4)
def test_save_writes_checkpoint_marker_and_pointer(octave_task):
    """ckpt_save() writes the MAT file, a true completion marker and last.txt"""
    got = octave_task[SAVE_WRITES].value
    assert got["loaded"], ("ckpt_save('dir', checkpoint, 400) wrote no step_00000400.mat that "
                           "load() gives back as the variable 'checkpoint' (save(temp, "
                           "'checkpoint', '-v6'))")
    assert got["marker"], ("no completion marker step_00000400.mat.json: write it with "
                           "ckpt_write_text_atomic(..., jsonencode(marker)) after the rename")
    assert (got["step"], got["kind"]) == (400, "step"), (
        f"the marker says step {got['step']}, kind {got['kind']!r}; expected 400, 'step'")
    assert got["size"] and got["sha256"], ("the marker's size or sha256 is not that of the "
                                           "file: take both from the bytes written")
    assert got["last"] == "step_00000400.mat", (
        f"last.txt names {got['last']!r}; expected step_00000400.mat")
    assert got["info"], "ckpt_save() must return the marker as a struct (name, path, step, ...)"
    assert got["found"], "ckpt_find_latest_valid() does not accept the checkpoint just saved"
    assert sorted(as_list(got["files"])) == ["last.txt", "step_00000400.mat",
                                             "step_00000400.mat.json"], (
        f"after one save the folder holds {got['files']}; expected the checkpoint, its "
        "marker and last.txt, no temp files")
    assert "time_00000457.mat.json" in as_list(got["time_files"]) and \
        got["time_last"] == "time_00000457.mat", (
        "ckpt_save(dir, checkpoint, 457, 'time') must write time_00000457.mat with its marker "
        f"and point last.txt at it; the folder holds {got['time_files']}")


@pytest.mark.task(4)
def test_marker_step_is_the_step_argument(octave_task):
    """the marker's step is ckpt_save's argument, whatever the checkpoint struct holds"""
    got = octave_task[SAVE_KINDS].value
    assert not got["plain_error"], (
        "ckpt_save(folder, struct('iteration', 9, 'x', 1:3), 600) failed: "
        f"{got['plain_error']}. The checkpoint is the learner's struct and need not have a "
        "field 'step': take the step from the argument")
    assert got["plain_step"] == 600 and got["next_step"] == 700, (
        "ckpt_save(folder, struct('step', 701), 700) wrote a marker with step "
        f"{got['next_step']} (expected 700, as in the name step_00000700.mat): many runs "
        "store the NEXT step in the checkpoint, and a marker that disagrees with the file "
        "name makes ckpt_list order and rotate the checkpoints wrongly")


@pytest.mark.task(4)
def test_kind_is_checked(octave_task):
    """kind 'preempt' is accepted; an unknown kind is refused before anything is written"""
    got = octave_task[SAVE_KINDS].value
    assert not got["preempt_error"] and got["preempt"], (
        "ckpt_save(folder, checkpoint, 800, 'preempt') must write preempt_00000800.mat and "
        f"its marker ({got['preempt_error'] or 'no marker was written'})")
    new = as_list(got["typo_new"])
    assert got["typo_error"] and not new, (
        "ckpt_save(folder, checkpoint, 900, 'preemption') "
        + ("returned normally" if not got["typo_error"] else "failed")
        + (f" and left {new}" if new else "")
        + ". A kind other than step, time or preempt must raise an error and write "
        "nothing: ckpt_list and every resume find only step_, time_ and preempt_ files, so "
        "a checkpoint saved under a misspelled kind is silently lost")
    assert got["last"] == "preempt_00000800.mat", (
        f"after the refused save last.txt names {got['last']!r}; it must still name "
        "preempt_00000800.mat")


@pytest.mark.task(4)
def test_save_writes_to_a_temp_file_first(octave_task):
    """save() writes to a .tmp- file in the folder, never straight to the final name"""
    got = octave_task[SAVE_WHERE].value
    names, folders = as_list(got["names"]), as_list(got["folders"])
    assert names, "ckpt_save() never called save()"
    assert "step_00000100.mat" not in names, (
        "ckpt_save() called save() on step_00000100.mat itself: a kill during save() leaves "
        "a half-written file under the final name. Save to fullfile(folder, ['.tmp-' name]), "
        "then ckpt_rename it to the final name")
    assert all(folders) and all(n.startswith(".tmp-") for n in names), (
        f"save() wrote to {names}, expected a .tmp- file in the checkpoint folder (a rename "
        "is atomic only within one file system)")


@pytest.mark.task(4)
def test_marker_comes_after_the_rename(octave_task):
    """when the rename fails, the save fails and leaves no marker; last.txt does not move"""
    got = octave_task[SAVE_RENAME_FAILS].value
    assert got["error"], ("the final name step_00000200.mat was taken by a folder, so the "
                          "rename could not succeed, yet ckpt_save() returned normally")
    assert not got["marker"], (
        "the rename of the new checkpoint failed, yet its completion marker was written: "
        "the marker says the checkpoint is complete, so write it only after the rename")
    assert got["last"] == "step_00000100.mat", (
        f"after the failed save last.txt names {got['last']!r}; it must keep naming "
        "step_00000100.mat: move last.txt after the marker")
    assert not [f for f in as_list(got["files"]) if f.startswith(".tmp-")], (
        f"the failed save left temp files: {got['files']}; delete them before rethrowing")


@pytest.mark.task(4)
def test_failed_save_leaves_no_marker_and_no_debris(octave_task):
    """a save() that fails (disk full) raises, writes no marker, leaves no temp file"""
    got = octave_task[SAVE_DISK_FULL].value
    assert "No space left" in got["error"], (
        "save() failed with 'No space left on device', yet ckpt_save() "
        + (f"failed with another error: {got['error']}" if got["error"] else "returned normally")
        + ". Let the error through (rethrow) after cleaning up")
    files = as_list(got["files"])
    assert not [f for f in files if f.startswith(".tmp-") or "00000200" in f], (
        f"after the failed save at step 200 the folder holds {files}: no temp file, no "
        "step_00000200.mat and no marker may be left")
    assert got["last"] == "step_00000100.mat" and got["newest"] == 100, (
        "after the failed save, last.txt and the newest valid checkpoint must still be "
        "step_00000100.mat")
