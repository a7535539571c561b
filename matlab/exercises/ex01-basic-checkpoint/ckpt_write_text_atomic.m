function ckpt_write_text_atomic(path, text)
%CKPT_WRITE_TEXT_ATOMIC  Write a small text file so that it is either old or complete.
%   ckpt_write_text_atomic('checkpoints/last.txt', sprintf('step_00000400.mat\n'))
%   The text goes to '.tmp-<name>' in the same folder, which is then renamed over path.
%   Used for completion markers and the last.txt pointer.

  % Exercise ex01-basic-checkpoint, task 3: write this function in place of the error() below.
  % Generated from matlab/ckpt_write_text_atomic.m by scripts/make_starters.py. Grade from the repository's top folder: make grade EX=matlab-ex01
  error('ckpt:todo', 'TODO: Task 3: Write a small file atomically (see README.md)');
end

%!test
%! folder = tempname (); mkdir (folder);
%! confirm_recursive_rmdir (false, 'local');
%! target = fullfile (folder, 'last.txt');
%! ckpt_write_text_atomic (target, 'first');
%! ckpt_write_text_atomic (target, 'second');
%! assert (fileread (target), 'second');
%! listing = dir (folder);
%! assert (sort ({listing.name}), {'.', '..', 'last.txt'});
%! rmdir (folder, 's');
