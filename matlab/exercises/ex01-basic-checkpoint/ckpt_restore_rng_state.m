function ckpt_restore_rng_state(state)
%CKPT_RESTORE_RNG_STATE  Put back the random number generators saved by ckpt_rng_state,
%   so a resumed run draws exactly the numbers the uninterrupted run would have drawn.
%   ckpt_restore_rng_state(checkpoint.rng)
%   Call it after everything the program draws before its loop (data it simulates, initial
%   values): those draws would move the restored generators on.

  % Exercise ex01-basic-checkpoint, task 2: write this function in place of the error() below.
  % Generated from matlab/ckpt_restore_rng_state.m by scripts/make_starters.py. Grade from the repository's top folder: make grade EX=matlab-ex01
  error('ckpt:todo', 'TODO: Task 2: Restore it, draw for draw (see README.md)');
end

%!test
%! % the state survives the round trip through a checkpoint file
%! folder = tempname ();
%! confirm_recursive_rmdir (false, 'local');
%! rng (7);
%! randn (1, 50);
%! ckpt_save (folder, struct ('rng', ckpt_rng_state ()), 50);
%! expected = [randn(1, 5), rand(1, 5), rande(1, 2)];
%! rng (1); rande (1, 99);
%! checkpoint = ckpt_load_latest (folder);
%! ckpt_restore_rng_state (checkpoint.rng);
%! assert ([randn(1, 5), rand(1, 5), rande(1, 2)], expected);
%! rmdir (folder, 's');
