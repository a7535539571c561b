function seeds = ckpt_legacy_rng()
%CKPT_LEGACY_RNG  Catch the old generators that rand('seed', x) and its kin switch on.
%   seeds = ckpt_legacy_rng()   % [] unless Octave's old generators draw the numbers
%   Old code seeds with rand('seed', 42), randn('seed', 42) or, in MATLAB, also
%   rand('state', 42). That switches rand and randn to old generators whose state rng()
%   does not hold: a resume that restores rng() draws other numbers, and nothing says so.
%   ckpt_rng_state calls this at every save; it warns once per process, in one line.
%
%   Octave: one flag switches rand, randn, rande, randg and randp to their old generators,
%   one each, and rng() says 'twister' whatever the flag. A draw shows it: the old
%   generator leaves rand('state') as it was. The draw is then taken back exactly, by
%   putting back the old generator's seed or the twister's state. seeds holds the five old
%   generators' seeds (rand('seed') and so on), which ckpt_restore_rng_state sets again:
%   that switches the old generators back on, and the resume is exact. (rand('state', x)
%   is the twister in Octave.)
%   MATLAB (not run here: MATLAB is not installed): the old syntaxes put the global stream
%   in legacy mode, and rng() then reports Type 'Legacy'. The kit only warns there.
  persistent warned
  seeds = [];
  if exist('OCTAVE_VERSION', 'builtin')
    seed = rand('seed');
    twister = rand('state');
    rand();
    if ~isequal(rand('state'), twister)
      rand('state', twister);
      return;
    end
    rand('seed', seed);
    seeds = struct('rand', seed, 'randn', randn('seed'), 'rande', rande('seed'), ...
                   'randg', randg('seed'), 'randp', randp('seed'));
    advice = 'their seeds are saved and restored, but seed with ckpt_seed_rng(x) or rng(x)';
  else
    settings = rng();
    if ~strcmpi(settings.Type, 'legacy')
      return;
    end
    advice = 'a resume may draw other numbers: seed with rng(x)';
  end
  if isempty(warned)
    warned = true;
    backtrace = warning('query', 'backtrace');
    warning('off', 'backtrace');   % one line, without the "called from" lines
    warning('ckpt:legacyRng', ['ckpt_rng_state: rand and randn draw from the old ' ...
            'generators that rand(''seed'', x) and its kin switch on; %s'], advice);
    warning(backtrace.state, 'backtrace');
  end
end

%!test
%! % the twister: no seed, no warning, and the next numbers are the ones before the check
%! rng (3);
%! expected = rand (1, 3);
%! rng (3);
%! lastwarn ('');
%! assert (isempty (ckpt_legacy_rng ()));
%! assert (rand (1, 3), expected);
%! assert (lastwarn (), '');

%!test
%! % the old generators: their seeds, and again the next numbers are the ones before the check
%! rand ('seed', 42); randn ('seed', 43);
%! expected = [rand(1, 3), randn(1, 3)];
%! rand ('seed', 42); randn ('seed', 43);
%! seeds = ckpt_legacy_rng ();
%! assert (fieldnames (seeds), {'rand'; 'randn'; 'rande'; 'randg'; 'randp'});
%! assert ([rand(1, 3), randn(1, 3)], expected);
%! rng (0);

%!test
%! % ckpt_rng_state keeps the seeds: the old generators' numbers go on after a restore
%! rand ('seed', 42);
%! randn (1, 5); randg (2, 1, 3);
%! evalc ('state = ckpt_rng_state ();');
%! assert (isfield (state.octave_extra, 'legacy_seeds'));
%! expected = [rand(1, 3), randn(1, 3), rande(1, 2), randg(2, 1, 2), randp(3, 1, 2)];
%! rng (1); rand (1, 7); randg (2, 1, 4);
%! ckpt_restore_rng_state (state);
%! assert ([rand(1, 3), randn(1, 3), rande(1, 2), randg(2, 1, 2), randp(3, 1, 2)], expected);
%! rng (0);
