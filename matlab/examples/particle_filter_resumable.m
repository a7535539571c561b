function exit_code = particle_filter_resumable(folder, varargin)                % + checkpoint
% PARTICLE_FILTER_RESUMABLE  particle_filter.m with the kit: the lines it added or  % + checkpoint
% changed end in "% + checkpoint". A function, as job.sbatch runs it: returns 0 when  % + checkpoint
% finished, 75 when it saved and stopped because stop_file exists.              % + checkpoint
%   exit_code = particle_filter_resumable('checkpoints', 'stop_file', flag_file)  % + checkpoint
options = struct('stop_file', '', 'save_every_steps', 50);                      % + checkpoint
for k = 1:2:numel(varargin)                                                     % + checkpoint
  options.(validatestring(varargin{k}, fieldnames(options))) = varargin{k + 1};  % + checkpoint
end                                                                             % + checkpoint

T = 400;                  % time steps
N = 100000;               % particles
process_var = 10;         % variance of the state noise
observation_var = 1;      % variance of the observation noise
ckpt_seed_rng(42);        % rng(42) leaves Octave's randg & co. unseeded        % + checkpoint

% The hidden states and the observations, simulated from the model.
x_true = zeros(T, 1);
y = zeros(T, 1);
x = 0.1;
for t = 1:T
  x = x / 2 + 25 * x / (1 + x^2) + 8 * cos(1.2 * t) + sqrt(process_var) * randn();
  x_true(t) = x;
  y(t) = x^2 / 20 + sqrt(observation_var) * randn();
end

% The filter: particles drawn from the prior of the first state, then for each time
% step move them, weight them by the observation, estimate, resample.
particles = sqrt(5) * randn(N, 1);
estimates = zeros(T, 1);
log_likelihood = 0;
first_step = 1;                                                                 % + checkpoint
% Resume after every draw above: they rebuilt the same y, and then the restored  % + checkpoint
% generators go on from where the checkpoint left them.                         % + checkpoint
ckpt_remove_unfinished(folder);                                                 % + checkpoint
[checkpoint, info] = ckpt_load_latest(folder);                                  % + checkpoint
if ~isempty(checkpoint)                                                         % + checkpoint
  particles = checkpoint.particles;                                             % + checkpoint
  estimates = checkpoint.estimates;                                             % + checkpoint
  log_likelihood = checkpoint.log_likelihood;                                   % + checkpoint
  first_step = checkpoint.step + 1;                                             % + checkpoint
  ckpt_restore_rng_state(checkpoint.rng);                                       % + checkpoint
  ckpt_print('resumed from %s (step %d)\n', info.name, checkpoint.step);        % + checkpoint
end                                                                             % + checkpoint
for t = first_step:T                                                            % + checkpoint
  particles = particles / 2 + 25 * particles ./ (1 + particles.^2) + 8 * cos(1.2 * t) ...
              + sqrt(process_var) * randn(N, 1);
  log_weights = -(y(t) - particles.^2 / 20).^2 / (2 * observation_var);
  top = max(log_weights);
  weights = exp(log_weights - top);
  log_likelihood = log_likelihood + top + log(mean(weights)) - log(2 * pi * observation_var) / 2;
  weights = weights / sum(weights);
  estimates(t) = sum(weights .* particles);
  % systematic resampling: one uniform draw places all N pointers
  edges = cumsum([0; weights]);
  edges = edges / edges(end);   % exactly 1 at the end, whatever the rounding
  [~, chosen] = histc((rand() + (0:N - 1)') / N, edges);
  particles = particles(chosen);
  if mod(t, 25) == 0   % ckpt_print flushes: Octave holds back output to a file  % + checkpoint
    ckpt_print('step %d/%d  estimate %8.3f  true %8.3f\n', ...                  % + checkpoint
               t, T, estimates(t), x_true(t));                                  % + checkpoint
  end
  if ckpt_stop_requested(options.stop_file)   % job.sbatch got Slurm's signal   % + checkpoint
    saved = save_checkpoint(folder, t, 'preempt', ...                           % + checkpoint
                            particles, estimates, log_likelihood);              % + checkpoint
    ckpt_print('stop requested: saved %s at step %d, exiting 75\n', saved.name, t);  % + checkpoint
    exit_code = 75;                                                             % + checkpoint
    return;                                                                     % + checkpoint
  end                                                                           % + checkpoint
  if mod(t, options.save_every_steps) == 0 || t == T                            % + checkpoint
    save_checkpoint(folder, t, 'step', particles, estimates, log_likelihood);   % + checkpoint
  end                                                                           % + checkpoint
end

ckpt_write_text_atomic('particle_filter_result.txt', [ ...                      % + checkpoint
    sprintf('log-likelihood %.17g\n', log_likelihood), ...                      % + checkpoint
    sprintf('rmse %.17g\n', sqrt(mean((estimates - x_true).^2))), ...           % + checkpoint
    sprintf('%.17g\n', estimates)]);                                            % + checkpoint
fprintf('finished: %d steps, results in particle_filter_result.txt\n', T);
exit_code = 0;                                                                  % + checkpoint
end                                                                             % + checkpoint

function info = save_checkpoint(folder, step, kind, ...                         % + checkpoint
                                particles, estimates, log_likelihood)           % + checkpoint
% Everything the next step needs: the loop's variables and the generators' state.  % + checkpoint
checkpoint = struct('step', step, 'particles', particles, ...                   % + checkpoint
                    'estimates', estimates, 'log_likelihood', log_likelihood, ...  % + checkpoint
                    'rng', ckpt_rng_state());                                   % + checkpoint
info = ckpt_save(folder, checkpoint, step, kind);                               % + checkpoint
ckpt_rotate(folder, 3, 2, {info.name});                                         % + checkpoint
end                                                                             % + checkpoint
