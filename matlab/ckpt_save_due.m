function kind = ckpt_save_due(step, every_steps, every_seconds, seconds_since_save)
%CKPT_SAVE_DUE  Which checkpoint is due now: 'step', 'time' or '' (none).
%   kind = ckpt_save_due(step, 500, 600, toc(last_save))
%   'step' every `every_steps` steps; 'time' when `every_seconds` have passed since the
%   last save (restart the timer with tic after each save), whichever comes first. Pass
%   Inf to turn either off. Timed saves bound the work lost when steps are slow or vary;
%   step saves give checkpoints at predictable steps.
  kind = '';
  if isfinite(every_steps) && step > 0 && mod(step, every_steps) == 0
    kind = 'step';
  elseif seconds_since_save >= every_seconds
    kind = 'time';
  end
end

%!test
%! assert (ckpt_save_due (500, 500, 600, 1), 'step');
%! assert (ckpt_save_due (501, 500, 600, 1), '');
%! assert (ckpt_save_due (501, 500, 600, 600), 'time');
%! assert (ckpt_save_due (500, 500, 600, 900), 'step');
%! assert (ckpt_save_due (0, 500, Inf, 0), '');
%! assert (ckpt_save_due (3, Inf, Inf, 1e9), '');
