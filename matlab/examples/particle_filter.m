% PARTICLE_FILTER  A bootstrap particle filter for the growth model of Gordon, Salmond and
% Smith (1993), run on observations it simulates first. Written the way such scripts
% usually are: loose variables, random draws before the loop, a for loop over the time
% steps, a results file at the end. It knows nothing of checkpoints.
%   octave-cli --eval particle_filter       or       matlab -batch particle_filter
% particle_filter_resumable.m is the same computation with the checkpointing kit added.

T = 400;                  % time steps
N = 100000;               % particles
process_var = 10;         % variance of the state noise
observation_var = 1;      % variance of the observation noise
rng(42);

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
for t = 1:T
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
  if mod(t, 25) == 0
    fprintf('step %d/%d  estimate %8.3f  true %8.3f\n', t, T, estimates(t), x_true(t));
  end
end

fid = fopen('particle_filter_result.txt', 'w');
fprintf(fid, 'log-likelihood %.17g\n', log_likelihood);
fprintf(fid, 'rmse %.17g\n', sqrt(mean((estimates - x_true).^2)));
fprintf(fid, '%.17g\n', estimates);
fclose(fid);
fprintf('finished: %d steps, results in particle_filter_result.txt\n', T);
