function ckpt_restore_rng_state(state)
%CKPT_RESTORE_RNG_STATE  Put back the random number generators saved by ckpt_rng_state,
%   so a resumed run draws exactly the numbers the uninterrupted run would have drawn.
%   ckpt_restore_rng_state(checkpoint.rng)
%   Call it after everything the program draws before its loop (data it simulates, initial
%   values): those draws would move the restored generators on.
  rng(state.rng);
  if exist('OCTAVE_VERSION', 'builtin') && isfield(state.octave_extra, 'rande')
    rande('state', state.octave_extra.rande);
    randg('state', state.octave_extra.randg);
    randp('state', state.octave_extra.randp);
  end
  if isfield(state.octave_extra, 'legacy_seeds')
    % Last: each 'state' above switched the old generators off; a 'seed' switches them on.
    seeds = state.octave_extra.legacy_seeds;
    for name = reshape(fieldnames(seeds), 1, [])
      feval(name{1}, 'seed', seeds.(name{1}));
    end
  end
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
