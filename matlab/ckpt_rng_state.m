function state = ckpt_rng_state()
%CKPT_RNG_STATE  The state of the random number generators, to store in a checkpoint.
%   checkpoint.rng = ckpt_rng_state();     % ... later: ckpt_restore_rng_state(checkpoint.rng)
%   state.rng is what rng() returns. In MATLAB that is the one global stream behind rand,
%   randn, randi and randperm. Octave's rng() holds the states of rand and randn only
%   (randi and randperm draw from rand); Octave's rande, randg and randp have states of
%   their own, kept in state.octave_extra. A RandStream you create yourself is not
%   global: save its State property with it.
%   Old code that seeds with rand('seed', x) draws from generators rng() does not hold:
%   ckpt_legacy_rng warns, and in Octave their seeds go into state.octave_extra too.
  legacy_seeds = ckpt_legacy_rng();
  state.rng = rng();
  state.octave_extra = struct();
  if exist('OCTAVE_VERSION', 'builtin')
    state.octave_extra = struct('rande', rande('state'), 'randg', randg('state'), ...
                                'randp', randp('state'));
  end
  if ~isempty(legacy_seeds)
    state.octave_extra.legacy_seeds = legacy_seeds;
  end
end

%!test
%! rng (42);
%! state = ckpt_rng_state ();
%! first = [rand(1, 3), randn(1, 3), randi(100, 1, 3), randperm(5), rande(1, 2), randg(2, 1, 2), randp(4, 1, 2)];
%! rand (1, 1000); randn (1, 10); rande (1, 10); randg (2, 1, 10); randp (4, 1, 10);
%! ckpt_restore_rng_state (state);
%! again = [rand(1, 3), randn(1, 3), randi(100, 1, 3), randperm(5), rande(1, 2), randg(2, 1, 2), randp(4, 1, 2)];
%! assert (again, first);
