function [path, info] = ckpt_find_latest_valid(folder)
%CKPT_FIND_LATEST_VALID  The newest checkpoint (by step) whose bytes match its marker.
%   [path, info] = ckpt_find_latest_valid('checkpoints')
%   path is '' and info [] when there is none (a fresh start). Newer checkpoints that fail
%   verification, or hold more than data (ckpt_check_plain_mat), are skipped with a printed
%   line that says why; files without a marker are not candidates at all. It never raises
%   for a damaged or unreadable file, and changes nothing on disk (ckpt_load_latest moves
%   what it skips to corrupt/).

  % Exercise ex04-auto-resume, task 3: write this function in place of the error() below.
  % Generated from matlab/ckpt_find_latest_valid.m by scripts/make_starters.py. Grade from the repository's top folder: make grade EX=matlab-ex04
  error('ckpt:todo', 'TODO: Task 3: Resume from the newest valid checkpoint (see README.md)');
end

%!test
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! [path, info] = ckpt_find_latest_valid (folder);
%! assert (path, ''); assert (isempty (info));
%! ckpt_save (folder, struct ('x', 1), 100);
%! newest = ckpt_save (folder, struct ('x', 2), 200);
%! % the newest is damaged: same size, other bytes
%! bytes = fileread (newest.path);
%! fid = fopen (newest.path, 'w'); fwrite (fid, fliplr (bytes)); fclose (fid);
%! % a newer file still without marker, and a newer marker that is garbage
%! fclose (fopen (fullfile (folder, 'step_00000300.mat'), 'w'));
%! fclose (fopen (fullfile (folder, 'step_00000400.mat'), 'w'));
%! ckpt_write_text_atomic (fullfile (folder, 'step_00000400.mat.json'), '{not json');
%! printed = evalc ('[path, info] = ckpt_find_latest_valid (folder);');
%! assert (info.step, 100);
%! assert (path, fullfile (folder, 'step_00000100.mat'));
%! assert (printed, sprintf ('skipped corrupt checkpoint: step_00000200.mat: sha256 does not match the marker (the bytes were changed)\n'));
%! rmdir (folder, 's');

%!test
%! % a truncated newest one: skipped by its size, without hashing
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! ckpt_save (folder, struct ('x', 1), 1);
%! newest = ckpt_save (folder, struct ('x', rand (100)), 2);
%! bytes = fileread (newest.path);
%! fid = fopen (newest.path, 'w'); fwrite (fid, bytes(1:end-10)); fclose (fid);
%! printed = evalc ('[path, info] = ckpt_find_latest_valid (folder);');
%! assert (info.step, 1);
%! assert (! isempty (regexp (printed, 'step_00000002.mat: \d+ bytes on disk, the marker says \d+ \(truncated', 'once')));
%! rmdir (folder, 's');
