function ckpt_seed_rng(seed)
%CKPT_SEED_RNG  Seed every global random number generator, for a run's fresh start.
%   ckpt_seed_rng(42)   % on a fresh start; on a resume ckpt_restore_rng_state instead
%   rng(seed, 'twister') seeds what rand, randn, randi and randperm draw from: all of
%   MATLAB's global generators. Octave's rng(seed) leaves rande, randg and randp alone, and
%   every new Octave process starts them in a new state of its own, so a run that draws
%   from them is another run each time, interrupted or not. Here they get seeds of their own: rand's
%   seed would give them the same stream of bits as rand. The same in Octave by hand:
%     rng(seed); rande('state', [seed 1]); randg('state', [seed 2]); randp('state', [seed 3]);
%   Seeding also switches off the old generator that rand('seed', x) switches on.
  rng(seed, 'twister');
  if exist('OCTAVE_VERSION', 'builtin')
    rande('state', [seed, 1]);
    randg('state', [seed, 2]);
    randp('state', [seed, 3]);
  end
end

%!test
%! % two seedings give the same numbers from every generator, rande, randg and randp too
%! ckpt_seed_rng (5);
%! first = [rand(1, 2), randn(1, 2), randi(9, 1, 2), rande(1, 2), randg(2, 1, 2), randp(4, 1, 2)];
%! rande (1, 7); randg (3, 1, 7); randp (2, 1, 7);
%! ckpt_seed_rng (5);
%! again = [rand(1, 2), randn(1, 2), randi(9, 1, 2), rande(1, 2), randg(2, 1, 2), randp(4, 1, 2)];
%! assert (again, first);

%!test
%! % rng(seed) alone: randg goes on from where it was, so a new process would differ
%! rng (5); before = randg (2, 1, 3);
%! rng (5); assert (! isequal (randg (2, 1, 3), before));

%!test
%! % the old generator that rand('seed', x) switches on is switched off again
%! rand ('seed', 42);
%! ckpt_seed_rng (5);
%! expected = rand (1, 3);
%! rand ('seed', 42); rand (1, 9);
%! ckpt_seed_rng (5);
%! assert (rand (1, 3), expected);
