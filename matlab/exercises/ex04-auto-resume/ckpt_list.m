function infos = ckpt_list(folder)
%CKPT_LIST  Every checkpoint in a folder that has a readable completion marker.
%   infos = ckpt_list('checkpoints')
%   A struct array (see ckpt_read_marker), oldest first by step, then by save time. The
%   order never depends on file modification times, which copies, restores and clock skew
%   between nodes all change. Checksums are not checked here: see ckpt_find_latest_valid.

  % Exercise ex04-auto-resume, task 2: write this function in place of the error() below.
  % Generated from matlab/ckpt_list.m by scripts/make_starters.py. Grade from the repository's top folder: make grade EX=matlab-ex04
  error('ckpt:todo', 'TODO: Task 2: List complete checkpoints by step (see README.md)');
end

%!test
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! assert (numel (ckpt_list (folder)), 0);
%! ckpt_save (folder, struct ('x', 1), 20);
%! ckpt_save (folder, struct ('x', 1), 100, 'time');
%! ckpt_save (folder, struct ('x', 1), 3);
%! fclose (fopen (fullfile (folder, 'step_00000500.mat'), 'w'));  % no marker: not listed
%! infos = ckpt_list (folder);
%! assert ({infos.name}, {'step_00000003.mat', 'step_00000020.mat', 'time_00000100.mat'});
%! rmdir (folder, 's');
