function info = ckpt_save(folder, checkpoint, step, kind)
%CKPT_SAVE  Save a checkpoint atomically, write its completion marker, move last.txt.
%   info = ckpt_save('checkpoints', checkpoint, step)          % kind 'step'
%   info = ckpt_save('checkpoints', checkpoint, step, 'time')  % or 'preempt'
%
%   checkpoint: a struct holding everything the run needs to continue (the step, its
%   data, the RNG state from ckpt_rng_state). It is saved as the variable 'checkpoint' in a
%   MAT file of format -v6 (read by MATLAB, Octave and scipy.io.loadmat; variables up to
%   2 GB each). Not -v7: its compressed bytes cannot be checked before load, and load can
%   run code (see ckpt_check_plain_mat).
%
%   The order is what makes a kill at any moment harmless:
%     1. save to '.tmp-<name>' in the same folder        (a kill leaves debris only)
%     2. sha256 and size of those bytes
%     3. rename it to '<kind>_<step>.mat'                (atomic)
%     4. write '<name>.json', the completion marker, atomically and LAST
%     5. point 'last.txt' at the new checkpoint
%   A checkpoint counts only once its marker exists and its bytes match the marker.
%   Neither MATLAB nor Octave can fsync a file, so after a power cut of the node the
%   newest file may be damaged; the sha256 check then skips it and the one before is used.
%   Returns the marker as a struct (name, path, step, kind, size, sha256, saved_at).
%   Only one process may save into a folder.

  % Exercise ex01-basic-checkpoint, task 4: write this function in place of the error() below.
  % Generated from matlab/ckpt_save.m by scripts/make_starters.py. Grade from the repository's top folder: make grade EX=matlab-ex01
  error('ckpt:todo', 'TODO: Task 4: Save: temp file, rename, marker last (see README.md)');
end

function text = runtime_name()
  if exist('OCTAVE_VERSION', 'builtin')
    text = ['Octave ' OCTAVE_VERSION];
  else
    text = ['MATLAB ' version()];
  end
end

%!test
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! checkpoint = struct ('step', 400, 'x', magic (4));
%! info = ckpt_save (folder, checkpoint, 400);
%! assert (info.name, 'step_00000400.mat');
%! listing = dir (folder);
%! assert (sort ({listing.name}), ...
%!         {'.', '..', 'last.txt', 'step_00000400.mat', 'step_00000400.mat.json'});
%! marker = jsondecode (fileread ([info.path '.json']));
%! assert (marker.step, 400);
%! assert (marker.kind, 'step');
%! assert (marker.size, dir (info.path).bytes);
%! assert (marker.sha256, ckpt_sha256_file (info.path));
%! assert (ckpt_read_last_pointer (folder), 'step_00000400.mat');
%! loaded = load (info.path);
%! assert (loaded.checkpoint, checkpoint);
%! rmdir (folder, 's');

%!test
%! % a save that fails leaves no temp file and no marker behind
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! ckpt_save (folder, struct ('x', 1), 1);
%! fail ('ckpt_save (folder, struct (''x'', 2), 2, ''weekly'')', 'kind must be');
%! listing = dir (folder);
%! assert (sort ({listing.name}), {'.', '..', 'last.txt', 'step_00000001.mat', 'step_00000001.mat.json'});
%! rmdir (folder, 's');
