function exit_code = example_simulation(folder, varargin)
%EXAMPLE_SIMULATION  A long Monte Carlo run that checkpoints, stops on request, resumes.
%   exit_code = example_simulation('checkpoints')
%   exit_code = example_simulation('checkpoints', 'steps', 20000, 'save_every_steps', 500)
%   From job.sbatch:  matlab -batch "exit(example_simulation('checkpoints', ...))"
%             or:     octave-cli --eval "exit(example_simulation('checkpoints', ...))"
%
%   What it computes: `walkers` independent random walks; for each, the first step at
%   which it moves `barrier` or further from 0 (a first-passage time). Every step draws
%   from the global RNG, so a resume that lost or repeated a single draw would end with
%   other numbers: the tests compare the result file byte for byte with an uninterrupted
%   run.
%
%   What it gives you, to copy into your own loop:
%     - resume from the newest valid checkpoint (damaged ones skipped), or start fresh
%     - a save every `save_every_steps` steps and every `save_every_seconds` seconds
%     - the RNG state in every checkpoint, restored on resume
%     - a stop at the end of the current step when the flag file `stop_file` appears
%       (job.sbatch creates it when Slurm signals the batch shell); the step is saved
%       as a 'preempt' checkpoint and the function returns 75
%     - rotation: the newest `keep` step/preempt and `keep_time` timed checkpoints stay
%
%   Files in the checkpoint folder:
%     step_00000400.mat        a checkpoint: the variable 'checkpoint' (MAT -v6)
%     step_00000400.mat.json   its completion marker: step, kind, size, sha256
%     time_00000457.mat(.json) saved by the timer (named by step, so names sort by progress)
%     preempt_00000412.mat(.json)  saved when a stop was requested
%     last.txt                 the name of the newest checkpoint
%     result.txt               the final result, written once the run has finished
%
%   What to change (marked CHANGE ME below): new_state (your initial state),
%   advance (one step of your computation), result_text (what you keep at the end), and
%   the options. Nothing else reads your fields: everything that a step changes must be
%   in `state`, and the loop itself uses state.step only.
%   The name of the file and of the function is yours too; job.sbatch runs any function
%   written as exit_code = f(folder, 'stop_file', stop_file, name, value, ...): set PROGRAM.
%
%   Returns 0 when finished, 75 when stopped on request (see ckpt_exit_codes).
  options = parse_options(folder, varargin{:});
  codes = ckpt_exit_codes();
  if exist('OCTAVE_VERSION', 'builtin')
    % Octave answers SIGTERM (Slurm's kill) by writing its workspace to 'octave-workspace'
    % in the current folder: useless here, and possibly large.
    crash_dumps_octave_core(false);
  end

  ckpt_remove_unfinished(options.folder);
  [checkpoint, info] = ckpt_load_latest(options.folder);
  if isempty(checkpoint)
    ckpt_seed_rng(options.seed);   % before the first draw; rande, randg, randp too
    state = new_state(options);
    ckpt_print('starting fresh: %d steps, seed %d\n', options.steps, options.seed);
  else
    state = checkpoint.state;
    ckpt_restore_rng_state(checkpoint.rng);
    ckpt_print('resumed from %s (step %d)\n', info.name, state.step);
  end

  last_saved_step = state.step;
  since_save = tic();
  while state.step < options.steps
    state = advance(state, options);
    if ckpt_stop_requested(options.stop_file)
      saved = save_checkpoint(state, options, 'preempt');
      ckpt_print('stop requested: saved %s at step %d, exiting %d\n', ...
                 saved.name, state.step, codes.preempted);
      exit_code = codes.preempted;
      return;
    end
    kind = ckpt_save_due(state.step, options.save_every_steps, ...
                         options.save_every_seconds, toc(since_save));
    if ~isempty(kind)
      save_checkpoint(state, options, kind);
      last_saved_step = state.step;
      since_save = tic();
    end
    if mod(state.step, options.log_every) == 0
      ckpt_print('step %d/%d\n', state.step, options.steps);   % names no field of yours
    end
    if options.step_seconds > 0
      pause(options.step_seconds);   % only to make the tests' signals land mid-run
    end
  end

  if last_saved_step < state.step
    save_checkpoint(state, options, 'step');   % a later resume finds the run finished
  end
  ckpt_write_text_atomic(options.result_file, result_text(state));
  ckpt_print('finished: %d steps, result in %s\n', state.step, options.result_file);
  exit_code = codes.finished;
end

% ----------------------------------------------------------------- the computation
function state = new_state(options)
  % CHANGE ME: everything your computation carries from one step to the next. Keep
  % state.step, the loop's count of the steps done.
  state.step = 0;
  state.position = zeros(options.walkers, 1);
  state.first_passage = zeros(options.walkers, 1);   % 0: has not crossed yet
end

function state = advance(state, options)
  % CHANGE ME: one step of your computation, state.step + 1 included. Draw random numbers
  % only from the global generators (rand, randn, randi, randperm; in Octave also rande,
  % randg, randp), whose states are in every checkpoint.
  state.step = state.step + 1;
  state.position = state.position + randn(options.walkers, 1);
  crossed_now = state.first_passage == 0 & abs(state.position) >= options.barrier;
  state.first_passage(crossed_now) = state.step;
end

function text = result_text(state)
  % CHANGE ME: what the run is for. %.17g prints every double exactly, so two results
  % are the same numbers exactly when the two files are the same bytes.
  crossed = state.first_passage(state.first_passage > 0);
  text = [sprintf('steps %d\n', state.step), ...
          sprintf('crossed %d of %d\n', numel(crossed), numel(state.first_passage)), ...
          sprintf('mean first-passage step %.17g\n', mean(crossed)), ...
          sprintf('mean squared position %.17g\n', mean(state.position .^ 2)), ...
          sprintf('%.17g\n', state.position)];
end

% ----------------------------------------------------------------- checkpointing
function info = save_checkpoint(state, options, kind)
  checkpoint = struct('step', state.step, 'state', state, 'rng', ckpt_rng_state());
  info = ckpt_save(options.folder, checkpoint, state.step, kind);
  ckpt_rotate(options.folder, options.keep, options.keep_time, {info.name});
end

function options = parse_options(folder, varargin)
  parser = inputParser();
  parser.FunctionName = 'example_simulation';
  parser.addParameter('steps', 2000);               % CHANGE ME: the length of the run
  parser.addParameter('walkers', 5000);
  parser.addParameter('barrier', 30);
  parser.addParameter('seed', 0);
  parser.addParameter('save_every_steps', 200);     % Inf: off
  parser.addParameter('save_every_seconds', 600);   % Inf: off
  parser.addParameter('keep', 3);
  parser.addParameter('keep_time', 2);
  parser.addParameter('log_every', 100);
  parser.addParameter('stop_file', getenv('CKPT_STOP_FILE'));   % job.sbatch passes 'stop_file'
  parser.addParameter('result_file', '');
  parser.addParameter('step_seconds', 0);
  parser.parse(varargin{:});
  options = parser.Results;
  options.folder = folder;
  if isempty(options.result_file)
    options.result_file = fullfile(folder, 'result.txt');
  end
end

%!test
%! % stopped twice on request and resumed: the same result, byte for byte
%! confirm_recursive_rmdir (false, 'local');
%! reference = tempname ();  interrupted = tempname ();  flag = tempname ();
%! args = {'steps', 300, 'walkers', 50, 'save_every_steps', 100, 'log_every', 1000};
%! evalc ('assert (example_simulation (reference, args{:}), 0);');
%! fclose (fopen (flag, 'w'));
%! evalc ('assert (example_simulation (interrupted, args{:}, ''stop_file'', flag), 75);');
%! evalc ('assert (example_simulation (interrupted, args{:}, ''stop_file'', flag), 75);');
%! delete (flag);
%! printed = evalc ('assert (example_simulation (interrupted, args{:}, ''stop_file'', flag), 0);');
%! assert (! isempty (strfind (printed, 'resumed from preempt_00000002.mat (step 2)')));
%! assert (fileread (fullfile (interrupted, 'result.txt')), fileread (fullfile (reference, 'result.txt')));
%! rmdir (reference, 's'); rmdir (interrupted, 's');

%!test
%! % a finished run that is started again only rewrites its result
%! confirm_recursive_rmdir (false, 'local');
%! folder = tempname ();
%! evalc ('example_simulation (folder, ''steps'', 30, ''walkers'', 5);');
%! printed = evalc ('assert (example_simulation (folder, ''steps'', 30, ''walkers'', 5), 0);');
%! assert (! isempty (strfind (printed, 'resumed from step_00000030.mat (step 30)')));
%! rmdir (folder, 's');

%!test
%! % timed saves only: named by step, rotated apart (keep_time 2)
%! confirm_recursive_rmdir (false, 'local');
%! folder = tempname ();
%! evalc ('example_simulation (folder, ''steps'', 6, ''walkers'', 5, ''save_every_steps'', Inf, ''save_every_seconds'', 0, ''keep_time'', 2);');
%! infos = ckpt_list (folder);
%! assert ({infos.name}, {'time_00000005.mat', 'time_00000006.mat'});
%! rmdir (folder, 's');
