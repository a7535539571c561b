function [checkpoint, info] = ckpt_load_latest(folder)
%CKPT_LOAD_LATEST  Load the newest valid checkpoint of a folder, for a resume.
%   [checkpoint, info] = ckpt_load_latest('checkpoints')
%   checkpoint is the struct given to ckpt_save, or [] when there is no valid checkpoint
%   (start fresh). info is its marker (name, step, ...). Damaged checkpoints are skipped
%   with a printed line (see ckpt_find_latest_valid). A file whose bytes match its marker
%   but cannot be loaded is an error, not a skip: nothing was damaged, so something else
%   is wrong (a MAT format this program cannot read, a name clash) and you must know.

  % Exercise ex04-auto-resume, task 3: write this function in place of the error() below.
  % Generated from matlab/ckpt_load_latest.m by scripts/make_starters.py. Grade from the repository's top folder: make grade EX=matlab-ex04
  error('ckpt:todo', 'TODO: Task 3: Resume from the newest valid checkpoint (see README.md)');
end

%!test
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! [checkpoint, info] = ckpt_load_latest (folder);
%! assert (isempty (checkpoint)); assert (isempty (info));
%! ckpt_save (folder, struct ('step', 7, 'data', {{'a', [1 2 3]}}), 7);
%! [checkpoint, info] = ckpt_load_latest (folder);
%! assert (checkpoint.step, 7);
%! assert (checkpoint.data, {'a', [1 2 3]});
%! assert (info.name, 'step_00000007.mat');
%! rmdir (folder, 's');
