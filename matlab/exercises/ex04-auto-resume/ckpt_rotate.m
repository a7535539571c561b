function deleted = ckpt_rotate(folder, keep, keep_time, protect)
%CKPT_ROTATE  Delete old checkpoints, never the ones a resume needs.
%   deleted = ckpt_rotate('checkpoints', 3, 2, {info.name})
%   Keeps the newest `keep` step/preempt checkpoints and the newest `keep_time` timed ones
%   (they rotate apart, so frequent timer saves cannot push out the step checkpoints; 0
%   deletes every timed one). Never deletes the checkpoint last.txt names, nor the names
%   in `protect`: pass the checkpoint ckpt_save just returned, which is the newest valid
%   one, since its sha256 was taken from the bytes it wrote. Call it only after a save
%   succeeded, so that a failed save never costs a checkpoint. Returns the deleted names.

  % Exercise ex04-auto-resume, task 4: write this function in place of the error() below.
  % Generated from matlab/ckpt_rotate.m by scripts/make_starters.py. Grade from the repository's top folder: make grade EX=matlab-ex04
  error('ckpt:todo', 'TODO: Task 4: Rotate without losing what you need (see README.md)');
end

function old = oldest_beyond(infos, count)
  old = infos(1:max(0, numel(infos) - count));
  old = reshape(old, 1, []);
end

%!test
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! for step = 1:5
%!   ckpt_save (folder, struct ('x', step), step);
%!   ckpt_save (folder, struct ('x', step), step, 'time');
%! end
%! deleted = ckpt_rotate (folder, 2, 1);
%! assert (sort (deleted), sort ({'step_00000001.mat', 'step_00000002.mat', 'step_00000003.mat', ...
%!                                'time_00000001.mat', 'time_00000002.mat', 'time_00000003.mat', ...
%!                                'time_00000004.mat'}));
%! infos = ckpt_list (folder);
%! assert ({infos.name}, {'step_00000004.mat', 'step_00000005.mat', 'time_00000005.mat'});
%! assert (numel (dir (fullfile (folder, '*.json'))), 3);   % markers went with their files
%! rmdir (folder, 's');

%!test
%! % last.txt's target and protected names survive, however old
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! for step = 1:4
%!   ckpt_save (folder, struct ('x', step), step);
%! end
%! ckpt_write_text_atomic (fullfile (folder, 'last.txt'), 'step_00000001.mat');
%! deleted = ckpt_rotate (folder, 1, 0, {'step_00000002.mat'});
%! assert (deleted, {'step_00000003.mat'});
%! infos = ckpt_list (folder);
%! assert ({infos.name}, {'step_00000001.mat', 'step_00000002.mat', 'step_00000004.mat'});
%! rmdir (folder, 's');

%!error <keep must be at least 1> ckpt_rotate (tempname (), 0)
